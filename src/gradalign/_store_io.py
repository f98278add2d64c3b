"""Private: the files of a [`GradientStore`][gradalign.store.GradientStore] and their integrity checks.

Implementations: `dtype_name`, `read_index` (every defect of ``index.json`` is a ``GradAlignError``,
its checksum included), `write_index` (atomic replace, with a checksum), `writer_lock` (one writer
at a time, ``flock``), `damaged` (the error that says how to recover), `batch_record` and
`check_batch` (the batch statistics the rows were prepared with), `repair_store` and
`finish_repair` (crash-safe repair: new files beside the old ones, a journal, then renames).

Format 3 adds the index checksum. Format 2 stores (no checksum) are still read, unchecked, and get
their checksum with the next write (an extract's commit or a repair); a format 3 index without
one is refused like a wrong one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gradalign.errors import GradAlignError
from gradalign.objective import BatchStats, GRPOObjective, TokenWeightObjective, TokenWeights
from gradalign.rollouts import Rollouts

FORMAT, LEGACY_FORMAT = 3, 2
DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
}
DATA, INDEX, LOCK = "grads.bin", "index.json", "writer.lock"
# A repair writes the new data and index beside the old ones; the journal, once complete on disk,
# is the commit point (see finish_repair).
NEW_DATA, JOURNAL = f"{DATA}.repair", f"{INDEX}.repair"
REJECTED = ".rejected"
COLUMNS = ("group_ids", "num_sequences", "num_tokens", "zero_spread", "crc32", "content")


def dtype_name(call: str, dtype: Any) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise GradAlignError(f"{call}: dtype must be float32 or float16, got {dtype!r}")
    return name


def empty_index() -> dict[str, Any]:
    return {"format": FORMAT, **{k: [] for k in COLUMNS}}


@contextlib.contextmanager
def writer_lock(folder: Path, call: str) -> Iterator[None]:
    """Hold the store's exclusive writer lock; a second writer gets an error at once.

    The lock is an ``flock`` on ``writer.lock``: the system releases it when the holder exits,
    also on a crash or ``kill -9``. Where ``fcntl`` does not exist (Windows) there is no lock.
    """
    file = folder / LOCK
    fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:
            pass
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise GradAlignError(
                f"{call}: another process (pid {holder}) is writing the store at {folder}; wait "
                "for it to finish (then extract again: committed groups are skipped), or use "
                "another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


# --- index: checksum, write, read -------------------------------------------------------------


def index_checksum(body: dict[str, Any]) -> str:
    """SHA-256 of the index content in a canonical form (sorted keys), so that re-serialising
    the same content gives the same checksum. The index holds only JSON-native values with
    string keys, which survive a round trip unchanged."""
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _dumps(index: dict[str, Any]) -> str:
    index["format"] = FORMAT  # a format 2 index is upgraded by its next write
    body = {k: v for k, v in index.items() if k != "checksum"}
    return json.dumps({**body, "checksum": index_checksum(body)})


def _write_synced(file: Path, text: str) -> None:
    with open(file, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _sync_dir(folder: Path) -> None:
    """Make renames in ``folder`` durable (POSIX; Windows cannot open a folder)."""
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_index(folder: Path, index: dict[str, Any]) -> None:
    """Replace the index atomically: a reader sees the old one or the new one, never a mix."""
    tmp = folder / f"{INDEX}.{os.getpid()}.tmp"
    _write_synced(tmp, _dumps(index))
    os.replace(tmp, folder / INDEX)
    _sync_dir(folder)


def damaged(path: Path, what: str) -> GradAlignError:
    return GradAlignError(
        f"GradientStore: the store at {path} is damaged: {what}. Recover with "
        f"GradientStore.repair({str(path)!r}), which drops the damaged rows (the next extract "
        "computes them again), or delete the folder"
    )


def _parse(file: Path) -> dict[str, Any]:
    try:
        index = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise GradAlignError(
            f"GradientStore: {file} is not valid JSON ({err}); delete the folder and extract again"
        ) from None
    if not isinstance(index, dict) or index.get("format") not in (FORMAT, LEGACY_FORMAT):
        got = index.get("format") if isinstance(index, dict) else type(index).__name__
        raise GradAlignError(
            f"GradientStore: {file} has format {got!r}, expected {FORMAT} (or {LEGACY_FORMAT}); "
            "delete the folder and extract again"
        )
    return index


def _validate(file: Path, index: dict[str, Any]) -> None:
    columns = [index.get(k) for k in COLUMNS]
    lists = [c for c in columns if isinstance(c, list)]
    if len(lists) != len(columns) or len({len(c) for c in lists}) != 1:
        raise GradAlignError(
            f"GradientStore: {file} must hold lists {COLUMNS} of one length; delete the folder "
            "and extract again"
        )
    ids = index["group_ids"]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids) or len(set(ids)) < len(
        ids
    ):
        raise GradAlignError(
            f"GradientStore: {file} must list each group id once, as integers; delete the "
            "folder and extract again"
        )
    if ids:
        dim, dtype = index.get("dim"), index.get("dtype")
        if not isinstance(dim, int) or dim < 1 or dtype not in DTYPES:
            raise GradAlignError(
                f"GradientStore: {file} has dim={dim!r}, dtype={dtype!r}; expected an int >= 1 "
                "and float32 or float16. Delete the folder and extract again"
            )


def load_index(file: Path) -> tuple[dict[str, Any], str]:
    """The structurally valid index (its checksum removed) and the checksum's verdict: "ok",
    "legacy" (a format 2 index, which has none) or "bad"."""
    if not file.exists():
        return empty_index(), "ok"
    index = _parse(file)
    _validate(file, index)
    stored = index.pop("checksum", None)
    if stored is None:
        return index, "legacy" if index["format"] == LEGACY_FORMAT else "bad"
    return index, "ok" if stored == index_checksum(index) else "bad"


def read_index(path: Path) -> dict[str, Any]:
    """The validated index (empty for a new store); every defect is a GradAlignError."""
    file = path / INDEX
    index, verdict = load_index(file)
    if verdict == "bad":
        raise GradAlignError(
            f"GradientStore: {file} fails its checksum: it was edited or damaged after it was "
            "written (e.g. group ids swapped or D changed), so its rows cannot be matched to "
            f"their groups. Restore the file if you edited it, or call GradientStore.repair("
            f"{str(path)!r}), which sets the store's files aside as *{REJECTED} (the next "
            "extract computes every group again)"
        )
    return index


# --- batch statistics -----------------------------------------------------------------------


def batch_record(objective: Any, rollouts: Rollouts) -> dict[str, float]:
    """The statistics of the whole pool that the prepared weights of ``objective`` depend on.

    Every row's weights use these statistics of the pool it was extracted with, so the rows of
    one store are comparable only if every extract saw the same values. ``GRPOObjective``
    depends on the reward std (``scale_rewards="batch"``) and on the longest response
    (``"seq-mean-token-sum-norm"`` without ``max_response_length``); prepared ``TokenWeights``
    and ``TokenWeightObjective`` on none; any other objective may use every field of
    [`BatchStats`][gradalign.token_weights.BatchStats], so all are recorded.
    """
    if isinstance(objective, (TokenWeights, TokenWeightObjective)):
        return {}
    stats = BatchStats.of(rollouts)
    if not isinstance(objective, GRPOObjective):
        return dict(dataclasses.asdict(stats))
    record: dict[str, float] = {}
    if objective.scale_rewards == "batch":
        record["reward_std"] = stats.reward_std
    if objective.loss_agg == "seq-mean-token-sum-norm" and objective.max_response_length is None:
        record["max_response_length"] = stats.max_response_length
    return record


def _same(stored: Any, got: float) -> bool:
    # The float64 sums behind the std can differ in the last bits when the same rollouts come in
    # another order; 1e-9 relative is far below what float32 weights can resolve.
    return isinstance(stored, (int, float)) and math.isclose(stored, got, rel_tol=1e-9)


def check_batch(path: Path, index: dict[str, Any], record: dict[str, float]) -> None:
    """Refuse to add rows prepared with other batch statistics than the stored rows'."""
    call, rows = "GradientStore.extract", len(index["group_ids"])
    stored = index.get("batch")
    if rows and record and stored is None:
        raise GradAlignError(
            f"{call}: the store at {path} was written before stores recorded batch statistics, "
            f"and the objective's weights depend on them ({', '.join(sorted(record))}), so its "
            f"{rows} rows cannot be checked against this pool; extract into a new path"
        )
    if not rows or stored is None:
        return
    keys = sorted(set(stored) | set(record))
    diffs = [
        f"{k}: stored {stored.get(k)}, got {record.get(k)}"
        for k in keys
        if k not in record or not _same(stored.get(k), record[k])
    ]
    if diffs:
        raise GradAlignError(
            f"{call}: the rows stored at {path} were prepared with another batch's statistics "
            f"({'; '.join(diffs)}), and the objective's weights depend on them, so the rows of "
            "one store must all come from one batch: extract this pool into a new path, or pass "
            "the same rollouts the store was built from"
        )


# --- repair ---------------------------------------------------------------------------------


def finish_repair(folder: Path) -> None:
    """Complete a repair whose journal is complete on disk; discard one that is not.

    A complete journal (it passes its checksum) was written after the new data file was synced,
    so renaming the new data (if not renamed yet) and then the journal finishes that repair. An
    incomplete one means the old files were not touched yet: drop the new files.
    """
    journal, new = folder / JOURNAL, folder / NEW_DATA
    if not journal.exists():
        new.unlink(missing_ok=True)
        return
    try:
        pending, verdict = load_index(journal)
    except GradAlignError:
        pending, verdict = {}, "bad"
    if verdict != "ok" or not (new.exists() or _fits_better(folder, pending)):
        journal.unlink()
        new.unlink(missing_ok=True)
        return
    if new.exists():
        os.replace(new, folder / DATA)
        _sync_dir(folder)
    os.replace(journal, folder / INDEX)
    _sync_dir(folder)


def _fits_better(folder: Path, pending: dict[str, Any]) -> bool:
    """Whether the journal describes the data file at least as well as the current index.

    Without the new data file the rename is normally done; but should it have gone missing
    otherwise, the old data is still in place and the journal must not replace its index.
    """
    file = folder / DATA
    raw = file.read_bytes() if file.exists() else b""
    current = load_index(folder / INDEX)[0]
    return len(_intact(pending, raw)) >= len(_intact(current, raw))


def _intact(index: dict[str, Any], raw: bytes) -> list[int]:
    """The rows that lie inside the data file and match their CRC-32."""
    size = DTYPES[index["dtype"]].itemsize * index["dim"] if index["group_ids"] else 0
    return [
        i
        for i, crc in enumerate(index["crc32"])
        if (i + 1) * size <= len(raw) and zlib.crc32(raw[i * size : (i + 1) * size]) == crc
    ]


def _refuse_misfit(folder: Path, index: dict[str, Any], raw: bytes, keep: list[int]) -> None:
    """Refuse when no row fits: dropping them all would destroy data an edited dim hides."""
    rows = len(index["group_ids"])
    if keep or not rows or not raw:
        return
    raise GradAlignError(
        f"GradientStore.repair: none of the {rows} rows of {folder / INDEX} matches its checksum "
        f"in {DATA} ({len(raw)} bytes) with dim={index['dim']}, dtype={index['dtype']}: the index "
        "does not describe this data file (were dim or dtype edited?), and repair never drops "
        "every row of a data file. Nothing was changed: restore index.json, or delete the folder "
        "and extract again"
    )


def _set_aside(folder: Path, index: dict[str, Any]) -> list[int]:
    """Move an index that fails its checksum, and its data, to ``*.rejected``: the store is then
    empty. The data goes first, so a crash in between leaves the index (data missing), which the
    next repair sets aside too."""
    for name in (DATA, INDEX):
        if (folder / name).exists():
            os.replace(folder / name, folder / f"{name}{REJECTED}")
    _sync_dir(folder)
    return list(index["group_ids"])


def _rewrite(folder: Path, index: dict[str, Any], raw: bytes, keep: list[int]) -> None:
    """Commit the kept rows: new data beside the old, then the journal (the commit point), then
    the renames. A crash at any step leaves either the old files or a journal to finish."""
    size = DTYPES[index["dtype"]].itemsize * index["dim"]
    with open(folder / NEW_DATA, "wb") as fh:
        for i in keep:
            fh.write(raw[i * size : (i + 1) * size])
        fh.flush()
        os.fsync(fh.fileno())
    for key in COLUMNS:
        index[key] = [index[key][i] for i in keep]
    _write_synced(folder / JOURNAL, _dumps(index))
    _sync_dir(folder)
    finish_repair(folder)


def repair_store(folder: Path) -> list[int]:
    """Drop rows beyond the data file or failing their CRC; rewrite the rest; their ids."""
    with writer_lock(folder, "GradientStore.repair"):
        finish_repair(folder)  # an interrupted repair first: its journal knows the intact rows
        index, verdict = load_index(folder / INDEX)
        file = folder / DATA
        raw = file.read_bytes() if file.exists() else b""
        keep = _intact(index, raw)
        _refuse_misfit(folder, index, raw, keep)
        if verdict == "bad":
            return _set_aside(folder, index)
        kept = set(keep)
        dropped = [g for i, g in enumerate(index["group_ids"]) if i not in kept]
        if dropped:
            _rewrite(folder, index, raw, keep)
        elif verdict == "legacy":
            write_index(folder, index)  # nothing to drop: only add the checksum
        return dropped
