"""A paired study of training benefit: online GRPO on SmolLM2-135M-Instruct, GradAlign against baselines.

The design (seeds, rounds, budgets, metric, analysis) is written down in docs/training-study.md
before any run; this script implements it. In short:

* a **seed** fixes the pool, the corrupted problems, the validation and test sets, the curriculum's
  chunks, the sampling streams of every round and the coin flips of corrupted rewards; every
  method starts from the same pretrained weights, so methods differ only in which problems they
  train on (common random numbers: at round 0 they see identical candidates);
* every method runs the same loop: each round ``fill_round`` draws a chunk of candidates (16
  problems x 16 rollouts at temperature 1), draws up to two extra chunks until 4 candidates pass
  the method's rule, the method selects 4, and one full-parameter GRPO step (Adam) trains on the
  selected groups' own rollouts (train on what was scored: exactly on-policy);
* rules: every method needs reward spread (the library's one zero-spread rule); GradAlign also
  needs a positive cosine with the validation gradient (``Informative(min_score=0.0)``);
* held-out accuracy: the mean, over the test problems, of the probability the policy gives the
  exact answer line at temperature 1 (a noise-free lower bound of the expected reward).

Usage:
    python benchmarks/study.py --out docs/results/study.json --seeds 0,2,4,6 &   # one process
    python benchmarks/study.py --out docs/results/study.json --seeds 1,3,5,7 &   # per core
    python benchmarks/study.py --report docs/results/study.json                  # tables + PNGs
    python benchmarks/study.py --quick --out /tmp/q.json                          # tiny model, schema

The run resumes from its JSON: finished (regime, method, seed) runs are skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import hashlib
import itertools
import json
import math
import os
import platform
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import gradalign as ga
from gradalign.demo.problems import verify_line
from gradalign.extractors import response_logprobs
from gradalign.sampling import sample_completions, stop_tokens

REGIMES: dict[str, tuple[str, ...]] = {
    "noisy": ("GradAlign", "Random", "AccGreedy", "LearnAlign"),
    "imbalance": ("GradAlign", "Random", "AccGreedy", "AccuracyBand"),
}
VAL_ID_BASE = 1_000_000  # validation group ids, apart from the pool's 0 .. N-1


@dataclass(frozen=True)
class Settings:
    """The pre-registered settings (docs/training-study.md); every method and regime uses them."""

    rounds: int = 10
    pool: int = 320
    chunk: int = 16
    keep: int = 4
    rollouts: int = 16
    max_extra_chunks: int = 2
    val: int = 8
    test: int = 64
    lr: float = 1e-5
    temperature: float = 1.0
    max_new_tokens: int = 5
    factor_dims: tuple[int, int] = (32, 32)
    imbalance_target: float = 0.1
    seeds: tuple[int, ...] = tuple(range(8))
    quick: bool = False

    @classmethod
    def quick_settings(cls) -> Settings:
        return cls(
            rounds=2,
            pool=24,
            chunk=6,
            keep=2,
            rollouts=4,
            val=2,
            test=4,
            factor_dims=(4, 4),
            seeds=(0,),
            quick=True,
        )


def derived_seed(seed: int, stream: str) -> int:
    """An independent 63-bit seed for one random stream of a study seed."""
    digest = hashlib.sha256(f"gradalign-study/{stream}/{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# -- problems ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: int
    family: str  # "add1", "add2" (the target task), "sub", "mul"
    corrupted: bool = False

    @property
    def target(self) -> bool:
        return self.family.startswith("add")


def one_shot(rng: random.Random, family: str) -> Problem:
    """``"a op b = v\\nc op d ="``: one worked example, then the question."""
    lo, hi = (10, 99) if family == "add2" else (1, 9)
    op = {"add1": "+", "add2": "+", "sub": "-", "mul": "*"}[family]
    a, b, c, d = (rng.randint(lo, hi) for _ in range(4))
    if op == "-":
        a, b, c, d = max(a, b), min(a, b), max(c, d), min(c, d)
    value = {"+": c + d, "-": c - d, "*": c * d}[op]
    shot = {"+": a + b, "-": a - b, "*": a * b}[op]
    return Problem(f"{a} {op} {b} = {shot}\n{c} {op} {d} =", value, family)


def make_sets(
    regime: str, s: Settings, seed: int
) -> tuple[list[Problem], list[Problem], list[Problem]]:
    """(pool, validation, test). The target task is addition, half one-digit, half two-digit."""
    rng = random.Random(derived_seed(seed, f"{regime}/sets"))
    n = s.pool
    target = n if regime == "noisy" else max(1, round(n * s.imbalance_target))
    families = [("add1", "add2")[i % 2] for i in range(target)]
    families += [("sub", "mul")[i % 2] for i in range(n - target)]
    rng.shuffle(families)
    seen: set[str] = set()

    def draw(family: str) -> Problem:
        while True:
            p = one_shot(rng, family)
            if p.prompt not in seen:
                seen.add(p.prompt)
                return p

    pool = [draw(f) for f in families]
    if regime == "noisy":
        bad = set(rng.sample(range(n), n // 2))
        pool = [Problem(p.prompt, p.answer, p.family, i in bad) for i, p in enumerate(pool)]
    val = [draw(("add1", "add2")[i % 2]) for i in range(s.val)]
    test = [draw(("add1", "add2")[i % 2]) for i in range(s.test)]
    return pool, val, test


# -- one run -------------------------------------------------------------------------------------


@dataclass
class Run:
    accuracy: list[float] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    candidate_rollouts: int = 0
    validation_rollouts: int = 0
    seconds: float = 0.0


class ToppedUp(ga.policies.Policy):
    """A policy's ids, then random others until k: every method trains on k problems."""

    def __init__(self, policy: Any, k: int, seed: int) -> None:
        self.policy, self.k, self.seed = policy, k, seed

    def __call__(self, candidates: ga.Candidates) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a band with fewer than k problems
            ids = torch.as_tensor(self.policy(candidates), dtype=torch.long)[: self.k]
        rest = candidates.ids[~torch.isin(candidates.ids, ids)]
        order = torch.randperm(len(rest), generator=torch.Generator().manual_seed(self.seed))
        return torch.cat([ids, rest[order][: self.k - len(ids)]])


class Runner:
    """One (regime, method, seed): rounds of fill_round selection and one GRPO step each."""

    def __init__(
        self, base: Any, tok: Any, regime: str, method: str, seed: int, s: Settings
    ) -> None:
        self.tok, self.regime, self.method, self.seed, self.s = tok, regime, method, seed, s
        self.pool, self.val, self.test = make_sets(regime, s, seed)
        self.model = copy.deepcopy(base).eval()
        for p in self.model.parameters():
            p.requires_grad_(True)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=s.lr)
        self.stop = stop_tokens(tok, "\n") | {int(tok.eos_token_id)}
        self.pad = int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        self.extractor = ga.FactorizedGradient(*s.factor_dims, share_prompts=True)
        self.prompt_cache: dict[str, list[int]] = {}
        self.run = Run()

    def _ids(self, text: str) -> list[int]:
        if text not in self.prompt_cache:
            self.prompt_cache[text] = [int(t) for t in self.tok(text).input_ids]
        return self.prompt_cache[text]

    def rollouts(self, problems: list[Problem], ids: list[int], stream: str, r: int) -> ga.Rollouts:
        """``rollouts`` completions of each problem, rewarded; corrupted rewards are coin flips
        drawn from the (seed, round, problem) stream, so every method sees the same coins."""
        k, prompts = self.s.rollouts, [self._ids(p.prompt) for p in problems]
        completions = sample_completions(
            self.model,
            prompts,
            k,
            stop_token_ids=self.stop,
            pad_token_id=self.pad,
            max_new_tokens=self.s.max_new_tokens,
            temperature=self.s.temperature,
            seed=derived_seed(self.seed, f"{self.regime}/{stream}/sample"),
        )
        rewards = []
        for j, (p, pid) in enumerate(zip(problems, ids, strict=True)):
            if p.corrupted:
                coins = torch.Generator().manual_seed(
                    derived_seed(self.seed, f"{self.regime}/round{r}/coin/{pid}")
                )
                rewards += (torch.rand(k, generator=coins) < 0.5).float().tolist()
            else:
                rows = completions[j * k : (j + 1) * k]
                rewards += [verify_line(self.tok.decode(c), p.answer) for c in rows]
        return ga.Rollouts.from_token_ids(
            [q for q in prompts for _ in range(k)],
            completions,
            rewards,
            [i for i in ids for _ in range(k)],
            pad_token_id=self.pad,
        )

    def method_rule(
        self, r: int
    ) -> tuple[Callable[[ga.Rollouts], ga.Candidates], Any, Any, dict[str, Any]]:
        """(score, policy, rule, notes) of this method in round r."""
        keep, m = self.s.keep, self.method
        notes: dict[str, Any] = {}
        if m == "GradAlign":
            val_ids = [VAL_ID_BASE + i for i in range(len(self.val))]
            val = self.rollouts(self.val, val_ids, f"round{r}/validation", r)
            self.run.validation_rollouts += len(val)
            selector = ga.GradAlign(self.extractor, policy=ga.policies.TopK(keep))
            try:
                targets = selector.targets(self.model, val)
            except ga.GradAlignError:  # every validation group without spread: no target
                notes["fallback"] = "Random"
                m = "Random"
            else:
                return (
                    lambda ro: selector.score(self.model, ro, targets),
                    ga.policies.TopK(keep),
                    ga.Informative(min_score=0.0),
                    notes,
                )
        seed = derived_seed(self.seed, f"{self.regime}/{m}/policy/{r}")
        if m == "LearnAlign":
            return (
                lambda ro: ga.Candidates.from_rollouts(
                    ro, grads=self.extractor.per_group(self.model, ro).grads
                ),
                ga.policies.LearnAlign(keep),
                ga.Informative(),
                notes,
            )
        policy = {
            "Random": lambda: ga.policies.Random(keep, seed=seed),
            "AccGreedy": lambda: ga.policies.AccGreedy(keep),
            "AccuracyBand": lambda: ToppedUp(
                ga.policies.AccuracyBand(0.2, 0.8, keep, seed=seed), keep, seed + 1
            ),
        }[m]()
        return ga.Candidates.from_rollouts, policy, ga.Informative(), notes

    def grpo_step(self, batch: ga.Rollouts) -> None:
        """One on-policy GRPO step (group-normalised advantages, token-mean) on ``batch``."""
        weights = ga.GRPOObjective().prepare(batch).token_weights()  # (S, T)
        logp = response_logprobs(
            self.model,
            batch.input_ids,
            batch.attention_mask,
            batch.response_mask,
            share_keys=batch.group_ids,
        )  # (S, T)
        loss = -(weights * logp).sum() / batch.num_groups
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    @torch.no_grad()
    def accuracy(self) -> float:
        """Mean probability of the exact answer line (temperature 1)."""
        prompts = [self._ids(p.prompt) for p in self.test]
        answers = [
            [int(t) for t in self.tok(f" {p.answer}\n", add_special_tokens=False).input_ids]
            for p in self.test
        ]
        ro = ga.Rollouts.from_token_ids(
            prompts, answers, [0.0] * len(prompts), list(range(len(prompts))), pad_token_id=self.pad
        )
        lp = response_logprobs(self.model, ro.input_ids, ro.attention_mask, ro.response_mask)
        return float(lp.sum(1).exp().mean())

    def shares(self, ids: list[int]) -> dict[str, float]:
        chosen = [self.pool[i] for i in ids]
        n = max(1, len(chosen))
        return {
            "corrupted": sum(p.corrupted for p in chosen) / n,
            "target": sum(p.target for p in chosen) / n,
        }

    def __call__(self, log: Callable[[str], None] = print) -> Run:
        start = time.perf_counter()
        cur = ga.Curriculum(
            pool_size=len(self.pool),
            chunk_size=self.s.chunk,
            seed=derived_seed(self.seed, f"{self.regime}/curriculum"),
        )
        self.run.accuracy.append(self.accuracy())
        for r in range(self.s.rounds):
            t0 = time.perf_counter()
            score, policy, rule, notes = self.method_rule(r)
            drawn = [0]

            def sample(ids: torch.Tensor, r: int = r, drawn: list[int] = drawn) -> ga.Rollouts:
                stream = f"round{r}/chunk{drawn[0]}"
                drawn[0] += 1
                out = self.rollouts([self.pool[int(i)] for i in ids], ids.tolist(), stream, r)
                self.run.candidate_rollouts += len(out)
                return out

            rnd = ga.fill_round(
                cur,
                sample,
                score,
                policy,
                k=self.s.keep,
                rule=rule,
                max_extra_chunks=self.s.max_extra_chunks,
            )
            cur.record(rnd.selection)
            ids = rnd.ids.tolist()
            self.grpo_step(rnd.training_rollouts())
            self.run.accuracy.append(self.accuracy())
            self.run.rounds.append(
                {
                    "selected": ids,
                    "chunks": rnd.num_chunks,
                    "informative": len(rnd.informative),
                    "shortfall": rnd.shortfall,
                    "candidates": len(rnd.candidates),
                    "seconds": time.perf_counter() - t0,
                    **self.shares(ids),
                    **notes,
                }
            )
        self.run.seconds = time.perf_counter() - start
        return self.run


# -- the whole study -----------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """An exclusive lock beside ``out``: processes running other seeds merge into one JSON."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read(out: Path, settings: Settings) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    expected = json.loads(json.dumps(asdict(settings)))
    if data and data.get("settings") != expected:
        raise SystemExit(f"{out} holds another study's settings; use another --out")
    data.setdefault("settings", expected)
    data.setdefault("runs", {})
    return data


def load_model(quick: bool) -> tuple[Any, Any]:
    if quick:
        from gradalign.testing import tiny_model, tiny_tokenizer

        return tiny_model(), tiny_tokenizer()
    from gradalign.demo.models import load_smollm2

    return load_smollm2()


def run_all(settings: Settings, out: Path, seeds: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Run every (seed, regime, method) not yet in ``out``, saving after each run."""
    with locked(out):
        data = read(out, settings)
    base, tok = load_model(settings.quick)
    start = time.perf_counter()
    for seed in settings.seeds if seeds is None else seeds:
        for regime, methods in REGIMES.items():
            for method in methods:
                if str(seed) in data["runs"].get(regime, {}).get(method, {}):
                    continue
                run = Runner(base, tok, regime, method, seed, settings)()
                with locked(out):
                    data = read(out, settings)
                    slot = data["runs"].setdefault(regime, {}).setdefault(method, {})
                    slot[str(seed)] = asdict(run)
                    data["run_seconds"] = data.get("run_seconds", 0.0) + run.seconds
                    data.setdefault("first_start", time.time() - run.seconds)
                    data["last_end"] = time.time()
                    data["cpu"], data["threads"] = cpu_name(), torch.get_num_threads()
                    tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
                    tmp.write_text(json.dumps(data, indent=1))
                    os.replace(tmp, out)
                print(
                    f"[{regime} {method} seed {seed}] accuracy {run.accuracy[0]:.3f} -> "
                    f"{run.accuracy[-1]:.3f}, {run.seconds:.0f} s "
                    f"(process total {time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
    return data


# -- analysis ------------------------------------------------------------------------------------

# Two-sided 95% quantiles of Student's t, by degrees of freedom.
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120,
         17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086}  # fmt: skip


def area(curve: list[float]) -> float:
    """Area under the accuracy curve over rounds 0..R (trapezoid), divided by R: a mean accuracy."""
    return sum((a + b) / 2 for a, b in itertools.pairwise(curve)) / (len(curve) - 1)


def interval(diffs: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the mean paired difference and its 95% t interval."""
    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n < 2:
        return mean, math.nan, math.nan
    half = _T975.get(n - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(n)
    return mean, mean - half, mean + half


def first_reach(curve: list[float], level: float) -> int | None:
    """The first round (0..R) whose accuracy is at least ``level``; None if never."""
    return next((i for i, a in enumerate(curve) if a >= level), None)


def paired(data: dict[str, Any], regime: str) -> list[dict[str, Any]]:
    """One row per baseline: GradAlign minus it, per seed, in final accuracy and area."""
    runs = data["runs"][regime]
    rows = []
    for base in REGIMES[regime][1:]:
        seeds = sorted(set(runs.get("GradAlign", {})) & set(runs.get(base, {})), key=int)
        if not seeds:
            continue
        ga_, bl = runs["GradAlign"], runs[base]
        final = [ga_[s]["accuracy"][-1] - bl[s]["accuracy"][-1] for s in seeds]
        auc = [area(ga_[s]["accuracy"]) - area(bl[s]["accuracy"]) for s in seeds]
        rows.append(
            {
                "baseline": base,
                "seeds": [int(s) for s in seeds],
                "final": final,
                "area": auc,
                "final_ci": interval(final),
                "area_ci": interval(auc),
                "final_wins": sum(d > 0 for d in final),
                "area_wins": sum(d > 0 for d in auc),
            }
        )
    return rows


def _fmt(ci: tuple[float, float, float]) -> str:
    mean, lo, hi = ci
    return f"{mean:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def report(data: dict[str, Any], png_dir: Path | None = None) -> str:
    """Markdown: the paired table, per-seed differences, shares per round, budgets, time."""
    lines: list[str] = []
    for regime in REGIMES:
        runs = data["runs"].get(regime)
        if not runs:
            continue
        lines += [f"### {regime}", ""]
        lines += [
            "| GradAlign minus | area under the curve: mean [95% CI] | seeds favouring GradAlign "
            "| final accuracy: mean [95% CI] | seeds favouring GradAlign |",
            "|---|---|---|---|---|",
        ]
        rows = paired(data, regime)
        for row in rows:
            n = len(row["seeds"])
            lines.append(
                f"| {row['baseline']} | {_fmt(row['area_ci'])} | {row['area_wins']} of {n} | "
                f"{_fmt(row['final_ci'])} | {row['final_wins']} of {n} |"
            )
        lines += ["", "Per seed, GradAlign minus each baseline (area under the curve):", ""]
        lines += ["| seed | " + " | ".join(r["baseline"] for r in rows) + " |"]
        lines += ["|---" * (len(rows) + 1) + "|"]
        # Baselines may have finished different seeds (a study still running): one line per seed
        # any of them has, a dash where one has not.
        per_row = [dict(zip(r["seeds"], r["area"], strict=True)) for r in rows]
        for s in sorted({seed for r in rows for seed in r["seeds"]}):
            cells = (f"{d[s]:+.4f}" if s in d else "-" for d in per_row)
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines += ["", "| method | accuracy round 0 | final accuracy | area | rounds to reach "
                  "Random's final (not reached) | candidate rollouts | validation rollouts | "
                  "extra chunks per run | seconds per run |", "|---" * 9 + "|"]  # fmt: skip
        for method, per_seed in runs.items():
            seeds = sorted(per_seed, key=int)
            acc = [per_seed[s]["accuracy"] for s in seeds]
            reach = []
            for s in seeds:
                if s in runs.get("Random", {}):
                    reach.append(
                        first_reach(per_seed[s]["accuracy"], runs["Random"][s]["accuracy"][-1])
                    )
            got = [x for x in reach if x is not None]
            extra = [sum(r["chunks"] - 1 for r in per_seed[s]["rounds"]) for s in seeds]
            lines.append(
                f"| {method} | {statistics.fmean(a[0] for a in acc):.4f} | "
                f"{statistics.fmean(a[-1] for a in acc):.4f} | "
                f"{statistics.fmean(area(a) for a in acc):.4f} | "
                f"{statistics.fmean(got) if got else math.nan:.1f} ({len(reach) - len(got)}) | "
                f"{statistics.fmean(per_seed[s]['candidate_rollouts'] for s in seeds):.0f} | "
                f"{statistics.fmean(per_seed[s]['validation_rollouts'] for s in seeds):.0f} | "
                f"{statistics.fmean(extra):.1f} | "
                f"{statistics.fmean(per_seed[s]['seconds'] for s in seeds):.0f} |"
            )
        share = "corrupted" if regime == "noisy" else "target"
        lines += ["", f"{share} share of the selection per round (mean over seeds; max):", ""]
        for method, per_seed in runs.items():
            seeds = sorted(per_seed, key=int)
            rounds = len(per_seed[seeds[0]]["rounds"])
            per_round = [[per_seed[s]["rounds"][r][share] for s in seeds] for r in range(rounds)]
            means = " ".join(f"{statistics.fmean(x):.2f}" for x in per_round)
            worst = max(max(x) for x in per_round)
            lines.append(f"- {method}: {means} (max {worst:.2f})")
        lines.append("")
        if png_dir is not None:
            plot(regime, runs, rows, png_dir / f"study_{regime}.png")
    if "first_start" in data:
        lines.append(
            f"Runs add up to {data['run_seconds'] / 3600:.2f} CPU-hours on {data.get('cpu')} "
            f"({data.get('threads')} thread per process); "
            f"{(data['last_end'] - data['first_start']) / 60:.0f} min elapsed from the first run's "
            "start to the last run's end."
        )
    return "\n".join(lines)


def plot(regime: str, runs: dict[str, Any], rows: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    left, right = fig.subplots(1, 2)
    for method, per_seed in runs.items():
        curves = torch.tensor([per_seed[s]["accuracy"] for s in sorted(per_seed, key=int)])
        mean = curves.mean(0)
        half = curves.std(0) * _T975.get(len(curves) - 1, 1.96) / math.sqrt(len(curves))
        x = list(range(len(mean)))
        left.plot(x, mean.tolist(), label=method, linewidth=2.5 if method == "GradAlign" else 1.2)
        left.fill_between(x, (mean - half).tolist(), (mean + half).tolist(), alpha=0.15)
    left.set_xlabel("round (one GRPO step each)")
    left.set_ylabel("held-out accuracy (exact answer probability)")
    left.set_title(f"{regime}: mean and 95% CI over seeds")
    left.legend(fontsize=8)
    for j, row in enumerate(rows):
        ys = row["area"]
        xs = [j + (i - (len(ys) - 1) / 2) * 0.04 for i in range(len(ys))]
        right.scatter(xs, ys, s=18)
        mean, lo, hi = row["area_ci"]
        right.errorbar([j + 0.3], [mean], yerr=[[mean - lo], [hi - mean]], fmt="o", color="k")
    right.axhline(0, color="grey", linewidth=0.8)
    right.set_xticks(range(len(rows)), [f"vs {r['baseline']}" for r in rows])
    right.set_ylabel("GradAlign minus baseline, area under the curve")
    right.set_title("paired difference per seed (dots), mean and 95% CI")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/results/study.json"))
    parser.add_argument("--quick", action="store_true", help="tiny model, one seed: a schema run")
    parser.add_argument("--report", type=Path, help="print the tables of this JSON and draw PNGs")
    parser.add_argument("--png-dir", type=Path, default=Path("docs/img"))
    parser.add_argument(
        "--seeds",
        type=lambda text: tuple(int(x) for x in text.split(",")),
        help="only these of the settings' seeds (e.g. 0,2,4,6): one process per core",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    args = parser.parse_args(argv)
    if args.report is not None:
        print(report(json.loads(args.report.read_text()), args.png_dir))
        return
    settings = Settings.quick_settings() if args.quick else Settings()
    torch.set_num_threads(args.threads)
    if args.seeds is not None and not set(args.seeds) <= set(settings.seeds):
        raise SystemExit(f"--seeds {args.seeds} are not among the settings' seeds {settings.seeds}")
    data = run_all(settings, args.out, seeds=args.seeds)
    print(report(data))


if __name__ == "__main__":
    sys.exit(main())
