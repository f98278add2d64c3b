"""Policies that mix score and pass rate, or spread the selection: `SimAcc`, `LearnAlign`, `DiverseTopK`, `TaskQuota`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gradalign._options import integer, option, real, required
from gradalign.candidates import Candidates
from gradalign.errors import GradAlignError
from gradalign.policies._base import (
    Policy,
    _clip_k,
    _ids_at,
    _KeyTopK,
    _learnability,
    _need,
    _pass_rate,
    _rank,
)
from gradalign.scoring import unit_rows

_NON_NEGATIVE = integer(0)


def _quotas(call: str, name: str, value: Any) -> tuple[int, ...]:
    """Q ints >= 0 with a positive sum, as a tuple."""
    bad = GradAlignError(f"{call}: {name} must be ints >= 0 with sum > 0, got {value!r}")
    try:
        quotas = tuple(_NON_NEGATIVE(call, name, q) for q in value)
    except (GradAlignError, TypeError):
        raise bad from None
    if sum(quotas) < 1:
        raise bad
    return quotas


class SimAcc(_KeyTopK):
    """Rank by ``score * 4 p (1 - p)`` descending. Needs ``scores`` and ``pass_rate`` (or ``accuracy``).

    Empty pool -> empty; k > G -> all + UserWarning; ties keep candidate order; NaN rejected.

    Examples:
        >>> import torch
        >>> from gradalign.policies import Candidates, SimAcc
        >>> c = Candidates(ids=torch.tensor([10, 11, 12, 13]), scores=torch.tensor([0.1, 0.9, 0.5, -0.2]),
        ...     accuracy=torch.tensor([0.5, 1.0, 0.75, 0.25]), reward_std=torch.tensor([0.5, 0.0, 0.43, 0.43]),
        ...     grads=torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [-1.0, 0.5]]))
        >>> SimAcc(2)(c)
        tensor([12, 10])
    """

    def _key(self, c: Candidates) -> torch.Tensor:
        return _need(self, c, "scores") * 4 * _learnability(_pass_rate(self, c))


class LearnAlign(_KeyTopK):
    """Rank by ``cos(g_i, mean_j g_j) * p_i (1 - p_i)`` descending. Needs ``grads``, ``pass_rate`` (or ``accuracy``).

    The mean (D,) runs over the candidates given: the pool's own mean gradient. Zero-norm rows, or a
    zero mean, have cosine 0. Empty pool -> empty; k > G -> all + UserWarning; ties stable.

    Examples:
        >>> import torch
        >>> from gradalign.policies import Candidates, LearnAlign
        >>> c = Candidates(ids=torch.tensor([10, 11, 12, 13]), scores=torch.tensor([0.1, 0.9, 0.5, -0.2]),
        ...     accuracy=torch.tensor([0.5, 1.0, 0.75, 0.25]), reward_std=torch.tensor([0.5, 0.0, 0.43, 0.43]),
        ...     grads=torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [-1.0, 0.5]]))
        >>> LearnAlign(2)(c)
        tensor([12, 10])
    """

    def _key(self, c: Candidates) -> torch.Tensor:
        grads = _need(self, c, "grads")  # (G, D)
        mean = unit_rows(grads.mean(0, keepdim=True))  # (1, D)
        return (unit_rows(grads) @ mean.T).squeeze(1) * _learnability(_pass_rate(self, c))


@dataclass(frozen=True, repr=False)
class DiverseTopK(Policy):
    """Greedy top-k that penalises redundancy with the chosen set. Needs ``scores`` and ``grads``.

    Step t picks ``argmax_{i free} score_i - redundancy * max_{j chosen} cos(g_i, g_j)``, the max
    being 0 while nothing is chosen (so the first pick is the top score). Zero-norm gradients have
    cosine 0 with everything. ``redundancy=0`` equals [`TopK`][gradalign.policies.TopK]. Empty pool -> empty;
    k > G -> all + UserWarning; ties go to the earlier candidate; NaN rejected.

    Args:
        k: positive int.
        redundancy: λ, finite and >= 0.

    Examples:
        >>> import torch
        >>> from gradalign.policies import Candidates, DiverseTopK
        >>> c = Candidates(ids=torch.tensor([10, 11, 12, 13]), scores=torch.tensor([0.1, 0.9, 0.5, -0.2]),
        ...     accuracy=torch.tensor([0.5, 1.0, 0.75, 0.25]), reward_std=torch.tensor([0.5, 0.0, 0.43, 0.43]),
        ...     grads=torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [-1.0, 0.5]]))
        >>> DiverseTopK(2, redundancy=1.0)(c)
        tensor([11, 12])
    """

    k: int = required(integer(1))
    redundancy: float = option(0.5, real(ok=lambda v: v >= 0, rule="finite and >= 0"), kw_only=True)

    def __call__(self, candidates: Candidates) -> torch.Tensor:
        scores = _need(self, candidates, "scores").double()  # (G,)
        unit = unit_rows(_need(self, candidates, "grads"))  # (G, D)
        k = _clip_k(self, self.k, len(candidates), len(candidates))
        max_sim = torch.zeros_like(scores)  # (G,)
        free = torch.ones_like(scores, dtype=torch.bool)
        chosen: list[int] = []
        for step in range(k):
            rows = free.nonzero().flatten()
            i = int(rows[(scores[rows] - self.redundancy * max_sim[rows]).argmax()])
            chosen.append(i)
            free[i] = False
            sim = (unit @ unit[i]).double()  # (G,)
            max_sim = sim if step == 0 else torch.maximum(max_sim, sim)
        return _ids_at(candidates, chosen)


@dataclass(frozen=True, repr=False)
class TaskQuota(Policy):
    """Per-task quotas over Q validation tasks, filled round-robin. Needs ``task_scores`` (G, Q).

    Task q ranks the candidates by ``task_scores[:, q]`` (descending, stable). In each round every
    task that still has quota takes its best candidate not yet taken, tasks in order 0..Q-1; so the
    result is rank-ordered: every task's first pick, then every task's second pick, and so on. Each
    task gets exactly ``quotas[q]`` distinct candidates. Empty pool -> empty; ``sum(quotas) > G``
    -> all G (in that order) + UserWarning; NaN rejected.

    Args:
        quotas: Q non-negative ints with a positive sum.

    Examples:
        >>> import torch
        >>> from gradalign.policies import Candidates, TaskQuota
        >>> c = Candidates(ids=torch.tensor([10, 11, 12, 13]),
        ...     task_scores=torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.1, 0.7], [0.0, 0.6]]))
        >>> TaskQuota([1, 2])(c)  # one problem for task 0, two for task 1
        tensor([10, 12, 13])
    """

    quotas: Sequence[int] = required(_quotas)

    def __call__(self, candidates: Candidates) -> torch.Tensor:
        ts = _need(self, candidates, "task_scores")  # (G, Q)
        if ts.shape[1] != len(self.quotas):
            raise GradAlignError(
                f"TaskQuota: {len(self.quotas)} quotas but task_scores has {ts.shape[1]} columns"
            )
        total = _clip_k(self, sum(self.quotas), len(candidates), len(candidates))
        ranks = [_rank(ts[:, q]).tolist() for q in range(len(self.quotas))]
        left, ptr = list(self.quotas), [0] * len(ranks)
        taken: set[int] = set()
        out: list[int] = []
        while len(out) < total:
            for q, rank in enumerate(ranks):
                if left[q] == 0 or len(out) == total:
                    continue
                while rank[ptr[q]] in taken:
                    ptr[q] += 1
                out.append(rank[ptr[q]])
                taken.add(out[-1])
                left[q] -= 1
        return _ids_at(candidates, out)
