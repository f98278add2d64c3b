"""Select a dataset before training: sample, score, rank, write JSONL and a datasets.Dataset.

Run: ``python examples/tutorials/select_dataset.py [OUT_DIR]`` (seconds on a CPU). The tiny
random model stands in for the model you will train: the ranking is only as good as the model that
samples and differentiates, so use the real one (the "Does it work?" page shows it on SmolLM2).
"""

import argparse

# --8<-- [start:imports]
import json
import tempfile
from pathlib import Path

import torch

import gradalign as ga
from gradalign.policies import Chain, DropZeroVariance, TopFraction
from gradalign.testing import tiny_model, tiny_tokenizer

# --8<-- [end:imports]
# --8<-- [start:data]
tok, model = tiny_tokenizer(), tiny_model()  # the model you will train, and its tokenizer
tok.padding_side = "left"  # generate continues every prompt from its last token
out_dir = Path(tempfile.mkdtemp())  # where the ranked pool is written
pool = [{"id": i, "prompt": f"{i % 7}+{i % 5}="} for i in range(24)]  # your candidate problems
trusted = [{"id": -1 - i, "prompt": f"{i}*2="} for i in range(4)]  # a small trusted set
k = 8  # completions per problem


def reward(problem: dict, completion: str) -> float:
    """Your verifier; here a format reward (a random tiny model rarely adds right)."""
    return float(any(c.isdigit() for c in completion))


def sample(problems: list[dict]) -> ga.Rollouts:
    """k completions per problem, rewarded; the problem ids become the group ids."""
    messages = [[{"role": "user", "content": p["prompt"]}] for p in problems]
    texts = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(
        **batch, do_sample=True, num_return_sequences=k, max_new_tokens=4, pad_token_id=0
    )
    completions = tok.batch_decode(out[:, batch.input_ids.shape[1] :], skip_special_tokens=True)
    rows = [p for p in problems for _ in range(k)]
    return ga.Rollouts.from_generate(
        batch.input_ids,
        out,
        [reward(p, c) for p, c in zip(rows, completions, strict=True)],
        [p["id"] for p in rows],
        pad_token_id=0,
        eos_token_id=tok.eos_token_id,
        prompt_mask=batch.attention_mask,
    )


# --8<-- [end:data]

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("out_dir", nargs="?", type=Path, help="write ranked.jsonl here")
if (given := parser.parse_args().out_dir) is not None:
    out_dir = given


# --8<-- [start:score]
torch.manual_seed(0)
selector = ga.GradAlign(ga.FactorizedGradient(16, 16))
target, _ = selector.targets(model, sample(trusted))  # (1, D): computed once, reused per chunk
tables = []
for start in range(0, len(pool), 8):  # a pool of any size, a chunk of problems at a time
    chunk = sample(pool[start : start + 8])
    grads = selector.extractor.per_group(model, chunk)  # (G, D) GroupGradients
    table = ga.Candidates.from_rollouts(chunk)
    tables.append((table, ga.cosine(grads.grads, target[0])))  # one score per problem
ids = torch.cat([t.ids for t, _ in tables])
table = ga.Candidates(
    ids=ids,
    scores=torch.cat([s for _, s in tables]),
    accuracy=torch.cat([t.accuracy for t, _ in tables]),
    reward_std=torch.cat([t.reward_std for t, _ in tables]),
)
keep = Chain(DropZeroVariance(), TopFraction(0.25))(table)  # the best quarter that has signal
# --8<-- [end:score]

# --8<-- [start:write]
out_dir.mkdir(parents=True, exist_ok=True)
order = torch.argsort(table.scores, descending=True, stable=True)
kept = set(keep.tolist())
by_id = {p["id"]: p for p in pool}
rows = [
    {
        **by_id[int(table.ids[i])],
        "score": round(float(table.scores[i]), 4),
        "pass_rate": float(table.accuracy[i]),
        "rank": rank,
        "selected": int(table.ids[i]) in kept,
    }
    for rank, i in enumerate(order.tolist())
]
path = out_dir / "ranked.jsonl"
path.write_text("".join(json.dumps(r) + "\n" for r in rows))
print(f"wrote {len(rows)} ranked problems to {path}; {len(kept)} selected")
print("top 3:", [(r["prompt"], r["score"]) for r in rows[:3]])

try:
    import datasets  # pip install datasets (part of gradalign[trl])
except ImportError:
    print("datasets is not installed; the JSONL file is the result")
else:
    ds = datasets.Dataset.from_list([r for r in rows if r["selected"]])  # ready for a trainer
    print(f"datasets.Dataset with {ds.num_rows} rows: {ds.column_names}")
# --8<-- [end:write]
