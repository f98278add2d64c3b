"""The `Policy` base class, the shared top-k by a key, and the validation and ranking helpers every policy uses."""

from __future__ import annotations

import abc
import functools
import inspect
import math
import numbers
import operator
import warnings
from collections.abc import Callable
from typing import Any

import torch

from gradalign._validate import check_int, check_seed
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


def _plain_int(value: Any) -> Any:
    """numpy integers as Python ints; bools and everything else unchanged (and then rejected)."""
    integral = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    return operator.index(value) if integral else value


def _int(policy: object, name: str, value: Any, minimum: int) -> int:
    return int(check_int(type(policy).__name__, name, _plain_int(value), minimum))


def _seed(policy: object, value: Any) -> int:
    return check_seed(type(policy).__name__, _plain_int(value))


def _real(
    policy: object,
    name: str,
    value: Any,
    ok: Callable[[float], bool] = lambda v: not math.isnan(v),
    rule: str = "a real number, not NaN",
) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not ok(float(value)):
        raise GradAlignError(f"{type(policy).__name__}: {name} must be {rule}, got {value!r}")
    return float(value)


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


class _KeyTopK(Policy):
    """The ``k`` best by a (G,) key, stable; subclasses define the key and its direction."""

    descending = True

    def __init__(self, k: int | None = None) -> None:
        if k is None:
            raise GradAlignError(
                f"{type(self).__name__}: k (how many candidates to select) is required, got none"
            )
        self.k = _int(self, "k", k, 1)

    @abc.abstractmethod
    def _key(self, c: Candidates) -> torch.Tensor:
        """(G,) ranking key."""

    def __call__(self, candidates: Candidates) -> torch.Tensor:
        key = self._key(candidates)
        k = _clip_k(self, self.k, len(candidates), len(candidates))
        return candidates.ids[_rank(key, self.descending)[:k]]
