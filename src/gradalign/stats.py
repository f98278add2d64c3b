"""Per-group reward statistics and the one rule that decides "this group has no reward spread".

Every stage that asks whether a group carries a learning signal (the objective's weights, the
extractors' ``zero_spread`` flags, the candidate table, [`DropZeroVariance`][gradalign.policies.DropZeroVariance],
[`Informative`][gradalign.rounds.Informative] and the integrations) reads it from here:

    a group has no spread  <=>  max(rewards) - min(rewards) <= tol     (tol = 0 by default)

Its GRPO gradient is then exactly zero (every advantage is 0), whatever the reward scaling.

Implementations: [`GroupStats`][gradalign.stats.GroupStats] (counts, mean, population and unbiased std, spread,
flags) built by [`group_stats`][gradalign.stats.group_stats], and [`zero_spread`][gradalign.stats.zero_spread] (the rule).

Statistics are computed in float64 on rewards scaled by a power of two, so they neither overflow
nor lose exactness: a constant group has a std of exactly 0, and rewards of 1e200 give finite stds.

Shape glossary: S rollouts, G groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gradalign.errors import GradAlignError

__all__ = ["GroupStats", "group_stats", "zero_spread"]


def zero_spread(spread: torch.Tensor, tol: float = 0.0) -> torch.Tensor:
    """(G,) bool: the zero-spread rule, ``spread <= tol``.

    Args:
        spread: (G,) max minus min reward of each group.
        tol: a group whose rewards span at most this much counts as having no spread (>= 0).

    Examples:
        >>> zero_spread(torch.tensor([0.0, 1.0, 1e-9]), tol=1e-6)
        tensor([ True, False,  True])
    """
    if not (isinstance(tol, (int, float)) and not isinstance(tol, bool) and tol >= 0):
        raise GradAlignError(f"zero_spread: tol must be a number >= 0, got {tol!r}")
    return spread <= tol


def _power_of_two_scale(r: torch.Tensor) -> float:
    """A power of two >= max |r| (1 for an all-zero input): dividing by it is exact."""
    top = float(r.abs().max()) if r.numel() else 0.0
    return 1.0 if top == 0 else math.ldexp(1.0, math.frexp(top)[1])


@dataclass(frozen=True, eq=False)
class GroupStats:
    """Per-group reward statistics; every field is (G,) in ascending id order unless noted.

    Attributes:
        ids: int64 group ids, ascending.
        counts: int64 rollouts per group.
        mean: float64 mean reward (the pass rate for binary 0/1 rewards).
        std: float64 population std of the rewards; exactly 0 for a constant group.
        spread: float64 max minus min reward; exactly 0 for a constant group.
        index: (S,) int64 group of each rollout (positions into ``ids``).

    Examples:
        >>> st = group_stats(torch.tensor([4, 4, 1]), torch.tensor([1.0, 0.0, 1.0]))
        >>> st.ids.tolist(), st.mean.tolist(), st.std.tolist(), st.zero_spread().tolist()
        ([1, 4], [1.0, 0.5], [0.0, 0.5], [True, False])
    """

    ids: torch.Tensor
    counts: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    spread: torch.Tensor
    index: torch.Tensor

    def zero_spread(self, tol: float = 0.0) -> torch.Tensor:
        """(G,) bool, True for groups without reward spread ([`zero_spread`][gradalign.stats.zero_spread])."""
        return zero_spread(self.spread, tol)

    def unbiased_std(self) -> torch.Tensor:
        """(G,) float64 unbiased std (divides by n - 1, as GRPO trainers do); 0 for one rollout."""
        n = self.counts.to(torch.float64)
        return self.std * torch.sqrt(n / (n - 1).clamp_min(1)) * (n > 1)


def group_stats(group_ids: torch.Tensor, rewards: torch.Tensor) -> GroupStats:
    """Reward statistics of each group, float64, overflow-free.

    Args:
        group_ids: (S,) integer group of each rollout.
        rewards: (S,) finite rewards.

    Returns:
        [`GroupStats`][gradalign.stats.GroupStats] over the sorted unique ids.

    Examples:
        >>> rewards = torch.tensor([3e19, -3e19, 2.0, 2.0], dtype=torch.float64)
        >>> st = group_stats(torch.tensor([0, 0, 1, 1]), rewards)
        >>> st.std.tolist(), st.spread.tolist()
        ([3e+19, 0.0], [6e+19, 0.0])
    """
    ids, index, counts = torch.unique(
        group_ids, sorted=True, return_inverse=True, return_counts=True
    )
    r = rewards.detach().to(torch.float64)
    scale = _power_of_two_scale(r)
    x = r / scale  # (S,) in [-1, 1], exact
    g = len(ids)
    mean = torch.zeros(g, dtype=torch.float64, device=r.device).index_add_(0, index, x) / counts
    hi = torch.full((g,), -torch.inf, dtype=torch.float64, device=r.device)
    lo = torch.full((g,), torch.inf, dtype=torch.float64, device=r.device)
    spread = hi.scatter_reduce(0, index, x, "amax") - lo.scatter_reduce(0, index, x, "amin")
    dev = x - mean[index]  # (S,)
    # Squares of deviations scaled by each group's largest one neither overflow nor underflow.
    top = torch.zeros_like(mean).scatter_reduce(0, index, dev.abs(), "amax")  # (G,)
    unit = dev / torch.where(top > 0, top, 1.0)[index]  # (S,) in [-1, 1]
    sq = torch.zeros_like(mean).index_add_(0, index, unit**2)  # (G,)
    # A constant group's mean may differ from its value by rounding; its std is 0 by definition.
    std = torch.where(spread > 0, top * (sq / counts).sqrt(), 0.0)
    return GroupStats(ids, counts, mean * scale, std * scale, spread * scale, index)
