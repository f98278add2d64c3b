"""On-disk store of group gradients: pools larger than memory, resumable, safe to share.

Implementations: [`GradientStore`][gradalign.store.GradientStore]. A store is a directory holding

- ``grads.bin``: a raw row-major (rows, D) array (float32 or float16);
- ``index.json``: the committed rows (group id, sequences, tokens, zero-spread flag, a CRC-32 of
  the row's bytes and a digest of the group's rollouts), D, dtype, segments, fingerprints of
  the extractor and objective settings (tensors by value) and of the model's weights, the batch
  statistics the objective's weights depend on (``scale_rewards="batch"``: the pool's reward
  std), and a SHA-256 checksum of all of it;
- ``writer.lock``: held (``flock``) by the one process that may write.

[`GradientStore.extract`][gradalign.store.GradientStore.extract] takes the lock, streams the pool through ``extractor.iter_groups``
in chunks of ``group_chunk`` groups, writes each chunk's rows, flushes them to disk, then replaces
the index atomically (temporary file + ``os.replace``). Rows past the index are leftovers of an
interrupted chunk and are overwritten; a rerun skips every committed group. Chunks hold whole packs
of the extractor (``group_packs``: the groups that share its passes), so the stored numbers do not
depend on ``group_chunk`` or on interruptions.

Nothing damaged is ever returned: opening a store checks the index's checksum and the data file
against the index (a file shorter than the committed rows is refused), [`load`][gradalign.store.GradientStore.load] checks every
row's CRC, and [`GradientStore.repair`][gradalign.store.GradientStore.repair] drops the rows that fail so the next extract computes them
again. Rows prepared with other batch statistics are never mixed into one store.

Shape glossary: G groups, D gradient dimension.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gradalign._fingerprint import group_digests, model_digest, settings_digest
from gradalign._store_io import (
    COLUMNS,
    DATA,
    DTYPES,
    batch_record,
    check_batch,
    damaged,
    dtype_name,
    finish_repair,
    read_index,
    repair_store,
    write_index,
    writer_lock,
)
from gradalign._validate import check_int
from gradalign.errors import GradAlignError
from gradalign.extractors.base import GradientExtractor, GroupGradients, Segment, chunk_size
from gradalign.objective import GRPOObjective, Objective, TokenWeights, prepare_weights
from gradalign.rollouts import Rollouts

__all__ = ["GradientStore"]


def _chunk(
    prepared: TokenWeights, full: Rollouts, ids: torch.Tensor
) -> tuple[Rollouts, TokenWeights]:
    """The rollouts of groups ``ids`` and their rows of the whole pool's prepared weights.

    Batch-level statistics (``scale_rewards="batch"``, the default length of
    ``"seq-mean-token-sum-norm"``) stay those of the whole pool, so a resumed chunk gets exactly
    the weights it would have had in one uninterrupted pass.
    """
    subset = full.select_groups(ids)
    rows = torch.isin(full.group_ids, ids.to(full.device)).nonzero().flatten()  # subset order
    return subset, prepared.select(rows, subset.input_ids.shape[1])


COMMIT_GROUPS = 256
"""Default groups per committed chunk of ``GradientStore.extract`` (how much an interruption can lose)."""


class GradientStore:
    """Group gradients on disk, written chunk by chunk, resumable, checked on every read.

    Args:
        path: the store's directory (created if missing).
        dim: D; None takes it from the existing index or from the first extracted chunk.
        dtype: storage dtype, torch.float32 (default) or torch.float16 (loaded back as float32).

    Raises:
        GradAlignError: If the index is unreadable, the settings disagree with the stored ones,
            or the data file holds fewer rows than the index commits.

    Examples:
        >>> store = GradientStore(tmp_path / "pool_grads")
        >>> store.extract(FactorizedGradient(8, 8), model, rollouts, group_chunk=2)  # groups stored
        4
        >>> store.load().grads.shape  # a rerun resumes after the last whole chunk
        torch.Size([4, 1008])
    """

    def __init__(
        self, path: str | os.PathLike[str], dim: int | None = None, dtype: Any = torch.float32
    ) -> None:
        call = "GradientStore"
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
            raise GradAlignError(f"{call}: dim must be an int >= 1 or None, got {dim!r}")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.dtype = dtype_name(call, dtype)
        self._requested_dim = dim
        self._reload()

    def _reload(self) -> None:
        """Read the index from disk and check it against the settings and the data file."""
        call, index = "GradientStore", read_index(self.path)
        stored = index.get("dtype")
        if stored is not None and stored != self.dtype:
            raise GradAlignError(
                f"{call}: the store at {self.path} holds {stored}, got dtype={self.dtype!r}"
            )
        stored_dim, dim = index.get("dim"), self._requested_dim
        if stored_dim is not None and dim is not None and stored_dim != dim:
            raise GradAlignError(
                f"{call}: the store at {self.path} holds D={stored_dim}, got dim={dim}"
            )
        self._index = index
        self.dim: int | None = stored_dim if stored_dim is not None else dim
        self._cache: dict[str, torch.Tensor] | None = None
        self._check_size()

    def _row_bytes(self) -> int:
        assert self.dim is not None
        return self.dim * DTYPES[self.dtype].itemsize

    def _check_size(self) -> None:
        rows = len(self)
        if rows == 0:
            return
        file = self.path / DATA
        have = file.stat().st_size if file.exists() else 0
        need = rows * self._row_bytes()
        if have < need:
            what = "is missing" if not file.exists() else f"holds {have} bytes"
            raise damaged(
                self.path, f"{DATA} {what} but the index commits {rows} rows ({need} bytes)"
            )

    def _write_index(self) -> None:
        write_index(self.path, self._index)
        self._cache = None

    def __len__(self) -> int:
        return len(self._index["group_ids"])

    @property
    def group_ids(self) -> torch.Tensor:
        """(G,) ids of the committed groups, ascending."""
        return torch.tensor(sorted(self._index["group_ids"]), dtype=torch.long)

    def _check_part(self, part: GroupGradients) -> int:
        """D of the store (fixed by the first chunk ever written); refuses non-finite rows."""
        call = "GradientStore.extract"
        if self.dim is None:
            self.dim = part.dim
        if part.dim != self.dim:
            raise GradAlignError(
                f"{call}: the store holds D={self.dim} but the extractor gave D={part.dim}"
            )
        bad = ~torch.isfinite(part.grads).all(dim=1)
        if bad.any():
            raise GradAlignError(
                f"{call}: the gradients of groups {part.group_ids[bad][:10].tolist()} are not "
                "finite (NaN or inf); nothing of this chunk was stored"
            )
        if self.dtype == "float16":
            big = part.grads.abs().amax(dim=1) > float(torch.finfo(torch.float16).max)
            if big.any():
                raise GradAlignError(
                    f"{call}: the gradients of groups {part.group_ids[big][:10].tolist()} exceed "
                    "the float16 range (65504) and would be stored as inf; use a float32 store"
                )
        segments = [[s.name, s.start, s.stop] for s in part.segments]
        self._index.setdefault("segments", segments)
        self._index.update(dim=self.dim, dtype=self.dtype)
        return self.dim

    def _check_fingerprint(
        self, extractor: GradientExtractor, objective: Objective, model: nn.Module
    ) -> None:
        call = "GradientStore.extract"
        fingerprint = {
            "settings": settings_digest(extractor, objective),
            "model": model_digest(model),
            "describe": f"{extractor!r} | {objective!r}",
        }
        stored = self._index.get("fingerprint")
        if stored is not None and stored.get("settings") != fingerprint["settings"]:
            raise GradAlignError(
                f"{call}: the store at {self.path} holds gradients of {stored.get('describe')}, "
                f"got {fingerprint['describe']}; use a new path for other settings"
            )
        if stored is not None and stored.get("model") != fingerprint["model"]:
            raise GradAlignError(
                f"{call}: the store at {self.path} was written with other model weights "
                f"(fingerprint {stored.get('model')}, got {fingerprint['model']}); use a new path "
                "for another model or checkpoint"
            )
        self._index["fingerprint"] = fingerprint

    def _check_batch(self, objective: Objective, rollouts: Rollouts) -> None:
        """The pool's batch statistics must be those the stored rows were prepared with."""
        record = batch_record(objective, rollouts)
        check_batch(self.path, self._index, record)
        self._index["batch"] = record

    def _check_content(self, digests: dict[int, str]) -> None:
        """Committed groups that reappear must have the same rollouts (tokens, rewards, ...)."""
        stored = dict(zip(self._index["group_ids"], self._index["content"], strict=True))
        changed = [g for g, d in digests.items() if g in stored and stored[g] != d]
        if changed:
            raise GradAlignError(
                f"GradientStore.extract: groups {sorted(changed)[:10]} are stored from other "
                f"rollouts (tokens, masks, rewards or log-probs differ) at {self.path}; use a new "
                "path for new rollouts"
            )

    def extract(
        self,
        extractor: GradientExtractor,
        model: nn.Module,
        rollouts: Rollouts,
        objective: Objective | None = None,
        *,
        group_chunk: int = COMMIT_GROUPS,
        progress: bool = False,
    ) -> int:
        """Extract and store the gradients of every group of ``rollouts`` not stored yet.

        Args:
            extractor: any [`GradientExtractor`][gradalign.extractors.base.GradientExtractor].
            model: the model, as for ``extractor.per_group``; its weights must be those the store
                was written with.
            rollouts: the pool's rollouts (resuming: the same rollouts as the interrupted run).
            objective: the loss; default ``GRPOObjective()``.
            group_chunk: groups per committed chunk, rounded up to whole packs of the extractor
                (an interruption loses at most one chunk); it never changes the stored numbers.
                Unlike the extractors' ``group_chunk`` (a memory bound, default 1 GiB of rows),
                this one sets how often rows reach the disk, so its default is a count.
            progress: show the extractor's progress bar.

        Returns:
            The number of groups extracted by this call (0 when all were stored already).

        Raises:
            GradAlignError: If another process is writing the store, the settings, model or a
                stored group's rollouts differ from the store's, the objective depends on batch
                statistics (e.g. ``scale_rewards="batch"``) and ``rollouts`` has other ones than
                the pool the stored rows were prepared with, or the store is damaged.
        """
        call = "GradientStore.extract"
        if isinstance(group_chunk, bool) or not isinstance(group_chunk, int) or group_chunk < 1:
            raise GradAlignError(f"{call}: group_chunk must be an int >= 1, got {group_chunk!r}")
        if not isinstance(rollouts, Rollouts):
            raise GradAlignError(
                f"{call}: rollouts must be a gradalign.Rollouts, got {type(rollouts).__name__}"
            )
        objective = GRPOObjective() if objective is None else objective
        prepared = prepare_weights(call, objective, rollouts)  # once, for the whole pool
        with writer_lock(self.path, call):
            finish_repair(self.path)  # a crashed repair's journal says which rows are intact
            self._reload()  # another writer may have committed since this object was opened
            self._check_fingerprint(extractor, objective, model)
            self._check_batch(objective, rollouts)
            digests = group_digests(rollouts)
            self._check_content(digests)
            chunks = self._todo(extractor, rollouts, prepared, group_chunk)
            for ids in chunks:
                sub, weights = _chunk(prepared, rollouts, ids)
                parts = extractor.iter_groups(model, sub, weights, progress=progress)
                self._commit(parts, digests)
        return sum(len(c) for c in chunks)

    def _todo(
        self,
        extractor: GradientExtractor,
        rollouts: Rollouts,
        prepared: TokenWeights,
        group_chunk: int,
    ) -> list[torch.Tensor]:
        """The groups not stored yet, in chunks of whole extractor packs (>= group_chunk groups).

        Chunks never cut a pack, so every group runs with the same companions whatever
        ``group_chunk`` is and however often the extraction was interrupted: the stored rows are
        bit-identical to one uninterrupted pass.
        """
        done = torch.tensor(self._index["group_ids"], dtype=torch.long)
        unique = rollouts.unique_groups.cpu()
        chunks, current, size, start = [], [], 0, 0
        for n in extractor.group_packs(rollouts, prepared):
            ids = unique[start : start + n]
            start += n
            ids = ids[~torch.isin(ids, done)]
            if ids.numel():
                current.append(ids)
                size += int(ids.numel())
            if size >= group_chunk:
                chunks.append(torch.cat(current))
                current, size = [], 0
        if current:
            chunks.append(torch.cat(current))
        return chunks

    def _commit(self, parts: Iterator[GroupGradients], digests: dict[int, str]) -> None:
        """Write a chunk's rows after the committed ones, sync them, then update the index."""
        new: dict[str, list[Any]] = {k: [] for k in COLUMNS}
        stop, file = len(self), self.path / DATA
        with open(file, "r+b" if file.exists() else "w+b") as fh:
            for part in parts:
                self._check_part(part)
                rows = part.grads.float().numpy().astype(DTYPES[self.dtype])  # (Gc, D)
                fh.seek(stop * self._row_bytes())
                fh.write(rows.tobytes())
                stop += len(part)
                new["group_ids"] += part.group_ids.tolist()
                new["num_sequences"] += part.num_sequences.tolist()
                new["num_tokens"] += part.num_tokens.tolist()
                new["zero_spread"] += part.zero_spread.tolist()
                new["crc32"] += [zlib.crc32(r.tobytes()) for r in rows]
                new["content"] += [digests[int(g)] for g in part.group_ids]
            fh.flush()
            os.fsync(fh.fileno())
        for key, values in new.items():
            self._index[key] = self._index[key] + values
        self._write_index()

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
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise GradAlignError(f"GradientStore.load: ids must be integers, got {ids.dtype}")
        ids = ids.to(torch.long).flatten().unique()
        pos = torch.searchsorted(stored, ids).clamp(max=len(stored) - 1)
        found = stored[pos] == ids
        if not bool(found.all()):
            raise GradAlignError(
                f"GradientStore.load: groups {ids[~found][:10].tolist()} are not stored"
            )
        return ids, order[pos]

    def _read_rows(self, rows: torch.Tensor) -> np.ndarray:
        """(G, D) stored rows, each checked against its CRC-32."""
        assert self.dim is not None
        self._check_size()
        shape = (len(self), self.dim)
        try:
            # Map the committed rows only: bytes past them (an interrupted chunk's partial write)
            # are leftovers the next extract overwrites, not part of the store.
            table = np.memmap(self.path / DATA, dtype=DTYPES[self.dtype], mode="r", shape=shape)
        except (OSError, ValueError) as err:  # e.g. the file shrank since _check_size
            raise damaged(self.path, f"{DATA} cannot be read as {shape} rows ({err})") from None
        out = np.array(table[rows.numpy()])  # (G, D)
        del table
        crcs = self._index["crc32"]
        bad = [
            int(r)
            for r, row in zip(rows.tolist(), out, strict=True)
            if zlib.crc32(row.tobytes()) != crcs[r]
        ]
        if bad:
            ids = [self._index["group_ids"][r] for r in bad]
            raise damaged(self.path, f"the rows of groups {ids[:10]} fail their checksum")
        return out

    def load(self, ids: torch.Tensor | list[int] | None = None) -> GroupGradients:
        """The stored gradients (all, or of group ``ids``) as float32, sorted by group id.

        Raises:
            GradAlignError: If a group is not stored, or a row fails its checksum.
        """
        if len(self) == 0 or self.dim is None:
            raise GradAlignError(
                f"GradientStore.load: the store at {self.path} holds no groups yet"
            )
        group_ids, rows = self._rows_of(None if ids is None else torch.as_tensor(ids))
        grads = torch.from_numpy(self._read_rows(rows).astype(np.float32))  # (G, D)
        cols = self._columns()
        return GroupGradients(
            group_ids=group_ids,
            grads=grads,
            num_sequences=cols["num_sequences"][rows],
            num_tokens=cols["num_tokens"][rows],
            zero_spread=cols["zero_spread"][rows],
            segments=tuple(Segment(n, a, b) for n, a, b in self._index.get("segments", [])),
        )

    def iter_chunks(self, group_chunk: int | None = None) -> Iterator[GroupGradients]:
        """Stream the stored gradients in ascending group id, ``group_chunk`` groups at a time.

        ``group_chunk=None`` is the extractors' rule: as many groups as keep a chunk's float32
        rows under 1 GiB.
        """
        check_int("GradientStore.iter_chunks", "group_chunk", group_chunk, 1, allow_none=True)
        size = chunk_size(group_chunk, self.dim or 1)
        for ids in self.group_ids.split(size):
            yield self.load(ids)

    @staticmethod
    def repair(path: str | os.PathLike[str]) -> list[int]:
        """Drop the rows a damaged store cannot vouch for; returns their group ids.

        Rows beyond the end of the data file and rows that fail their checksum are removed from
        the index and the good rows are rewritten contiguously; the next [`extract`][gradalign.store.GradientStore.extract] computes
        the dropped groups again (without the pack-mates they first ran with, so they may differ
        from the lost rows in the last float bits). Takes the writer lock.

        Crash-safe: the new files are written beside the old ones and renamed in only once a
        journal is on disk, so a repair interrupted at any point is finished (or undone) by the
        next repair or extract, and an intact row is never dropped. An ``index.json`` that fails
        its own checksum cannot say which group a row belongs to: its files are moved to
        ``*.rejected`` and every group is returned (the next extract computes them again).

        Raises:
            GradAlignError: If no committed row matches the data file (e.g. a hand-edited
                ``dim``): nothing is changed then, since dropping every row would destroy data.
        """
        return repair_store(Path(path))
