"""What the demo reports: AUROC, the selection shares, the ranked table and the score histogram.

Implementations: :func:`auroc` (rank-based Mann-Whitney U), :func:`corrupted_share`,
:func:`format_table` and :func:`plot_histograms` (the paper's Figure 4, clean vs corrupted).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gradalign.errors import GradAlignError

__all__ = ["TableRow", "auroc", "corrupted_share", "format_table", "plot_histograms"]


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    start = 0
    while start < len(x):
        stop = start
        while stop + 1 < len(x) and sorted_x[stop + 1] == sorted_x[start]:
            stop += 1
        ranks[order[start : stop + 1]] = (start + stop) / 2 + 1
        start = stop + 1
    return ranks


def auroc(scores: Sequence[float] | np.ndarray, positive: Sequence[bool] | np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` separating positives from negatives.

    Computed as the Mann-Whitney U statistic over all (positive, negative) pairs: a pair counts 1
    when the positive scores higher, 1/2 when they tie. 1.0 ranks every positive first, 0.5 is
    chance (and the value when all scores are equal).

    Args:
        scores: (N,) finite scores; higher means "more likely positive".
        positive: (N,) class labels.

    Returns:
        The AUROC in [0, 1].

    Raises:
        GradAlignError: If the shapes differ, a score is not finite, or a class is empty.

    Example:
        >>> auroc([0.9, 0.1, 0.5, 0.5], [True, False, True, False])
        0.875
    """
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positive, dtype=bool)
    if s.ndim != 1 or s.shape != pos.shape:
        raise GradAlignError(
            f"auroc: scores and positive must be 1-D of one length, got {s.shape} and {pos.shape}"
        )
    if not np.isfinite(s).all():
        raise GradAlignError(f"auroc: scores must be finite, got {s[~np.isfinite(s)][:3]}")
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise GradAlignError(
            f"auroc: needs both classes, got {n_pos} positive and {n_neg} negative"
        )
    rank_sum = _average_ranks(s)[pos].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def corrupted_share(selected: Sequence[int], corrupted: Collection[int]) -> float:
    """Fraction of the ``selected`` problem ids that are in ``corrupted`` (0.0 if none selected)."""
    if len(selected) == 0:
        return 0.0
    return sum(int(i) in corrupted for i in selected) / len(selected)


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
        q = r.question if len(r.question) <= question_width else r.question[: question_width - 3]
        q = q + "..." if len(r.question) > question_width else q
        lines.append(
            f"{r.rank:>4} {'*' if r.selected else '':>3} {r.problem_id:>4} {r.cosine:>8.4f} "
            f"{r.inner_product:>10.3e} {r.accuracy:>5.2f} {r.true_accuracy:>5.2f} "
            f"{'y' if r.corrupted else 'n':>4}  {q}"
        )
    return "\n".join(lines)


def plot_histograms(
    cosine: np.ndarray, inner_product: np.ndarray, corrupted: np.ndarray, path: Path
) -> Path:
    """Histograms of clean vs corrupted scores, one panel per score (the paper's Figure 4).

    Args:
        cosine: (G,) cosine scores.
        inner_product: (G,) inner-product scores.
        corrupted: (G,) True for problems with corrupted rewards.
        path: Where to write the PNG (parent folders are created).

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
    fig.suptitle("Alignment with the validation gradient: clean vs corrupted rewards")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
