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

from gradalign.projection._hashing import DEFAULT_KIND, KINDS, ProjectionKind
from gradalign.projection._projector import ProjectionSum, Projector, project, projection_block

__all__ = [
    "DEFAULT_KIND",
    "KINDS",
    "ProjectionKind",
    "ProjectionSum",
    "Projector",
    "project",
    "projection_block",
]
