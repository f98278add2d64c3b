"""Choosing an extractor: how close each one's scores come to the exact gradient's, and its cost.

Run: ``python examples/tutorials/choose_extractor.py [--plot PNG]`` (about a minute on a CPU).
Exactness is measured here on a tiny model; speed and memory on real models are in the table of the
"Performance" page (``make bench``). The page shows every section after the ``imports`` one, so
each block can be pasted on its own.
"""

import argparse

# --8<-- [start:imports]
import time

import torch

import gradalign as ga
from gradalign.testing import tiny_model

# --8<-- [end:imports]
parser = argparse.ArgumentParser()
parser.add_argument("--plot", help="write the exact-vs-approximate scatter plot to this PNG")
args = parser.parse_args()

# --8<-- [start:setup]
model = tiny_model("qwen2", hidden_size=64, seed=0)
gen = torch.Generator().manual_seed(0)
groups, k = 24, 4


def random_rollouts(ids: list[int]) -> ga.Rollouts:
    """k rollouts per problem with random tokens and 0/1 rewards (the spread is what matters)."""
    prompts = {i: torch.randint(2, 100, (6,), generator=gen).tolist() for i in ids}
    rows = [i for i in ids for _ in range(k)]
    return ga.Rollouts.from_token_ids(
        [prompts[i] for i in rows],
        [[*torch.randint(2, 100, (8,), generator=gen).tolist(), 1] for _ in rows],
        [float(j % 2) for j in range(len(rows))],  # two right, two wrong per problem
        rows,
    )


candidates, validation = random_rollouts(list(range(groups))), random_rollouts([-1, -2, -3])
exact = ga.GradAlign(ga.FullGradient()).alignment(model, candidates, validation).cosine
# --8<-- [end:setup]

# --8<-- [start:compare]
extractors = {
    "FactorizedGradient(8, 8)": ga.FactorizedGradient(8, 8),
    "FactorizedGradient(32, 32)": ga.FactorizedGradient(32, 32),
    "RandomProjectedGradient(1024)": ga.RandomProjectedGradient(dim=1024),
    "RandomProjectedGradient(8192)": ga.RandomProjectedGradient(dim=8192),
    "FullGradient (exact)": ga.FullGradient(),
}
print(f"{'extractor':<31} {'dim':>7} {'corr. with exact':>17} {'top-6 shared':>13} {'seconds':>8}")
results = {}
for name, extractor in extractors.items():
    start = time.perf_counter()
    al = ga.GradAlign(extractor).alignment(model, candidates, validation)
    seconds = time.perf_counter() - start
    corr = torch.corrcoef(torch.stack([al.cosine, exact]))[0, 1].item()
    shared = len(set(al.cosine.topk(6).indices.tolist()) & set(exact.topk(6).indices.tolist()))
    results[name] = al.cosine
    dim = extractor.per_group(model, validation).dim
    print(f"{name:<31} {dim:>7} {corr:>17.3f} {shared:>11}/6 {seconds:>8.2f}")
# --8<-- [end:compare]

if args.plot:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(13, 3.4), sharex=True, sharey=True)
    for ax, name in zip(axes, list(results)[:4], strict=True):
        ax.scatter(exact, results[name], s=14)
        ax.axline((0, 0), slope=1, color="grey", lw=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("exact cosine")
    axes[0].set_ylabel("approximate cosine")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print(f"wrote {args.plot}")
