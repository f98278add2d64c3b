"""The `Policy` base class, the shared top-k by a key, and the validation and ranking helpers every policy uses."""

from __future__ import annotations

import abc
import functools
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from gradalign._options import Rule, check_options, integer, option
from gradalign.candidates import Candidates
from gradalign.errors import GradAlignError

_PolicyFn = Callable[["Candidates"], torch.Tensor]


_HINTS = {
    "scores": "pass scores=... (G,), e.g. Candidates.from_rollouts(rollouts, scores=sel.scores)",
    "accuracy": "build candidates with Candidates.from_rollouts(rollouts) (rewards outside [0, 1]: "
    "name a pass_threshold) or pass pass_rate=... or accuracy=...",
    "task_scores": "pass task_scores=... (G, Q), e.g. gradalign.cosine(grads, targets)",
    "grads": "pass grads=... (G, D), e.g. the .grads of an extractor's per_group(...) output",
}


def _need(policy: object, c: Candidates, name: str) -> torch.Tensor:
    value = getattr(c, name)
    if value is None:
        raise GradAlignError(f"{type(policy).__name__}: candidates.{name} is None; {_HINTS[name]}")
    return value


def _pass_rate(policy: object, c: Candidates) -> torch.Tensor:
    """The table's pass rate: ``pass_rate`` when set, else ``accuracy`` (the same for 0/1 rewards)."""
    return c.pass_rate if c.pass_rate is not None else _need(policy, c, "accuracy")


def _clip_k(policy: object, k: int, n: int, pool: int, what: str = "candidates in the pool") -> int:
    """min(k, n), with a UserWarning when k > n unless the pool is empty."""
    if k > n and pool > 0:
        warnings.warn(
            f"{type(policy).__name__}: k={k} is larger than the {n} {what}; selecting all {n}",
            UserWarning,
            stacklevel=3,
        )
    return min(k, n)


def _rank(key: torch.Tensor, descending: bool = True) -> torch.Tensor:
    """Stable argsort: equal keys keep the candidates' order."""
    return torch.sort(key, descending=descending, stable=True).indices


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _learnability(p: torch.Tensor) -> torch.Tensor:
    return p * (1 - p)


def _ids_at(candidates: Candidates, positions: list[int]) -> torch.Tensor:
    return candidates.ids[torch.tensor(positions, dtype=torch.long)]


def _k_required(call: str, name: str, value: Any) -> Any:
    if value is None:
        raise GradAlignError(f"{call}: k (how many candidates to select) is required, got none")
    return _AT_LEAST_ONE(call, name, value)


_AT_LEAST_ONE = integer(1)
K_RULE: Rule = _k_required
"""The ``k`` of the top-k policies: required, an int >= 1."""


class Policy(abc.ABC):
    """A selection rule: ``policy(candidates)`` returns the selected ids (int64), best first.

    Examples:
        >>> import torch
        >>> from gradalign.policies import Candidates, Policy
        >>> class Shortest(Policy):  # a policy of your own: the two lowest ids
        ...     def __call__(self, candidates: Candidates) -> torch.Tensor:
        ...         return candidates.ids.sort().values[:2]
        >>> Shortest()(Candidates(ids=torch.tensor([7, 3, 5])))
        tensor([3, 5])
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        call = cls.__dict__.get("__call__")
        if call is None or getattr(call, "_checks_candidates", False):
            return

        @functools.wraps(call)
        def checked(self: Policy, candidates: Candidates) -> torch.Tensor:
            if not isinstance(candidates, Candidates):
                raise GradAlignError(
                    f"{type(self).__name__}: candidates must be a gradalign.Candidates (e.g. "
                    "Candidates.from_rollouts(rollouts, scores=...)), got "
                    f"{type(candidates).__name__}"
                )
            return call(self, candidates)

        checked._checks_candidates = True  # type: ignore[attr-defined]
        cls.__call__ = checked  # type: ignore[method-assign]

    def __post_init__(self) -> None:
        """Built-in policies are frozen dataclasses: check every declared setting once, here."""
        check_options(self)

    @abc.abstractmethod
    def __call__(self, candidates: Candidates) -> torch.Tensor:
        """Select from ``candidates`` (G rows); returns (k,) int64 ids in rank order."""

    def __repr__(self) -> str:
        parts: list[str] = []
        for p in inspect.signature(type(self)).parameters.values():
            value: Any = getattr(self, p.name, None)
            if p.kind is p.VAR_POSITIONAL:
                parts.extend(repr(v) for v in value or ())
            else:
                parts.append(f"{p.name}={value!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


@dataclass(frozen=True, repr=False)
class _KeyTopK(Policy):
    """The ``k`` best by a (G,) key, stable; subclasses define the key and its direction."""

    descending = True

    k: int = option(None, K_RULE)

    @abc.abstractmethod
    def _key(self, c: Candidates) -> torch.Tensor:
        """(G,) ranking key."""

    def __call__(self, candidates: Candidates) -> torch.Tensor:
        key = self._key(candidates)
        k = _clip_k(self, self.k, len(candidates), len(candidates))
        return candidates.ids[_rank(key, self.descending)[:k]]
