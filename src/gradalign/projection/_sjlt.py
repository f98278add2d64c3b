"""The two-stage sparse JL transform: stage-1 sign tiles and slot rows, the stage-2 bucket table,
and the streamed sketch behind `ProjectionSum`."""

from __future__ import annotations

import math

import torch

from gradalign.projection._dense import _blocks
from gradalign.projection._hashing import _LRU, _keys, _sjlt_cells, _words

_SJLT_BLOCK = 512  # L: consecutive rows of a tensor that move together in stage 1
_SJLT_PATTERNS = 32  # P: sign patterns of one tensor (block b uses pattern b mod P)
_SJLT_TILE = _SJLT_BLOCK * _SJLT_PATTERNS  # T: the per-row sign of stage 1 repeats every T rows
_SJLT_CHUNK = 4 * _SJLT_TILE  # rows per step of the streamed stage 1 (a 256 KiB scratch per row)
_CACHE_BYTES = 64 << 20  # bound of each LRU cache below


def _sjlt_slots(dim: int) -> int:
    """S, the stage-1 slots: the intermediate dimension is M = S * L = max(8192, 128 * dim)."""
    return max(16, dim // 4)


def _stage2_keys(seed: int, nnz: int) -> tuple[int, int]:
    """Keys of the intermediate SJLT shared by every tensor (a tag no tensor key can take)."""
    return _keys("sjlt", seed, "", "\x00intermediate", nnz)


_TILES = _LRU(_CACHE_BYTES)  # (keys, device) -> (T,) float32 signs of stage 1
_ROWS = _LRU(_CACHE_BYTES)  # (keys, S, b0, b1, device) -> (b1 - b0,) int64 slot rows
_STAGE2 = _LRU(4 * _CACHE_BYTES)  # (seed, dim, nnz, device) -> (nnz, M) int64 folded buckets


def _tile(keys: tuple[int, int], dev: torch.device) -> torch.Tensor:
    """Signs pi(t) of stage 1 for t < T -> (T,) float32 (cached)."""

    def make() -> torch.Tensor:
        w = _words(keys, range(_SJLT_TILE // 32), range(1, 2), dev)[0]  # (T / 32,)
        bits = (w[:, None] >> torch.arange(32, device=dev)) & 1  # (T / 32, 32), low bits first
        return bits.flatten().to(torch.float32).mul_(2.0).sub_(1.0)  # (T,)

    return _TILES.get((keys, dev), make)


def _block_words(keys: tuple[int, int], b0: int, b1: int, dev: torch.device) -> torch.Tensor:
    """Hash words of blocks b0..b1 (column 0 of the tensor's grid) -> (b1 - b0,) int64."""
    return _words(keys, range(b0, b1), range(1), dev)[0]


def _slot_rows(
    keys: tuple[int, int], slots: int, b0: int, b1: int, dev: torch.device
) -> torch.Tensor:
    """Rows of the (2S, L) stage-1 buffer that blocks b0..b1 are added into (cached).

    Block b goes to slot(b) = (w & 0x7FFFFFFF) % S, in the first half when its sign sigma(b) is
    +1 (w >> 31 == 1) and in the second half (subtracted at the end) when it is -1.
    """

    def make() -> torch.Tensor:
        w = _block_words(keys, b0, b1, dev)
        return (w & 0x7FFFFFFF) % slots + slots * (1 - (w >> 31))

    return _ROWS.get((keys, slots, b0, b1, dev), make)


def _stage2_table(seed: int, dim: int, nnz: int, dev: torch.device) -> torch.Tensor:
    """Folded stage-2 buckets (nnz, M) int64: bucket, plus K where the sign is -1 (cached)."""

    def make() -> torch.Tensor:
        m = _sjlt_slots(dim) * _SJLT_BLOCK
        keys, out = _stage2_keys(seed, nnz), torch.empty(nnz, m, dtype=torch.int64, device=dev)
        step = 1 << 16
        for a in range(0, m, step):
            buckets, signs = _sjlt_cells(keys, dim, nnz, range(a, min(m, a + step)), dev)
            out[:, a : a + step] = buckets + dim * (signs < 0)
        return out

    return _STAGE2.get((seed, dim, nnz, dev), make)


def _stage1_direct(
    keys: tuple[int, int], slots: int, a: int, b: int, dev: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Intermediate rows u(i) (b - a,) int64 and stage-1 signs (b - a,) float32 of rows a..b."""
    i = torch.arange(a, b, device=dev, dtype=torch.int64)
    b0 = a // _SJLT_BLOCK
    w = _block_words(keys, b0, -(-b // _SJLT_BLOCK), dev)[i // _SJLT_BLOCK - b0]  # (rows,)
    u = ((w & 0x7FFFFFFF) % slots) * _SJLT_BLOCK + i % _SJLT_BLOCK
    tile = _tile(keys, dev)
    signs = tile[i % _SJLT_TILE] * ((w >> 31).to(torch.float32) * 2.0 - 1.0)
    return u, signs


def _sjlt_block(
    keys: tuple[int, int], seed: int, dim: int, nnz: int, a: int, b: int, dev: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Buckets (nnz, b - a) int64 and signs (nnz, b - a) float32 of rows a..b of R (unscaled)."""
    u, s1 = _stage1_direct(keys, _sjlt_slots(dim), a, b, dev)
    buckets, signs = _sjlt_cells(_stage2_keys(seed, nnz), dim, nnz, u, dev)  # (nnz, rows)
    return buckets, signs.mul_(s1)


def _project_sjlt(
    x: torch.Tensor,
    keys: tuple[int, int],
    seed: int,
    dim: int,
    nnz: int,
    offset: int,
    size: int,
) -> torch.Tensor:
    """Row by row of R: hash each row's nnz cells and scatter-add (for small inputs)."""
    out = torch.zeros(x.shape[0], dim, device=x.device, dtype=torch.float32)  # (N, K)
    for a, b in _blocks(offset, x.shape[1], size):
        buckets, signs = _sjlt_block(keys, seed, dim, nnz, a, b, x.device)  # (nnz, rows) each
        xb = x[:, a - offset : b - offset].to(torch.float32)  # (N, rows)
        src = xb[:, None, :] * signs  # (N, nnz, rows)
        out.index_add_(1, buckets.flatten(), src.view(x.shape[0], -1))
    return out.mul_(1.0 / math.sqrt(nnz))


class _SjltSketch:
    """Stage 1 streamed into a (N, 2S, L) buffer, stage 2 applied once in ``result``.

    Stage 1 touches each input element twice (a multiply by its sign into a small scratch, then
    a row-wise add of whole blocks), whatever ``sjlt_nnz``; the nnz-fold scatter runs only over
    the M intermediate rows, once.
    """

    def __init__(self, seed: int, dim: int, nnz: int, rows: int, device: torch.device) -> None:
        self.seed, self.dim, self.nnz, self.device = seed, dim, nnz, device
        self.slots = _sjlt_slots(dim)
        self.buffer = torch.zeros(rows, 2 * self.slots, _SJLT_BLOCK, device=device)
        self.scratch = torch.empty(rows, _SJLT_CHUNK, device=device)

    def add(self, x: torch.Tensor, keys: tuple[int, int], offset: int) -> None:
        n_rows, n = x.shape
        if n == 0:
            return
        start, end = offset - offset % _SJLT_TILE, offset + n
        b0, b1 = start // _SJLT_BLOCK, -(-end // _SJLT_BLOCK)
        slot_rows = _slot_rows(keys, self.slots, b0, b1, self.device)  # (b1 - b0,)
        tile = _tile(keys, self.device)  # (T,): global row g has sign tile[g % T]
        buffer = self.buffer[0] if n_rows == 1 else self.buffer  # 2-D adds are faster
        for c0 in range(start, end, _SJLT_CHUNK):
            c1 = min(c0 + _SJLT_CHUNK, b1 * _SJLT_BLOCK)  # block-aligned end of this chunk
            lo, hi = max(c0, offset), min(c0 + _SJLT_CHUNK, end)  # rows of x in the chunk
            scratch = self.scratch[:, : c1 - c0]
            if (lo, hi) == (c0, c1) and (c1 - c0) % _SJLT_TILE == 0:  # whole tiles: broadcast
                shape = (n_rows, -1, _SJLT_TILE)
                torch.mul(
                    x[:, lo - offset : hi - offset].view(shape), tile, out=scratch.view(shape)
                )
            else:
                scratch.zero_()
                signs = tile.repeat(_SJLT_CHUNK // _SJLT_TILE)[lo - c0 : hi - c0]
                torch.mul(x[:, lo - offset : hi - offset], signs, out=scratch[:, lo - c0 : hi - c0])
            rows = slot_rows[(c0 - start) // _SJLT_BLOCK : (c1 - start) // _SJLT_BLOCK]
            blocks = scratch.view(n_rows, -1, _SJLT_BLOCK)
            if n_rows == 1:
                buffer.index_add_(0, rows, blocks[0])
            else:
                buffer.index_add_(1, rows, blocks)

    def result(self) -> torch.Tensor:
        n_rows, s = self.buffer.shape[0], self.slots
        mid = (self.buffer[:, :s] - self.buffer[:, s:]).view(n_rows, -1)  # (N, M)
        table = _stage2_table(self.seed, self.dim, self.nnz, self.device)  # (nnz, M)
        out = torch.zeros(n_rows, 2 * self.dim, device=self.device)  # (N, 2K)
        for j in range(self.nnz):
            out.index_add_(1, table[j], mid)
        return (out[:, : self.dim] - out[:, self.dim :]).mul_(1.0 / math.sqrt(self.nnz))
