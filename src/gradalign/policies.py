"""Selection policies: a [`Candidates`][gradalign.candidates.Candidates] table in, the selected ids out, best first.

A policy is a small object with settings validated at construction and one call,
``policy(candidates) -> ids``: an int64 tensor of candidate *ids* (not positions) in rank order.

Implementations: by score [`TopK`][gradalign.policies.TopK], [`TopFraction`][gradalign.policies.TopFraction], [`BottomK`][gradalign.policies.BottomK], [`Threshold`][gradalign.policies.Threshold];
by pass rate [`AccGreedy`][gradalign.policies.AccGreedy], [`Learnability`][gradalign.policies.Learnability], [`AccuracyBand`][gradalign.policies.AccuracyBand],
[`DropZeroVariance`][gradalign.policies.DropZeroVariance]; mixed [`SimAcc`][gradalign.policies.SimAcc], [`LearnAlign`][gradalign.policies.LearnAlign], [`DiverseTopK`][gradalign.policies.DiverseTopK],
[`TaskQuota`][gradalign.policies.TaskQuota]; sampling [`Random`][gradalign.policies.Random], [`Softmax`][gradalign.policies.Softmax]; combinators [`EpsilonMix`][gradalign.policies.EpsilonMix],
[`Chain`][gradalign.policies.Chain].

Rules shared by every policy:

* Empty pool: an empty int64 tensor, no error, no warning.
* ``k`` larger than the pool (or the eligible candidates): all of them, with a ``UserWarning``.
* Ties are stable: equal keys keep the candidates' order.
* NaN never reaches a policy: [`Candidates`][gradalign.candidates.Candidates] rejects it.
* A missing signal (``scores``, ``accuracy``, ...) raises [`GradAlignError`][gradalign.errors.GradAlignError] saying how to
  provide it.
* ``seed`` builds a fresh local ``torch.Generator`` per call: calling twice gives the same ids; vary
  the seed (e.g. with the round) for fresh draws. Global RNG state is never touched.

Shapes: G candidates, D gradient dim, Q validation targets (tasks).

Examples:
    >>> import torch
    >>> from gradalign.policies import Candidates, TopK
    >>> c = Candidates(ids=torch.tensor([10, 11, 12]), scores=torch.tensor([0.1, 0.9, 0.5]))
    >>> TopK(2)(c)
    tensor([11, 12])
"""

from __future__ import annotations

import abc
import functools
import inspect
import math
import numbers
import operator
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from gradalign._validate import check_int, check_seed
from gradalign.candidates import Candidates
from gradalign.errors import GradAlignError
from gradalign.scoring import unit_rows

__all__ = [
    "AccGreedy",
    "AccuracyBand",
    "BottomK",
    "Candidates",
    "Chain",
    "DiverseTopK",
    "DropZeroVariance",
    "EpsilonMix",
    "LearnAlign",
    "Learnability",
    "Policy",
    "Random",
    "SimAcc",
    "Softmax",
    "TaskQuota",
    "Threshold",
    "TopFraction",
    "TopK",
]

_PolicyFn = Callable[["Candidates"], torch.Tensor]
_HINTS = {
    "scores": "pass scores=... (G,), e.g. Candidates.from_rollouts(rollouts, scores=sel.scores)",
    "accuracy": "build candidates with Candidates.from_rollouts(rollouts) (rewards outside [0, 1]: "
    "name a pass_threshold) or pass pass_rate=... or accuracy=...",
    "task_scores": "pass task_scores=... (G, Q), e.g. gradalign.cosine(grads, targets)",
    "grads": "pass grads=... (G, D), e.g. the .grads of an extractor's per_group(...) output",
}


# Helpers ------------------------------------------------------------------------------------------


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


# Base classes -------------------------------------------------------------------------------------


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


# Ranking by a key ---------------------------------------------------------------------------------


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

    def __init__(self, fraction: float) -> None:
        self.fraction = _real(self, "fraction", fraction, lambda v: 0 < v <= 1, "in (0, 1]")

    def __call__(self, candidates: Candidates) -> torch.Tensor:
        scores = _need(self, candidates, "scores")
        return candidates.ids[_rank(scores)[: max(1, round(self.fraction * len(candidates)))]]


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

    def __init__(self, min_score: float) -> None:
        self.min_score = _real(self, "min_score", min_score)

    def __call__(self, candidates: Candidates) -> torch.Tensor:
        scores = _need(self, candidates, "scores")
        order = _rank(scores)
        return candidates.ids[order[scores[order] >= self.min_score]]


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


# Sampling -----------------------------------------------------------------------------------------


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

    def __init__(
        self, low: float = 0.2, high: float = 0.8, k: int | None = None, seed: int = 0
    ) -> None:
        self.low = _real(self, "low", low)
        self.high = _real(self, "high", high, lambda v: v >= self.low, f">= low={self.low}")
        self.k = None if k is None else _int(self, "k", k, 1)
        self.seed = _seed(self, seed)

    def __call__(self, candidates: Candidates) -> torch.Tensor:
        p = _pass_rate(self, candidates)
        eligible = ((p >= self.low) & (p <= self.high)).nonzero().flatten()
        perm = torch.randperm(len(eligible), generator=_generator(self.seed))
        what = f"candidates with {self.low} <= accuracy <= {self.high}"
        k = len(eligible) if self.k is None else self.k
        k = _clip_k(self, k, len(eligible), len(candidates), what)
        return candidates.ids[eligible[perm[:k]]]


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

    def __init__(self, k: int, seed: int = 0) -> None:
        self.k = _int(self, "k", k, 1)
        self.seed = _seed(self, seed)

    def __call__(self, candidates: Candidates) -> torch.Tensor:
        k = _clip_k(self, self.k, len(candidates), len(candidates))
        return candidates.ids[torch.randperm(len(candidates), generator=_generator(self.seed))[:k]]


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

    def __init__(self, k: int, temperature: float = 1.0, seed: int = 0) -> None:
        self.k = _int(self, "k", k, 1)
        rule = "finite and > 0"
        self.temperature = _real(self, "temperature", temperature, lambda v: 0 < v < math.inf, rule)
        self.seed = _seed(self, seed)

    def __call__(self, candidates: Candidates) -> torch.Tensor:
        scores = _need(self, candidates, "scores").double()
        u = torch.rand(len(candidates), generator=_generator(self.seed), dtype=torch.float64)
        gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny)))  # (G,)
        k = _clip_k(self, self.k, len(candidates), len(candidates))
        return candidates.ids[_rank(scores / self.temperature + gumbel)[:k]]


# Diversity and several tasks ----------------------------------------------------------------------


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

    def __init__(self, k: int, *, redundancy: float = 0.5) -> None:
        self.k = _int(self, "k", k, 1)
        rule = "finite and >= 0"
        self.redundancy = _real(self, "redundancy", redundancy, lambda v: 0 <= v < math.inf, rule)

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

    def __init__(self, quotas: Sequence[int]) -> None:
        bad = GradAlignError(f"TaskQuota: quotas must be ints >= 0 with sum > 0, got {quotas!r}")
        try:
            self.quotas = [_int(self, "quotas", q, 0) for q in quotas]
        except (GradAlignError, TypeError):
            raise bad from None
        if sum(self.quotas) < 1:
            raise bad

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


# Combinators --------------------------------------------------------------------------------------


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

    def __init__(self, policy: _PolicyFn, epsilon: float, seed: int = 0) -> None:
        if not callable(policy):
            raise GradAlignError(f"EpsilonMix: policy must be callable, got {policy!r}")
        self.policy = policy
        self.epsilon = _real(self, "epsilon", epsilon, lambda v: 0 <= v <= 1, "in [0, 1]")
        self.seed = _seed(self, seed)

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

    def __init__(self, *policies: _PolicyFn) -> None:
        if not policies or not all(callable(p) for p in policies):
            raise GradAlignError(f"Chain: needs one or more callable policies, got {policies!r}")
        self.policies = policies

    def __call__(self, candidates: Candidates) -> torch.Tensor:
        ids = candidates.ids
        for policy in self.policies:
            ids = policy(candidates)
            candidates = candidates.subset(ids)
        return ids
