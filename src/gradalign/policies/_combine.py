"""Combinators: `EpsilonMix` (mix two policies) and `Chain` (filter, then rank)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradalign._options import function, option, real, required, seed_rule
from gradalign.candidates import Candidates
from gradalign.errors import GradAlignError
from gradalign.policies._base import Policy, _generator, _ids_at, _PolicyFn


@dataclass(frozen=True, repr=False)
class EpsilonMix(Policy):
    """The inner policy's ranking with each slot, with probability ε, given to a random candidate.

    With k the number of ids the inner policy returns, slot t = 0..k-1 takes, with probability
    ``epsilon``, a candidate uniformly at random among those not yet chosen, else the inner
    policy's best id not yet chosen. ``epsilon=0`` is the inner policy; ``epsilon=1`` a uniform
    random k-subset in random order. Empty pool -> empty.

    Args:
        policy: any callable ``Candidates -> ids``.
        epsilon: in [0, 1].
        seed: int seeding the local generator (any value ``torch.manual_seed`` accepts).

    Examples:
        >>> import torch
        >>> from gradalign.policies import Candidates, EpsilonMix, TopK
        >>> c = Candidates(ids=torch.tensor([10, 11, 12, 13]), scores=torch.tensor([0.1, 0.9, 0.5, -0.2]),
        ...     accuracy=torch.tensor([0.5, 1.0, 0.75, 0.25]), reward_std=torch.tensor([0.5, 0.0, 0.43, 0.43]),
        ...     grads=torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [-1.0, 0.5]]))
        >>> EpsilonMix(TopK(2), epsilon=0.5, seed=0)(c)
        tensor([11, 12])
    """

    policy: _PolicyFn = required(function())
    epsilon: float = required(real(ok=lambda v: 0 <= v <= 1, rule="in [0, 1]"))
    seed: int = option(0, seed_rule())

    def __call__(self, candidates: Candidates) -> torch.Tensor:
        inner = candidates.positions(self.policy(candidates)).tolist()
        gen = _generator(self.seed)
        explore = (torch.rand(len(inner), generator=gen) < self.epsilon).tolist()
        # Walking a random permutation past taken rows gives a uniform pick among the untaken ones.
        sources = (inner, torch.randperm(len(candidates), generator=gen).tolist())
        ptr = [0, 0]
        taken: set[int] = set()
        out: list[int] = []
        for coin in explore:
            while sources[coin][ptr[coin]] in taken:
                ptr[coin] += 1
            out.append(sources[coin][ptr[coin]])
            taken.add(out[-1])
        return _ids_at(candidates, out)


@dataclass(frozen=True, repr=False, init=False)
class Chain(Policy):
    """Apply policies in turn, each to the previous one's selection (in its rank order).

    ``Chain(DropZeroVariance(), TopK(8))`` keeps the 8 best-scored groups that have reward spread.
    The result is the last policy's output; an empty intermediate selection gives an empty result.

    Args:
        *policies: one or more callables ``Candidates -> ids``.

    Examples:
        >>> import torch
        >>> from gradalign.policies import Candidates, Chain, DropZeroVariance, TopK
        >>> c = Candidates(ids=torch.tensor([10, 11, 12, 13]), scores=torch.tensor([0.1, 0.9, 0.5, -0.2]),
        ...     accuracy=torch.tensor([0.5, 1.0, 0.75, 0.25]), reward_std=torch.tensor([0.5, 0.0, 0.43, 0.43]),
        ...     grads=torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [-1.0, 0.5]]))
        >>> Chain(DropZeroVariance(), TopK(2))(c)  # 11 scores best but has no spread
        tensor([12, 10])
    """

    policies: tuple[_PolicyFn, ...]

    def __init__(self, *policies: _PolicyFn) -> None:
        if not policies or not all(callable(p) for p in policies):
            raise GradAlignError(f"Chain: needs one or more callable policies, got {policies!r}")
        object.__setattr__(self, "policies", policies)  # frozen: set once, here

    def __call__(self, candidates: Candidates) -> torch.Tensor:
        ids = candidates.ids
        for policy in self.policies:
            ids = policy(candidates)
            candidates = candidates.subset(ids)
        return ids
