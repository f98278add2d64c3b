"""Dense projection paths: (block, K) slices and a GEMM, or the four-Russians gather for few rows."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from gradalign.projection._hashing import (
    _BLOCK_BYTES,
    _FR_MAX_ROWS,
    _dense_t,
    _split,
    _table,
    _words,
)


def _blocks(offset: int, n: int, size: int) -> Iterator[tuple[int, int]]:
    """Global row ranges [a, b) covering offset..offset+n, cut at multiples of ``size``."""
    a, end = offset, offset + n
    while a < end:
        b = min((a // size + 1) * size, end)
        yield a, b
        a = b


def _default_block(kind: str, dim: int, rows: int, nnz: int) -> int:
    """Rows per block so that one block's temporaries take about ``_BLOCK_BYTES``."""
    if kind == "sjlt":
        per_row = nnz * (4 * rows + 32)  # src values + buckets, words, signs
    elif kind == "rademacher" and rows <= _FR_MAX_ROWS:
        per_row = 32 * 4 * rows + dim // 2  # 256 sums per 8 inputs + int32 byte indices
    else:
        per_row = 8 * dim  # float32 block + int32 table indices
    return max(32, _BLOCK_BYTES // per_row // 32 * 32)


def _project_dense(
    x: torch.Tensor, kind: str, keys: tuple[int, int], dim: int, offset: int, size: int
) -> torch.Tensor:
    out = torch.zeros(x.shape[0], dim, device=x.device, dtype=torch.float32)  # (N, K)
    for a, b in _blocks(offset, x.shape[1], size):
        xb = x[:, a - offset : b - offset].to(torch.float32)  # (N, rows)
        out.addmm_(xb, _dense_t(kind, keys, dim, a, b, x.device).t())
    return out.mul_(1.0 / math.sqrt(dim))


def _project_four_russians(
    x: torch.Tensor, keys: tuple[int, int], dim: int, offset: int, size: int
) -> torch.Tensor:
    """Rademacher for few rows: per 8 inputs, all 256 signed sums, then gathered by column."""
    n_rows, dev = x.shape[0], x.device
    signs = _table("rademacher", dev)  # (256, 8): bit b of byte v as ±1
    out_t = torch.zeros(dim, n_rows, device=dev, dtype=torch.float32)  # (K, N)
    for a, b in _blocks(offset, x.shape[1], size):
        g0, g1 = a // 32, -(-b // 32)
        chunks = 4 * (g1 - g0)  # groups of 8 rows; their bytes index the sign patterns
        xp = torch.zeros(n_rows, 8 * chunks, device=dev, dtype=torch.float32)
        xp[:, a - 32 * g0 : b - 32 * g0] = x[:, a - offset : b - offset]  # zero-padded to groups
        xt = xp.view(n_rows, chunks, 8).permute(2, 1, 0).reshape(8, -1)  # (8, chunks * N)
        sums = signs @ xt  # (256, chunks * N): every signed sum of each chunk's 8 inputs
        idx = _split(_words(keys, range(g0, g1), range(dim), dev), 4)  # (K, chunks) bytes
        idx.mul_(chunks).add_(torch.arange(chunks, device=dev, dtype=torch.int32))
        out_t += F.embedding_bag(idx, sums.view(-1, n_rows), mode="sum")  # (K, N)
    return out_t.t().contiguous().mul_(1.0 / math.sqrt(dim))


# --------------------------------------------------------------------------- sjlt, two levels
