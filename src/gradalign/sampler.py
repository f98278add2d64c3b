"""A torch ``Sampler`` over the latest selection: the one sampler every trainer integration uses.

Implementations: [`SelectionSampler`][gradalign.sampler.SelectionSampler] (``torch.utils.data.Sampler[int]`` over the latest
recorded selection in TRL's ``RepeatSampler`` layout, seeded and rank-aware; finite per
``__iter__``, or endless for trainers that draw from one iterator for the whole run) and
[`SelectionSource`][gradalign.sampler.SelectionSource] (the protocol it reads; [`Curriculum`][gradalign.curriculum.Curriculum] is one).

Shape glossary: K selected problems, P problems of this rank, R ranks, B blocks, b block size,
G generations per problem.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch.utils.data import Sampler

from gradalign._problem_ids import _check_int, _ids, _permutation
from gradalign.errors import GradAlignError

__all__ = ["SelectionSampler", "SelectionSource"]

_STATE_FORMAT = 1
_SETTINGS = (
    "pool_size",
    "num_generations",
    "seed",
    "num_replicas",
    "rank",
    "shuffle",
    "repeat_count",
    "batch_size",
    "endless",
)
"""What fixes the order besides the position: a state loads only into a sampler built alike."""


class _Position(NamedTuple):
    """Where a sampler stands: its epoch, and where its endless stream stands."""

    epoch: int
    stream_version: int  # the record whose selection the stream walks (-1: none yet)
    stream_pass: int
    queue: torch.Tensor  # (n,) problems left in the pass
    block: torch.Tensor  # (b,) the block in hand
    served: int  # indices of the block in hand already handed out


@runtime_checkable
class SelectionSource(Protocol):
    """What [`SelectionSampler`][gradalign.sampler.SelectionSampler] reads; `Curriculum` is one."""

    @property
    def pool_size(self) -> int: ...

    @property
    def num_records(self) -> int: ...

    def selected_ids(self) -> torch.Tensor: ...


class SelectionSampler(Sampler[int]):
    """Indices of the latest recorded selection, each repeated ``num_generations`` times in a row.

    Every ``__iter__`` snapshots the source's latest selection (K problems); one recorded while an
    iterator runs is served from the next ``__iter__`` on. Before any record it serves
    ``initial_ids`` if given, else the whole pool. With ``shuffle`` the problems are permuted by a
    local generator seeded by ``(seed, source.num_records, epoch)``, else kept in rank order. As in
    ``DistributedSampler``, the list is padded by wrapping around to a multiple of
    ``num_replicas`` and rank r takes every ``num_replicas``-th problem from position r: equal
    lengths, one order on all ranks. As in TRL's ``RepeatSampler``, the rank's problems are cut into
    blocks of ``batch_size`` (the last padded by wrapping; one block if None), each block is served
    ``repeat_count`` times and each problem ``num_generations`` times consecutively.

    Args:
        source: a `Curriculum` or any [`SelectionSource`][gradalign.sampler.SelectionSource].
        num_generations: rollouts per problem, >= 1.
        seed: base seed of the order.
        num_replicas: ranks sharing the selection, >= 1.
        rank: this rank, in ``[0, num_replicas)``.
        shuffle: permute the problems (anew per selection and epoch).
        repeat_count: times each block is served in a row, >= 1.
        batch_size: problems per block, or None for all of the rank's problems.
        initial_ids: (K0,) problem ids served before the first record.
        endless: serve forever instead of once per ``__iter__`` (for trainers that draw from one
            iterator for the whole run, like TRL's): every block starts by checking the source,
            and after a new record the blocks walk the new selection from its start; within one
            selection the rank's problems are walked in passes, pass p in the order of epoch p,
            so every selected problem is served once per pass. Needs ``batch_size``; such a
            sampler has no length. Its position is in
            [`state_dict`][gradalign.sampler.SelectionSampler.state_dict]: a resumed run continues
            with the ids the uninterrupted run would have served.

    Raises:
        GradAlignError: bad settings; from ``__iter__`` and ``__len__``, an empty selection.

    Examples:
        >>> from gradalign import Curriculum
        >>> cur = Curriculum(pool_size=4, chunk_size=4)
        >>> sampler = SelectionSampler(cur, num_generations=2, shuffle=False)
        >>> list(sampler)
        [0, 0, 1, 1, 2, 2, 3, 3]
        >>> _ = cur.next_chunk()
        >>> cur.record(torch.tensor([3, 1]))
        >>> list(sampler), len(sampler)
        ([3, 3, 1, 1], 4)
    """

    def __init__(
        self,
        source: SelectionSource,
        *,
        num_generations: int = 1,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        repeat_count: int = 1,
        batch_size: int | None = None,
        initial_ids: torch.Tensor | None = None,
        endless: bool = False,
    ) -> None:
        super().__init__()
        where = type(self).__name__
        if not isinstance(source, SelectionSource):
            raise GradAlignError(
                f"{where}: source must have pool_size, num_records and selected_ids(), "
                f"got {type(source).__name__}"
            )
        self._source = source
        self._num_generations = _check_int(where, "num_generations", num_generations, minimum=1)
        self._seed = _check_int(where, "seed", seed)
        self._num_replicas = _check_int(where, "num_replicas", num_replicas, minimum=1)
        self._rank = _check_int(where, "rank", rank, minimum=0)
        if rank >= num_replicas:
            raise GradAlignError(f"{where}: rank must be < num_replicas={num_replicas}, got {rank}")
        self._shuffle = bool(shuffle)
        self._repeat_count = _check_int(where, "repeat_count", repeat_count, minimum=1)
        if batch_size is not None:
            _check_int(where, "batch_size", batch_size, minimum=1)
        self._batch_size = batch_size
        self._initial = initial_ids
        if initial_ids is not None:
            self._initial = _ids(where, "initial_ids", initial_ids, source.pool_size)
        self._epoch = 0
        self._endless = bool(endless)
        if self._endless and batch_size is None:
            raise GradAlignError(f"{where}: an endless sampler needs a batch_size, got None")
        self._stream_version, self._stream_pass = -1, 0
        self._queue = torch.zeros(0, dtype=torch.long)
        # The stream's block in hand and how many of its indices were handed out: an iterator
        # resumed from a state finishes it before drawing the next block.
        self._block = torch.zeros(0, dtype=torch.long)
        self._block_rows: list[int] = []
        self._served = 0

    @property
    def batch_size(self) -> int | None:
        """Problems per block (None: all of the rank's problems)."""
        return self._batch_size

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that, with the seed and the selection, fixes the order."""
        self._epoch = _check_int("SelectionSampler.set_epoch", "epoch", epoch, minimum=0)

    def _selection(self, where: str) -> torch.Tensor:
        if self._source.num_records == 0:
            ids = torch.arange(self._source.pool_size) if self._initial is None else self._initial
        else:
            ids = self._source.selected_ids().to("cpu", torch.int64)
        if ids.numel() == 0:
            raise GradAlignError(
                f"{where}: the selection of record {self._source.num_records} is empty; "
                "there is nothing to serve"
            )
        return ids  # (K,)

    def _sizes(self, k: int) -> tuple[int, int, int]:
        per_rank = -(-k // self._num_replicas)
        block = self._batch_size or per_rank
        return per_rank, block, -(-per_rank // block)

    def _order(self, epoch: int) -> torch.Tensor:
        """(P,) this rank's problems of the current selection, in the order of ``epoch``."""
        ids = self._selection(f"{type(self).__name__}.__iter__")  # (K,)
        if self._shuffle:
            version = self._source.num_records
            ids = ids[_permutation(len(ids), "sampler", self._seed, version, epoch)]
        per_rank = -(-len(ids) // self._num_replicas)
        padded = ids[torch.arange(per_rank * self._num_replicas) % len(ids)]  # (P * R,)
        return padded[self._rank :: self._num_replicas]  # (P,)

    def __iter__(self) -> Iterator[int]:
        if self._endless:
            return self._stream()
        mine = self._order(self._epoch)  # (P,)
        per_rank = len(mine)
        block = self._batch_size or per_rank
        n_blocks = -(-per_rank // block)
        mine = mine[torch.arange(n_blocks * block) % per_rank].view(n_blocks, 1, block)  # (B, 1, b)
        out = mine.expand(n_blocks, self._repeat_count, block)  # (B, repeat, b)
        out = out.repeat_interleave(self._num_generations, dim=-1)  # (B, repeat, b * G)
        return iter(out.reshape(-1).tolist())

    def __len__(self) -> int:
        if self._endless:
            raise TypeError(
                f"{type(self).__name__}: an endless sampler has no length; give the trainer a "
                "number of steps (max_steps)"
            )
        _, block, n_blocks = self._sizes(len(self._selection("SelectionSampler.__len__")))
        return n_blocks * block * self._repeat_count * self._num_generations

    def current_ids(self) -> torch.Tensor:
        """(P,) the problems this rank serves from the next block on, in no particular order."""
        return self._order(0)

    def next_block(self) -> torch.Tensor:
        """(batch_size,) the next block of an endless stream; a selection smaller than a block
        repeats within it."""
        version = self._source.num_records
        if version != self._stream_version:
            self._stream_version, self._stream_pass = version, 0
            self._queue = self._order(0)
        parts, need = [], self._batch_size or len(self._queue)
        while need:
            if not len(self._queue):
                self._stream_pass += 1
                self._queue = self._order(self._stream_pass)
            parts.append(self._queue[:need])
            self._queue = self._queue[len(parts[-1]) :]
            need -= len(parts[-1])
        return torch.cat(parts)

    def _hold(self, block: torch.Tensor, served: int) -> None:
        """Take ``block`` (b,) in hand, ``served`` of its indices already handed out."""
        rows = block.repeat_interleave(self._num_generations)  # (b * G,)
        self._block, self._served = block, served
        self._block_rows = rows.repeat(self._repeat_count).tolist()  # (repeat * b * G,)

    def _stream(self) -> Iterator[int]:
        # The position lives on the sampler, not in this generator: a state saved mid-block
        # resumes mid-block, and every iterator of one sampler shares one stream.
        while True:
            if self._served >= len(self._block_rows):
                self._hold(self.next_block(), 0)
            self._served += 1
            yield self._block_rows[self._served - 1]

    def _settings(self) -> dict[str, Any]:
        values = (
            self._source.pool_size,
            self._num_generations,
            self._seed,
            self._num_replicas,
            self._rank,
            self._shuffle,
            self._repeat_count,
            self._batch_size,
            self._endless,
        )
        return dict(zip(_SETTINGS, values, strict=True))

    def state_dict(self) -> dict[str, Any]:
        """The position as plain Python (ints, bools, lists): ``torch.save``/JSON-able.

        The epoch, and for an endless sampler where its stream stands: the record and pass it
        walks, the problems left in the pass, the block in hand and how many of that block's
        indices were handed out. Save it with the source's own state (``Curriculum.state_dict``).

        Examples:
            >>> from gradalign import Curriculum
            >>> cur = Curriculum(pool_size=6, chunk_size=6)
            >>> sampler = SelectionSampler(cur, num_generations=2, batch_size=2, endless=True)
            >>> stream = iter(sampler)
            >>> served = [next(stream) for _ in range(3)]
            >>> state = sampler.state_dict()  # saved with cur.state_dict()
            >>> later = [next(stream) for _ in range(5)]
            >>> resumed = SelectionSampler(cur, num_generations=2, batch_size=2, endless=True)
            >>> resumed.load_state_dict(state)
            >>> stream = iter(resumed)
            >>> [next(stream) for _ in range(5)] == later
            True
        """
        position = _Position(
            self._epoch,
            self._stream_version,
            self._stream_pass,
            self._queue,
            self._block,
            self._served,
        )
        plain = {
            key: value.tolist() if isinstance(value, torch.Tensor) else value
            for key, value in position._asdict().items()
        }
        return {"format": _STATE_FORMAT, **self._settings(), **plain}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from [`state_dict`][gradalign.sampler.SelectionSampler.state_dict].

        Load the source's state first: an endless sampler then serves, from its next index on,
        what the uninterrupted run would have served.

        Raises:
            GradAlignError: not a state of a sampler built with the same settings, a state ahead
                of the source (load the source's state first), or an inconsistent position. On
                error this sampler is left unchanged.
        """
        where = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state, dict):
            raise GradAlignError(
                f"{where}: state must be the dict of {type(self).__name__}.state_dict(), got "
                f"{type(state).__name__} {state!r:.60}"
            )
        missing = [k for k in ("format", *_SETTINGS, *_Position._fields) if k not in state]
        if missing:
            raise GradAlignError(
                f"{where}: state lacks keys {missing}; pass the dict of state_dict()"
            )
        expected = {"format": _STATE_FORMAT, **self._settings()}
        for key, value in expected.items():
            if state[key] != value or type(state[key]) is not type(value):
                raise GradAlignError(
                    f"{where}: state has {key}={state[key]!r}, this sampler has {value!r}; "
                    "build the sampler with the settings of the saved one"
                )
        position = self._position(where, state)
        self._epoch, self._stream_version = position.epoch, position.stream_version
        self._stream_pass, self._queue = position.stream_pass, position.queue
        self._hold(position.block, position.served)

    def _position(self, where: str, state: dict[str, Any]) -> _Position:
        """The validated position of a state; raises before anything is changed."""
        position = _position(where, state, self._source)
        block = len(position.block)
        if block not in (0, self._batch_size):
            raise GradAlignError(
                f"{where}: block must hold batch_size={self._batch_size} problems (or none), got "
                f"{block}"
            )
        rows = block * self._num_generations * self._repeat_count
        if position.served > rows:
            raise GradAlignError(
                f"{where}: served must be at most the {rows} indices of the block in hand, got "
                f"{position.served}"
            )
        return position


def _position(where: str, state: dict[str, Any], source: SelectionSource) -> _Position:
    """The position entries of a state, each checked on its own."""
    epoch = _check_int(where, "epoch", state["epoch"], minimum=0)
    version = _check_int(where, "stream_version", state["stream_version"], minimum=-1)
    if version > source.num_records:
        raise GradAlignError(
            f"{where}: the state's stream is at record {version} but the source has "
            f"{source.num_records} records; load the source's state (Curriculum.load_state_dict) "
            "first"
        )
    stream_pass = _check_int(where, "stream_pass", state["stream_pass"], minimum=0)
    queue = _ids_list(where, "queue", state["queue"], source.pool_size)
    block = _ids_list(where, "block", state["block"], source.pool_size)
    served = _check_int(where, "served", state["served"], minimum=0)
    return _Position(epoch, version, stream_pass, queue, block, served)


def _ids_list(where: str, name: str, value: Any, pool_size: int) -> torch.Tensor:
    """(n,) int64 problem ids from a list of ints in [0, pool_size); repeats allowed."""
    ok = isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v < pool_size for v in value
    )
    if not ok:
        raise GradAlignError(
            f"{where}: {name} must be a list of problem ids in [0, {pool_size}), got {value!r:.60}"
        )
    return torch.tensor(value, dtype=torch.long)
