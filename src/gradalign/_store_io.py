"""Private: the files of a [`GradientStore`][gradalign.store.GradientStore] and their integrity checks.

Implementations: `dtype_name`, `read_index` (every defect of ``index.json`` is a ``GradAlignError``),
`write_index` (atomic replace), `writer_lock` (one writer at a time, ``flock``),
`damaged` (the error that says how to recover) and `repair_store`.
"""

from __future__ import annotations

import contextlib
import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gradalign.errors import GradAlignError

FORMAT = 2
DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
}
DATA, INDEX, LOCK = "grads.bin", "index.json", "writer.lock"
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


def write_index(folder: Path, index: dict[str, Any]) -> None:
    """Replace the index atomically: a reader sees the old one or the new one, never a mix."""
    tmp = folder / f"{INDEX}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump(index, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, folder / INDEX)


def damaged(path: Path, what: str) -> GradAlignError:
    return GradAlignError(
        f"GradientStore: the store at {path} is damaged: {what}. Recover with "
        f"GradientStore.repair({str(path)!r}), which drops the damaged rows (the next extract "
        "computes them again), or delete the folder"
    )


def read_index(path: Path) -> dict[str, Any]:
    """The validated index (empty for a new store); every defect is a GradAlignError."""
    file = path / INDEX
    if not file.exists():
        return empty_index()
    try:
        index = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise GradAlignError(
            f"GradientStore: {file} is not valid JSON ({err}); delete the folder and extract again"
        ) from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        got = index.get("format") if isinstance(index, dict) else type(index).__name__
        raise GradAlignError(
            f"GradientStore: {file} has format {got!r}, expected {FORMAT}; delete the folder "
            "and extract again"
        )
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
    return index


def repair_store(folder: Path) -> list[int]:
    """Drop rows beyond the data file or failing their CRC; rewrite the rest; their ids."""
    with writer_lock(folder, "GradientStore.repair"):
        index = read_index(folder)
        if not index["group_ids"]:
            return []
        size = DTYPES[index["dtype"]].itemsize * index["dim"]
        file = folder / DATA
        raw = file.read_bytes() if file.exists() else b""
        keep = [
            i
            for i in range(len(index["group_ids"]))
            if (i + 1) * size <= len(raw)
            and zlib.crc32(raw[i * size : (i + 1) * size]) == index["crc32"][i]
        ]
        kept = set(keep)
        dropped = [g for i, g in enumerate(index["group_ids"]) if i not in kept]
        tmp = folder / f"{DATA}.{os.getpid()}.tmp"
        with open(tmp, "wb") as fh:
            for i in keep:
                fh.write(raw[i * size : (i + 1) * size])
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, file)
        for key in COLUMNS:
            index[key] = [index[key][i] for i in keep]
        write_index(folder, index)
        return dropped
