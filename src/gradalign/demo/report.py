"""What the demo reports: AUROC, the selection shares, the ranked table and the score histogram.

Implementations: [`auroc`][gradalign.metrics.auroc] (from [`gradalign.metrics`][gradalign.metrics]), [`corrupted_share`][gradalign.demo.report.corrupted_share],
[`format_table`][gradalign.demo.report.format_table], [`plot_histograms`][gradalign.demo.report.plot_histograms] (the paper's Figure 4, clean vs corrupted),
[`SeedResult`][gradalign.demo.report.SeedResult] (one seed) and [`DemoResult`][gradalign.demo.report.DemoResult] (every seed, their means and the JSON file).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gradalign.metrics import auroc, selected_share

if TYPE_CHECKING:
    from gradalign.demo.config import DemoConfig

__all__ = [
    "DemoResult",
    "SeedResult",
    "TableRow",
    "auroc",
    "corrupted_share",
    "format_table",
    "plot_histograms",
]


def corrupted_share(selected: Sequence[int], corrupted: Collection[int]) -> float:
    """Fraction of the ``selected`` problem ids that are in ``corrupted`` (0.0 if none selected)."""
    return selected_share(selected, corrupted)


@dataclass(frozen=True)
class TableRow:
    """One problem in the ranked table.

    Attributes:
        rank: 1-based rank by cosine score.
        problem_id: The problem (group) id.
        cosine: GradAlign cosine score.
        inner_product: GradAlign inner-product score (with the unit-norm target).
        accuracy: Mean reward the selector saw (corrupted rewards for corrupted problems).
        true_accuracy: Mean verified reward.
        corrupted: Whether the problem's rewards were corrupted.
        selected: Whether GradAlign-cosine selected it.
        question: The question text.
    """

    rank: int
    problem_id: int
    cosine: float
    inner_product: float
    accuracy: float
    true_accuracy: float
    corrupted: bool
    selected: bool
    question: str


def format_table(rows: Sequence[TableRow], question_width: int = 48) -> str:
    """Render the ranked rows as a fixed-width text table (``*`` marks selected problems)."""
    header = (
        f"{'rank':>4} {'sel':>3} {'id':>4} {'cosine':>8} {'inner':>10} {'acc':>5} "
        f"{'true':>5} {'corr':>4}  question"
    )
    lines = [header, "-" * (len(header) + question_width - 8)]
    for r in rows:
        question = r.question.replace("\n", " / ")  # the few-shot line break, kept on one line
        q = question if len(question) <= question_width else question[: question_width - 3]
        q = q + "..." if len(question) > question_width else q
        lines.append(
            f"{r.rank:>4} {'*' if r.selected else '':>3} {r.problem_id:>4} {r.cosine:>8.4f} "
            f"{r.inner_product:>10.3e} {r.accuracy:>5.2f} {r.true_accuracy:>5.2f} "
            f"{'y' if r.corrupted else 'n':>4}  {q}"
        )
    return "\n".join(lines)


def plot_histograms(
    cosine: np.ndarray,
    inner_product: np.ndarray,
    corrupted: np.ndarray,
    path: Path,
    *,
    seeds: Sequence[int] = (),
) -> Path:
    """Histograms of clean vs corrupted scores, one panel per score (the paper's Figure 4).

    Args:
        cosine: (G,) cosine scores (the problems of every seed).
        inner_product: (G,) inner-product scores.
        corrupted: (G,) True for problems with corrupted rewards.
        path: Where to write the PNG (parent folders are created).
        seeds: The seeds pooled in the arrays, named in the title.

    Returns:
        ``path``.
    """
    # A bare Figure renders with Agg and leaves pyplot's global backend and figure list alone.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(10, 3.8))
    axes = fig.subplots(1, 2)
    panels = (("cosine similarity", cosine), ("inner product (unit target)", inner_product))
    for ax, (label, values) in zip(axes, panels, strict=True):
        lo, hi = float(values.min()), float(values.max())
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-12, 21)
        ax.hist(values[~corrupted], bins=bins, alpha=0.6, label="clean", color="tab:blue")
        ax.hist(values[corrupted], bins=bins, alpha=0.6, label="corrupted", color="tab:red")
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_xlabel(f"GradAlign score: {label}")
        ax.set_ylabel("problems")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
    pooled = f" ({len(corrupted)} problems, seeds {_seed_list(seeds)})" if seeds else ""
    fig.suptitle(f"Alignment with the validation gradient: clean vs corrupted rewards{pooled}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _seed_list(seeds: Sequence[int]) -> str:
    items = sorted(seeds)
    if len(items) > 2 and items == list(range(items[0], items[-1] + 1)):
        return f"{items[0]}-{items[-1]}"
    return ", ".join(str(s) for s in items)


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0.0 for a single value)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


@dataclass(frozen=True)
class SeedResult:
    """What one seed of the demo measured.

    Attributes:
        seed: The seed.
        rows: The pool ranked by cosine score.
        num_selected: Problems each method selects.
        selections: Method name -> selected problem ids in rank order.
        shares: Method name -> share of corrupted problems in its selection.
        pool_share: Share of corrupted problems in the pool (a blind selector's expectation).
        aurocs: Score name -> clean-vs-corrupted AUROC (clean is the positive class).
        stats: Summary counts: verified accuracy, zero-spread groups, completion lengths.
        timings: Stage name -> seconds.
    """

    seed: int
    rows: list[TableRow]
    num_selected: int
    selections: dict[str, list[int]]
    shares: dict[str, float]
    pool_share: float
    aurocs: dict[str, float]
    stats: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: aurocs, shares, pool_share, timings, stats, selections and the table."""
        return {
            "seed": self.seed,
            "aurocs": self.aurocs,
            "shares": self.shares,
            "pool_share": self.pool_share,
            "num_selected": self.num_selected,
            "selections": self.selections,
            "stats": self.stats,
            "timings": self.timings,
            "problems": [dataclasses.asdict(r) for r in self.rows],
        }


@dataclass(frozen=True)
class DemoResult:
    """Every seed of one demo run, with the means the summary reports.

    Attributes:
        config: The settings used.
        seeds: One [`SeedResult`][gradalign.demo.report.SeedResult] per seed, in run order.
        png_path: The histogram PNG (problems of every seed pooled); None without matplotlib.
        timings: "load model" and "total" seconds.
    """

    config: DemoConfig
    seeds: list[SeedResult]
    png_path: Path | None
    timings: dict[str, float] = field(default_factory=dict)

    def _stat(self, key: str) -> dict[str, tuple[float, float]]:
        names = getattr(self.seeds[0], key)
        return {n: _mean_sd([getattr(s, key)[n] for s in self.seeds]) for n in names}

    @property
    def aurocs(self) -> dict[str, float]:
        """Score name -> AUROC, the mean over seeds."""
        return {n: m for n, (m, _) in self._stat("aurocs").items()}

    @property
    def shares(self) -> dict[str, float]:
        """Method name -> corrupted share of its selection, the mean over seeds."""
        return {n: m for n, (m, _) in self._stat("shares").items()}

    @property
    def pool_share(self) -> float:
        """Corrupted share of the pool, the mean over seeds."""
        return float(np.mean([s.pool_share for s in self.seeds]))

    def as_dict(self) -> dict[str, Any]:
        """The JSON object: means at the top level, ``sd`` beside them, one object per seed."""
        timings = dict(self.timings)
        for stage in self.seeds[0].timings:
            timings[stage] = float(sum(s.timings[stage] for s in self.seeds))
        return {
            "aurocs": self.aurocs,
            "shares": self.shares,
            "pool_share": self.pool_share,
            "sd": {
                "aurocs": {n: sd for n, (_, sd) in self._stat("aurocs").items()},
                "shares": {n: sd for n, (_, sd) in self._stat("shares").items()},
            },
            "stats": {n: m for n, (m, _) in self._stat("stats").items()},
            "config": self.config.as_dict(),
            "timings": timings,
            "png": None if self.png_path is None else str(self.png_path),
            "problems": [{"seed": s.seed, **row} for s in self.seeds for row in _rows(s)],
            "per_seed": [s.as_dict() for s in self.seeds],
        }

    def write_json(self, path: Path) -> Path:
        """Write `as_dict` to ``path`` (parent folders are created); returns ``path``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_dict(), indent=1) + "\n")
        return path

    def report(self) -> str:
        """The printed report: the last seed's table, the per-seed table and the summary."""
        c, last = self.config, self.seeds[-1]
        lines = [f"Ranked pool of seed {last.seed} (* = selected by GradAlign):"]
        lines += [format_table(last.rows), ""]
        lines.append(
            f"Per seed: top {c.select_fraction:.0%} of {c.pool} problems = {last.num_selected} "
            f"selected per method; the pool holds {self.pool_share:.2f} corrupted."
        )
        lines += _per_seed_table(self.seeds)
        lines.append("")
        lines.append(f"Summary over seeds {_seed_list(c.seeds)} (mean ± sd):")
        lines += _summary(self._stat("shares"), "corrupted share of the selection")
        lines += _summary(self._stat("aurocs"), "AUROC clean vs corrupted (0.5 = chance)")
        stats = self._stat("stats")
        lines.append("Stats (mean): " + ", ".join(f"{k} {m:.3g}" for k, (m, _) in stats.items()))
        lines.append("Time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in self.timings.items()))
        shown = self.png_path or "not drawn (pip install 'gradalign[demo]' for matplotlib)"
        lines.append(f"Histogram: {shown}")
        return "\n".join(lines)


def _rows(seed: SeedResult) -> list[dict[str, Any]]:
    return [dataclasses.asdict(r) for r in seed.rows]


_SHORT = {"GradAlign (inner product)": "GradAlign-IP", "inner_product": "inner prod"}


def _per_seed_table(seeds: Sequence[SeedResult]) -> list[str]:
    shares, aurocs = list(seeds[0].shares), list(seeds[0].aurocs)
    left_w, right_w = 13 * len(shares), 11 * len(aurocs)
    lines = [f"{'':5}{'corrupted share':^{left_w}} | {'AUROC clean vs corrupted':^{right_w}}"]
    left = " ".join(f"{_SHORT.get(n, n):>12}" for n in shares)
    right = " ".join(f"{_SHORT.get(n, n):>10}" for n in aurocs)
    lines.append(f"{'seed':>4} {left} | {right}")
    for s in seeds:
        left = " ".join(f"{s.shares[n]:>12.2f}" for n in shares)
        right = " ".join(f"{s.aurocs[n]:>10.3f}" for n in aurocs)
        lines.append(f"{s.seed:>4} {left} | {right}")
    return lines


def _summary(stat: Mapping[str, tuple[float, float]], label: str) -> list[str]:
    return [f"  {label}:"] + [f"    {n:<28} {m:.3f} ± {sd:.3f}" for n, (m, sd) in stat.items()]
