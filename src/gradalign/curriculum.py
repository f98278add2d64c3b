"""Rounds over the problem pool, per-problem history, and a torch Sampler over the selection.

Implementations: [`Curriculum`][gradalign.curriculum.Curriculum] (seeded chunks of ``range(pool_size)``, a fresh permutation
per pass; a round counter; one log of recorded selections and observed pass rates, from which
every per-problem table is derived; an exact ``state_dict`` resume) and [`ProblemStats`][gradalign.curriculum.ProblemStats] (its
per-problem table). The torch ``Sampler`` over the selection, [`SelectionSampler`][gradalign.sampler.SelectionSampler], lives in
[`gradalign.sampler`][gradalign.sampler] and is re-exported here.

Shape glossary: N pool size, M chunk size, C candidates of a round, K selected problems.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from gradalign._history import Tables as _Tables
from gradalign._history import is_record as _is_record
from gradalign._problem_ids import _check_int, _ids, _permutation, _tensor
from gradalign.errors import GradAlignError
from gradalign.sampler import SelectionSampler, SelectionSource  # re-exported: the old home

__all__ = ["Curriculum", "HasIds", "ProblemStats", "SelectionSampler", "SelectionSource"]

_STATE_FORMAT = 2
_ARG_KEYS = ("format", "pool_size", "chunk_size", "seed")
_STATE_KEYS = (*_ARG_KEYS, "round", "pass_index", "offset", "records", "chunk_rounds")


def _values(where: str, name: str, value: Any, n: int) -> torch.Tensor:
    """Per-problem numbers: (n,) finite. Returns float32 on CPU."""
    values = _tensor(where, name, value)
    if values.shape != (n,):
        raise GradAlignError(f"{where}: {name} must have shape ({n},), got {tuple(values.shape)}")
    values = values.to("cpu", torch.float32)
    if not bool(torch.isfinite(values).all()):
        raise GradAlignError(f"{where}: {name} must be finite, got {values[:20].tolist()}")
    return values


def _copy_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """Entries hold only ints and flat lists; copying the lists is a (much faster) deep copy."""
    return {k: list(v) if isinstance(v, list) else v for k, v in entry.items()}


def _maybe_values(where: str, name: str, value: Any, n: int) -> torch.Tensor | None:
    return None if value is None else _values(where, name, value, n)


@dataclass(frozen=True)
class ProblemStats:
    """Per-problem table of a [`Curriculum`][gradalign.curriculum.Curriculum]; every field is (N,). Masks replace NaN.

    Attributes:
        seen: bool, the problem was a candidate (or selected) in some recorded round.
        seen_count: int64, recorded rounds that saw it.
        selected_count: int64, recorded rounds that selected it.
        last_round: int64, last recorded round that saw it; -1 if never.
        last_score: float32, latest recorded score; 0.0 where ``has_score`` is False.
        has_score: bool, a score was recorded.
        last_accuracy: float32, latest recorded pass rate; 0.0 where ``has_accuracy`` is False.
        has_accuracy: bool, a pass rate was recorded.

    Examples:
        >>> import torch, gradalign as ga
        >>> cur = ga.Curriculum(pool_size=4, chunk_size=2)
        >>> chunk = cur.next_chunk()
        >>> cur.record(chunk[:1])
        >>> stats = cur.stats()
        >>> int(stats.selected_count.sum()), bool(stats.seen[chunk[0]])
        (1, True)
    """

    seen: torch.Tensor
    seen_count: torch.Tensor
    selected_count: torch.Tensor
    last_round: torch.Tensor
    last_score: torch.Tensor
    has_score: torch.Tensor
    last_accuracy: torch.Tensor
    has_accuracy: torch.Tensor


@runtime_checkable
class HasIds(Protocol):
    """What [`Curriculum.record`][gradalign.curriculum.Curriculum.record] reads: a [`Selection`][gradalign.alignment.Selection] or
    [`Candidates`][gradalign.candidates.Candidates] (``ids``; optional ``scores``, ``accuracy``, ``candidates``)."""

    @property
    def ids(self) -> torch.Tensor: ...


class Curriculum:
    """Seeded chunks of a problem pool, one round per chunk, and the history of each selection.

    Pass p visits ``range(pool_size)`` in the order of a permutation from a local generator seeded
    by ``(seed, p)``, so its chunks cover the pool exactly once. When ``chunk_size`` does not
    divide ``pool_size`` the last chunk of a pass is shorter (if ``chunk_size >= pool_size`` every
    chunk is the whole pool). Passes go on forever. [`next_chunk`][gradalign.curriculum.Curriculum.next_chunk] starts a round;
    [`record`][gradalign.curriculum.Curriculum.record] stores that round's selection, at most once.

    Args:
        pool_size: N >= 1 problems, identified by ``0 .. N-1``.
        chunk_size: M >= 1 candidates per round.
        seed: base seed; the global torch RNG is never touched.

    Examples:
        >>> cur = Curriculum(pool_size=5, chunk_size=2, seed=0)
        >>> [len(cur.next_chunk()) for _ in range(4)], cur.round, cur.pass_index
        ([2, 2, 1, 2], 3, 1)
    """

    def __init__(self, pool_size: int, chunk_size: int, seed: int = 0) -> None:
        #: N, M and the base seed; constructor arguments, fixed for the object's life.
        self.pool_size = n = _check_int("Curriculum", "pool_size", pool_size, minimum=1)
        self.chunk_size = _check_int("Curriculum", "chunk_size", chunk_size, minimum=1)
        self.seed = _check_int("Curriculum", "seed", seed)
        self._round, self._pass = -1, 0
        self._offset = 0  # start of the next chunk in this pass's permutation
        self._chunk_rounds: list[int] = []  # the round of every chunk drawn, in draw order
        self._perm: tuple[int, torch.Tensor] | None = None  # (pass, permutation) cache
        # The one source of truth: a plain-Python entry per recorded round or observation. Every
        # table (counts, latest values, histories) is derived from it by _tables().
        self._log: list[dict[str, Any]] = []
        self._cache: tuple[int, _Tables] | None = None
        del n

    @property
    def round(self) -> int:
        """Index of the current round (the latest [`next_chunk`][gradalign.curriculum.Curriculum.next_chunk]); -1 before the first."""
        return self._round

    @property
    def pass_index(self) -> int:
        """Pass that the current round's chunk came from (0 before the first chunk)."""
        return self._pass

    @property
    def chunks_per_pass(self) -> int:
        """ceil(N / M): the rounds in one pass over the pool."""
        return -(-self.pool_size // self.chunk_size)

    @property
    def num_records(self) -> int:
        """Recorded rounds so far ([`SelectionSampler`][gradalign.sampler.SelectionSampler] reseeds its order when it changes)."""
        return sum(1 for e in self._log if _is_record(e))

    @property
    def num_observations(self) -> int:
        """Calls of [`observe`][gradalign.curriculum.Curriculum.observe] so far."""
        return len(self._log) - self.num_records

    def _records(self) -> list[dict[str, Any]]:
        return [e for e in self._log if _is_record(e)]

    def _draw(self) -> torch.Tensor:
        """The next chunk of the pass order (a new pass when this one is used up)."""
        if self._offset >= self.pool_size:
            self._pass, self._offset = self._pass + 1, 0
        if self._perm is None or self._perm[0] != self._pass:
            perm = _permutation(self.pool_size, "curriculum", self.seed, self._pass)  # (N,)
            self._perm = (self._pass, perm)
        chunk = self._perm[1][self._offset : self._offset + self.chunk_size].clone()  # (<= M,)
        self._offset += chunk.numel()
        return chunk

    def next_chunk(self) -> torch.Tensor:
        """Start the next round and return its candidates: (<= M,) int64 problem ids."""
        chunk = self._draw()
        self._round += 1
        self._chunk_rounds.append(self._round)
        return chunk

    def extra_chunk(self) -> torch.Tensor:
        """Draw the next chunk into the current round (no new round): (<= M,) int64 problem ids.

        For rounds that need more candidates than one chunk gives, e.g. until enough of them carry
        a learning signal ([`fill_round`][gradalign.rounds.fill_round]). The chunk continues the pass order, so
        later rounds start after it; it is kept in [`drawn_chunks`][gradalign.curriculum.Curriculum.drawn_chunks] and in the state.

        Raises:
            GradAlignError: no round has started, or the current round is already recorded.
        """
        where = "Curriculum.extra_chunk"
        if self._round < 0:
            raise GradAlignError(f"{where}: no round has started; call next_chunk() first")
        records = self._records()
        if records and records[-1]["round"] == self._round:
            raise GradAlignError(
                f"{where}: round {self._round} is already recorded; call next_chunk() to start "
                "the next round"
            )
        chunk = self._draw()
        self._chunk_rounds.append(self._round)
        return chunk

    def drawn_chunks(self, round: int | None = None) -> list[torch.Tensor]:
        """The chunks drawn so far, in draw order, or only those of one ``round``.

        Examples:
            >>> cur = Curriculum(pool_size=6, chunk_size=2, seed=0)
            >>> first, extra = cur.next_chunk(), cur.extra_chunk()
            >>> [c.tolist() for c in cur.drawn_chunks(0)] == [first.tolist(), extra.tolist()]
            True
        """
        replay = Curriculum(*self._args())
        chunks = [replay._draw() for _ in self._chunk_rounds]
        if round is None:
            return chunks
        return [c for c, r in zip(chunks, self._chunk_rounds, strict=True) if r == round]

    def chunks_per_round(self) -> list[int]:
        """How many chunks each round drew (1 + its extra chunks), rounds 0 .. ``round``."""
        counts = [0] * (self._round + 1)
        for r in self._chunk_rounds:
            counts[r] += 1
        return counts

    def record(
        self,
        selection: HasIds | torch.Tensor | Sequence[int],
        *,
        candidates: HasIds | None = None,
    ) -> None:
        """Store the current round's outcome in the per-problem history.

        Args:
            selection: an object with ``.ids`` ((K,) problem ids, rank order) and optional
                ``.scores`` ((K,) or None) and ``.candidates``; or the (K,) ids themselves.
            candidates: overrides ``selection.candidates``: an object with ``.ids`` (C,) and
                optional ``.scores`` (C,) and ``.accuracy`` (C,), covering the round's candidates.

        Candidates and selected problems all count as seen this round. Scores come from
        ``candidates.scores``; ``selection.scores`` fills in only for selected problems that it
        leaves unscored. Pass rates come from ``candidates.accuracy``. Ids need not be in the chunk.

        Raises:
            GradAlignError: no round started, or this one already recorded; ids out of ``[0, N)``,
                repeated or not integers; scores or accuracy misshapen or not finite.
        """
        where = "Curriculum.record"
        if self._round < 0:
            raise GradAlignError(f"{where}: no round has started; call next_chunk() first")
        records = self._records()
        if records and records[-1]["round"] == self._round:
            raise GradAlignError(f"{where}: round {self._round} is already recorded")
        self._apply(where, self._entry(where, selection, candidates))

    def observe(
        self,
        ids: torch.Tensor | Sequence[int],
        pass_rates: torch.Tensor | Sequence[float],
        counts: torch.Tensor | Sequence[int] | None = None,
    ) -> None:
        """Record pass rates observed outside a selection round, e.g. in a training batch.

        They join each problem's accuracy history ([`history`][gradalign.curriculum.Curriculum.history], [`stats`][gradalign.curriculum.Curriculum.stats]) and the
        rollout-weighted means of [`pass_rates`][gradalign.curriculum.Curriculum.pass_rates]; they never change the selection.

        Args:
            ids: (n,) problem ids in ``[0, N)``, unique.
            pass_rates: (n,) mean reward of each problem's rollouts in this observation.
            counts: (n,) rollouts behind each pass rate (default 1 each).

        Raises:
            GradAlignError: ids out of range, repeated or not integers; values misshapen or not
                finite; counts not positive integers.
        """
        where = "Curriculum.observe"
        pids = _ids(where, "ids", ids, self.pool_size)  # (n,)
        rates = _values(where, "pass_rates", pass_rates, len(pids))  # (n,)
        if counts is None:
            n_rollouts = [1] * len(pids)
        else:
            raw = _tensor(where, "counts", counts).flatten()
            if raw.shape != pids.shape or raw.is_floating_point() or bool((raw < 1).any()):
                raise GradAlignError(
                    f"{where}: counts must be ({len(pids)},) integers >= 1, got {raw.tolist()[:10]}"
                )
            n_rollouts = raw.tolist()
        entry = {
            "kind": "observe",
            "round": self._round,
            "ids": pids.tolist(),
            "pass_rates": rates.tolist(),
            "counts": n_rollouts,
        }
        self._apply(where, entry)

    def _entry(
        self,
        where: str,
        selection: HasIds | torch.Tensor | Sequence[int],
        candidates: HasIds | None,
    ) -> dict[str, Any]:
        """Validate a selection and flatten it to the plain-Python entry kept in the state."""
        sel_ids, sel_val = selection, None
        if hasattr(selection, "ids"):  # else: the ids themselves
            sel_ids, sel_val = selection.ids, getattr(selection, "scores", None)
            if candidates is None:
                candidates = getattr(selection, "candidates", None)
        sel = _ids(where, "selection.ids", sel_ids, self.pool_size)  # (K,)
        sel_val = _maybe_values(where, "selection.scores", sel_val, len(sel))
        cand, cand_val, cand_acc = torch.zeros(0, dtype=torch.int64), None, None
        if candidates is not None:
            cand = _ids(where, "candidates.ids", getattr(candidates, "ids", None), self.pool_size)
            cand_val, cand_acc = (
                _maybe_values(where, f"candidates.{k}", getattr(candidates, k, None), len(cand))
                for k in ("scores", "accuracy")
            )
        extra = ~torch.isin(sel, cand)  # (K,) selected but not a candidate
        score_ids, scores = (cand, cand_val) if cand_val is not None else (cand[:0], torch.zeros(0))
        if sel_val is not None:  # fills in selected problems that the candidates leave unscored
            fill = extra if cand_val is not None else torch.ones_like(extra)
            score_ids = torch.cat([score_ids, sel[fill]])
            scores = torch.cat([scores, sel_val[fill]])
        return {
            "round": self._round,
            "seen": torch.cat([cand, sel[extra]]).tolist(),
            "selected": sel.tolist(),
            "scores_ids": score_ids.tolist(),
            "scores": scores.tolist(),
            "accuracy_ids": cand.tolist() if cand_acc is not None else [],
            "accuracy": cand_acc.tolist() if cand_acc is not None else [],
        }

    def _apply(self, where: str, entry: dict[str, Any]) -> None:
        """Validate an entry (state may be hand-made) and append it to the log."""
        n = self.pool_size
        if _is_record(entry):
            _ids(where, "seen", entry["seen"], n)
            _ids(where, "selected", entry["selected"], n)
            for key in ("scores", "accuracy"):
                ids = _ids(where, f"{key}_ids", entry[f"{key}_ids"], n)
                _values(where, key, entry[key], len(ids))
        else:
            ids = _ids(where, "ids", entry["ids"], n)
            _values(where, "pass_rates", entry["pass_rates"], len(ids))
            if len(entry["counts"]) != len(ids):
                raise GradAlignError(f"{where}: counts must have one entry per id")
        self._log.append(entry)

    def _tables(self) -> _Tables:
        """Every per-problem table, replayed from the log (cached until the log grows)."""
        if self._cache is None or self._cache[0] != len(self._log):
            self._cache = (len(self._log), _Tables.replay(self.pool_size, self._log))
        return self._cache[1]

    def selected_ids(self) -> torch.Tensor:
        """The latest recorded selection, (K,) int64 in rank order; empty before any record."""
        records = self._records()
        return torch.tensor(records[-1]["selected"] if records else [], dtype=torch.int64)

    def times_selected(self) -> torch.Tensor:
        """(N,) int64: how many recorded rounds selected each problem."""
        return self._tables().selected_count.clone()

    def stats(self) -> ProblemStats:
        """A copy of the per-problem table; every field is (N,)."""
        t = self._tables()
        return ProblemStats(
            seen=t.seen_count > 0,
            seen_count=t.seen_count.clone(),
            selected_count=t.selected_count.clone(),
            last_round=t.last_round.clone(),
            last_score=t.last["scores"].clone(),
            has_score=t.known["scores"].clone(),
            last_accuracy=t.last["accuracy"].clone(),
            has_accuracy=t.known["accuracy"].clone(),
        )

    def pass_rates(self) -> dict[str, torch.Tensor]:
        """(N,) per problem, from [`observe`][gradalign.curriculum.Curriculum.observe]: ``count`` of rollouts, their ``mean`` reward,
        the ``last`` observed pass rate and ``last_observation`` (its index; -1: never)."""
        t = self._tables()
        mean = torch.where(t.obs_count > 0, t.obs_sum / t.obs_count.clamp_min(1), 0.0)
        return {
            "count": t.obs_count.clone(),
            "mean": mean.float(),
            "last": t.obs_last.clone(),
            "last_observation": t.obs_index.clone(),
        }

    def history(self, problem_id: int) -> dict[str, Any]:
        """Everything recorded about one problem, as plain Python.

        Returns:
            ``seen_count``, ``last_round`` (-1 if never seen), ``selected_count``,
            ``selected_rounds``, ``last_score`` and ``last_accuracy`` (None if never recorded),
            ``scores`` and ``accuracies`` (lists of ``(round, value)``, oldest first).
        """
        pid = _check_int("Curriculum.history", "problem_id", problem_id, minimum=0)
        if pid >= self.pool_size:
            raise GradAlignError(f"Curriculum.history: problem_id must be < N, got {pid}")
        t = self._tables()
        scores = list(t.hist["scores"].get(pid, []))
        accuracies = list(t.hist["accuracy"].get(pid, []))
        return {
            "seen_count": int(t.seen_count[pid]),
            "last_round": int(t.last_round[pid]),
            "selected_count": int(t.selected_count[pid]),
            "selected_rounds": list(t.selected_rounds.get(pid, [])),
            "last_score": scores[-1][1] if scores else None,
            "last_accuracy": accuracies[-1][1] if accuracies else None,
            "scores": scores,
            "accuracies": accuracies,
        }

    def state_dict(self) -> dict[str, Any]:
        """Position and history as plain Python (ints, floats, lists): ``torch.save``/JSON-able."""
        log = [_copy_entry(e) for e in self._log]
        position = (self._round, self._pass, self._offset, log, list(self._chunk_rounds))
        return dict(zip(_STATE_KEYS, (_STATE_FORMAT, *self._args(), *position), strict=True))

    def _args(self) -> tuple[int, int, int]:
        return self.pool_size, self.chunk_size, self.seed

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from [`state_dict`][gradalign.curriculum.Curriculum.state_dict]: later chunks and history match the uninterrupted run.

        Raises:
            GradAlignError: a key is missing, a constructor argument differs, or the state is
                inconsistent. On error this curriculum is left unchanged.
        """
        where = "Curriculum.load_state_dict"
        if not isinstance(state, dict):
            raise GradAlignError(
                f"{where}: state must be a dict from Curriculum.state_dict(), got "
                f"{type(state).__name__}"
            )
        state = dict(state)
        if state.get("format") == 1 and "chunk_rounds" not in state:
            # Format 1 had one chunk per round.
            rnd = state.get("round")
            state["chunk_rounds"] = list(range(rnd + 1)) if isinstance(rnd, int) else None
            state["format"] = _STATE_FORMAT
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise GradAlignError(f"{where}: state lacks keys {missing}")
        mine = dict(zip(_ARG_KEYS, (_STATE_FORMAT, *self._args()), strict=True))
        for key, value in mine.items():
            if state[key] != value:
                raise GradAlignError(f"{where}: state has {key}={state[key]!r}, expected {value!r}")
        fresh = Curriculum(*self._args())
        fresh._round = _check_int(where, "round", state["round"], minimum=-1)
        fresh._pass = _check_int(where, "pass_index", state["pass_index"], minimum=0)
        fresh._offset = _check_int(where, "offset", state["offset"], minimum=0)
        chunk_rounds = state["chunk_rounds"]
        ok = isinstance(chunk_rounds, list) and all(
            isinstance(r, int) and not isinstance(r, bool) for r in chunk_rounds
        )
        if (
            not ok
            or sorted(set(chunk_rounds)) != list(range(fresh._round + 1))
            or (chunk_rounds != sorted(chunk_rounds))
        ):
            raise GradAlignError(
                f"{where}: chunk_rounds must list the round of every drawn chunk, rising from 0 "
                f"to round={fresh._round}, got {chunk_rounds if ok else type(chunk_rounds)}"
            )
        fresh._chunk_rounds = list(chunk_rounds)
        drawn = fresh._pass * self.chunks_per_pass - (-fresh._offset // self.chunk_size)
        if fresh._offset > self.pool_size or drawn != len(chunk_rounds):
            raise GradAlignError(
                f"{where}: round={fresh._round}, pass_index={fresh._pass}, offset={fresh._offset} "
                f"and {len(chunk_rounds)} drawn chunks do not fit pool_size={self.pool_size}, "
                f"chunk_size={self.chunk_size}"
            )
        records = state["records"]
        if not isinstance(records, (list, tuple)):
            raise GradAlignError(
                f"{where}: records must be a list of round records, got {type(records).__name__}"
            )
        for entry in records:
            r = entry.get("round") if isinstance(entry, dict) else None
            done = fresh._records()
            low = (done[-1]["round"] + 1) if done and _is_record(entry) else -1
            if not isinstance(r, int) or not low <= r <= fresh._round:
                raise GradAlignError(f"{where}: record rounds must rise to {fresh._round}, got {r}")
            try:
                fresh._apply(f"{where}: records[round={r}]", _copy_entry(entry))
            except (KeyError, TypeError) as exc:
                raise GradAlignError(f"{where}: records[round={r}] is malformed ({exc!r})") from exc
        self.__dict__.update(fresh.__dict__)
