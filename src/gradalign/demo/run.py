"""The demo pipeline: sample, verify, corrupt half the pool, score with GradAlign, report; per seed.

It reproduces the paper's unreliable-reward experiment in miniature. Half the candidate problems
get Bernoulli(0.5) rewards, independent of the completion, instead of verified ones; GradAlign
scores every problem by how well its GRPO gradient aligns with the gradient of trusted validation
rollouts. Each seed draws its own problems, rollouts and corruption; the model loads once.

Implementations: [`DemoConfig`][gradalign.demo.config.DemoConfig] (settings, in ``demo/config.py``), [`run_seed`][gradalign.demo.run.run_seed] (one seed end to end) and
[`run_demo`][gradalign.demo.run.run_demo] (every seed, then the summary and the histogram).
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import gradalign as ga
from gradalign.alignment import Alignment
from gradalign.demo.config import EXTRACTORS, DemoConfig
from gradalign.demo.models import load_smollm2, load_tiny
from gradalign.demo.problems import (
    Problem,
    format_reward,
    make_problems,
    verify,
    verify_line,
)
from gradalign.demo.report import (
    DemoResult,
    SeedResult,
    TableRow,
    auroc,
    corrupted_share,
    plot_histograms,
)
from gradalign.extractors import GradientExtractor
from gradalign.rollouts import group_stats
from gradalign.sampling import render_prompts, sample_completions, stop_tokens

__all__ = ["EXTRACTORS", "DemoConfig", "derived_seed", "run_demo", "run_seed"]

PNG_NAME = "gradalign_scores.png"


def derived_seed(seed: int, stream: str) -> int:
    """An independent 63-bit seed for one random stream ("pool", "sample-val", ...) of a seed."""
    digest = hashlib.sha256(f"gradalign-demo/{stream}/{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class _Sampled:
    """Rollouts of a problem set before corruption: (S,) rows, k per problem, problem-major."""

    problems: list[Problem]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    rewards: list[float]
    group_ids: list[int]


def _prompts(tokenizer: Any, problems: list[Problem]) -> list[list[int]]:
    if problems[0].task == "word":
        return render_prompts(tokenizer, [q.question for q in problems])
    return [[int(t) for t in tokenizer(q.question).input_ids] for q in problems]


def _sample(
    model: Any, tokenizer: Any, problems: list[Problem], config: DemoConfig, seed: int, desc: str
) -> _Sampled:
    """Sample ``config.rollouts`` completions per problem and reward them."""
    k = config.rollouts
    prompts = _prompts(tokenizer, problems)
    stop = {int(tokenizer.eos_token_id)}
    if problems[0].task == "addition":
        stop |= stop_tokens(tokenizer, "\n")
    completions = sample_completions(
        model,
        prompts,
        k,
        stop_token_ids=stop,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=config.new_tokens,
        temperature=config.temperature,
        seed=seed,
        batch_size=config.gen_batch_size,
        progress=config.progress,
        desc=desc,
    )
    check = format_reward if config.tiny else verify_line if config.task == "addition" else verify
    rows = [q for q in problems for _ in range(k)]
    rewards = [
        check(tokenizer.decode(c, skip_special_tokens=True), q.answer)
        for c, q in zip(completions, rows, strict=True)
    ]
    prompt_rows = [p for p in prompts for _ in range(k)]
    return _Sampled(problems, prompt_rows, completions, rewards, [q.id for q in rows])


def _corrupt(sampled: _Sampled, config: DemoConfig, seed: int) -> tuple[list[float], set[int]]:
    """Replace the rewards of a seeded random subset of problems by fair coin flips."""
    rng = random.Random(derived_seed(seed, "corrupt"))
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


def _extractor(config: DemoConfig) -> GradientExtractor:
    if config.extractor == "full":
        return ga.FullGradient(batch_size=config.grad_batch_size, share_prompts=True)
    k = config.projection_dim
    return ga.FactorizedGradient(k, k, batch_size=config.grad_batch_size, share_prompts=True)


def _select(al: Alignment, table: ga.Candidates, k: int, seed: int) -> dict[str, list[int]]:
    """The selections of GradAlign (both scores), AccGreedy and Random, all of size ``k``."""
    top = ga.policies.TopK(k)
    picks = {
        "GradAlign": top(table),
        "GradAlign (inner product)": top(dataclasses.replace(table, scores=al.inner_product)),
        "AccGreedy": ga.policies.AccGreedy(k)(table),
        "Random": ga.policies.Random(k, seed=derived_seed(seed, "random-policy"))(table),
    }
    return {name: [int(i) for i in ids] for name, ids in picks.items()}


def _group_means(values: list[float], groups: list[int]) -> dict[int, float]:
    st = group_stats(torch.tensor(groups), torch.tensor(values))
    return dict(zip(st.ids.tolist(), st.mean.tolist(), strict=True))


def run_seed(
    model: Any,
    tokenizer: Any,
    config: DemoConfig,
    seed: int,
    *,
    log: Callable[[str], None] | None = None,
) -> SeedResult:
    """One seed end to end: problems, rollouts, corruption, GradAlign scores and every selection.

    Args:
        model: The policy (eval mode).
        tokenizer: Its tokenizer.
        config: The settings.
        seed: The seed of this run's problems, rollouts, corruption and Random baseline.
        log: Called with one line per finished stage; None stays silent.
    """
    say = log or (lambda _msg: None)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t0
        now = time.perf_counter()
        timings[name] = now - t0
        say(f"[seed {seed}] {name} done in {now - t0:.1f} s")
        t0 = now

    task = config.task
    pool = make_problems(config.pool, f"pool-{seed}", task=task)
    val = make_problems(
        config.val,
        f"val-{seed}",
        task=task,
        start_id=config.pool,
        exclude={p.question for p in pool},
    )
    train_s = _sample(model, tokenizer, pool, config, derived_seed(seed, "sample-pool"), "pool")
    val_s = _sample(model, tokenizer, val, config, derived_seed(seed, "sample-val"), "validation")
    lap("sample")
    rewards, bad = _corrupt(train_s, config, seed)
    pad = tokenizer.pad_token_id
    train, valid = _to_rollouts(train_s, rewards, pad), _to_rollouts(val_s, val_s.rewards, pad)
    selector = ga.GradAlign(_extractor(config), objective=ga.GRPOObjective())
    al = selector.alignment(model, train, valid, progress=config.progress)
    lap("gradients")
    return _finish(seed, config, al, train, train_s, val_s, bad, timings)


def _finish(
    seed: int,
    config: DemoConfig,
    al: Alignment,
    train: ga.Rollouts,
    train_s: _Sampled,
    val_s: _Sampled,
    bad: set[int],
    timings: dict[str, float],
) -> SeedResult:
    """Selections, AUROCs and the ranked table from the alignment scores."""
    table = ga.Candidates.from_rollouts(train, scores=al.cosine, zero_gradient=al.zero_gradient)
    assert table.accuracy is not None  # from_rollouts always fills it
    k = max(1, round(config.select_fraction * len(table)))
    picks = _select(al, table, k, seed)
    corrupted = np.array([int(i) in bad for i in al.ids])
    clean = ~corrupted
    true_acc = _group_means(train_s.rewards, train_s.group_ids)
    questions = {p.id: p.question for p in train_s.problems}
    order = torch.argsort(al.cosine, descending=True, stable=True).tolist()
    rows = [
        TableRow(
            rank=rank + 1,
            problem_id=int(al.ids[i]),
            cosine=float(al.cosine[i]),
            inner_product=float(al.inner_product[i]),
            accuracy=float(table.accuracy[i]),
            true_accuracy=true_acc[int(al.ids[i])],
            corrupted=bool(corrupted[i]),
            selected=int(al.ids[i]) in picks["GradAlign"],
            question=questions[int(al.ids[i])],
        )
        for rank, i in enumerate(order)
    ]
    zero = al.zero_gradient.numpy()
    stats = {
        "pool verified acc (clean)": float(
            np.mean([true_acc[g] for g in true_acc if g not in bad])
        ),
        "validation acc": float(np.mean(val_s.rewards)),
        "zero-spread clean": float(zero[clean].sum()),
        "zero-spread corrupted": float(zero[corrupted].sum()),
        "mean completion tokens": float(np.mean([len(c) for c in train_s.completion_ids])),
    }
    return SeedResult(
        seed=seed,
        rows=rows,
        num_selected=k,
        selections=picks,
        shares={name: corrupted_share(ids, bad) for name, ids in picks.items()},
        pool_share=len(bad) / len(train_s.problems),
        aurocs={
            "cosine": auroc(al.cosine.numpy(), clean),
            "inner_product": auroc(al.inner_product.numpy(), clean),
            # AccGreedy's own ranking key: pass rate closest to 0.5 first.
            "AccGreedy": auroc(-(table.accuracy - 0.5).abs().numpy(), clean),
        },
        stats=stats,
        timings=timings,
    )


def run_demo(config: DemoConfig, *, log: Callable[[str], None] | None = None) -> DemoResult:
    """Run the unreliable-reward demo for every seed of ``config``; the model loads once.

    Args:
        config: The settings.
        log: Called with one line per finished stage (e.g. ``print``); None stays silent.

    Returns:
        Per-seed results, their means and standard deviations, and the histogram's path.

    Examples:
        >>> result = run_demo(DemoConfig.tiny_defaults(out_dir=tmp_path))
        >>> sorted(result.shares)
        ['AccGreedy', 'GradAlign', 'GradAlign (inner product)', 'Random']
    """
    say = log or (lambda _msg: None)
    start = time.perf_counter()
    if config.tiny:
        model, tokenizer = load_tiny(0)
    else:
        say("[load model] SmolLM2-135M-Instruct (the first run converts the GGUF file, ~30 s)")
        model, tokenizer = load_smollm2(config.cache_dir)
    load = time.perf_counter() - start
    say(f"[load model] done in {load:.1f} s")
    seeds = [run_seed(model, tokenizer, config, s, log=log) for s in config.seeds]
    cosine = np.concatenate([[r.cosine for r in s.rows] for s in seeds])
    inner = np.concatenate([[r.inner_product for r in s.rows] for s in seeds])
    corrupted = np.concatenate([[r.corrupted for r in s.rows] for s in seeds])
    png: Path | None = config.out_dir / PNG_NAME
    try:
        plot_histograms(cosine, inner, corrupted, config.out_dir / PNG_NAME, seeds=config.seeds)
    except ImportError:  # matplotlib is the [demo] extra; the numbers do not need it
        say("[histogram] skipped: pip install 'gradalign[demo]' for the PNG")
        png = None
    timings = {"load model": load, "total": time.perf_counter() - start}
    return DemoResult(config=config, seeds=seeds, png_path=png, timings=timings)
