"""gradalign's FactorizedGradient beside bergson's in-memory per-example collector (CPU).

Both tools compute one projected gradient per sequence of the same per-token-mean loss (the mean
negative log-likelihood of the sequence's response tokens) over the weights of every linear layer
of the decoder (the output head left out, bergson's default coverage), at the same projection
size: K x K per layer (16 x 16, then 32 x 32), each side of a layer's gradient projected to K.
gradalign runs with one group per sequence and ``TokenWeightObjective`` weights
``response_mask / response_length`` (no group centring); bergson runs its ``InMemoryCollector``
through ``CollectorComputer`` on a ``datasets.Dataset`` of the same tokens (labels -100 outside
the response, ``loss_reduction="mean"``), the model prepared as bergson's own build prepares it
(parameters frozen, the input embeddings trainable). Both use the same micro-batch; inputs are
built before the clock starts.

Every method runs over the same batch in one process, interleaved (repeat r runs all methods before
repeat r + 1), and its median wall time is divided by that of one plain HF training
forward+backward (``model(..., labels=...).loss.backward()``, every parameter trainable) over the
same batch and micro-batches. Repeat r uses projection seed r for both tools.

Columns:
    wall s        median wall time of one run; x train: over the training step's
    cpu s         median process CPU time of one run (all threads); x train: likewise. On a
                  loaded machine wall time includes waiting for a core, CPU time does not
    growth MiB    growth of this process's resident set during one run (VmHWM after resetting it
                  through /proc/self/clear_refs, minus VmRSS before; ru_maxrss growth where the
                  reset is not available), the largest over the repeats
    peak RSS MiB  peak resident set of a fresh process that loads the model and runs the method
                  once (``--one METHOD``; the peak is reset after loading), interpreter, torch and
                  model included; gradalign's process never imports bergson
    over loaded   that peak minus the fresh process's RSS before the run
    corr          ranking quality: Pearson correlation between the off-diagonal pairwise cosines
                  of the projected per-sequence gradients and those of the exact ones
                  (``FullGradient(target_modules="all-linear")`` with one sequence per group,
                  biases dropped), mean over the repeats' seeds (+- their standard deviation);
                  the exact rows need about (S + 2) x D x 4 bytes for a moment (4.2 GB on SmolLM2)

If bergson is not importable, the benchmark says so and prints gradalign's rows alone.

Usage:
    python benchmarks/bench_bergson.py                 # tiny Qwen2 and SmolLM2, 1 thread
    python benchmarks/bench_bergson.py --threads 1,2   # each model at 1 then 2 threads
    python benchmarks/bench_bergson.py --quick         # tiny Qwen2 only, 1 repeat, no subprocesses
    python benchmarks/bench_bergson.py --one bergson:16 --models smollm2   # JSON peak RSS
    python benchmarks/bench_bergson.py --json docs/results/bench_bergson.json  # also a JSON
                                                     # (plot_performance.py draws its bars)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # bergson's progress bars

import torch
from torch import nn

from bench_extractors import (
    CAN_RESET,
    MEMORY_HOW,
    _peak_growth,
    _peak_start,
    _status,
    make_rollouts,
    small_qwen,
    smollm2,
)
from gradalign import FactorizedGradient, FullGradient, Rollouts
from gradalign.objective import TokenWeightObjective

Rows = torch.Tensor | None
"""(S, D) per-sequence rows over the linear layers' weights, or None (the training step)."""

Method = Callable[[nn.Module, "Inputs", int], Rows]
"""(model, inputs, projection seed) -> rows."""


# --------------------------------------------------------------------------- bergson, if present

_BERGSON: Any = None
_BERGSON_MISSING: str | None = None


def load_bergson() -> Any:
    """The bergson module, or None (the reason is in ``_BERGSON_MISSING``)."""
    global _BERGSON, _BERGSON_MISSING
    if _BERGSON is None and _BERGSON_MISSING is None:
        for name in ("bitsandbytes", "bergson", "httpx", "datasets"):  # import-time chatter
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            import bergson
        except Exception as exc:  # not installed, or installed against another torch
            _BERGSON_MISSING = f"{type(exc).__name__}: {exc}"
        else:
            _BERGSON = bergson
    return _BERGSON


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Inputs:
    """One batch in each tool's format, built before any clock starts."""

    rollouts: Rollouts  # one group per sequence
    objective: TokenWeightObjective  # per-token mean over each sequence's response
    labels: torch.Tensor  # (S, T) input ids, -100 outside the response
    batch_size: int  # sequences per forward/backward, every method
    dataset: Any  # bergson's datasets.Dataset (None without bergson)
    run_dir: str  # bergson writes a small counter file under it


def make_inputs(sequences: int, tokens: int, vocab: int, batch_size: int, run_dir: str) -> Inputs:
    ro = make_rollouts(sequences, 1, tokens, vocab, seed=0)  # group g = sequence g
    mask = ro.response_mask
    weights = mask.float() / mask.sum(1, keepdim=True).clamp(min=1)  # (S, T)
    labels = torch.where(mask, ro.input_ids, -100)  # (S, T)
    dataset = None
    if load_bergson() is not None:
        from datasets import Dataset

        lengths = ro.attention_mask.sum(1).tolist()
        dataset = Dataset.from_dict(
            {
                "input_ids": [r[:n] for r, n in zip(ro.input_ids.tolist(), lengths, strict=True)],
                "labels": [r[:n] for r, n in zip(labels.tolist(), lengths, strict=True)],
            }
        )
    return Inputs(ro, TokenWeightObjective(weights), labels, batch_size, dataset, run_dir)


def vocab_size(model: nn.Module) -> int:
    config: Any = model.config
    return int(config.vocab_size)


@contextlib.contextmanager
def trainable(model: nn.Module, which: str) -> Iterator[None]:
    """Set requires_grad ("all", or "embeddings" as bergson's build does); restore on exit."""
    flags = [p.requires_grad for p in model.parameters()]
    try:
        model.requires_grad_(which == "all")
        if which == "embeddings":
            hf: Any = model  # a transformers model
            hf.get_input_embeddings().requires_grad_(True)
        yield
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)


# --------------------------------------------------------------------------- methods


def train_step(model: nn.Module, x: Inputs, seed: int) -> Rows:
    """One plain HF training forward+backward over the batch, gradients into .grad."""
    del seed
    ro = x.rollouts
    with trainable(model, "all"):
        for rows in torch.arange(len(ro)).split(x.batch_size):
            width = int(ro.attention_mask[rows].sum(1).max())
            out = model(
                input_ids=ro.input_ids[rows, :width],
                attention_mask=ro.attention_mask[rows, :width],
                labels=x.labels[rows, :width],
            )
            out.loss.backward()
        model.zero_grad(set_to_none=True)
    return None


def gradalign_method(dim: int) -> Method:
    def run(model: nn.Module, x: Inputs, seed: int) -> Rows:
        ext = FactorizedGradient(
            dim_in=dim,
            dim_out=dim,
            seed=seed,
            target_modules="all-linear",
            batch_size=x.batch_size,
        )
        out = ext.per_group(model, x.rollouts, x.objective)
        # each layer's segment is its dim * dim weight block, then dim bias columns if it has one
        return torch.cat([out.grads[:, s.start : s.start + dim * dim] for s in out.segments], 1)

    return run


def bergson_method(dim: int) -> Method:
    def run(model: nn.Module, x: Inputs, seed: int) -> Rows:
        bg = load_bergson()
        from bergson.collector.collector import CollectorComputer

        cfg = bg.IndexConfig(
            run_path=os.path.join(x.run_dir, "index"),
            projection_dim=dim,
            projection_seed=seed,
            loss_reduction="mean",
        )
        cfg.partial_run_path.mkdir(parents=True, exist_ok=True)
        processor = bg.GradientProcessor(projection_dim=dim, projection_seed=seed)
        n = len(x.dataset)
        batches = [list(range(i, min(i + x.batch_size, n))) for i in range(0, n, x.batch_size)]
        logging.disable(logging.INFO)  # its loggers reset themselves to INFO on every run
        with trainable(model, "embeddings"), contextlib.ExitStack() as undo:
            undo.callback(logging.disable, logging.NOTSET)
            collector = bg.InMemoryCollector(
                model=model.base_model, cfg=cfg, processor=processor, data=x.dataset
            )
            computer = CollectorComputer(
                model=model, data=x.dataset, collector=collector, batches=batches, cfg=cfg
            )
            computer.run_with_collector_hooks(desc="bench")
        return torch.cat([collector.gradients[name] for name in collector.shapes()], 1).float()

    return run


def methods(dims: list[int], with_bergson: bool) -> dict[str, Method]:
    table: dict[str, Method] = {"train": train_step}
    for dim in dims:
        table[f"gradalign:{dim}"] = gradalign_method(dim)
        if with_bergson:
            table[f"bergson:{dim}"] = bergson_method(dim)
    return table


def label(key: str) -> str:
    tool, _, dim = key.partition(":")
    return f"{tool} {dim}x{dim}" if dim else tool


# --------------------------------------------------------------------------- quality


def gram(blocks: list[torch.Tensor]) -> torch.Tensor:
    """(S, S) float64 Gram matrix of rows split into column blocks, a bounded slice at a time."""
    out = torch.zeros(len(blocks[0]), len(blocks[0]), dtype=torch.float64)
    for block in blocks:
        for piece in block.split(1 << 18, dim=1):
            p = piece.double()
            out += p @ p.T
    return out


def exact_gram(model: nn.Module, x: Inputs) -> torch.Tensor:
    """(S, S) Gram matrix of the exact per-sequence gradients of the linear layers' weights
    (biases dropped), from ``FullGradient`` with one sequence per group."""
    out = FullGradient(target_modules="all-linear", batch_size=x.batch_size).per_group(
        model, x.rollouts, x.objective
    )
    keep = [s for s in out.segments if s.name.endswith(".weight")]
    return gram([out.grads[:, s.start : s.stop] for s in keep])


def off_diagonal_cosines(g: torch.Tensor) -> torch.Tensor:
    """(S * (S - 1) / 2,) cosines between distinct rows, from their (S, S) Gram matrix."""
    norms = g.diagonal().clamp(min=1e-300).sqrt()
    i, j = torch.triu_indices(len(g), len(g), offset=1)
    return g[i, j] / (norms[i] * norms[j])


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


# --------------------------------------------------------------------------- measuring


@dataclass
class Result:
    wall: list[float]
    cpu: list[float]
    growth: int = 0
    corr: list[float] | None = None
    peak: dict[str, int] | None = None


def measure(
    model: nn.Module,
    x: Inputs,
    table: dict[str, Method],
    repeats: int,
    exact: torch.Tensor,
) -> dict[str, Result]:
    """Interleaved repeats; repeat r projects with seed r. ``exact``: the exact off-diagonal
    cosines each method's are correlated with."""
    results = {key: Result(wall=[], cpu=[]) for key in table}
    for run in table.values():  # warm-up: allocator, kernels, lazy imports
        run(model, x, 0)
    for r in range(repeats):
        for key, run in table.items():
            start = _peak_start()
            t0, c0 = time.perf_counter(), time.process_time()
            rows = run(model, x, r)
            results[key].wall.append(time.perf_counter() - t0)
            results[key].cpu.append(time.process_time() - c0)
            results[key].growth = max(results[key].growth, _peak_growth(start))
            if rows is not None:
                corr = results[key].corr = results[key].corr or []
                corr.append(correlation(off_diagonal_cosines(gram([rows])), exact))
            del rows
    return results


MODELS: dict[str, tuple[str, Callable[[], nn.Module], int, int]] = {
    "small": ("Qwen2 h256 L4 V1000", small_qwen, 64, 32),
    "smollm2": ("SmolLM2-135M", smollm2, 8, 8),
}
"""key -> (title, loader, sequences, micro-batch); 64 tokens per sequence."""
TOKENS = 64


def bench_model(
    key: str, dims: list[int], repeats: int, threads: int, peak_rss: bool, run_dir: str
) -> dict[str, Result]:
    name, load, sequences, batch_size = MODELS[key]
    model = load()
    x = make_inputs(sequences, TOKENS, vocab_size(model), batch_size, run_dir)
    exact = off_diagonal_cosines(exact_gram(model, x))  # the (G, D) rows are freed here
    table = methods(dims, load_bergson() is not None)
    results = measure(model, x, table, repeats, exact)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    if peak_rss:
        for method in table:
            results[method].peak = one_in_subprocess(method, key, threads)
    title = (
        f"{name}: {n_params / 1e6:.1f}M parameters, {sequences} sequences x {TOKENS} tokens, "
        f"micro-batch {batch_size}, {threads} thread{'s' if threads > 1 else ''}"
    )
    report(title, results, repeats, dims)
    return results


def report(title: str, results: dict[str, Result], repeats: int, dims: list[int]) -> None:
    med = statistics.median
    base, base_cpu = med(results["train"].wall), med(results["train"].cpu)
    loaded = results["train"].peak
    extra = f"; loaded {loaded['loaded'] / 2**20:.0f} MiB" if loaded else ""
    print(f"\n{title}  (median of {repeats} interleaved repeats{extra})")
    print(
        f"  {'method':<18}{'wall s':>8}{'x train':>9}{'cpu s':>8}{'x train':>9}{'growth MiB':>12}{'peak RSS MiB':>14}"
        f"{'over loaded':>13}  corr (cosines vs exact)"
    )
    for key, res in results.items():
        sec, cpu = med(res.wall), med(res.cpu)
        peak = f"{res.peak['peak'] / 2**20:14.0f}" if res.peak else f"{'-':>14}"
        over = (
            f"{(res.peak['peak'] - res.peak['loaded']) / 2**20:13.0f}" if res.peak else f"{'-':>13}"
        )
        corr = "-"
        if res.corr:
            corr = f"{statistics.mean(res.corr):.3f}"
            if len(res.corr) > 1:
                corr += f" +- {statistics.stdev(res.corr):.3f}"
        print(
            f"  {label(key):<18}{sec:8.2f}{sec / base:9.2f}{cpu:8.2f}{cpu / base_cpu:9.2f}{res.growth / 2**20:12.0f}"
            f"{peak}{over}  {corr}"
        )
    for dim in dims:
        ours, theirs = results[f"gradalign:{dim}"], results.get(f"bergson:{dim}")
        if theirs is None:
            continue
        speed = med(theirs.wall) / med(ours.wall)
        speed_cpu = med(theirs.cpu) / med(ours.cpu)
        line = (
            f"  {dim}x{dim}: gradalign {speed:.2f}x faster than bergson (CPU time {speed_cpu:.2f}x)"
        )
        if ours.peak and theirs.peak:
            line += (
                f"; peak RSS {ours.peak['peak'] / 2**20:.0f} vs {theirs.peak['peak'] / 2**20:.0f}"
                " MiB"
            )
        print(line)


def summary(key: str, threads: int, repeats: int, results: dict[str, Result]) -> dict[str, Any]:
    """One (model, threads) table for ``--json``: medians, ratios, peak RSS and quality."""
    med = statistics.median
    base = med(results["train"].wall)
    methods: dict[str, Any] = {}
    for name, res in results.items():
        methods[name] = {
            "label": label(name),
            "seconds": med(res.wall),
            "x_train": med(res.wall) / base,
            "cpu_seconds": med(res.cpu),
            "peak_rss_mib": res.peak["peak"] / 2**20 if res.peak else None,
            "corr_mean": statistics.mean(res.corr) if res.corr else None,
            "corr_sd": statistics.stdev(res.corr) if res.corr and len(res.corr) > 1 else None,
        }
    return {
        "model": key,
        "title": MODELS[key][0],
        "threads": threads,
        "repeats": repeats,
        "methods": methods,
    }


def one_in_subprocess(method: str, key: str, threads: int) -> dict[str, int]:
    """Run ``--one method`` in a fresh interpreter; its RSS before the run and its peak."""
    cmd = [sys.executable, os.path.abspath(__file__), "--one", method, "--models", key]
    cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"--one {method} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_one(method: str, key: str, run_dir: str) -> None:
    """Load the model, run one method once, print JSON: RSS before the run and the peak (bytes)."""
    tool, _, dim = method.partition(":")
    if tool == "bergson" and load_bergson() is None:
        raise SystemExit(f"bergson is not importable: {_BERGSON_MISSING}")
    _, load, sequences, batch_size = MODELS[key]
    model = load()
    x = make_inputs(sequences, TOKENS, vocab_size(model), batch_size, run_dir)
    run = methods([int(dim)] if dim else [], tool == "bergson")[method]
    with torch.no_grad():
        sum(float(p.sum()) for p in model.parameters())  # page in memory-mapped weights
    loaded = _peak_start()  # reset here: loading may have peaked higher than the run
    loaded = _status("VmRSS:") if CAN_RESET else loaded
    run(model, x, 0)
    if CAN_RESET:
        peak = _status("VmHWM:")
    else:  # ru_maxrss (KiB on Linux) cannot be reset: it may be the loading peak
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"loaded": loaded, "peak": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny Qwen2 only, 1 repeat")
    parser.add_argument("--models", default=None, help="comma list: small, smollm2")
    parser.add_argument("--dims", default="16,32", help="comma list of K (K x K per layer)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats")
    parser.add_argument("--threads", default="1", help="comma list of torch CPU thread counts")
    parser.add_argument(
        "--peak-rss",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="each method's peak RSS in a fresh subprocess (default: on, off with --quick)",
    )
    parser.add_argument("--one", default=None, help="run only this method once; print JSON")
    parser.add_argument("--json", type=Path, help="also write the tables to this JSON file")
    args = parser.parse_args()
    models = (args.models or ("small" if args.quick else "small,smollm2")).split(",")
    threads = [int(t) for t in args.threads.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-bergson-") as run_dir:
        if args.one is not None:
            torch.set_num_threads(threads[0])
            run_one(args.one, models[0], run_dir)
            return
        dims = [int(d) for d in args.dims.split(",")]
        repeats = args.repeats or (1 if args.quick else 3)
        peak_rss = not args.quick if args.peak_rss is None else args.peak_rss
        bg = load_bergson()
        print(f"torch {torch.__version__}; memory: {MEMORY_HOW}")
        if bg is None:
            print(
                f"bergson is missing ({_BERGSON_MISSING}): gradalign's rows only "
                "(make bench-bergson installs it into .venv-bench)"
            )
        else:
            print(f"bergson {bg.__version__}")
        speedups, runs = [], []
        for n in threads:
            torch.set_num_threads(n)
            for key in models:
                # peak RSS hardly depends on threads: measured at the first count only
                first = n == threads[0]
                results = bench_model(key, dims, repeats, n, peak_rss and first, run_dir)
                runs.append(summary(key, n, repeats, results))
                if key == "smollm2" and "bergson:16" in results:
                    ours, theirs = results["gradalign:16"], results["bergson:16"]
                    speedups.append(
                        (
                            n,
                            statistics.median(theirs.wall) / statistics.median(ours.wall),
                            statistics.median(theirs.cpu) / statistics.median(ours.cpu),
                        )
                    )
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            version = None if bg is None else bg.__version__
            record = {"torch": torch.__version__, "bergson": version, "runs": runs}
            args.json.write_text(json.dumps(record, indent=1))
        for n, speed, speed_cpu in speedups:
            verdict = "met" if speed >= 1.3 else "NOT met"
            print(
                f"\nSmolLM2 16x16 at {n} thread{'s' if n > 1 else ''}: gradalign {speed:.2f}x "
                f"faster than bergson, CPU time {speed_cpu:.2f}x (target >= 1.3 in wall time: {verdict})"
            )


if __name__ == "__main__":
    main()
