"""The entry definition: counter-based hash words, their split into signs or table indices, and
the bounded LRU cache the projection paths share."""

from __future__ import annotations

import functools
import hashlib
import sys
from collections import OrderedDict
from collections.abc import Callable
from typing import Literal

import torch

from gradalign._options import choices

ProjectionKind = Literal["rademacher", "gaussian", "sjlt"]
"""The projection kinds (typed choice of every ``kind=`` setting)."""
KINDS: tuple[str, ...] = choices(ProjectionKind)
DEFAULT_KIND: ProjectionKind = "sjlt"
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
