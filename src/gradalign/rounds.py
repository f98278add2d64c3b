"""Rounds that stay informative while the policy learns: fill until k candidates carry a signal.

As a policy learns, more and more candidate problems get every rollout right: their groups have no
reward spread, their GRPO gradient is exactly zero and they score 0. A round that keeps the top k
of one chunk then fills up with whatever still has spread, in a noisy pool often the corrupted
problems. [`fill_round`][gradalign.rounds.fill_round] instead draws further chunks of the pool (the role of DAPO's dynamic
sampling) until k candidates pass a rule ([`Informative`][gradalign.rounds.Informative]: reward spread, optionally a score
above a floor), within a stated number of extra chunks, and reports what it drew.

Two ways to train on a round's selection:

* **train on what was scored** (``round.training_rollouts()``): the selected groups' own rollouts,
  on-policy at selection time; no new generation. The gradient trained on is the one that was
  scored.
* **select then resample**: hand ``round.ids`` to the trainer, which samples fresh rollouts of
  those problems (``SelectionSampler``, the TRL and verl adapters). This is the paper's pipeline.

Implementations: [`Informative`][gradalign.rounds.Informative] (the rule, also a policy), [`fill_round`][gradalign.rounds.fill_round] and
[`Round`][gradalign.rounds.Round] (its result).

Shape glossary: G candidates drawn this round, k selected.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from gradalign._validate import check_int
from gradalign.candidates import Candidates
from gradalign.curriculum import Curriculum
from gradalign.errors import GradAlignError
from gradalign.policies import Policy
from gradalign.rollouts import Rollouts
from gradalign.selector import Selection

__all__ = ["Informative", "Round", "fill_round"]


class Informative(Policy):
    """The candidates worth training on, in the table's order: reward spread, and optionally a
    score above ``min_score``.

    Spread is the library's one zero-spread rule ([`Candidates.has_spread`][gradalign.candidates.Candidates.has_spread]). As a policy
    it is a filter: ``Chain(Informative(min_score=0.0), TopK(8))`` keeps the 8 best-scored groups
    that have spread and a positive score.

    Args:
        min_score: None (default) ignores scores; a number keeps only ``scores > min_score``
            (needs scores: GradAlign's cosine or inner product). ``0.0`` drops every candidate
            whose gradient points away from the target, and every zero-gradient one.

    Examples:
        >>> import torch
        >>> from gradalign import Candidates
        >>> c = Candidates(ids=torch.tensor([10, 11, 12, 13]), scores=torch.tensor([0.4, 0.0, 0.5, -0.2]),
        ...     reward_std=torch.tensor([0.5, 0.0, 0.43, 0.43]))
        >>> Informative()(c), Informative(min_score=0.0)(c)
        (tensor([10, 12, 13]), tensor([10, 12]))
    """

    def __init__(self, min_score: float | None = None) -> None:
        ok = min_score is None or (
            isinstance(min_score, (int, float))
            and not isinstance(min_score, bool)
            and min_score == min_score
        )
        if not ok:
            raise GradAlignError(
                f"Informative: min_score must be a number (not NaN) or None, got {min_score!r}"
            )
        self.min_score = None if min_score is None else float(min_score)

    def mask(self, candidates: Candidates) -> torch.Tensor:
        """(G,) bool: the rows that pass."""
        keep = candidates.has_spread("Informative")
        if self.min_score is not None:
            if candidates.scores is None:
                raise GradAlignError(
                    f"Informative: min_score={self.min_score} needs candidates.scores, got None; "
                    "score the candidates (GradAlign.score) or use Informative(min_score=None)"
                )
            keep = keep & (candidates.scores > self.min_score)
        return keep

    def __call__(self, candidates: Candidates) -> torch.Tensor:
        return candidates.ids[self.mask(candidates)]


@dataclass(frozen=True, eq=False)
class Round:
    """What [`fill_round`][gradalign.rounds.fill_round] drew and selected.

    Attributes:
        selection: the selected ids in rank order, their scores, and the table of every drawn
            candidate (pass it to [`Curriculum.record`][gradalign.curriculum.Curriculum.record]).
        rollouts: the rollouts of every drawn candidate.
        chunks: the problem ids of each chunk drawn, the round's first chunk first.
        informative: (n,) ids of the candidates that passed the rule, in table order.
        shortfall: how many selected ids did not pass the rule (taken because fewer than k did
            within the limit); 0 when the round filled.

    Examples:
        >>> import torch, gradalign as ga
        >>> cur = ga.Curriculum(pool_size=8, chunk_size=2, seed=0)
        >>> def sample(ids):  # your generation + reward; here problem 3 and 5 have spread
        ...     rewards = [float(j) if int(i) in (3, 5) else 1.0 for i in ids for j in (0, 1)]
        ...     return ga.Rollouts.from_token_ids([[5]] * (2 * len(ids)), [[7]] * (2 * len(ids)),
        ...                                       rewards, [int(i) for i in ids for _ in (0, 1)])
        >>> rnd = ga.fill_round(cur, sample, ga.Candidates.from_rollouts,
        ...                     ga.policies.Random(2, seed=0), k=2, max_extra_chunks=3)
        >>> sorted(rnd.selection.ids.tolist()), rnd.num_chunks, rnd.shortfall
        ([3, 5], 3, 0)
    """

    selection: Selection
    rollouts: Rollouts
    chunks: tuple[torch.Tensor, ...]
    informative: torch.Tensor
    shortfall: int

    @property
    def ids(self) -> torch.Tensor:
        """(k,) the selected problem ids, rank order."""
        return self.selection.ids

    @property
    def candidates(self) -> Candidates:
        """The table of every drawn candidate."""
        return self.selection.candidates

    @property
    def num_chunks(self) -> int:
        """Chunks drawn: 1 + the extra chunks."""
        return len(self.chunks)

    @property
    def num_rollouts(self) -> int:
        """Candidate rollouts sampled this round (validation rollouts not included)."""
        return len(self.rollouts)

    def training_rollouts(self) -> Rollouts:
        """The selected groups' own rollouts: train on what was scored.

        Raises:
            GradAlignError: the round selected nothing (the policy returned no id).
        """
        if self.ids.numel() == 0:
            raise GradAlignError(
                "Round.training_rollouts: the round selected no problem (the policy returned no "
                "id from any drawn candidate); nothing to train on"
            )
        return self.rollouts.select_groups(self.ids)


def _checked_sample(sample: Callable[[torch.Tensor], Rollouts], ids: torch.Tensor) -> Rollouts:
    ro = sample(ids)
    if not isinstance(ro, Rollouts):
        raise GradAlignError(
            f"fill_round: sample(ids) must return Rollouts, got {type(ro).__name__}"
        )
    got, want = ro.unique_groups.cpu(), torch.sort(ids).values
    if got.shape != want.shape or not bool((got == want).all()):
        raise GradAlignError(
            "fill_round: sample(ids) must return one group per requested problem, with the "
            f"problem ids as group ids; asked for {want.tolist()[:10]}, got {got.tolist()[:10]}"
        )
    return ro


def _checked_score(score: Callable[[Rollouts], Candidates], ro: Rollouts) -> Candidates:
    table = score(ro)
    if not isinstance(table, Candidates):
        raise GradAlignError(
            f"fill_round: score(rollouts) must return Candidates, got {type(table).__name__}"
        )
    if set(table.ids.tolist()) != set(ro.unique_groups.tolist()):
        raise GradAlignError(
            "fill_round: score(rollouts) must return one row per group of the rollouts, got ids "
            f"{table.ids.tolist()[:10]} for groups {ro.unique_groups.tolist()[:10]}"
        )
    return table


def _rank(policy: Callable[[Candidates], Any], table: Candidates, k: int) -> torch.Tensor:
    """The policy's first k ids of ``table`` (its k-larger-than-pool warning is the shortfall's)."""
    if len(table) == 0 or k == 0:
        return torch.zeros(0, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".* is larger than the .*", category=UserWarning)
        out = policy(table)
    return torch.as_tensor(out, dtype=torch.long).flatten()[:k]


def fill_round(
    curriculum: Curriculum,
    sample: Callable[[torch.Tensor], Rollouts],
    score: Callable[[Rollouts], Candidates],
    policy: Callable[[Candidates], Any],
    *,
    k: int,
    rule: Callable[[Candidates], Any] | None = None,
    max_extra_chunks: int = 2,
) -> Round:
    """Start a round and draw chunks until ``k`` candidates pass ``rule``; select ``k`` of them.

    The round's first chunk comes from ``curriculum.next_chunk()``; while fewer than ``k`` drawn
    candidates pass the rule and fewer than ``max_extra_chunks`` extra chunks were drawn, one
    more comes from ``curriculum.extra_chunk()`` (problems already drawn this round, possible
    when the pool wraps around, are not sampled again). ``policy`` then ranks the passing
    candidates and the first ``k`` are selected. When fewer than ``k`` pass within the limit,
    the rest is filled with the policy's best among the others, and ``shortfall`` says how many.

    Candidates are scored chunk by chunk, so a score must depend on its own group only (true of
    GradAlign's scores against fixed [`Targets`][gradalign.alignment.Targets]; not of ``scale_rewards="batch"``).

    Args:
        curriculum: the pool's rounds; this call starts the next round. Record the result with
            ``curriculum.record(round.selection)`` after training.
        sample: ``ids (n,) -> Rollouts``: generate and reward rollouts of these problems, with
            the problem ids as group ids.
        score: ``Rollouts -> Candidates``, e.g. ``lambda ro: selector.score(model, ro, targets)``
            with ``targets = selector.targets(model, validation)`` computed once per round, or
            ``Candidates.from_rollouts`` for rules that need no gradients.
        policy: ranks candidates, e.g. ``policies.TopK(k)`` or ``policies.Random(k, seed=r)``.
        k: problems to select (>= 1).
        rule: which candidates count as informative; default ``Informative()`` (reward spread).
        max_extra_chunks: chunks that may be drawn beyond the first (>= 0).

    Returns:
        A [`Round`][gradalign.rounds.Round]: the selection, every drawn rollout and chunk, and the shortfall.

    Raises:
        GradAlignError: bad settings, or ``sample``/``score``/``policy`` returning something
            that does not fit the problems asked for.

    Examples:
        Two rollouts per problem; only even problems get a reward spread (1, 0):

        >>> def sample(ids):
        ...     ids = ids.tolist()
        ...     rewards = [float(j == 0 and i % 2 == 0) for i in ids for j in (0, 1)]
        ...     groups = [i for i in ids for _ in (0, 1)]
        ...     return Rollouts.from_token_ids([[5, 6]] * len(groups), [[7, 1], [8, 1]] * len(ids),
        ...                                    rewards, groups)
        >>> cur = Curriculum(pool_size=12, chunk_size=4, seed=0)
        >>> rnd = fill_round(cur, sample, Candidates.from_rollouts, policies.AccGreedy(3), k=3)
        >>> rnd.num_chunks, rnd.shortfall, sorted(rnd.ids.tolist())
        (2, 0, [0, 2, 8])
        >>> len(rnd.training_rollouts())  # the selected groups' own rollouts
        6
        >>> cur.record(rnd.selection); cur.chunks_per_round()
        [2]
    """
    call = "fill_round"
    if not isinstance(curriculum, Curriculum):
        raise GradAlignError(
            f"{call}: curriculum must be a Curriculum, got {type(curriculum).__name__}"
        )
    for name, fn in (("sample", sample), ("score", score), ("policy", policy)):
        if not callable(fn):
            raise GradAlignError(f"{call}: {name} must be callable, got {type(fn).__name__}")
    k = check_int(call, "k", k, minimum=1)
    max_extra_chunks = check_int(call, "max_extra_chunks", max_extra_chunks, minimum=0)
    rule = Informative() if rule is None else rule
    if not callable(rule):
        raise GradAlignError(f"{call}: rule must be callable, got {type(rule).__name__}")

    chunks: list[torch.Tensor] = []
    parts: list[Rollouts] = []
    tables: list[Candidates] = []
    drawn = torch.zeros(0, dtype=torch.long)
    chunk = curriculum.next_chunk()
    while True:
        fresh = chunk[~torch.isin(chunk, drawn)]
        chunks.append(chunk)
        if fresh.numel():
            drawn = torch.cat([drawn, fresh])
            ro = _checked_sample(sample, fresh)
            parts.append(ro)
            tables.append(_checked_score(score, ro))
        table = Candidates.concat(tables) if tables else Candidates(ids=drawn)
        passing = torch.as_tensor(rule(table), dtype=torch.long).flatten() if tables else drawn
        done = len(passing) >= k or len(chunks) > max_extra_chunks or fresh.numel() == 0
        if done:
            break
        chunk = curriculum.extra_chunk()
    if not tables:
        raise GradAlignError(f"{call}: the curriculum drew no problems")
    unknown = passing[~torch.isin(passing, table.ids)]
    if unknown.numel():
        raise GradAlignError(
            f"{call}: the rule returned ids that are not candidates: {unknown[:10].tolist()}"
        )
    chosen = _rank(policy, table.subset(passing), k)
    short = k - len(chosen)
    if short > 0:
        rest = table.ids[~torch.isin(table.ids, passing)]
        chosen = torch.cat([chosen, _rank(policy, table.subset(rest), short)])
    unknown = chosen[~torch.isin(chosen, table.ids)]
    if unknown.numel() or chosen.unique().numel() != chosen.numel():
        raise GradAlignError(
            f"{call}: the policy must return distinct candidate ids, got {chosen.tolist()[:20]}"
        )
    scores = None if table.scores is None else table.scores[table.positions(chosen)]
    return Round(
        selection=Selection(ids=chosen, scores=scores, candidates=table),
        rollouts=Rollouts.concat(parts),
        chunks=tuple(chunks),
        informative=passing,
        shortfall=int((~torch.isin(chosen, passing)).sum()),
    )
