"""Seeded random projections, regenerated block by block and never stored.

Implementations (``KINDS``): ``"rademacher"`` (entries ±1/sqrt(K)), ``"gaussian"`` (entries
N(0, 1/K)) and ``"sjlt"`` (sparse JL transform: each input feature lands in ``sjlt_nnz`` buckets
with random signs, scaled 1/sqrt(nnz)). All three satisfy E[<Rx, Ry>] = <x, y>.

Shapes: N rows to project, n input features of one parameter block, K projection dim.

The matrix R (n_total, K) of a tensor is a pure function of (kind, seed, name, side, dim) and the
entry indices: a counter-based 32-bit integer hash evaluated with int64 torch ops (every product
stays below 2**63, so nothing relies on overflow). No RNG state is touched, and any block, on any
device, with any block size or offset, holds the same numbers:

- rademacher: one hash word per (32-row group, column) gives the signs of 32 consecutive rows;
- gaussian: one word per (2-row pair, column) gives two 16-bit indices into a fixed table of normal
  quantiles (built in float64 on the CPU, so every device reads identical values);
- sjlt: two levels, so that a large tensor costs two cheap passes whatever ``sjlt_nnz``.
  Stage 1 maps row i of the tensor to an intermediate row u(i) < M = L * S (L = 512,
  S = max(16, K // 4), so M = max(8192, 128 K)) with a sign: block b = i // L
  moves whole to slot(b) = (w & 0x7FFFFFFF) % S, w the word of (row b, column 0), with sign
  +1 if w >> 31 else -1; u(i) = slot(b) * L + i % L, and row i also gets the sign
  pi(i % T) of a tile of T = 16384 signs (bit t % 32 of the word of (row t // 32, column 1)).
  Stage 2 is a sparse JL transform of u, keyed on the seed alone (shared by every tensor): one
  word per (u, j < nnz) picks a bucket in the j-th of nnz column slices and a sign. Row i of R
  is the stage-1 sign times row u(i) of stage 2: exactly nnz entries ±1/sqrt(nnz), one per
  slice, as in a one-level SJLT. Two rows share a bucket with probability about 1/(K/nnz), as
  there; rows of one block never meet in stage 1, rows of two blocks meet (probability 1/S)
  with independent block signs, so E[<Rx, Ry>] = <x, y> holds exactly. Stage 1 adds a relative
  variance of order 1/M to <Rx, Rx> for spread-out x and at most about 2 / (S * P) (P = 32
  sign patterns per tensor) for adversarially aligned blocks, well under stage 2's 2 / K.

``project`` never builds the (n, K) matrix: rademacher with few rows uses the "four Russians" trick
(all 256 signed sums of every 8 inputs, gathered and summed per column by ``embedding_bag``); more
rows use dense (block, K) slices and a GEMM. sjlt hashes each row's cells and scatter-adds small
inputs; large ones (and every [`ProjectionSum`][gradalign.projection.ProjectionSum]) stream
through stage 1 (a multiply by the cached sign tile, then a row-wise add of whole blocks into a
(2S, L) buffer at cached slot rows) and apply stage 2 once, from a cached table of its buckets.
The caches are bounded LRUs keyed on (seed, name, side, dim, block range), so results never
depend on what was cached.
"""

from __future__ import annotations

import functools
import hashlib
import math
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gradalign._validate import check_int
from gradalign.errors import GradAlignError

__all__ = ["KINDS", "ProjectionSum", "Projector", "project", "projection_block"]

KINDS = ("rademacher", "gaussian", "sjlt")
DEFAULT_KIND = "sjlt"
"""The kind every extractor and [`Projector`][gradalign.projection.Projector] uses unless told: sparse, the fastest."""

_M32 = 0xFFFFFFFF
_MUL = 0x45D9F3B  # < 2**27, so uint32 * _MUL fits in int64
_GROUP = {"rademacher": 32, "gaussian": 2}  # rows covered by one hash word
_FR_MAX_ROWS = 32  # above this many rows a dense block + GEMM beats the gather (measured on CPU)
_DEFAULT_NNZ = 4  # a few nonzeros per feature: much lower variance than CountSketch on spiky inputs
_BLOCK_BYTES = 4 << 20  # per-block working set: stays cache-friendly, far below the dense matrix
_MAX_BLOCK = 1 << 24  # rows; keeps the gather's int32 table indices (256 per 8 rows) in range


def _rounds(x: torch.Tensor) -> torch.Tensor:
    """Two multiply-xorshift rounds, in place, on a fresh int64 tensor of values in [0, 2**32)."""
    x.mul_(_MUL).bitwise_and_(_M32)
    x ^= x >> 16
    x.mul_(_MUL).bitwise_and_(_M32)
    x ^= x >> 16
    return x


def _mix(x: torch.Tensor) -> torch.Tensor:
    """32-bit integer finalizer (xorshift, then two rounds) -> a new tensor."""
    return _rounds(x ^ (x >> 16))


def _keys(kind: str, seed: int, name: str, side: str, nnz: int) -> tuple[int, int]:
    """Two 32-bit keys from a stable digest (never Python's salted ``hash``)."""
    tag = repr((kind, seed, name, side, nnz if kind == "sjlt" else 0)).encode()
    digest = int.from_bytes(hashlib.blake2b(tag, digest_size=8).digest(), "little")
    return digest & _M32, digest >> 32


def _words(
    keys: tuple[int, int], rows: range | torch.Tensor, cols: range, device: torch.device
) -> torch.Tensor:
    """Hash words of the (cols, rows) grid -> (len(cols), len(rows)) int64 in [0, 2**32).

    ``rows`` is a range or a 1-D int64 tensor of (any, not necessarily consecutive) row indices.
    """
    if isinstance(rows, range):
        r = torch.arange(rows.start, rows.stop, device=device, dtype=torch.int64)
    else:
        r = rows.to(device, torch.int64)
    rh = _mix(_mix((r & _M32) ^ keys[0]) ^ (r >> 32))  # (R,)
    c = torch.arange(cols.start, cols.stop, device=device, dtype=torch.int64)
    ch = _mix(_mix(c ^ keys[1]) ^ 0x9E3779B9)  # (C,)
    return _rounds(ch[:, None] ^ rh[None, :])  # (C, R); both halves already mixed


def _split(words: torch.Tensor, parts: int) -> torch.Tensor:
    """(A, B) uint32 words -> (A, B * parts) int32 pieces of 32 // parts bits, low bits first."""
    bits = 32 // parts
    if sys.byteorder == "little":  # reinterpreting memory is ~10x cheaper than shifting
        small = torch.uint8 if parts == 4 else torch.int16
        pieces = words.to(torch.int32).view(small).to(torch.int32)
        return pieces.bitwise_and_((1 << bits) - 1)
    shifts = torch.arange(0, 32, bits, device=words.device)
    pieces = (words[..., None] >> shifts) & ((1 << bits) - 1)  # (A, B, parts)
    return pieces.reshape(words.shape[0], -1).to(torch.int32)


@functools.cache
def _table(kind: str, device: torch.device) -> torch.Tensor:
    """Lookup tables: byte -> its 8 bits as ±1 (256, 8); 16 bits -> a unit normal (65536,)."""
    if kind == "rademacher":
        bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1  # (256, 8)
        return (2.0 * bits - 1.0).to(device, torch.float32)
    q = torch.special.ndtri((torch.arange(32768, dtype=torch.float64) + 0.5) / 65536)  # < 0
    q = torch.cat([q, -q.flip(0)])  # exactly symmetric: mean 0
    return (q / q.square().mean().sqrt()).to(device, torch.float32)  # exactly variance 1


def _dense_t(
    kind: str, keys: tuple[int, int], dim: int, a: int, b: int, dev: torch.device
) -> torch.Tensor:
    """Unit-scale rows a..b of R, transposed -> (K, b - a) float32 (rademacher/gaussian)."""
    g = _GROUP[kind]
    g0, g1 = a // g, -(-b // g)
    pieces = _split(_words(keys, range(g0, g1), range(dim), dev), 4 if g == 32 else 2)
    vals = _table(kind, dev).index_select(0, pieces.flatten())
    return vals.view(dim, (g1 - g0) * g)[:, a - g0 * g : b - g0 * g]  # (K, b - a)


def _sjlt_cells(
    keys: tuple[int, int], dim: int, nnz: int, rows: range | torch.Tensor, dev: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 2 of sjlt: buckets (nnz, U) int64 and signs (nnz, U) float32 of intermediate rows."""
    w = _words(keys, rows, range(nnz), dev)  # (nnz, U)
    edges = torch.tensor([(j * dim) // nnz for j in range(nnz + 1)], device=dev)  # disjoint slices
    lo, width = edges[:-1, None], (edges[1:] - edges[:-1])[:, None]  # (nnz, 1) each
    buckets = lo + (w & 0x7FFFFFFF) % width
    signs = (w >> 31).to(torch.float32).mul_(2.0).sub_(1.0)
    return buckets, signs


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


class _LRU:
    """A small least-recently-used cache of tensors, bounded by their total bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.items: OrderedDict[tuple[object, ...], torch.Tensor] = OrderedDict()
        self.bytes = 0

    def get(self, key: tuple[object, ...], make: Callable[[], torch.Tensor]) -> torch.Tensor:
        hit = self.items.get(key)
        if hit is not None:
            self.items.move_to_end(key)
            return hit
        value = make()
        size = value.numel() * value.element_size()
        if size <= self.max_bytes:
            self.items[key] = value
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self.items.popitem(last=False)
                self.bytes -= old.numel() * old.element_size()
        return value


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


class ProjectionSum:
    """The sum of projections of many tensors' slices, accumulated one slice at a time.

    Made by [`Projector.accumulator`][gradalign.projection.Projector.accumulator]. ``add(x, name=...)``
    then ``result()`` equals the sum of ``projector(x, name=...)`` over the added slices (up to
    float rounding), but for ``kind="sjlt"`` each add only streams x into an intermediate buffer
    of M = max(8192, 128 * dim) rows per input row; the final sparse map to K runs once, in
    ``result``. Dense kinds project each slice as it is added.

    Examples:
        >>> proj = Projector(dim=8, seed=0)
        >>> acc = proj.accumulator()
        >>> a, b = torch.randn(1, 300), torch.randn(1, 40)
        >>> acc.add(a, name="w"); acc.add(b, name="bias")
        >>> want = proj(a, name="w") + proj(b, name="bias")
        >>> bool(torch.allclose(acc.result(), want, atol=1e-5))
        True
    """

    def __init__(self, projector: Projector, rows: int, device: torch.device) -> None:
        self.projector, self.rows, self.device = projector, rows, device
        p = projector
        self._nnz = _check("Projector", p.kind, p.dim, p.seed, p.sjlt_nnz)
        self._out = torch.zeros(rows, projector.dim, device=device)
        self._sketch: _SjltSketch | None = None
        if projector.kind == "sjlt":
            self._sketch = _SjltSketch(projector.seed, projector.dim, self._nnz, rows, device)

    def add(self, x: torch.Tensor, *, name: str, side: str = "", offset: int = 0) -> None:
        """Add the projection of x (N, n), columns ``offset..offset + n`` of tensor ``name``."""
        call = "ProjectionSum.add"
        _check_names(call, name, side)
        _check_x(call, x)
        if x.shape[0] != self.rows:
            raise GradAlignError(f"{call}: x must have {self.rows} rows, got {x.shape[0]}")
        offset = _int(call, "offset", offset, 0)
        if self._sketch is None:
            self._out += self.projector(x, name=name, side=side, offset=offset).to(self.device)
            return
        p = self.projector
        keys = _keys(p.kind, p.seed, name, side, self._nnz)
        self._sketch.add(x.to(self.device), keys, offset)

    def result(self) -> torch.Tensor:
        """(N, K) float32: the sum of every added slice's projection."""
        out = self._out if self._sketch is None else self._out + self._sketch.result()
        if not bool(torch.isfinite(out).all()):
            raise GradAlignError(
                "ProjectionSum.result: the added tensors must be finite, got a projection with "
                "NaN or inf"
            )
        return out


def _int(call: str, what: str, value: object, low: int | None = None) -> int:
    return int(check_int(call, what, value, low))


def _check(call: str, kind: object, dim: object, seed: object, nnz: object) -> int:
    """Validate the settings; returns the effective sjlt_nnz (None -> min(4, dim))."""
    if kind not in KINDS:
        raise GradAlignError(f"{call}: kind must be one of {KINDS}, got {kind!r}")
    dim = _int(call, "dim", dim, 1)
    _int(call, "seed", seed)
    if nnz is None:
        return min(_DEFAULT_NNZ, dim)
    nnz = _int(call, "sjlt_nnz", nnz, 1)
    if nnz > dim and kind == "sjlt":
        raise GradAlignError(f"{call}: sjlt_nnz must be <= dim={dim}, got {nnz!r}")
    return nnz


def _check_x(call: str, x: object) -> None:
    if not isinstance(x, torch.Tensor):
        raise GradAlignError(f"{call}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or not x.is_floating_point():
        raise GradAlignError(
            f"{call}: x must be a 2-D (N, n) floating tensor, got shape {tuple(x.shape)} "
            f"and dtype {x.dtype}"
        )


def _check_names(call: str, name: object, side: object) -> None:
    for what, value in (("name", name), ("side", side)):
        if not isinstance(value, str):
            raise GradAlignError(f"{call}: {what} must be a str, got {value!r}")


def projection_block(
    *,
    kind: str,
    dim: int,
    seed: int,
    name: str,
    start: int,
    stop: int,
    side: str = "",
    sjlt_nnz: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Rows ``start..stop`` of the (n_total, K) projection matrix R of tensor ``name``.

    Entry (i, k) depends only on (kind, seed, name, side, i, k, dim) and, for sjlt, ``sjlt_nnz``:
    never on ``start``/``stop``, the device or how the rows are blocked. Materializes the block, so
    keep ``stop - start`` moderate; [`project`][gradalign.projection.project] never materializes more than one small block.

    Args:
        kind: One of ``KINDS``.
        dim: K, the projection dimension.
        seed: Any int.
        name: Name of the tensor (e.g. ``"model.layers.0.mlp.up_proj.weight"``).
        start: First row (global input-feature index), ``>= 0``.
        stop: One past the last row, ``>= start``.
        side: Extra key, e.g. ``"in"``/``"out"`` for factorized projections.
        sjlt_nnz: Nonzeros per row for ``"sjlt"`` (ignored otherwise), ``1 <= sjlt_nnz <= dim``;
            None means ``min(4, dim)``.
        device: Where to build the block (default CPU).
        dtype: Floating dtype of the result.

    Returns:
        (stop - start, K) tensor: rows of R, scaled so that E[<Rx, Ry>] = <x, y>.

    Examples:
        >>> R = projection_block(kind="rademacher", dim=4, seed=0, name="w", start=0, stop=3)
        >>> R.shape, bool((R.abs() == 0.5).all())
        (torch.Size([3, 4]), True)
    """
    call = "projection_block"
    sjlt_nnz = _check(call, kind, dim, seed, sjlt_nnz)
    _check_names(call, name, side)
    start = _int(call, "start", start, 0)
    stop = _int(call, "stop", stop, start)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise GradAlignError(f"{call}: dtype must be a floating torch.dtype, got {dtype!r}")
    dev = torch.device("cpu" if device is None else device)
    keys = _keys(kind, seed, name, side, sjlt_nnz)
    if kind == "sjlt":
        buckets, signs = _sjlt_block(keys, seed, dim, sjlt_nnz, start, stop, dev)  # (nnz, rows)
        block = torch.zeros(stop - start, dim, device=dev, dtype=torch.float32)
        block.scatter_(1, buckets.t(), signs.t())  # buckets of a row are distinct
        return block.mul_(1.0 / math.sqrt(sjlt_nnz)).to(dtype)
    block = _dense_t(kind, keys, dim, start, stop, dev).t()  # (rows, K)
    return (block * (1.0 / math.sqrt(dim))).contiguous().to(dtype)


def project(
    x: torch.Tensor,
    *,
    kind: str,
    dim: int,
    seed: int,
    name: str,
    side: str = "",
    offset: int = 0,
    sjlt_nnz: int | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """Project rows of x with rows ``offset..offset+n`` of R, generated block by block.

    Computes ``x @ projection_block(..., start=offset, stop=offset + n)`` in float32 on x's device
    without ever holding more than ``block_size`` rows of R (sjlt builds no block at all: small
    inputs scatter-add x's columns into their buckets, inputs of at least M / 2 columns stream
    through its two stages, see the module docstring). Chunks of one tensor projected with their
    offsets sum to the projection of the whole tensor.

    Args:
        x: (N, n) floating tensor (any float dtype; computed in float32).
        kind: One of ``KINDS``.
        dim: K, the projection dimension.
        seed: Any int.
        name: Name of the tensor x's columns belong to.
        side: Extra key, e.g. ``"in"``/``"out"``.
        offset: Global index of x's first column within the tensor, ``>= 0``.
        sjlt_nnz: Nonzeros per input feature for ``"sjlt"`` (ignored otherwise); None means
            ``min(4, dim)``.
        block_size: Rows of R per block (default: a few MiB of temporaries per block); the
            streamed sjlt path works in fixed chunks and ignores it.

    Returns:
        (N, K) float32 tensor on x's device.

    Examples:
        >>> x = torch.randn(2, 10)
        >>> project(x, kind="sjlt", dim=8, seed=0, name="w").shape
        torch.Size([2, 8])
    """
    call = "project"
    sjlt_nnz = _check(call, kind, dim, seed, sjlt_nnz)
    _check_names(call, name, side)
    offset = _int(call, "offset", offset, 0)
    if block_size is not None:
        _int(call, "block_size", block_size, 1)
    _check_x(call, x)
    if x.shape[0] == 0:
        return torch.zeros(0, dim, device=x.device, dtype=torch.float32)
    keys = _keys(kind, seed, name, side, sjlt_nnz)
    size = min(block_size or _default_block(kind, dim, x.shape[0], sjlt_nnz), _MAX_BLOCK)
    if kind == "sjlt" and x.shape[1] >= _sjlt_slots(dim) * _SJLT_BLOCK // 2:
        sketch = _SjltSketch(seed, dim, sjlt_nnz, x.shape[0], x.device)  # large x: streamed
        sketch.add(x, keys, offset)
        out = sketch.result()
    elif kind == "sjlt":
        out = _project_sjlt(x, keys, seed, dim, sjlt_nnz, offset, size)
    elif kind == "rademacher" and x.shape[0] <= _FR_MAX_ROWS:
        out = _project_four_russians(x, keys, dim, offset, size)
    else:
        out = _project_dense(x, kind, keys, dim, offset, size)
    if not bool(torch.isfinite(out).all()):
        raise GradAlignError(f"{call}: x must be finite, got a projection with NaN or inf")
    return out


@dataclass(frozen=True)
class Projector:
    """Settings of a seeded projection; calling it projects one tensor's slice.

    Args:
        dim: K, the projection dimension (``>= 1``).
        kind: One of ``KINDS`` (default ``DEFAULT_KIND``, "sjlt").
        seed: Any int; the same seed gives the same matrices on every device and process.
        sjlt_nnz: Nonzeros per input feature for ``"sjlt"`` (``1 <= sjlt_nnz <= dim``; None
            means ``min(4, dim)``).
        block_size: Rows of R per block in [`project`][gradalign.projection.project] (None: automatic).

    Examples:
        >>> proj = Projector(dim=16, seed=0)
        >>> proj(torch.randn(3, 100), name="lm_head.weight").shape
        torch.Size([3, 16])
    """

    dim: int
    kind: str = DEFAULT_KIND
    seed: int = 0
    sjlt_nnz: int | None = None
    block_size: int | None = None

    def __post_init__(self) -> None:
        _check("Projector", self.kind, self.dim, self.seed, self.sjlt_nnz)
        if self.block_size is not None:
            _int("Projector", "block_size", self.block_size, 1)

    def __call__(
        self, x: torch.Tensor, *, name: str, side: str = "", offset: int = 0
    ) -> torch.Tensor:
        """x (N, n) -> (N, K): [`project`][gradalign.projection.project] with these settings."""
        return project(
            x,
            kind=self.kind,
            dim=self.dim,
            seed=self.seed,
            name=name,
            side=side,
            offset=offset,
            sjlt_nnz=self.sjlt_nnz,
            block_size=self.block_size,
        )

    def accumulator(self, rows: int = 1, device: torch.device | str | None = None) -> ProjectionSum:
        """A [`ProjectionSum`][gradalign.projection.ProjectionSum]: projections of many slices summed.

        Args:
            rows: N, the rows of every slice that will be added.
            device: where the sum lives (default CPU); added slices are moved there.

        Examples:
            >>> acc = Projector(dim=16, seed=0).accumulator()
            >>> acc.add(torch.randn(1, 1000), name="lm_head.weight")
            >>> acc.result().shape
            torch.Size([1, 16])
        """
        rows = _int("Projector.accumulator", "rows", rows, 1)
        return ProjectionSum(self, rows, torch.device("cpu" if device is None else device))

    def block(
        self,
        *,
        name: str,
        start: int,
        stop: int,
        side: str = "",
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Rows ``start..stop`` of this projector's matrix for ``name`` -> (stop - start, K)."""
        return projection_block(
            kind=self.kind,
            dim=self.dim,
            seed=self.seed,
            name=name,
            start=start,
            stop=stop,
            side=side,
            sjlt_nnz=self.sjlt_nnz,
            device=device,
        )
