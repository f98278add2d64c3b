"""Tests for gradalign.projection: a pure-Python reference of the entry definition, blocking and
offset invariance, JL statistics, SJLT sparsity, dtypes and input errors."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import statistics

import pytest
import torch

from gradalign.errors import GradAlignError
from gradalign.projection import KINDS, Projector, project, projection_block

M32 = 0xFFFFFFFF


# --- pure-Python reference of the documented entry definition (independent of torch) ---------


def _rounds(v: int) -> int:
    for _ in range(2):
        v = (v * 0x45D9F3B) & M32
        v ^= v >> 16
    return v


def _mix(v: int) -> int:
    return _rounds(v ^ (v >> 16))


def _word(kind: str, seed: int, name: str, side: str, nnz: int, row: int, col: int) -> int:
    tag = repr((kind, seed, name, side, nnz if kind == "sjlt" else 0)).encode()
    digest = int.from_bytes(hashlib.blake2b(tag, digest_size=8).digest(), "little")
    k0, k1 = digest & M32, digest >> 32
    rh = _mix(_mix((row & M32) ^ k0) ^ (row >> 32))
    ch = _mix(_mix(col ^ k1) ^ 0x9E3779B9)
    return _rounds(ch ^ rh)


@pytest.fixture(scope="module")
def normal_table() -> list[float]:
    q = [statistics.NormalDist().inv_cdf((t + 0.5) / 65536) for t in range(65536)]
    scale = math.sqrt(sum(v * v for v in q) / len(q))
    return [v / scale for v in q]


def _reference(kind: str, dim: int, i: int, seed: int, name: str, side: str, nnz: int,
               table: list[float]) -> list[float]:  # fmt: skip
    """Row i of R, entry by entry, from the definition in the module docstring."""
    row = [0.0] * dim
    if kind == "rademacher":
        for k in range(dim):
            bit = (_word(kind, seed, name, side, nnz, i // 32, k) >> (i % 32)) & 1
            row[k] = (2 * bit - 1) / math.sqrt(dim)
    elif kind == "gaussian":
        for k in range(dim):
            u = (_word(kind, seed, name, side, nnz, i // 2, k) >> (16 * (i % 2))) & 0xFFFF
            row[k] = table[u] / math.sqrt(dim)
    else:
        # Stage 1: block b = i // 512 of the tensor moves to a slot (of S = max(16, dim // 4))
        # with a sign; row i also gets the sign of its place in a 16384-row tile of signs.
        slots = max(16, dim // 4)
        wb = _word(kind, seed, name, side, nnz, i // 512, 0)
        slot, block_sign = (wb & 0x7FFFFFFF) % slots, (1.0 if wb >> 31 else -1.0)
        t = i % 16384
        tile_sign = (
            1.0 if (_word(kind, seed, name, side, nnz, t // 32, 1) >> (t % 32)) & 1 else -1.0
        )
        u = slot * 512 + i % 512  # the intermediate row
        # Stage 2: an SJLT of the intermediate row, keyed on the seed alone (shared by tensors).
        edges = [(j * dim) // nnz for j in range(nnz + 1)]
        for j in range(nnz):
            w = _word(kind, seed, "", "\x00intermediate", nnz, u, j)
            bucket = edges[j] + (w & 0x7FFFFFFF) % (edges[j + 1] - edges[j])
            sign = (1.0 if w >> 31 else -1.0) * block_sign * tile_sign
            row[bucket] = sign / math.sqrt(nnz)
    return row


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("start", [0, 45, 509, 16381, 2**33 + 7])  # across blocks, tiles
def test_block_matches_python_reference(kind: str, start: int, normal_table: list[float]) -> None:
    dim, nnz = 12, 3
    block = projection_block(
        kind=kind, dim=dim, seed=5, name="h.0.w", side="in", start=start, stop=start + 5,
        sjlt_nnz=nnz,
    )  # fmt: skip
    ref = [_reference(kind, dim, start + r, 5, "h.0.w", "in", nnz, normal_table) for r in range(5)]
    torch.testing.assert_close(block, torch.tensor(ref), rtol=1e-6, atol=1e-7)


# --- determinism and independence -------------------------------------------------------------


def _proj(x: torch.Tensor, kind: str, **kw: object) -> torch.Tensor:
    args: dict = {"dim": 32, "seed": 0, "name": "w"} | kw
    return project(x, kind=kind, **args)


@pytest.mark.parametrize("kind", KINDS)
def test_seeded_determinism_and_independence(kind: str) -> None:
    x = torch.randn(3, 200, generator=torch.Generator().manual_seed(0))
    base = _proj(x, kind)
    torch.manual_seed(123)  # global RNG state must not matter
    assert torch.equal(base, _proj(x, kind))
    for change in ({"seed": 1}, {"name": "w2"}, {"side": "out"}):
        other = _proj(x, kind, **change)
        assert not torch.allclose(base, other), change
    blocks = [
        projection_block(kind=kind, dim=64, seed=s, name=n, side=d, start=0, stop=256).flatten()
        for s, n, d in ((0, "a", ""), (1, "a", ""), (0, "b", ""), (0, "a", "in"))
    ]
    corr = torch.corrcoef(torch.stack(blocks))
    off_diag = corr[~torch.eye(4, dtype=torch.bool)]
    assert off_diag.abs().max() < 0.05  # 16k entries: |corr| ~ 0.008 when independent


# --- blocking, offsets, paths -----------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n_rows", [1, 5, 40])  # rademacher: four-Russians path up to 32 rows
def test_project_equals_dense_matmul_any_block_size(kind: str, n_rows: int) -> None:
    g = torch.Generator().manual_seed(n_rows)
    x = torch.randn(n_rows, 150, generator=g)
    kw = {"kind": kind, "dim": 40, "seed": 3, "name": "layer.w", "side": "out"}
    dense = projection_block(start=13, stop=163, **kw)  # type: ignore[arg-type]
    expected = x @ dense
    for block_size in (None, 7, 64, 10_000):
        got = project(x, offset=13, block_size=block_size, **kw)  # type: ignore[arg-type]
        assert got.dtype == torch.float32 and got.shape == (n_rows, 40) and got.is_contiguous()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_block_rows_do_not_depend_on_range(kind: str) -> None:
    kw = {"kind": kind, "dim": 24, "seed": 9, "name": "e"}
    whole = projection_block(start=0, stop=300, **kw)  # type: ignore[arg-type]
    part = projection_block(start=37, stop=101, **kw)  # type: ignore[arg-type]
    assert torch.equal(part, whole[37:101])


@pytest.mark.parametrize("kind", KINDS)
def test_offset_chunks_sum_to_whole(kind: str) -> None:
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(4, 77, generator=g), torch.randn(4, 58, generator=g)
    whole = _proj(torch.cat([x1, x2], dim=1), kind)
    parts = _proj(x1, kind, offset=0) + _proj(x2, kind, offset=77)
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-5)


# --- statistics and the JL property -----------------------------------------------------------


def test_rademacher_entries_are_balanced_signs() -> None:
    dim = 64
    block = projection_block(kind="rademacher", dim=dim, seed=0, name="w", start=0, stop=4096)
    assert torch.equal(block.abs(), torch.full_like(block, 1 / math.sqrt(dim)))
    signs = block * math.sqrt(dim)  # ±1, 262144 entries
    assert signs.mean().abs() < 5 / math.sqrt(signs.numel())
    assert signs.mean(0).abs().max() < 5 / math.sqrt(4096)  # each column balanced
    # neighbouring rows (same hash word) and columns are uncorrelated
    assert (signs[1:] * signs[:-1]).mean().abs() < 5 / math.sqrt(signs.numel())
    assert (signs[:, 1:] * signs[:, :-1]).mean().abs() < 5 / math.sqrt(signs.numel())


def test_gaussian_entry_moments() -> None:
    dim = 64
    block = projection_block(kind="gaussian", dim=dim, seed=0, name="w", start=0, stop=4096)
    z = (block * math.sqrt(dim)).double().flatten()  # should be ~ N(0, 1)
    se = 1 / math.sqrt(z.numel())
    assert z.mean().abs() < 5 * se
    assert abs(z.var().item() - 1.0) < 5 * math.sqrt(2) * se
    assert abs((z**4).mean().item() - 3.0) < 0.1  # Gaussian kurtosis, not Rademacher's 1
    assert (z.abs() < 1).double().mean().item() == pytest.approx(0.6827, abs=0.01)


@pytest.mark.parametrize("kind", KINDS)
def test_jl_preserves_inner_products_and_norms(kind: str) -> None:
    dim, n = 256, 2000
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, n, generator=g)
    x[3] = 0.0
    x[3, :5] = 1.0  # a spiky vector, the hard case for sparse projections
    exact = x @ x.T
    norms = exact.diagonal().sqrt()
    bound = 6 * norms[:, None] * norms[None, :] / math.sqrt(dim)  # generous c = 6
    for seed in range(4):
        y = _proj(x, kind, dim=dim, seed=seed)
        assert ((y @ y.T - exact).abs() <= bound).all(), seed


@pytest.mark.parametrize("kind", KINDS)
def test_inner_products_are_unbiased(kind: str) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 64, generator=g)
    target = (x[0] @ x[1]).item()
    estimates = torch.tensor(
        [(lambda y: (y[0] @ y[1]).item())(_proj(x, kind, dim=8, seed=s)) for s in range(200)]
    )
    se = estimates.std().item() / math.sqrt(len(estimates))
    assert abs(estimates.mean().item() - target) < 4.5 * se


@pytest.mark.parametrize("nnz", [1, 3, 8])
def test_sjlt_identity_rows_have_exactly_nnz_entries(nnz: int) -> None:
    dim, n = 16, 500
    rows = project(torch.eye(n), kind="sjlt", dim=dim, seed=0, name="w", sjlt_nnz=nnz)
    assert torch.equal((rows != 0).sum(1), torch.full((n,), nnz))
    torch.testing.assert_close(rows.abs().sum(1), torch.full((n,), nnz / math.sqrt(nnz)))
    block = projection_block(kind="sjlt", dim=dim, seed=0, name="w", start=0, stop=n, sjlt_nnz=nnz)
    torch.testing.assert_close(rows, block)
    assert (rows[rows != 0] > 0).float().mean().item() == pytest.approx(0.5, abs=0.1)


# --- dtypes, devices, edge cases --------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_and_high_precision_inputs_give_float32(kind: str, dtype: torch.dtype) -> None:
    x = torch.randn(3, 90, generator=torch.Generator().manual_seed(4)).to(dtype)
    got = _proj(x, kind)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, _proj(x.float(), kind), rtol=1e-6, atol=1e-6)


def test_block_dtype_and_device() -> None:
    block = projection_block(
        kind="gaussian", dim=8, seed=0, name="w", start=0, stop=9, device="cpu", dtype=torch.float64
    )
    assert block.dtype == torch.float64 and block.device.type == "cpu"


@pytest.mark.parametrize("kind", KINDS)
def test_empty_inputs(kind: str) -> None:
    assert torch.equal(_proj(torch.empty(3, 0), kind), torch.zeros(3, 32))
    assert _proj(torch.empty(0, 10), kind).shape == (0, 32)
    for start in (5, 64):
        block = projection_block(kind=kind, dim=4, seed=0, name="w", start=start, stop=start)
        assert block.shape == (0, 4)


def test_default_sjlt_nnz_is_min_of_4_and_dim() -> None:
    eye = torch.eye(20)
    for dim, nnz in ((2, 2), (3, 3), (16, 4)):
        rows = project(eye, kind="sjlt", dim=dim, seed=0, name="w")
        assert torch.equal((rows != 0).sum(1), torch.full((20,), nnz))
        explicit = project(eye, kind="sjlt", dim=dim, seed=0, name="w", sjlt_nnz=nnz)
        assert torch.equal(rows, explicit)


def test_non_contiguous_input() -> None:
    x = torch.randn(60, 4, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(_proj(x.T, "rademacher"), _proj(x.T.contiguous(), "rademacher"))


def test_projector_wraps_the_functions() -> None:
    proj = Projector(dim=16, kind="sjlt", seed=2, sjlt_nnz=2, block_size=50)
    x = torch.randn(2, 120, generator=torch.Generator().manual_seed(6))
    expected = project(x, kind="sjlt", dim=16, seed=2, name="w", side="in", offset=4, sjlt_nnz=2)
    torch.testing.assert_close(proj(x, name="w", side="in", offset=4), expected)
    block = proj.block(name="w", side="in", start=4, stop=124)
    torch.testing.assert_close(x @ block, expected)
    with pytest.raises(dataclasses.FrozenInstanceError):
        proj.dim = 3  # type: ignore[misc]


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "orthogonal"}, r"project: kind must be one of .*got 'orthogonal'"),
        ({"dim": 0}, r"project: dim must be an int >= 1, got 0"),
        ({"dim": True}, r"dim must be an int >= 1, got True"),
        ({"seed": "0"}, r"project: seed must be an int, got '0'"),
        ({"name": 3}, r"project: name must be a str, got 3"),
        ({"side": None}, r"project: side must be a str, got None"),
        ({"offset": -1}, r"project: offset must be an int >= 0, got -1"),
        ({"block_size": 0}, r"project: block_size must be an int >= 1, got 0"),
        ({"kind": "sjlt", "dim": 4, "sjlt_nnz": 5}, r"sjlt_nnz must be <= dim=4, got 5"),
        ({"sjlt_nnz": 0}, r"sjlt_nnz must be an int >= 1, got 0"),
    ],
)
def test_bad_settings_raise(kwargs: dict, match: str) -> None:
    args = {"kind": "rademacher", "dim": 8, "seed": 0, "name": "w"} | kwargs
    with pytest.raises(GradAlignError, match=match):
        project(torch.zeros(2, 3), **args)


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.zeros(3, 4, 5), r"project: x must be a 2-D \(N, n\) floating tensor, got shape "
         r"\(3, 4, 5\)"),
        (torch.zeros(3, dtype=torch.int64), r"got shape \(3,\)"),
        (torch.zeros(3, 4, dtype=torch.int64), r"dtype torch.int64"),
        ([[1.0, 2.0]], r"project: x must be a torch.Tensor, got list"),
    ],
)  # fmt: skip
def test_bad_x_raises(x: object, match: str) -> None:
    with pytest.raises(GradAlignError, match=match):
        project(x, kind="gaussian", dim=4, seed=0, name="w")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", KINDS)
def test_non_finite_input_raises_instead_of_nan(kind: str) -> None:
    x = torch.ones(2, 10)
    x[1, 3] = float("nan")
    with pytest.raises(GradAlignError, match="project: x must be finite"):
        _proj(x, kind)


def test_block_and_projector_errors() -> None:
    with pytest.raises(GradAlignError, match=r"projection_block: stop must be an int >= 5, got 2"):
        projection_block(kind="gaussian", dim=4, seed=0, name="w", start=5, stop=2)
    with pytest.raises(GradAlignError, match=r"projection_block: dtype must be a floating"):
        projection_block(kind="gaussian", dim=4, seed=0, name="w", start=0, stop=2,
                         dtype=torch.int32)  # fmt: skip
    with pytest.raises(GradAlignError, match=r"Projector: kind must be one of"):
        Projector(dim=4, kind="dense")
    with pytest.raises(GradAlignError, match=r"Projector: dim must be an int >= 1, got -2"):
        Projector(dim=-2)
    assert issubclass(GradAlignError, ValueError)


# --- the streamed sjlt path and ProjectionSum -------------------------------------------------


@pytest.mark.parametrize(("dim", "n", "offset", "rows"), [(8, 4100, 0, 1), (8, 9000, 777, 3),
                                                        (40, 70000, 16380, 2), (12, 40000, 2**33 + 5, 1)])  # fmt: skip
def test_streamed_sjlt_equals_dense_block(dim: int, n: int, offset: int, rows: int) -> None:
    """Inputs of >= M / 2 columns take the streamed two-stage path; the dense block is built row
    by row from the hashed cells, which the pure-Python reference above pins down."""
    import gradalign.projection._sjlt as P

    assert n >= P._sjlt_slots(dim) * P._SJLT_BLOCK // 2  # really the streamed path
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    kw = {"kind": "sjlt", "dim": dim, "seed": 4, "name": "emb", "side": ""}
    dense = projection_block(start=offset, stop=offset + n, dtype=torch.float64, **kw)  # type: ignore[arg-type]
    got = project(x.float(), offset=offset, **kw)  # type: ignore[arg-type]
    torch.testing.assert_close(got.double(), x @ dense, rtol=1e-5, atol=1e-4)
    acc = Projector(dim=dim, seed=4).accumulator(rows=rows)
    cut = n // 3
    acc.add(x[:, :cut].float(), name="emb", offset=offset)
    acc.add(x[:, cut:].to(torch.bfloat16), name="emb", offset=offset + cut)  # any float dtype
    want = x[:, :cut] @ dense[:cut] + x[:, cut:].to(torch.bfloat16).double() @ dense[cut:]
    torch.testing.assert_close(acc.result().double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_projection_sum_adds_tensors(kind: str) -> None:
    proj = Projector(dim=24, kind=kind, seed=2)
    g = torch.Generator().manual_seed(0)
    parts = {
        "a.weight": torch.randn(2, 5000, generator=g),
        "a.bias": torch.randn(2, 7, generator=g),
    }
    acc = proj.accumulator(rows=2)
    for name, x in parts.items():
        acc.add(x, name=name)
    want = sum(x @ proj.block(name=name, start=0, stop=x.shape[1]) for name, x in parts.items())
    torch.testing.assert_close(acc.result(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(GradAlignError, match="x must have 2 rows, got 1"):
        proj.accumulator(rows=2).add(torch.ones(1, 3), name="w")
    with pytest.raises(GradAlignError, match="NaN or inf"):  # when added (dense) or summed (sjlt)
        bad = proj.accumulator(rows=1)
        bad.add(torch.full((1, 3), float("nan")), name="w")
        bad.result()


def test_sjlt_caches_never_change_results() -> None:
    """The cached tiles, slot rows and stage-2 tables are pure functions of their keys."""
    import gradalign.projection._sjlt as P

    x = torch.randn(1, 50_000, generator=torch.Generator().manual_seed(1))
    kw = {"kind": "sjlt", "dim": 64, "seed": 0, "name": "w"}
    first = project(x, **kw)  # type: ignore[arg-type]
    for cache in (P._TILES, P._ROWS, P._STAGE2):
        cache.items.clear()
        cache.bytes = 0
    old = P._ROWS.max_bytes
    try:
        P._ROWS.max_bytes = 0  # nothing fits: every call recomputes
        assert torch.equal(project(x, **kw), first)  # type: ignore[arg-type]
    finally:
        P._ROWS.max_bytes = old
    assert torch.equal(project(x, **kw), first)  # type: ignore[arg-type]
    assert P._ROWS.bytes <= P._ROWS.max_bytes and P._TILES.bytes <= P._TILES.max_bytes
