"""Sampling policies: `Random` and `Softmax` (a seeded draw without replacement)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradalign._options import integer, option, real, required, seed_rule
from gradalign.candidates import Candidates
from gradalign.policies._base import Policy, _clip_k, _generator, _need, _rank


@dataclass(frozen=True, repr=False)
class Random(Policy):
    """``k`` candidates uniformly at random without replacement, in random order. Needs nothing.

    Empty pool -> empty; k > G -> all (shuffled) + UserWarning.

    Args:
        k: positive int.
        seed: int seeding the local generator (any value ``torch.manual_seed`` accepts).

    Examples:
        >>> import torch
        >>> from gradalign.policies import Candidates, Random
        >>> c = Candidates(ids=torch.tensor([10, 11, 12, 13]), scores=torch.tensor([0.1, 0.9, 0.5, -0.2]),
        ...     accuracy=torch.tensor([0.5, 1.0, 0.75, 0.25]), reward_std=torch.tensor([0.5, 0.0, 0.43, 0.43]),
        ...     grads=torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [-1.0, 0.5]]))
        >>> Random(2, seed=0)(c)
        tensor([10, 11])
    """

    k: int = required(integer(1))
    seed: int = option(0, seed_rule())

    def __call__(self, candidates: Candidates) -> torch.Tensor:
        k = _clip_k(self, self.k, len(candidates), len(candidates))
        return candidates.ids[torch.randperm(len(candidates), generator=_generator(self.seed))[:k]]


@dataclass(frozen=True, repr=False)
class Softmax(Policy):
    """``k`` draws without replacement with probability ``∝ exp(score / T)``. Needs ``scores``.

    Gumbel-top-k: rank by ``score / T + Gumbel(0, 1)`` descending (float64). ``T -> 0`` approaches
    [`TopK`][gradalign.policies.TopK] (distinct scores), large ``T`` approaches [`Random`][gradalign.policies.Random]. Empty pool -> empty;
    k > G -> all + UserWarning; NaN rejected.

    Args:
        k: positive int.
        temperature: T, finite and > 0.
        seed: int seeding the local generator (any value ``torch.manual_seed`` accepts).

    Examples:
        >>> import torch
        >>> from gradalign.policies import Candidates, Softmax
        >>> c = Candidates(ids=torch.tensor([10, 11, 12, 13]), scores=torch.tensor([0.1, 0.9, 0.5, -0.2]),
        ...     accuracy=torch.tensor([0.5, 1.0, 0.75, 0.25]), reward_std=torch.tensor([0.5, 0.0, 0.43, 0.43]),
        ...     grads=torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [-1.0, 0.5]]))
        >>> Softmax(2, temperature=0.1, seed=0)(c)
        tensor([11, 12])
    """

    k: int = required(integer(1))
    temperature: float = option(1.0, real(ok=lambda v: v > 0, rule="finite and > 0"))
    seed: int = option(0, seed_rule())

    def __call__(self, candidates: Candidates) -> torch.Tensor:
        scores = _need(self, candidates, "scores").double()
        u = torch.rand(len(candidates), generator=_generator(self.seed), dtype=torch.float64)
        gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny)))  # (G,)
        k = _clip_k(self, self.k, len(candidates), len(candidates))
        return candidates.ids[_rank(scores / self.temperature + gumbel)[:k]]
