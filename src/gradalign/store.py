"""On-disk store of group gradients: pools larger than memory, resumable after an interruption.

Implementations: :class:`GradientStore`. A store is a directory holding

- ``grads.bin``: a raw row-major (rows, D) array (float32 or float16), read and written through a
  ``numpy.memmap``;
- ``index.json``: the committed rows (group id, sequences, tokens, zero-spread flag of each row),
  the gradient dimension, dtype and segments, and a fingerprint of the extractor and objective.

:meth:`GradientStore.extract` streams the pool through ``extractor.iter_groups`` in chunks of
``chunk_groups`` groups, writes each chunk's rows, flushes them, then replaces the index atomically
(temporary file + ``os.replace``). Rows past the index are leftovers of an interrupted chunk and are
overwritten; a rerun skips every committed group. Peak memory is one chunk's (chunk_groups, D) rows
plus what the extractor itself holds, never G x D.

Shape glossary: G groups, D gradient dimension.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from gradalign.errors import GradAlignError
from gradalign.extractors.base import GradientExtractor, GroupGradients, Segment
from gradalign.objective import GRPOObjective
from gradalign.rollouts import Rollouts

__all__ = ["GradientStore"]

_FORMAT = 1
_DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
}
_DATA, _INDEX = "grads.bin", "index.json"


def _dtype_name(call: str, dtype: Any) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise GradAlignError(f"{call}: dtype must be float32 or float16, got {dtype!r}")
    return name


@dataclasses.dataclass(frozen=True, eq=False)
class _Pinned(GRPOObjective):
    """The objective of the whole pool, evaluated on a subset of its groups.

    Batch-level statistics (``scale_rewards="batch"``, the default length of
    ``"seq-mean-token-sum-norm"``) stay those of the full rollouts, so a resumed chunk gets exactly
    the weights it would have had in one uninterrupted pass.
    """

    subset: Rollouts | None = dataclasses.field(default=None, repr=False)
    pinned_advantages: torch.Tensor | None = dataclasses.field(default=None, repr=False)
    pinned_aggregation: torch.Tensor | None = dataclasses.field(default=None, repr=False)

    def advantages(self, rollouts: Rollouts) -> torch.Tensor:
        if rollouts is self.subset and self.pinned_advantages is not None:
            return self.pinned_advantages  # (S_sub,)
        return super().advantages(rollouts)

    def aggregation(self, rollouts: Rollouts) -> torch.Tensor:
        if rollouts is self.subset and self.pinned_aggregation is not None:
            return self.pinned_aggregation  # (S_sub, T_sub)
        return super().aggregation(rollouts)


def _pin(objective: GRPOObjective, full: Rollouts, ids: torch.Tensor) -> tuple[Rollouts, _Pinned]:
    """The rollouts of groups ``ids`` and the objective that weighs them as in ``full``."""
    subset = full.select_groups(ids)
    rows = (
        torch.isin(full.group_ids, ids.to(full.device)).nonzero().flatten()
    )  # select_groups order
    width = subset.input_ids.shape[1]
    settings = {f.name: getattr(objective, f.name) for f in dataclasses.fields(GRPOObjective)}
    pinned = _Pinned(
        **settings,
        subset=subset,
        pinned_advantages=objective.advantages(full)[rows],  # (S_sub,)
        pinned_aggregation=objective.aggregation(full)[rows, :width],  # (S_sub, T_sub)
    )
    return subset, pinned


class GradientStore:
    """Group gradients on disk, written chunk by chunk and resumable.

    Args:
        path: the store's directory (created if missing).
        dim: D; None takes it from the existing index or from the first extracted chunk.
        dtype: storage dtype, torch.float32 (default) or torch.float16 (loaded back as float32).

    Example:
        >>> store = GradientStore("pool_grads", dim=None)  # doctest: +SKIP
        >>> store.extract(FactorizedGradient(), model, pool_rollouts, chunk_groups=64)  # doctest: +SKIP
        >>> grads = store.load()  # (G, D) GroupGradients  # doctest: +SKIP
    """

    def __init__(
        self, path: str | os.PathLike[str], dim: int | None = None, dtype: Any = torch.float32
    ) -> None:
        call = "GradientStore"
        if dim is not None and (not isinstance(dim, int) or dim < 1):
            raise GradAlignError(f"{call}: dim must be an int >= 1 or None, got {dim!r}")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._index = self._read_index()
        stored = self._index.get("dtype")
        self.dtype = _dtype_name(call, dtype)
        if stored is not None and stored != self.dtype:
            raise GradAlignError(
                f"{call}: the store at {self.path} holds {stored}, got dtype={dtype!r}"
            )
        stored_dim = self._index.get("dim")
        if stored_dim is not None and dim is not None and stored_dim != dim:
            raise GradAlignError(
                f"{call}: the store at {self.path} holds D={stored_dim}, got dim={dim}"
            )
        self.dim: int | None = stored_dim if stored_dim is not None else dim
        self._cache: dict[str, torch.Tensor] | None = None

    def _read_index(self) -> dict[str, Any]:
        file = self.path / _INDEX
        if not file.exists():
            return {
                "format": _FORMAT,
                "group_ids": [],
                "num_sequences": [],
                "num_tokens": [],
                "zero_spread": [],
            }
        index: dict[str, Any] = json.loads(file.read_text())
        if index.get("format") != _FORMAT:
            raise GradAlignError(
                f"GradientStore: {file} has format {index.get('format')!r}, expected {_FORMAT}"
            )
        return index

    def _write_index(self) -> None:
        tmp = self.path / (_INDEX + ".tmp")
        with open(tmp, "w") as fh:
            json.dump(self._index, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path / _INDEX)

    def __len__(self) -> int:
        return len(self._index["group_ids"])

    @property
    def group_ids(self) -> torch.Tensor:
        """(G,) ids of the committed groups, ascending."""
        return torch.tensor(sorted(self._index["group_ids"]), dtype=torch.long)

    def _memmap(self, rows: int, dim: int, mode: Literal["r", "r+"]) -> np.memmap[Any, Any]:
        """The data file as a (rows, D) memmap, grown to hold ``rows`` rows when writing."""
        file, np_dtype = self.path / _DATA, _DTYPES[self.dtype]
        need = rows * dim * np_dtype.itemsize
        if mode == "r+":
            with open(file, "ab") as fh:
                if fh.tell() < need:
                    fh.truncate(need)
        elif not file.exists() or file.stat().st_size < need:
            raise GradAlignError(
                f"GradientStore: {file} is shorter than its index says ({rows} rows)"
            )
        return np.memmap(file, dtype=np_dtype, mode=mode, shape=(rows, dim))

    def _check_part(self, part: GroupGradients) -> int:
        """D of the store, fixed by the first chunk ever written."""
        if self.dim is None:
            self.dim = part.dim
        if part.dim != self.dim:
            raise GradAlignError(
                f"GradientStore.extract: the store holds D={self.dim} but the extractor gave "
                f"D={part.dim}"
            )
        segments = [[s.name, s.start, s.stop] for s in part.segments]
        self._index.setdefault("segments", segments)
        self._index.update(dim=self.dim, dtype=self.dtype)
        return self.dim

    def _check_fingerprint(self, extractor: GradientExtractor, objective: GRPOObjective) -> None:
        fingerprint = f"{extractor!r} | {objective!r}"
        stored = self._index.get("fingerprint")
        if stored is not None and stored != fingerprint:
            raise GradAlignError(
                f"GradientStore.extract: the store at {self.path} holds gradients of {stored}, "
                f"got {fingerprint}; use a new path for other settings"
            )
        self._index["fingerprint"] = fingerprint

    def extract(
        self,
        extractor: GradientExtractor,
        model: nn.Module,
        rollouts: Rollouts,
        objective: GRPOObjective | None = None,
        *,
        chunk_groups: int = 256,
        progress: bool = False,
    ) -> int:
        """Extract and store the gradients of every group of ``rollouts`` not stored yet.

        Args:
            extractor: any :class:`GradientExtractor`.
            model: the model, as for ``extractor.per_group``.
            rollouts: the pool's rollouts (resuming: the same rollouts as the interrupted run).
            objective: the GRPO loss; default ``GRPOObjective()``.
            chunk_groups: groups per committed chunk (an interruption loses at most one chunk).
            progress: show the extractor's progress bar.

        Returns:
            The number of groups extracted by this call (0 when all were stored already).
        """
        call = "GradientStore.extract"
        if not isinstance(chunk_groups, int) or chunk_groups < 1:
            raise GradAlignError(f"{call}: chunk_groups must be an int >= 1, got {chunk_groups!r}")
        if not isinstance(rollouts, Rollouts):
            raise GradAlignError(
                f"{call}: rollouts must be a gradalign.Rollouts, got {type(rollouts).__name__}"
            )
        objective = GRPOObjective() if objective is None else objective
        self._check_fingerprint(extractor, objective)
        done = torch.tensor(self._index["group_ids"], dtype=torch.long)
        todo = rollouts.unique_groups.cpu()
        todo = todo[~torch.isin(todo, done)]  # (G_todo,) ascending
        for ids in todo.split(chunk_groups) if todo.numel() else ():
            sub, pinned = _pin(objective, rollouts, ids)
            self._commit(extractor.iter_groups(model, sub, pinned, progress=progress))
        return int(todo.numel())

    def _commit(self, parts: Iterator[GroupGradients]) -> None:
        """Write a chunk's rows after the committed ones, flush them, then update the index."""
        index, start = self._index, len(self)
        new: dict[str, list[Any]] = {
            k: [] for k in ("group_ids", "num_sequences", "num_tokens", "zero_spread")
        }
        stop = start
        for part in parts:
            dim = self._check_part(part)
            data = self._memmap(stop + len(part), dim, "r+")
            data[stop : stop + len(part)] = part.grads.float().numpy().astype(data.dtype)
            data.flush()
            del data
            stop += len(part)
            new["group_ids"] += part.group_ids.tolist()
            new["num_sequences"] += part.num_sequences.tolist()
            new["num_tokens"] += part.num_tokens.tolist()
            new["zero_spread"] += part.zero_spread.tolist()
        for key, values in new.items():
            index[key] = index[key] + values
        self._write_index()
        self._cache = None

    def _columns(self) -> dict[str, torch.Tensor]:
        """The index as tensors in row order, plus ``order`` (rows sorted by group id); cached."""
        if self._cache is None:
            index = self._index
            cols = {
                "group_ids": torch.tensor(index["group_ids"], dtype=torch.long),
                "num_sequences": torch.tensor(index["num_sequences"], dtype=torch.long),
                "num_tokens": torch.tensor(index["num_tokens"], dtype=torch.long),
                "zero_spread": torch.tensor(index["zero_spread"], dtype=torch.bool),
            }
            cols["order"] = torch.argsort(cols["group_ids"])
            self._cache = cols
        return self._cache

    def _rows_of(self, ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(G,) ids ascending and (G,) their rows in the data file."""
        cols = self._columns()
        order = cols["order"]
        stored = cols["group_ids"][order]  # (G_all,) ascending
        if ids is None:
            return stored, order
        ids = ids.to(torch.long).flatten().unique()
        pos = torch.searchsorted(stored, ids).clamp(max=len(stored) - 1)
        found = stored[pos] == ids
        if not bool(found.all()):
            raise GradAlignError(
                f"GradientStore.load: groups {ids[~found][:10].tolist()} are not stored"
            )
        return ids, order[pos]

    def load(self, ids: torch.Tensor | list[int] | None = None) -> GroupGradients:
        """The stored gradients (all, or of group ``ids``) as float32, sorted by group id."""
        if len(self) == 0 or self.dim is None:
            raise GradAlignError(
                f"GradientStore.load: the store at {self.path} holds no groups yet"
            )
        group_ids, rows = self._rows_of(None if ids is None else torch.as_tensor(ids))
        data = self._memmap(len(self), self.dim, "r")
        grads = torch.from_numpy(np.asarray(data[rows.numpy()], dtype=np.float32))  # (G, D)
        del data
        cols = self._columns()
        return GroupGradients(
            group_ids=group_ids,
            grads=grads,
            num_sequences=cols["num_sequences"][rows],
            num_tokens=cols["num_tokens"][rows],
            zero_spread=cols["zero_spread"][rows],
            segments=tuple(Segment(n, a, b) for n, a, b in self._index.get("segments", [])),
        )

    def iter_chunks(self, chunk_groups: int = 1024) -> Iterator[GroupGradients]:
        """Stream the stored gradients in ascending group id, ``chunk_groups`` groups at a time."""
        if not isinstance(chunk_groups, int) or chunk_groups < 1:
            raise GradAlignError(
                f"GradientStore.iter_chunks: chunk_groups must be an int >= 1, got {chunk_groups!r}"
            )
        for ids in self.group_ids.split(chunk_groups):
            yield self.load(ids)
