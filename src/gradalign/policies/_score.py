"""Policies by alignment score: `TopK`, `TopFraction`, `BottomK`, `Threshold`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradalign._options import real, required
from gradalign.candidates import Candidates
from gradalign.policies._base import Policy, _KeyTopK, _need, _rank


class TopK(_KeyTopK):
    """The ``k`` highest scores: rank by ``score`` descending. Needs ``scores``.

    Empty pool -> empty; k > G -> all + UserWarning; ties keep candidate order; NaN rejected.

    Examples:
        >>> import torch
        >>> from gradalign.policies import Candidates, TopK
        >>> c = Candidates(ids=torch.tensor([10, 11, 12, 13]), scores=torch.tensor([0.1, 0.9, 0.5, -0.2]),
        ...     accuracy=torch.tensor([0.5, 1.0, 0.75, 0.25]), reward_std=torch.tensor([0.5, 0.0, 0.43, 0.43]),
        ...     grads=torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [-1.0, 0.5]]))
        >>> TopK(2)(c)
        tensor([11, 12])
    """

    def _key(self, c: Candidates) -> torch.Tensor:
        return _need(self, c, "scores")


class BottomK(_KeyTopK):
    """The ``k`` lowest scores (the paper's "negsim"): rank by ``score`` ascending.

    Needs ``scores``. Empty pool -> empty; k > G -> all + UserWarning; ties keep candidate order.

    Examples:
        >>> import torch
        >>> from gradalign.policies import Candidates, BottomK
        >>> c = Candidates(ids=torch.tensor([10, 11, 12, 13]), scores=torch.tensor([0.1, 0.9, 0.5, -0.2]),
        ...     accuracy=torch.tensor([0.5, 1.0, 0.75, 0.25]), reward_std=torch.tensor([0.5, 0.0, 0.43, 0.43]),
        ...     grads=torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [-1.0, 0.5]]))
        >>> BottomK(2)(c)
        tensor([13, 10])
    """

    descending = False

    def _key(self, c: Candidates) -> torch.Tensor:
        return _need(self, c, "scores")


@dataclass(frozen=True, repr=False)
class TopFraction(Policy):
    """The top ``max(1, round(fraction * G))`` by score, descending. Needs ``scores``.

    ``round`` is Python's (half to even): fraction 0.25 keeps 2 of G=10 and 2 of G=6. Empty pool ->
    empty; ties keep candidate order; NaN rejected.

    Args:
        fraction: in (0, 1].

    Examples:
        >>> import torch
        >>> from gradalign.policies import Candidates, TopFraction
        >>> c = Candidates(ids=torch.tensor([10, 11, 12, 13]), scores=torch.tensor([0.1, 0.9, 0.5, -0.2]),
        ...     accuracy=torch.tensor([0.5, 1.0, 0.75, 0.25]), reward_std=torch.tensor([0.5, 0.0, 0.43, 0.43]),
        ...     grads=torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [-1.0, 0.5]]))
        >>> TopFraction(0.5)(c)
        tensor([11, 12])
    """

    fraction: float = required(real(ok=lambda v: 0 < v <= 1, rule="in (0, 1]"))

    def __call__(self, candidates: Candidates) -> torch.Tensor:
        scores = _need(self, candidates, "scores")
        return candidates.ids[_rank(scores)[: max(1, round(self.fraction * len(candidates)))]]


@dataclass(frozen=True, repr=False)
class Threshold(Policy):
    """Every candidate with ``score >= min_score``, in descending score order. Needs ``scores``.

    May select nothing (no warning). Empty pool -> empty; ties keep candidate order; NaN rejected.

    Args:
        min_score: a real number (infinities allowed).

    Examples:
        >>> import torch
        >>> from gradalign.policies import Candidates, Threshold
        >>> c = Candidates(ids=torch.tensor([10, 11, 12, 13]), scores=torch.tensor([0.1, 0.9, 0.5, -0.2]),
        ...     accuracy=torch.tensor([0.5, 1.0, 0.75, 0.25]), reward_std=torch.tensor([0.5, 0.0, 0.43, 0.43]),
        ...     grads=torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [-1.0, 0.5]]))
        >>> Threshold(0.3)(c)
        tensor([11, 12])
    """

    min_score: float = required(real(finite=False, rule="a real number, not NaN"))

    def __call__(self, candidates: Candidates) -> torch.Tensor:
        scores = _need(self, candidates, "scores")
        order = _rank(scores)
        return candidates.ids[order[scores[order] >= self.min_score]]
