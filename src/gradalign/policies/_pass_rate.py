"""Policies by pass rate (the accuracy baselines): `AccGreedy`, `Learnability`, `AccuracyBand`, `DropZeroVariance`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradalign._options import integer, option, real, seed_rule
from gradalign.candidates import Candidates
from gradalign.errors import GradAlignError
from gradalign.policies._base import (
    Policy,
    _clip_k,
    _generator,
    _KeyTopK,
    _learnability,
    _pass_rate,
)


class AccGreedy(_KeyTopK):
    """Pass rate closest to 0.5: rank by ``|p - 0.5|`` ascending. Needs ``pass_rate`` (or ``accuracy``).

    Empty pool -> empty; k > G -> all + UserWarning; ties keep candidate order; NaN rejected.

    Examples:
        >>> import torch
        >>> from gradalign.policies import Candidates, AccGreedy
        >>> c = Candidates(ids=torch.tensor([10, 11, 12, 13]), scores=torch.tensor([0.1, 0.9, 0.5, -0.2]),
        ...     accuracy=torch.tensor([0.5, 1.0, 0.75, 0.25]), reward_std=torch.tensor([0.5, 0.0, 0.43, 0.43]),
        ...     grads=torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [-1.0, 0.5]]))
        >>> AccGreedy(2)(c)  # pass rates 0.5 and 0.75 are closest to 0.5
        tensor([10, 12])
    """

    descending = False

    def _key(self, c: Candidates) -> torch.Tensor:
        return (_pass_rate(self, c) - 0.5).abs()


class Learnability(_KeyTopK):
    """Rank by learnability ``p (1 - p)`` descending. Needs ``pass_rate`` (or ``accuracy``).

    Empty pool -> empty; k > G -> all + UserWarning; ties keep candidate order; NaN rejected.

    Examples:
        >>> import torch
        >>> from gradalign.policies import Candidates, Learnability
        >>> c = Candidates(ids=torch.tensor([10, 11, 12, 13]), scores=torch.tensor([0.1, 0.9, 0.5, -0.2]),
        ...     accuracy=torch.tensor([0.5, 1.0, 0.75, 0.25]), reward_std=torch.tensor([0.5, 0.0, 0.43, 0.43]),
        ...     grads=torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [-1.0, 0.5]]))
        >>> Learnability(2)(c)
        tensor([10, 12])
    """

    def _key(self, c: Candidates) -> torch.Tensor:
        return _learnability(_pass_rate(self, c))


@dataclass(frozen=True, repr=False)
class DropZeroVariance(Policy):
    """Drop groups whose rewards have no spread; keep the rest in the candidates' order.

    The rule is [`Candidates.has_spread`][gradalign.candidates.Candidates.has_spread]: the table's ``zero_spread`` flags
    (set by ``Candidates.from_rollouts`` and ``GradAlign.score`` with the objective's tolerance),
    else ``reward_std > 0``, else ``accuracy not in {0, 1}``. ``zero_gradient`` is not consulted, so
    a group with spread but a zero gradient stays (it scores 0; rank it away). Empty pool -> empty.

    Examples:
        >>> import torch
        >>> from gradalign.policies import Candidates, DropZeroVariance
        >>> c = Candidates(ids=torch.tensor([10, 11, 12, 13]), scores=torch.tensor([0.1, 0.9, 0.5, -0.2]),
        ...     accuracy=torch.tensor([0.5, 1.0, 0.75, 0.25]), reward_std=torch.tensor([0.5, 0.0, 0.43, 0.43]),
        ...     grads=torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [-1.0, 0.5]]))
        >>> DropZeroVariance()(c)  # 11: every rollout right, no signal
        tensor([10, 12, 13])
    """

    def __call__(self, candidates: Candidates) -> torch.Tensor:
        return candidates.ids[candidates.has_spread("DropZeroVariance")]


@dataclass(frozen=True, repr=False)
class AccuracyBand(Policy):
    """A uniform sample without replacement among candidates with ``low <= p <= high``.

    Needs ``pass_rate`` (or ``accuracy``). Empty pool -> empty; NaN rejected.

    Args:
        low: lower pass-rate bound (inclusive).
        high: upper pass-rate bound (inclusive), ``>= low``.
        k: how many to draw; None draws every eligible candidate, in random order. More than are
            eligible selects all of them with a UserWarning.
        seed: int seeding the local generator (any value ``torch.manual_seed`` accepts).

    Examples:
        >>> import torch
        >>> from gradalign.policies import Candidates, AccuracyBand
        >>> c = Candidates(ids=torch.tensor([10, 11, 12, 13]), scores=torch.tensor([0.1, 0.9, 0.5, -0.2]),
        ...     accuracy=torch.tensor([0.5, 1.0, 0.75, 0.25]), reward_std=torch.tensor([0.5, 0.0, 0.43, 0.43]),
        ...     grads=torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [-1.0, 0.5]]))
        >>> AccuracyBand(0.2, 0.8, 2, seed=0)(c)
        tensor([13, 10])
    """

    low: float = option(0.2, real(finite=False, rule="a real number, not NaN"))
    high: float = option(0.8, real(finite=False, rule="a real number, not NaN"))
    k: int | None = option(None, integer(1, none=True))
    seed: int = option(0, seed_rule())

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.high >= self.low:
            raise GradAlignError(f"AccuracyBand: high must be >= low={self.low}, got {self.high!r}")

    def __call__(self, candidates: Candidates) -> torch.Tensor:
        p = _pass_rate(self, candidates)
        eligible = ((p >= self.low) & (p <= self.high)).nonzero().flatten()
        perm = torch.randperm(len(eligible), generator=_generator(self.seed))
        what = f"candidates with {self.low} <= accuracy <= {self.high}"
        k = len(eligible) if self.k is None else self.k
        k = _clip_k(self, k, len(eligible), len(candidates), what)
        return candidates.ids[eligible[perm[:k]]]
