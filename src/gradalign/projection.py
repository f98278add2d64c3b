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
- sjlt: one word per (row, j < nnz) picks a bucket in the j-th of nnz column slices and a sign.

``project`` never builds the (n, K) matrix: rademacher with few rows uses the "four Russians" trick
(all 256 signed sums of every 8 inputs, gathered and summed per column by ``embedding_bag``); more
rows use dense (block, K) slices and a GEMM; sjlt scatter-adds x's columns into their buckets.
"""

from __future__ import annotations

import functools
import hashlib
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gradalign._validate import check_int
from gradalign.errors import GradAlignError

__all__ = ["KINDS", "Projector", "project", "projection_block"]

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


def _words(keys: tuple[int, int], rows: range, cols: range, device: torch.device) -> torch.Tensor:
    """Hash words of the (cols, rows) grid -> (len(cols), len(rows)) int64 in [0, 2**32)."""
    r = torch.arange(rows.start, rows.stop, device=device, dtype=torch.int64)
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
    keys: tuple[int, int], dim: int, nnz: int, a: int, b: int, dev: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Buckets (nnz, b - a) int64 and signs (nnz, b - a) float32 of rows a..b."""
    w = _words(keys, range(a, b), range(nnz), dev)  # (nnz, rows)
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


def _project_sjlt(
    x: torch.Tensor, keys: tuple[int, int], dim: int, nnz: int, offset: int, size: int
) -> torch.Tensor:
    out = torch.zeros(x.shape[0], dim, device=x.device, dtype=torch.float32)  # (N, K)
    for a, b in _blocks(offset, x.shape[1], size):
        buckets, signs = _sjlt_cells(keys, dim, nnz, a, b, x.device)  # (nnz, rows) each
        xb = x[:, a - offset : b - offset].to(torch.float32)  # (N, rows)
        src = xb[:, None, :] * signs  # (N, nnz, rows)
        out.index_add_(1, buckets.flatten(), src.view(x.shape[0], -1))
    return out.mul_(1.0 / math.sqrt(nnz))


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
        buckets, signs = _sjlt_cells(keys, dim, sjlt_nnz, start, stop, dev)  # (nnz, rows)
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
    without ever holding more than ``block_size`` rows of R (sjlt builds no block at all: it
    scatter-adds x's columns into their buckets). Chunks of one tensor projected with their offsets
    sum to the projection of the whole tensor.

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
        block_size: Rows of R per block (default: a few MiB of temporaries per block).

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
    if not isinstance(x, torch.Tensor):
        raise GradAlignError(f"{call}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or not x.is_floating_point():
        raise GradAlignError(
            f"{call}: x must be a 2-D (N, n) floating tensor, got shape {tuple(x.shape)} "
            f"and dtype {x.dtype}"
        )
    if x.shape[0] == 0:
        return torch.zeros(0, dim, device=x.device, dtype=torch.float32)
    keys = _keys(kind, seed, name, side, sjlt_nnz)
    size = min(block_size or _default_block(kind, dim, x.shape[0], sjlt_nnz), _MAX_BLOCK)
    if kind == "sjlt":
        out = _project_sjlt(x, keys, dim, sjlt_nnz, offset, size)
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
