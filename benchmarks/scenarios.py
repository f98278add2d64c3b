"""The paper's three regimes in miniature: online GRPO on SmolLM2-135M, GradAlign and five baselines.

Every run trains a fresh LoRA adapter (rank 8 on every linear layer of the decoder, the output head
excluded) of SmolLM2-135M-Instruct with on-policy GRPO (group-normalised advantages, token-mean
loss, Adam). Each round takes the next chunk of the pool from a seeded ``Curriculum``, samples
``rollouts`` completions of every candidate, keeps ``keep`` of them by the method's rule, and trains
``steps_per_round`` GRPO steps on them, each on fresh rollouts of the kept problems. Tasks are the
demo's one-shot arithmetic (``"3 + 4 = 7\\n5 + 2 ="``, answered on one line at temperature 1.3).

Scenarios (the target task is one-shot single-digit addition; validation and test come from it):

- ``noisy``: the whole pool is the target task; half of the problems have Bernoulli(0.5) rewards,
  independent of the completion.
- ``imbalance``: a tenth of the pool is the target task; the rest is one-shot subtraction and
  multiplication.
- ``low-utility``: a quarter of the pool is the target task; the rest teaches it nothing: three-digit
  sums the model never solves and copy problems (``"7 = 7\\n5 ="``) it always solves, so their groups
  have no reward spread.

Methods: GradAlign (cosine against 8 clean validation problems, ``LoRAGradient``: the exact
gradient of the parameters being trained), Random, AccGreedy (pass rate closest to 0.5),
AccuracyBand ([0.2, 0.8]), Learnability (p(1 - p)) and LearnAlign (alignment with the chunk's own
mean gradient times p(1 - p)). Every method samples the same candidate rollouts every round and
trains the same number of steps on the same number of problems; GradAlign also samples the
validation rollouts (the budget table counts them).

Held-out accuracy: the mean, over the test problems, of the probability the policy gives the exact
answer line (``" 12\\n"``) at the sampling temperature: an exact, noise-free lower bound of the
expected reward (other completions that start with the right number are also rewarded).

Usage:
    python benchmarks/scenarios.py --out docs/results/scenarios.json   # the full run (hours)
    python benchmarks/scenarios.py --quick --out /tmp/q.json             # tiny model, < 2 min
    python benchmarks/scenarios.py --report docs/results/scenarios.json  # table + PNGs from a JSON

The full run resumes from its JSON: finished (scenario, method, seed) runs are skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import json
import os
import platform
import random
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model

import gradalign as ga
from gradalign.demo.problems import verify_line
from gradalign.demo.run import derived_seed
from gradalign.demo.sampling import sample_completions, stop_tokens

SCENARIOS = ("noisy", "imbalance", "low-utility")
METHODS = ("GradAlign", "Random", "AccGreedy", "AccuracyBand", "Learnability", "LearnAlign")


@dataclass(frozen=True)
class Settings:
    """One run's budget; every method and scenario uses the same."""

    rounds: int = 4
    steps_per_round: int = 2
    pool: int = 120
    chunk: int = 16
    keep: int = 4
    rollouts: int = 8
    val: int = 8
    test: int = 32
    lr: float = 3e-4
    lora_rank: int = 8
    temperature: float = 1.3
    max_new_tokens: int = 4
    seeds: tuple[int, ...] = (0, 1, 2)
    quick: bool = False

    @classmethod
    def quick_settings(cls) -> Settings:
        return cls(
            rounds=2,
            steps_per_round=1,
            pool=24,
            chunk=8,
            keep=2,
            rollouts=4,
            val=4,
            test=8,
            seeds=(0,),
            quick=True,
        )


# -- problems ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: int
    family: str  # "add" (the target), "sub", "mul", "big" (unsolvable), "copy" (always solved)
    corrupted: bool = False

    @property
    def low_utility(self) -> bool:
        return self.family in ("big", "copy")


def _one_shot(rng: random.Random, family: str) -> Problem:
    if family == "big":
        a, b, c, d = (rng.randint(100, 999) for _ in range(4))
        return Problem(f"{a} + {b} = {a + b}\n{c} + {d} =", c + d, family)
    if family == "copy":
        a, c = rng.randint(1, 9), rng.randint(1, 9)
        return Problem(f"{a} = {a}\n{c} =", c, family)
    op = {"add": "+", "sub": "-", "mul": "*"}[family]
    a, b, c, d = (rng.randint(1, 9) for _ in range(4))
    if family == "sub":
        a, b = max(a, b), min(a, b)
        c, d = max(c, d), min(c, d)
    value = {"+": c + d, "-": c - d, "*": c * d}[op]
    shot = {"+": a + b, "-": a - b, "*": a * b}[op]
    return Problem(f"{a} {op} {b} = {shot}\n{c} {op} {d} =", value, family)


def make_pool(
    scenario: str, settings: Settings, seed: int
) -> tuple[list[Problem], list[Problem], list[Problem]]:
    """(pool, validation, test): validation and test are clean target (addition) problems."""
    rng = random.Random(derived_seed(seed, f"scenario/{scenario}"))
    n = settings.pool
    if scenario == "noisy":
        families = ["add"] * n
    elif scenario == "imbalance":
        target = max(1, n // 10)
        families = ["add"] * target + [("sub", "mul")[i % 2] for i in range(n - target)]
    elif scenario == "low-utility":
        target = max(1, n // 4)
        families = ["add"] * target + [("big", "copy")[i % 2] for i in range(n - target)]
    else:
        raise ValueError(f"unknown scenario {scenario!r}")
    rng.shuffle(families)
    seen: set[str] = set()

    def draw(family: str) -> Problem:
        while True:
            p = _one_shot(rng, family)
            if p.prompt not in seen:
                seen.add(p.prompt)
                return p

    pool = [draw(f) for f in families]
    if scenario == "noisy":
        bad = set(rng.sample(range(n), n // 2))
        pool = [Problem(p.prompt, p.answer, p.family, i in bad) for i, p in enumerate(pool)]
    return (
        pool,
        [draw("add") for _ in range(settings.val)],
        [draw("add") for _ in range(settings.test)],
    )


# -- the model -----------------------------------------------------------------------------------


def load_model(quick: bool) -> tuple[Any, Any]:
    if quick:
        from gradalign.testing import tiny_model, tiny_tokenizer

        return tiny_model(), tiny_tokenizer()
    from gradalign.demo.models import load_smollm2

    return load_smollm2()


def with_lora(base: Any, settings: Settings, seed: int) -> Any:
    """A fresh LoRA adapter on a copy of the base model (adapter weights seeded)."""
    config = LoraConfig(
        r=settings.lora_rank,
        lora_alpha=2 * settings.lora_rank,
        lora_dropout=0.0,
        target_modules="all-linear",
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        model = get_peft_model(copy.deepcopy(base), config)
    return model.eval()


# -- one run -------------------------------------------------------------------------------------


@dataclass
class Run:
    accuracy: list[float] = field(default_factory=list)
    shares: list[dict[str, float]] = field(default_factory=list)
    rollouts: int = 0
    seconds: float = 0.0


class Runner:
    """One (scenario, method, seed): rounds of selection and GRPO steps."""

    def __init__(
        self, base: Any, tok: Any, scenario: str, method: str, seed: int, s: Settings
    ) -> None:
        self.tok, self.scenario, self.method, self.seed, self.s = tok, scenario, method, seed, s
        self.pool, self.val, self.test = make_pool(scenario, s, seed)
        self.model = with_lora(base, s, derived_seed(seed, "lora"))
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(params, lr=s.lr)
        self.stop = stop_tokens(tok, "\n") | {int(tok.eos_token_id)}
        self.pad = int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        self.noise = torch.Generator().manual_seed(derived_seed(seed, f"{scenario}/noise"))
        self.calls = 0
        self.run = Run()

    def _prompt_ids(self, problems: list[Problem]) -> list[list[int]]:
        return [[int(t) for t in self.tok(p.prompt).input_ids] for p in problems]

    def rollouts(self, problems: list[Problem], ids: list[int]) -> ga.Rollouts:
        """``rollouts`` sampled completions of each problem, rewarded (noise where corrupted)."""
        k, prompts = self.s.rollouts, self._prompt_ids(problems)
        self.calls += 1
        completions = sample_completions(
            self.model,
            prompts,
            k,
            stop_token_ids=self.stop,
            pad_token_id=self.pad,
            max_new_tokens=self.s.max_new_tokens,
            temperature=self.s.temperature,
            seed=derived_seed(self.seed, f"{self.scenario}/{self.method}/sample/{self.calls}"),
        )
        self.run.rollouts += len(completions)
        rewards = []
        for row, c in enumerate(completions):
            p = problems[row // k]
            coin = float(torch.rand(1, generator=self.noise).item() < 0.5)  # drawn for every row
            rewards.append(coin if p.corrupted else verify_line(self.tok.decode(c), p.answer))
        return ga.Rollouts.from_token_ids(
            [q for q in prompts for _ in range(k)],
            completions,
            rewards,
            [i for i in ids for _ in range(k)],
            pad_token_id=self.pad,
        )

    def select(self, chunk: list[int], candidates: ga.Rollouts, r: int) -> list[int]:
        keep, m = self.s.keep, self.method
        extractor = ga.LoRAGradient(batch_size=64, share_prompts=True)
        table = ga.Candidates.from_rollouts(candidates)
        if m == "GradAlign":
            val = self.rollouts(self.val, [-1 - i for i in range(len(self.val))])
            if bool((val.group_reward_spread() > 0).any()):
                selector = ga.GradAlign(extractor, policy=ga.policies.TopK(keep))
                return selector.select(self.model, candidates, val).ids.tolist()
            m = "Random"  # no target this round: the validation groups have no spread
        seed = derived_seed(self.seed, f"{self.scenario}/{m}/policy/{r}")
        if m == "LearnAlign":
            grads = extractor.per_group(self.model, candidates).grads
            table = ga.Candidates.from_rollouts(candidates, grads=grads)
            return ga.policies.LearnAlign(keep)(table).tolist()
        policy: Callable[[ga.Candidates], torch.Tensor] = {
            "Random": lambda: ga.policies.Random(keep, seed=seed),
            "AccGreedy": lambda: ga.policies.AccGreedy(keep),
            "AccuracyBand": lambda: ga.policies.AccuracyBand(0.2, 0.8, keep, seed=seed),
            "Learnability": lambda: ga.policies.Learnability(keep),
        }[m]()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a band with fewer than keep problems
            ids = policy(table).tolist()
        if len(ids) < keep:  # fill up at random, so every method trains on keep problems
            rest = [i for i in chunk if i not in ids]
            ids += random.Random(seed).sample(rest, min(keep - len(ids), len(rest)))
        return ids

    def grpo_step(self, ids: list[int]) -> None:
        ro = self.rollouts([self.pool[i] for i in ids], ids)
        weights = ga.GRPOObjective().prepare(ro).token_weights()  # (S, T)
        logp = ga.response_logprobs(self.model, ro.input_ids, ro.attention_mask, ro.response_mask)
        loss = -(weights * logp).sum()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    @torch.no_grad()
    def accuracy(self) -> float:
        """Mean probability of the exact answer line at the sampling temperature."""
        prompts = self._prompt_ids(self.test)
        answers = [
            [int(t) for t in self.tok(f" {p.answer}\n", add_special_tokens=False).input_ids]
            for p in self.test
        ]
        ro = ga.Rollouts.from_token_ids(
            prompts, answers, [0.0] * len(prompts), list(range(len(prompts))), pad_token_id=self.pad
        )
        # at the sampling temperature: the tempered softmax of the logits
        out = self.model(input_ids=ro.input_ids, attention_mask=ro.attention_mask).logits.float()
        lp = torch.log_softmax(out[:, :-1] / self.s.temperature, -1)
        tok_lp = lp.gather(-1, ro.input_ids[:, 1:, None]).squeeze(-1) * ro.response_mask[:, 1:]
        return float(tok_lp.sum(1).exp().mean())

    def shares(self, ids: list[int]) -> dict[str, float]:
        chosen = [self.pool[i] for i in ids]
        n = max(1, len(chosen))
        return {
            "corrupted": sum(p.corrupted for p in chosen) / n,
            "target": sum(p.family == "add" for p in chosen) / n,
            "low_utility": sum(p.low_utility for p in chosen) / n,
        }

    def __call__(self) -> Run:
        start = time.perf_counter()
        cur = ga.Curriculum(
            pool_size=len(self.pool),
            chunk_size=self.s.chunk,
            seed=derived_seed(self.seed, f"{self.scenario}/curriculum"),
        )
        self.run.accuracy.append(self.accuracy())
        for r in range(self.s.rounds):
            chunk = cur.next_chunk().tolist()
            candidates = self.rollouts([self.pool[i] for i in chunk], chunk)
            ids = self.select(chunk, candidates, r)
            cur.record(torch.tensor(ids))
            self.run.shares.append(self.shares(ids))
            for _ in range(self.s.steps_per_round):
                self.grpo_step(ids)
            self.run.accuracy.append(self.accuracy())
        self.run.seconds = time.perf_counter() - start
        return self.run


# -- the whole experiment ------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@contextlib.contextmanager
def _locked(out: Path) -> Any:
    """An exclusive lock beside ``out``: processes running other seeds merge into one JSON."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read(out: Path, settings: Settings) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    expected = asdict(settings) | {"seeds": list(settings.seeds)}
    if data and data.get("settings") != expected:
        raise SystemExit(f"{out} holds another experiment's settings; use another --out")
    data.setdefault("settings", expected)
    data.setdefault("runs", {})
    return data


def run_all(
    settings: Settings,
    out: Path,
    log: Callable[[str], None] = print,
    seeds: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """Run every (seed, scenario, method) not yet in ``out``, saving after each run.

    ``seeds`` restricts this process to some of the settings' seeds: several processes with
    disjoint seeds can share one ``out`` (each run is merged into the file under a lock).
    """
    with _locked(out):
        data = _read(out, settings)
    torch.manual_seed(0)
    base, tok = load_model(settings.quick)
    start = time.perf_counter()
    for seed in settings.seeds if seeds is None else seeds:
        for scenario in SCENARIOS:
            for method in METHODS:
                if str(seed) in data["runs"].get(scenario, {}).get(method, {}):
                    continue
                run = Runner(base, tok, scenario, method, seed, settings)()
                with _locked(out):
                    data = _read(out, settings)
                    slot = data["runs"].setdefault(scenario, {}).setdefault(method, {})
                    slot[str(seed)] = asdict(run)
                    data["wall_seconds"] = data.get("wall_seconds", 0.0) + run.seconds
                    data.setdefault("first_start", time.time() - run.seconds)  # epoch seconds
                    data["last_end"] = time.time()
                    data["cpu"], data["threads"] = cpu_name(), torch.get_num_threads()
                    tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
                    tmp.write_text(json.dumps(data, indent=1))
                    os.replace(tmp, out)
                log(
                    f"[{scenario} {method} seed {seed}] accuracy {run.accuracy[0]:.3f} -> "
                    f"{run.accuracy[-1]:.3f}, {run.seconds:.0f} s (total {time.perf_counter() - start:.0f} s)"
                )
    return data


def _mean_sd(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.fmean(xs):.3f} ± {sd:.3f}"


def report(data: dict[str, Any], png_dir: Path | None = None) -> str:
    """A markdown table per scenario: final accuracy, area under the curve, selection shares."""
    lines = []
    for scenario, methods in data["runs"].items():
        share = {"noisy": "corrupted", "imbalance": "target", "low-utility": "low_utility"}[
            scenario
        ]
        lines += [
            f"### {scenario}",
            "",
            f"| method | final accuracy | area under the curve | {share.replace('_', '-')} share of selections | rollouts per run | seeds |",
            "|---|---|---|---|---|---|",
        ]
        for method, runs in methods.items():
            acc = [r["accuracy"] for r in runs.values()]
            shares = [statistics.fmean(s[share] for s in r["shares"]) for r in runs.values()]
            budget = statistics.fmean(r["rollouts"] for r in runs.values())
            lines.append(
                f"| {method} | {_mean_sd([a[-1] for a in acc])} | "
                f"{_mean_sd([statistics.fmean(a) for a in acc])} | {_mean_sd(shares)} | {budget:.0f} | "
                f"{', '.join(sorted(runs, key=int))} |"
            )
        lines.append("")
        if png_dir is not None:
            plot(scenario, methods, png_dir / f"scenario_{scenario}.png")
    seeds = data["settings"]["seeds"]
    lines.append(
        f"Seeds {seeds}; the runs' times add up to {data.get('wall_seconds', 0) / 3600:.2f} h on "
        f"{data.get('cpu')} ({data.get('threads')} threads per process)"
        + (
            f"; {(data['last_end'] - data['first_start']) / 3600:.2f} h elapsed from the first "
            "run's start to the last run's end."
            if "first_start" in data
            else "."
        )
    )
    return "\n".join(lines)


def plot(scenario: str, methods: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4))
    ax = fig.subplots()
    for method, runs in methods.items():
        curves = torch.tensor([r["accuracy"] for r in runs.values()])  # (seeds, rounds + 1)
        mean = curves.mean(0)
        sd = curves.std(0) if len(curves) > 1 else torch.zeros_like(mean)
        x = list(range(len(mean)))
        ax.plot(x, mean.tolist(), label=method, linewidth=2 if method == "GradAlign" else 1)
        ax.fill_between(x, (mean - sd).tolist(), (mean + sd).tolist(), alpha=0.15)
        ax.set_xticks(x)
    ax.set_xlabel("round (selection + GRPO steps)")
    ax.set_ylabel("held-out accuracy (exact answer probability)")
    ax.set_title(f"{scenario}: mean ± sd over seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/results/scenarios.json"))
    parser.add_argument("--quick", action="store_true", help="tiny model, one seed, < 2 min")
    parser.add_argument("--report", type=Path, help="print the tables of this JSON and draw PNGs")
    parser.add_argument("--png-dir", type=Path, default=Path("docs/img"))
    parser.add_argument(
        "--seeds",
        type=lambda text: tuple(int(x) for x in text.split(",")),
        help="only these of the settings' seeds (e.g. 0,2): run one process per seed in parallel",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.report is not None:
        print(report(json.loads(args.report.read_text()), args.png_dir))
        return
    settings = Settings.quick_settings() if args.quick else Settings()
    torch.set_num_threads(1 if args.quick else (args.threads or torch.get_num_threads()))
    if args.seeds is not None and not set(args.seeds) <= set(settings.seeds):
        raise SystemExit(f"--seeds {args.seeds} are not among the settings' seeds {settings.seeds}")
    data = run_all(settings, args.out, seeds=args.seeds)
    print(report(data))


if __name__ == "__main__":
    main()
