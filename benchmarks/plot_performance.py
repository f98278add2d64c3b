"""Bars of each extractor's time (x one training step) and peak memory, from bench JSON files.

Usage:
    python benchmarks/bench_extractors.py --json docs/results/bench_extractors.json
    python benchmarks/plot_performance.py docs/results/bench_extractors.json --out docs/img/performance.png
    python benchmarks/bench_bergson.py --json docs/results/bench_bergson.json
    python benchmarks/plot_performance.py docs/results/bench_bergson.json --out docs/img/bergson.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

LABELS = {
    "train": "training step",
    "factorized": "FactorizedGradient(16, 16)",
    "random-projected": "RandomProjectedGradient(8192)",
    "full": "FullGradient",
    "per-group loop": "per-group backward loop",
}


def plot(bench: dict, out: Path) -> None:
    from matplotlib.figure import Figure

    models = bench["models"]
    fig = Figure(figsize=(10, 3.2 * len(models)))
    axes = fig.subplots(len(models), 2, squeeze=False)
    for row, (key, table) in zip(axes, models.items(), strict=True):
        names = [m for m in LABELS if m in table["methods"]]
        ratios = [table["methods"][m]["x_train"] for m in names]
        row[0].barh([LABELS[m] for m in names], ratios, color="tab:blue")
        row[0].axvline(1.0, color="grey", lw=0.8, ls="--")
        row[0].set_xlabel("time, x one training forward+backward")
        row[0].set_title(f"{key}: time ({table['threads']} thread(s))", fontsize=9)
        peaks = [table["methods"][m]["peak_rss_mib"] for m in names]
        if all(p is not None for p in peaks):
            row[1].barh([LABELS[m] for m in names], peaks, color="tab:orange")
            row[1].set_xlabel("peak RSS of a fresh process, MiB (model included)")
            row[1].set_title(f"{key}: memory", fontsize=9)
            row[1].set_yticklabels([])
        for ax in row:
            ax.invert_yaxis()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def plot_bergson(bench: dict, out: Path) -> None:
    """gradalign beside bergson: time (x training step) and peak RSS per run (model, threads)."""
    from matplotlib.figure import Figure

    runs = bench["runs"]
    fig = Figure(figsize=(10, 2.6 * len(runs)))
    axes = fig.subplots(len(runs), 2, squeeze=False)
    for row, run in zip(axes, runs, strict=True):
        methods = run["methods"]
        names = [m for m in methods if m != "train"]
        colors = ["tab:blue" if m.startswith("gradalign") else "tab:grey" for m in names]
        labels = [m.replace(":", " ") + "x" + m.partition(":")[2] for m in names]
        row[0].barh(labels, [methods[m]["x_train"] for m in names], color=colors)
        row[0].axvline(1.0, color="grey", lw=0.8, ls="--")
        row[0].set_xlabel("time, x one training forward+backward")
        title = f"{run['title']}, {run['threads']} thread(s)"
        row[0].set_title(f"{title}: time", fontsize=9)
        peaks = [methods[m]["peak_rss_mib"] for m in names]
        if all(p is not None for p in peaks):
            row[1].barh(labels, peaks, color=colors)
            row[1].set_xlabel("peak RSS of a fresh process, MiB (model included)")
            row[1].set_title(f"{title}: memory", fontsize=9)
            row[1].set_yticklabels([])
        else:
            row[1].set_axis_off()
        for ax in row:
            ax.invert_yaxis()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "bench", type=Path, help="a JSON written by bench_extractors.py or bench_bergson.py --json"
    )
    parser.add_argument("--out", type=Path, default=Path("docs/img/performance.png"))
    args = parser.parse_args()
    bench = json.loads(args.bench.read_text())
    (plot_bergson if "runs" in bench else plot)(bench, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
