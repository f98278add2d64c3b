"""Online GradAlign in a plain PyTorch GRPO loop, on a pool where half the rewards are noise.

The task is small enough to learn on a CPU in a minute. A problem is three letters and ``=``
(``"cab="``); the verifier gives reward 1 to a completion whose first character is the prompt's
first letter (``"c"``), else 0. Half of the training pool has *corrupted* rewards: seeded coin flips
that ignore the completion, the unreliable-reward regime of the GradAlign paper. A small trusted
validation set with clean rewards gives GradAlign its target gradient.

Each round the `gradalign.Curriculum` hands out a chunk of candidate problems, the current
policy samples ``k`` rollouts per candidate, the verifier scores them, a policy keeps half of the
chunk, and ``T`` GRPO steps train on the kept problems. Three selection rules run the same loop
from the same starting model:

- GradAlign: cosine between each candidate's GRPO gradient and the validation gradient, top k;
- AccGreedy: pass rate closest to 0.5 (no gradients);
- Random: k candidates uniformly at random.

The table reports, after every round, the expected reward on held-out clean problems: the policy's
probability of starting its answer with the right letter, which is the mean reward of sampling at
temperature 1, computed exactly rather than estimated from samples.

The starting model is a random `gradalign.testing.tiny_model` given a short supervised
warm-up on words outside every split, with labels that are right only 20% of the time (random
letters otherwise): it knows the answer format and a little of the rule, so its pass rate starts
near 0.25, where GRPO groups have the mixed rewards they need. That stands in for a pretrained LLM.

Run::

    python examples/online_loop.py                # seeds 0-4, about 3 minutes on one CPU core
    python examples/online_loop.py --seeds 7      # one seed, about 40 s
    python examples/online_loop.py --quick        # one seed, a few rounds: a smoke test

With several seeds it ends with the mean ± sd over seeds of the final held-out reward, of the area
under the reward curve (the mean over rounds 0..R) and of the corrupted share of the selections.
Each seed draws its own problems, corruption, starting model and rollouts.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

import gradalign as ga
from gradalign.extractors import GradientExtractor, response_logprobs
from gradalign.policies import AccGreedy, Random, TopK
from gradalign.testing import tiny_model, tiny_tokenizer

ALPHABET = "abcdef"
WORD_LENGTH = 3
MAX_NEW_TOKENS = 4
METHODS = ("GradAlign", "AccGreedy", "Random")


@dataclass(frozen=True)
class Config:
    """Settings of one experiment; every method runs with the same ones.

    ``target_modules="model"`` scores with the gradient of the decoder body (embeddings and
    blocks) but not of the output head: in a model this small, the head's gradient is mostly
    "raise this problem's answer letter", which differs between problems and drowns the shared
    copy circuit that validation and clean candidates have in common.
    """

    rounds: int = 12
    steps_per_round: int = 8
    seed: int = 0
    pool_size: int = 48
    corrupted_fraction: float = 0.5
    chunk_size: int = 16
    keep: int = 8
    rollouts: int = 16
    num_validation: int = 16
    num_test: int = 64
    lr: float = 1e-3
    warmup_steps: int = 150
    warmup_correct: float = 0.2
    projection_dim: int = 0
    target_modules: str | None = "model"


@dataclass(frozen=True)
class Split:
    """Problems with one role (pool, validation, test).

    Attributes:
        prompts: (P, L) prompt token ids; every prompt has the same length L.
        answers: (P,) token id of the correct first completion token.
        corrupted: (P,) True where the verifier's reward is a coin flip.
    """

    prompts: torch.Tensor
    answers: torch.Tensor
    corrupted: torch.Tensor


@dataclass(frozen=True)
class Task:
    """The three splits, the warm-up words and the special token ids."""

    pool: Split
    validation: Split
    test: Split
    warmup: torch.Tensor  # (W, L) prompts of the warm-up, disjoint from every split
    letter_ids: torch.Tensor  # (A,)
    eos_id: int
    pad_id: int


@dataclass(frozen=True)
class Streams:
    """The two local random streams of a run: rollout sampling and corrupted rewards."""

    sampling: torch.Generator
    noise: torch.Generator


@dataclass(frozen=True)
class RunResult:
    """Held-out reward before training and after each round, and what was selected."""

    rewards: list[float]
    corrupted_share: float
    seconds: float


def make_task(cfg: Config) -> Task:
    """Draw disjoint pool, validation, test and warm-up words and the corrupted half of the pool."""
    tokenizer = tiny_tokenizer()
    gen = torch.Generator().manual_seed(cfg.seed)
    words = ["".join(w) + "=" for w in itertools.product(ALPHABET, repeat=WORD_LENGTH)]
    words = [words[i] for i in torch.randperm(len(words), generator=gen).tolist()]
    sizes = [cfg.pool_size, cfg.num_validation, cfg.num_test]
    if sum(sizes) >= len(words):
        raise ValueError(f"needs fewer than {len(words)} problems in all, got {sum(sizes)}")
    # The char tokenizer adds no special tokens: one id per character, so ids[:, 0] is the answer.
    ids = torch.tensor([tokenizer(w).input_ids for w in words])  # (W, L)
    pool, val, test, warmup = torch.split(ids, [*sizes, len(words) - sum(sizes)])
    corrupted = torch.zeros(cfg.pool_size, dtype=torch.bool)
    n_bad = round(cfg.corrupted_fraction * cfg.pool_size)
    corrupted[torch.randperm(cfg.pool_size, generator=gen)[:n_bad]] = True

    def split(prompts: torch.Tensor, bad: torch.Tensor | None = None) -> Split:
        clean = torch.zeros(len(prompts), dtype=torch.bool)
        return Split(prompts, prompts[:, 0], clean if bad is None else bad)

    return Task(
        pool=split(pool, corrupted),
        validation=split(val),
        test=split(test),
        warmup=warmup,
        letter_ids=torch.tensor(tokenizer.convert_tokens_to_ids(list(ALPHABET))),
        eos_id=int(tokenizer.eos_token_id),
        pad_id=int(tokenizer.pad_token_id),
    )


@torch.no_grad()
def sample(
    model: nn.Module, prompts: torch.Tensor, k: int, eos_id: int, generator: torch.Generator
) -> list[list[int]]:
    """k completions per prompt, sampled at temperature 1 from a local generator.

    Completions are at most a few tokens long, so each step re-runs the whole sequence instead of
    keeping a KV cache. Rows that already emitted EOS keep sampling; their tail is cut off after.

    Args:
        model: the policy.
        prompts: (P, L) equal-length prompts.
        k: rollouts per prompt.
        eos_id: the token that ends a completion (kept in it).
        generator: the source of randomness.

    Returns:
        (P * k,) completions as token-id lists, the k rollouts of a prompt adjacent.
    """
    ids = prompts.repeat_interleave(k, dim=0)  # (P * k, L)
    for _ in range(MAX_NEW_TOKENS):
        logits = model(input_ids=ids).logits[:, -1].float()  # (P * k, V)
        nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)  # (P * k, 1)
        ids = torch.cat([ids, nxt], dim=1)  # (P * k, L + t)
    rows = ids[:, prompts.shape[1] :].tolist()
    return [row[: row.index(eos_id) + 1] if eos_id in row else row for row in rows]


def collect(
    model: nn.Module,
    task: Task,
    split: Split,
    ids: Sequence[int],
    k: int,
    streams: Streams,
    group_ids: Sequence[int] | None = None,
) -> ga.Rollouts:
    """Sample and reward k rollouts of each problem ``split[ids]``.

    The group ids are ``group_ids`` if given, else ``ids``: validation problems get ids of their
    own, so that no validation group shares an id with a pool problem.
    """
    rows = torch.tensor(list(ids))
    completions = sample(model, split.prompts[rows], k, task.eos_id, streams.sampling)
    first = torch.tensor([c[0] for c in completions])  # (S,)
    correct = (first == split.answers[rows].repeat_interleave(k)).float()  # (S,)
    # Drawn for every row, so the noise stream advances the same way whatever is corrupted.
    flips = torch.randint(0, 2, (len(first),), generator=streams.noise).float()  # (S,)
    rewards = torch.where(split.corrupted[rows].repeat_interleave(k), flips, correct)
    return ga.Rollouts.from_token_ids(
        split.prompts[rows].repeat_interleave(k, dim=0).tolist(),
        completions,
        rewards,
        torch.tensor(list(ids if group_ids is None else group_ids)).repeat_interleave(k),
        pad_token_id=task.pad_id,
    )


def grpo_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, rollouts: ga.Rollouts, obj: ga.GRPOObjective
) -> None:
    """One on-policy GRPO update: loss = -sum w * log pi, w from group-relative advantages."""
    model.train()
    weights = obj.token_weights(rollouts)  # (S, T)
    logp = response_logprobs(
        model, rollouts.input_ids, rollouts.attention_mask, rollouts.response_mask
    )  # (S, T)
    loss = -(weights * logp).sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    model.eval()  # rollouts are sampled in eval mode


@torch.no_grad()
def expected_reward(model: nn.Module, split: Split) -> float:
    """Mean probability of a correct first token: the exact mean reward at temperature 1."""
    logits = model(input_ids=split.prompts).logits[:, -1].float()  # (P, V)
    probs = torch.softmax(logits, -1)  # (P, V)
    return probs.gather(1, split.answers[:, None]).mean().item()


def warm_up(model: nn.Module, task: Task, cfg: Config) -> None:
    """Supervised warm-up: answers are the right letter with probability ``warmup_correct``.

    Otherwise they are a random letter, so the model learns the format (a letter, then EOS) and
    only a little of the rule.
    """
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    words, batch = task.warmup, 64
    eos = torch.full((batch, 1), task.eos_id)
    model.train()
    for _ in range(cfg.warmup_steps):
        prompts = words[torch.randint(0, len(words), (batch,), generator=gen)]  # (B, L)
        noise = task.letter_ids[torch.randint(0, len(ALPHABET), (batch,), generator=gen)]  # (B,)
        right = torch.rand(batch, generator=gen) < cfg.warmup_correct
        answer = torch.where(right, prompts[:, 0], noise)  # (B,)
        ids = torch.cat([prompts, answer[:, None], eos], dim=1)  # (B, L + 2)
        labels = ids.clone()
        labels[:, : prompts.shape[1]] = -100  # learn the answer, not the prompt
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()


def select(
    method: str,
    model: nn.Module,
    cfg: Config,
    round_: int,
    candidates: ga.Rollouts,
    validation: ga.Rollouts,
    obj: ga.GRPOObjective,
) -> ga.Selection:
    """One round's selection; the baselines read only pass rates, so they skip the gradients."""
    if method == "GradAlign" and bool((validation.group_reward_spread() > 0).any()):
        extractor: GradientExtractor = (
            ga.RandomProjectedGradient(
                dim=cfg.projection_dim, seed=cfg.seed, target_modules=cfg.target_modules
            )
            if cfg.projection_dim
            else ga.FullGradient(target_modules=cfg.target_modules)
        )
        selector = ga.GradAlign(extractor, objective=obj, scorer="cosine", policy=TopK(cfg.keep))
        return selector.select(model, candidates, validation)
    table = ga.Candidates.from_rollouts(candidates)
    if method == "AccGreedy":
        ids = AccGreedy(cfg.keep)(table)
    else:
        # Random, and GradAlign's fallback in the round where every validation group is all right
        # or all wrong: its target gradient is then zero and GradAlign.select would raise.
        ids = Random(cfg.keep, seed=cfg.seed * 10_000 + round_)(table)
    return ga.Selection(ids=ids, scores=None, candidates=table)


def run(method: str, base: nn.Module, task: Task, cfg: Config) -> RunResult:
    """Train a copy of ``base`` with one selection method and report the held-out reward."""
    start = time.perf_counter()
    model = copy.deepcopy(base)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    obj = ga.GRPOObjective()
    cur = ga.Curriculum(pool_size=cfg.pool_size, chunk_size=cfg.chunk_size, seed=cfg.seed)
    streams = Streams(
        sampling=torch.Generator().manual_seed(cfg.seed + 2),
        noise=torch.Generator().manual_seed(cfg.seed + 3),
    )
    val_ids = range(len(task.validation.prompts))
    val_groups = [-1 - i for i in val_ids]  # ids no pool problem has
    rewards = [expected_reward(model, task.test)]
    chosen_all: list[int] = []
    for round_ in range(cfg.rounds):
        chunk = cur.next_chunk().tolist()
        candidates = collect(model, task, task.pool, chunk, cfg.rollouts, streams)
        validation = collect(
            model, task, task.validation, val_ids, cfg.rollouts, streams, val_groups
        )
        selection = select(method, model, cfg, round_, candidates, validation, obj)
        cur.record(selection)
        chosen = selection.ids.tolist()
        chosen_all += chosen
        for _ in range(cfg.steps_per_round):
            batch = collect(model, task, task.pool, chosen, cfg.rollouts, streams)
            grpo_step(model, optimizer, batch, obj)
        rewards.append(expected_reward(model, task.test))
    share = task.pool.corrupted[chosen_all].float().mean().item() if chosen_all else 0.0
    return RunResult(rewards, share, time.perf_counter() - start)


def format_table(results: dict[str, RunResult], cfg: Config) -> str:
    """Held-out reward per round, one column per method, then corrupted share and run time."""
    names = list(results)
    lines = [
        f"expected reward on {cfg.num_test} held-out clean problems "
        f"({cfg.steps_per_round} GRPO steps per round, seed {cfg.seed})",
        "round  " + "  ".join(f"{m:>10}" for m in names),
    ]
    for r in range(cfg.rounds + 1):
        lines.append(f"{r:>5}  " + "  ".join(f"{results[m].rewards[r]:>10.3f}" for m in names))
    lines.append("corrupted share of selections")
    lines.append("       " + "  ".join(f"{results[m].corrupted_share:>10.0%}" for m in names))
    lines.append("seconds" + "  ".join(f"{results[m].seconds:>10.1f}" for m in names))
    return "\n".join(lines)


def _mean_sd(values: Sequence[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


def format_summary(per_seed: dict[int, dict[str, RunResult]]) -> str:
    """Mean ± sd over seeds of the final reward, the area under the curve and the corrupted share."""
    seeds = sorted(per_seed)
    lines = [
        f"summary over seeds {', '.join(map(str, seeds))} (mean ± sd)",
        f"{'method':<10}  {'final reward':>15}  {'area under curve':>16}  {'corrupted share':>15}",
    ]
    for m in METHODS:
        runs = [per_seed[s][m] for s in seeds]
        final = _mean_sd([r.rewards[-1] for r in runs])
        area = _mean_sd([statistics.fmean(r.rewards) for r in runs])
        share = _mean_sd([r.corrupted_share for r in runs])
        lines.append(f"{m:<10}  {final:>15}  {area:>16}  {share:>15}")
    return "\n".join(lines)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _seeds(text: str) -> list[int]:
    """``"0-4"``, ``"3"`` or ``"0,2,5"``."""
    out: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.partition("-")
        out += range(int(lo), int(hi) + 1) if sep else [int(lo)]
    if not out:
        raise argparse.ArgumentTypeError(f"no seed in {text!r}")
    return out


def parse_args(argv: Sequence[str] | None) -> tuple[Config, list[int]]:
    """The experiment's `Config` and its seeds from the command line."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--rounds", type=_positive, help="selection rounds (default 12; 3 with --quick)"
    )
    parser.add_argument(
        "--steps-per-round",
        type=_positive,
        help="GRPO steps T per round (default 8; 4 with --quick)",
    )
    parser.add_argument(
        "--seeds", type=_seeds, help="seeds to run: 0-4 (default), 3 or 0,2,5 (--quick: 0)"
    )
    parser.add_argument("--quick", action="store_true", help="a few short rounds: a smoke test")
    parser.add_argument(
        "--projection-dim",
        type=int,
        default=0,
        help="score with RandomProjectedGradient of this dimension (default 0: FullGradient)",
    )
    args = parser.parse_args(argv)
    cfg = Config(rounds=3, steps_per_round=4) if args.quick else Config()
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2, 3, 4])
    cfg = replace(
        cfg,
        rounds=args.rounds or cfg.rounds,
        steps_per_round=args.steps_per_round or cfg.steps_per_round,
        projection_dim=args.projection_dim,
    )
    return cfg, seeds


def run_seed(cfg: Config) -> dict[str, RunResult]:
    """The three methods from one warmed-up model, on the problems of ``cfg.seed``."""
    task = make_task(cfg)
    base = tiny_model("qwen2", seed=cfg.seed)
    warm_up(base, task, cfg)
    return {method: run(method, base, task, cfg) for method in METHODS}


def main(argv: Sequence[str] | None = None) -> dict[int, dict[str, RunResult]]:
    """Run every seed, print its table, then the summary over seeds."""
    cfg, seeds = parse_args(argv)
    # A model this small runs fastest on one thread; more only add synchronisation.
    torch.set_num_threads(1)
    per_seed = {}
    for seed in seeds:
        per_seed[seed] = run_seed(replace(cfg, seed=seed))
        print(format_table(per_seed[seed], replace(cfg, seed=seed)), end="\n\n", flush=True)
    print(format_summary(per_seed))
    return per_seed


if __name__ == "__main__":
    main()
