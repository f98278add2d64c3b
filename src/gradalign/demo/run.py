"""The demo pipeline: sample, verify, corrupt half the pool, score with GradAlign, report.

It reproduces the paper's unreliable-reward experiment in miniature. Half the candidate problems
get random 0/1 rewards instead of verified ones; GradAlign scores every problem by how well its
GRPO gradient aligns with the gradient of trusted validation rollouts. The demo reports how many
corrupted problems each selection method keeps and how well each score separates clean from
corrupted problems (AUROC).

Implementations: :class:`DemoConfig` (settings), :class:`DemoResult` (numbers, table, PNG path)
and :func:`run_demo` (the pipeline).
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import gradalign as ga
from gradalign.demo.models import load_smollm2, load_tiny
from gradalign.demo.problems import Problem, format_reward, make_problems, verify
from gradalign.demo.report import TableRow, auroc, corrupted_share, format_table, plot_histograms
from gradalign.demo.sampling import render_prompts, sample_completions
from gradalign.errors import GradAlignError

__all__ = ["DemoConfig", "DemoResult", "run_demo"]

PNG_NAME = "gradalign_scores.png"


@dataclass
class DemoConfig:
    """Settings of :func:`run_demo`; the defaults fit SmolLM2-135M in under 5 minutes on 2 cores.

    Args:
        tiny: Use the random tiny model of :mod:`gradalign.testing` and a format-only reward.
        pool: Candidate problems (half of them get corrupted rewards).
        rollouts: Rollouts per problem (pool and validation).
        val: Clean validation problems.
        seed: Seed of problems, sampling, corruption and the Random baseline.
        select_fraction: Fraction of the pool each method selects.
        corrupt_fraction: Fraction of the pool whose rewards are replaced by random 0/1.
        max_new_tokens: Length cap of a completion.
        temperature: Sampling temperature.
        out_dir: Folder of the PNG.
        cache_dir: Model cache root; None uses ``$GRADALIGN_CACHE`` or ``~/.cache/gradalign``.
        grad_batch_size: Sequences per forward/backward of the gradient pass.
        gen_batch_size: Sequences per ``generate`` call.
        progress: Show tqdm bars.
    """

    tiny: bool = False
    pool: int = 32
    rollouts: int = 4
    val: int = 16
    seed: int = 0
    select_fraction: float = 0.25
    corrupt_fraction: float = 0.5
    max_new_tokens: int = 40
    temperature: float = 0.7
    out_dir: Path = Path("demo_out")
    cache_dir: Path | None = None
    grad_batch_size: int = 8
    gen_batch_size: int = 32
    progress: bool = False

    def __post_init__(self) -> None:
        for name in ("pool", "rollouts", "val", "max_new_tokens", "grad_batch_size"):
            if getattr(self, name) < 1:
                raise GradAlignError(f"DemoConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.gen_batch_size < 1 or self.seed < 0:
            raise GradAlignError(
                f"DemoConfig: gen_batch_size must be >= 1 and seed >= 0, got "
                f"{self.gen_batch_size} and {self.seed}"
            )
        if not 0 < self.select_fraction <= 1:
            raise GradAlignError(
                f"DemoConfig: select_fraction must be in (0, 1], got {self.select_fraction}"
            )
        n_bad = round(self.pool * self.corrupt_fraction)
        if not 1 <= n_bad <= self.pool - 1:
            raise GradAlignError(
                "DemoConfig: pool * corrupt_fraction must leave at least one clean and one "
                f"corrupted problem, got pool={self.pool}, corrupt_fraction={self.corrupt_fraction}"
            )
        if self.temperature <= 0:
            raise GradAlignError(f"DemoConfig: temperature must be > 0, got {self.temperature}")
        self.out_dir = Path(self.out_dir)
        self.cache_dir = None if self.cache_dir is None else Path(self.cache_dir)

    @classmethod
    def tiny_defaults(cls, **overrides: Any) -> DemoConfig:
        """A config for the tiny model that runs in seconds; ``overrides`` replace fields."""
        base: dict[str, Any] = {"pool": 16, "rollouts": 4, "val": 4, "max_new_tokens": 8}
        return cls(**{**base, **overrides, "tiny": True})


@dataclass(frozen=True)
class DemoResult:
    """What :func:`run_demo` measured.

    Attributes:
        config: The settings used.
        rows: The pool ranked by cosine score.
        num_selected: Problems each method selects.
        selections: Method name -> selected problem ids in rank order.
        shares: Method name -> share of corrupted problems in its selection.
        pool_share: Share of corrupted problems in the whole pool (a blind selector's expectation).
        aurocs: Score name -> clean-vs-corrupted AUROC (clean is the positive class).
        png_path: The histogram PNG.
        timings: Stage name -> seconds.
        stats: Summary counts: mean verified accuracy, zero-spread groups, sequence lengths.
    """

    config: DemoConfig
    rows: list[TableRow]
    num_selected: int
    selections: dict[str, list[int]]
    shares: dict[str, float]
    pool_share: float
    aurocs: dict[str, float]
    png_path: Path
    timings: dict[str, float] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)

    def report(self) -> str:
        """The printed report: table, selection shares, AUROCs, timings."""
        c = self.config
        lines = [format_table(self.rows), ""]
        lines.append(
            f"Selection: top {c.select_fraction:.0%} of {c.pool} problems = {self.num_selected} "
            f"per method; corrupted share of the pool = {self.pool_share:.2f}"
        )
        lines += [
            f"  {name:<24} corrupted share {v:.2f}   ids {self.selections[name]}"
            for name, v in self.shares.items()
        ]
        lines.append("AUROC, clean (positive) vs corrupted (0.5 = chance):")
        lines += [f"  {name:<24} {v:.3f}" for name, v in self.aurocs.items()]
        lines.append("Stats: " + ", ".join(f"{k} {v:.3g}" for k, v in self.stats.items()))
        lines.append("Time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in self.timings.items()))
        lines.append(f"Histogram: {self.png_path}")
        return "\n".join(lines)


@dataclass
class _Sampled:
    """Rollouts of a problem set before corruption: (S,) rows, k per problem, problem-major."""

    problems: list[Problem]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    rewards: list[float]
    group_ids: list[int]


def _sample(
    model: Any,
    tokenizer: Any,
    problems: list[Problem],
    config: DemoConfig,
    *,
    seed: int,
    desc: str,
) -> _Sampled:
    """Sample ``config.rollouts`` completions per problem and reward them."""
    k = config.rollouts
    prompts = [
        p for p in render_prompts(tokenizer, [q.question for q in problems]) for _ in range(k)
    ]
    completions = sample_completions(
        model,
        prompts,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        seed=seed,
        batch_size=config.gen_batch_size,
        progress=config.progress,
        desc=desc,
    )
    reward_fn = format_reward if config.tiny else verify
    problem_of = [q for q in problems for _ in range(k)]
    rewards = [
        reward_fn(tokenizer.decode(c, skip_special_tokens=True), q.answer)
        for c, q in zip(completions, problem_of, strict=True)
    ]
    return _Sampled(problems, prompts, completions, rewards, [q.id for q in problem_of])


def _corrupt(sampled: _Sampled, config: DemoConfig) -> tuple[list[float], set[int]]:
    """Replace the rewards of a seeded random subset of problems by fair coin flips."""
    rng = random.Random(config.seed + 2)
    ids = sorted(set(sampled.group_ids))
    bad = set(rng.sample(ids, round(len(ids) * config.corrupt_fraction)))
    rewards = [
        float(rng.random() < 0.5) if g in bad else r
        for r, g in zip(sampled.rewards, sampled.group_ids, strict=True)
    ]
    return rewards, bad


def _to_rollouts(sampled: _Sampled, rewards: list[float], pad_token_id: int) -> ga.Rollouts:
    return ga.Rollouts.from_token_ids(
        sampled.prompt_ids,
        sampled.completion_ids,
        rewards,
        sampled.group_ids,
        pad_token_id=pad_token_id,
    )


def _select(
    al: ga.Alignment, table: ga.Candidates, config: DemoConfig
) -> tuple[dict[str, list[int]], int]:
    """The selections of GradAlign (both scores), AccGreedy and Random, all of one size."""
    top = ga.policies.TopFraction(config.select_fraction)
    by_cosine = top(table)
    k = len(by_cosine)
    picks = {
        "GradAlign-cosine": by_cosine,
        "GradAlign-inner-product": top(dataclasses.replace(table, scores=al.inner_product)),
        "AccGreedy": ga.policies.AccGreedy(k)(table),
        "Random": ga.policies.Random(k, seed=config.seed)(table),
    }
    return {name: [int(i) for i in ids] for name, ids in picks.items()}, k


def _rows(
    al: ga.Alignment,
    table: ga.Candidates,
    true_acc: dict[int, float],
    bad: set[int],
    selected: list[int],
    questions: dict[int, str],
) -> list[TableRow]:
    order = torch.argsort(al.cosine, descending=True, stable=True).tolist()
    assert table.accuracy is not None  # Candidates.from_rollouts always fills it
    return [
        TableRow(
            rank=rank + 1,
            problem_id=int(al.ids[i]),
            cosine=float(al.cosine[i]),
            inner_product=float(al.inner_product[i]),
            accuracy=float(table.accuracy[i]),
            true_accuracy=true_acc[int(al.ids[i])],
            corrupted=int(al.ids[i]) in bad,
            selected=int(al.ids[i]) in selected,
            question=questions[int(al.ids[i])],
        )
        for rank, i in enumerate(order)
    ]


def _aurocs(al: ga.Alignment, table: ga.Candidates, clean: np.ndarray) -> dict[str, float]:
    assert table.accuracy is not None
    return {
        "GradAlign-cosine": auroc(al.cosine.numpy(), clean),
        "GradAlign-inner-product": auroc(al.inner_product.numpy(), clean),
        # AccGreedy's own ranking key: pass rate closest to 0.5 first.
        "AccGreedy (-|acc-0.5|)": auroc(-(table.accuracy - 0.5).abs().numpy(), clean),
    }


def _group_means(values: list[float], groups: list[int]) -> dict[int, float]:
    sums: dict[int, list[float]] = {}
    for v, g in zip(values, groups, strict=True):
        sums.setdefault(g, []).append(v)
    return {g: float(np.mean(v)) for g, v in sums.items()}


def run_demo(config: DemoConfig, *, log: Callable[[str], None] | None = None) -> DemoResult:
    """Run the unreliable-reward demo end to end.

    Args:
        config: The settings.
        log: Called with one line per finished stage (e.g. ``print``); None stays silent.

    Returns:
        The per-method corrupted shares, AUROCs, the ranked table and the PNG path.

    Example:
        >>> result = run_demo(DemoConfig.tiny_defaults(out_dir=tmp_path))  # doctest: +SKIP
        >>> sorted(result.shares)  # doctest: +SKIP
        ['AccGreedy', 'GradAlign-cosine', 'GradAlign-inner-product', 'Random']
    """
    say = log or (lambda _msg: None)
    timings: dict[str, float] = {}
    start = t0 = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t0
        now = time.perf_counter()
        timings[name] = now - t0
        say(f"[{name}] done in {now - t0:.1f} s")
        t0 = now

    model, tokenizer = load_tiny(config.seed) if config.tiny else load_smollm2(config.cache_dir)
    lap("load model")
    pool = make_problems(config.pool, config.seed)
    val = make_problems(
        config.val, config.seed + 1, start_id=config.pool, exclude={p.question for p in pool}
    )
    train_s = _sample(model, tokenizer, pool, config, seed=config.seed, desc="sample pool")
    lap("sample pool")
    val_s = _sample(model, tokenizer, val, config, seed=config.seed + 1, desc="sample validation")
    lap("sample validation")
    rewards, bad = _corrupt(train_s, config)
    pad = tokenizer.pad_token_id
    train, valid = _to_rollouts(train_s, rewards, pad), _to_rollouts(val_s, val_s.rewards, pad)
    selector = ga.GradAlign(
        ga.FullGradient(batch_size=config.grad_batch_size), objective=ga.GRPOObjective()
    )
    al = selector.alignment(model, train, valid, progress=config.progress)
    lap("gradients")
    result = _finish(config, al, train, train_s, val_s, bad)
    return dataclasses.replace(result, timings={**timings, "total": time.perf_counter() - start})


def _finish(
    config: DemoConfig,
    al: ga.Alignment,
    train: ga.Rollouts,
    train_s: _Sampled,
    val_s: _Sampled,
    bad: set[int],
) -> DemoResult:
    """Selections, AUROCs, the table and the histogram from the alignment scores."""
    table = ga.Candidates.from_rollouts(train, scores=al.cosine, zero_gradient=al.zero_gradient)
    picks, k = _select(al, table, config)
    corrupted = np.array([int(i) in bad for i in al.ids])
    true_acc = _group_means(train_s.rewards, train_s.group_ids)
    questions = {p.id: p.question for p in train_s.problems}
    rows = _rows(al, table, true_acc, bad, picks["GradAlign-cosine"], questions)
    png = plot_histograms(
        al.cosine.numpy(), al.inner_product.numpy(), corrupted, config.out_dir / PNG_NAME
    )
    clean_ids = [g for g in true_acc if g not in bad]
    stats = {
        "pool verified acc (clean)": float(np.mean([true_acc[g] for g in clean_ids])),
        "validation acc": float(np.mean(val_s.rewards)),
        "zero-spread clean": float(
            sum(bool(al.zero_gradient[i]) for i in np.flatnonzero(~corrupted))
        ),
        "zero-spread corrupted": float(
            sum(bool(al.zero_gradient[i]) for i in np.flatnonzero(corrupted))
        ),
        "mean completion tokens": float(np.mean([len(c) for c in train_s.completion_ids])),
    }
    return DemoResult(
        config=config,
        rows=rows,
        num_selected=k,
        selections=picks,
        shares={name: corrupted_share(ids, bad) for name, ids in picks.items()},
        pool_share=len(bad) / len(train_s.problems),
        aurocs=_aurocs(al, table, ~corrupted),
        png_path=png,
        stats=stats,
    )
