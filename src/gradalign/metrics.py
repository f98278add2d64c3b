"""How good a selection is, when you know which problems are bad: AUROC and selected share.

For experiments where a subset of the pool is flagged (corrupted rewards, another task, ...):
[`auroc`][gradalign.metrics.auroc] says how well the scores separate the clean problems from the
flagged ones over the whole pool, [`selected_share`][gradalign.metrics.selected_share] what fraction
of a selection is flagged.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np
import torch

from gradalign.errors import GradAlignError

__all__ = ["auroc", "selected_share"]


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

    Examples:
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


def selected_share(selected: Sequence[int] | torch.Tensor, flagged: Collection[int]) -> float:
    """Fraction of the ``selected`` problem ids that are in ``flagged`` (0.0 if none selected).

    Examples:
        >>> selected_share([3, 7, 9, 12], flagged={7, 8})
        0.25
    """
    ids = selected.tolist() if isinstance(selected, torch.Tensor) else list(selected)
    if len(ids) == 0:
        return 0.0
    wanted = {int(i) for i in flagged}
    return sum(int(i) in wanted for i in ids) / len(ids)
