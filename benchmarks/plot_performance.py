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


Panel = tuple[str, str, list[str], list[float], list[float | None], list[str] | None]
"""(time title, memory title, bar labels, x training step, peak RSS MiB or None, bar colors or
None for blue time and orange memory bars)."""


def draw(panels: list[Panel], out: Path, height: float) -> None:
    """One row per panel: time bars (x one training step) left, peak-memory bars right."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, height * len(panels)))
    axes = fig.subplots(len(panels), 2, squeeze=False)
    for row, (time_title, memory_title, labels, ratios, peaks, colors) in zip(
        axes, panels, strict=True
    ):
        row[0].barh(labels, ratios, color=colors or "tab:blue")
        row[0].axvline(1.0, color="grey", lw=0.8, ls="--")
        row[0].set_xlabel("time, x one training forward+backward")
        row[0].set_title(time_title, fontsize=9)
        if all(p is not None for p in peaks):
            row[1].barh(labels, peaks, color=colors or "tab:orange")
            row[1].set_xlabel("peak RSS of a fresh process, MiB (model included)")
            row[1].set_title(memory_title, fontsize=9)
            row[1].set_yticklabels([])
        else:
            row[1].set_axis_off()
        for ax in row:
            ax.invert_yaxis()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def plot(bench: dict, out: Path) -> None:
    """Every extractor of ``bench_extractors.py --json``, one row per model."""
    panels: list[Panel] = []
    for key, table in bench["models"].items():
        methods = table["methods"]
        names = [m for m in LABELS if m in methods]
        panels.append(
            (
                f"{key}: time ({table['threads']} thread(s))",
                f"{key}: memory",
                [LABELS[m] for m in names],
                [methods[m]["x_train"] for m in names],
                [methods[m]["peak_rss_mib"] for m in names],
                None,
            )
        )
    draw(panels, out, 3.2)


def plot_bergson(bench: dict, out: Path) -> None:
    """gradalign beside bergson (``bench_bergson.py --json``), one row per model and threads."""
    panels: list[Panel] = []
    for run in bench["runs"]:
        methods = run["methods"]
        names = [m for m in methods if m != "train"]
        title = f"{run['title']}, {run['threads']} thread(s)"
        panels.append(
            (
                f"{title}: time",
                f"{title}: memory",
                [methods[m]["label"] for m in names],
                [methods[m]["x_train"] for m in names],
                [methods[m]["peak_rss_mib"] for m in names],
                ["tab:blue" if m.startswith("gradalign") else "tab:grey" for m in names],
            )
        )
    draw(panels, out, 2.6)


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
