"""The public projection calls: `project`, `projection_block`, `ProjectionSum` and `Projector`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gradalign._options import check_options, choice, instance, integer, option, required
from gradalign._validate import check_int
from gradalign.errors import GradAlignError
from gradalign.projection._dense import _default_block, _project_dense, _project_four_russians
from gradalign.projection._hashing import (
    _DEFAULT_NNZ,
    _FR_MAX_ROWS,
    _MAX_BLOCK,
    DEFAULT_KIND,
    KINDS,
    ProjectionKind,
    _dense_t,
    _keys,
)
from gradalign.projection._sjlt import (
    _SJLT_BLOCK,
    _project_sjlt,
    _sjlt_block,
    _sjlt_slots,
    _SjltSketch,
)


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
    return _nnz(call, kind, dim, nnz)


def _nnz(call: str, kind: object, dim: int, nnz: object) -> int:
    """The effective sjlt_nnz (None -> min(4, dim)); an sjlt one must not exceed ``dim``."""
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

    dim: int = required(integer(1))
    kind: ProjectionKind = option(DEFAULT_KIND, choice(ProjectionKind))
    seed: int = option(0, integer())
    sjlt_nnz: int | None = option(None, integer(1, none=True))
    block_size: int | None = option(None, integer(1, none=True))

    def __post_init__(self) -> None:
        check_options(self)  # each field; then the one rule across two
        _nnz("Projector", self.kind, self.dim, self.sjlt_nnz)

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


PROJECTOR_RULE = instance(Projector, "gradalign.projection.Projector")
"""The check of every extractor's ``projection`` field."""
