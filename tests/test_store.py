"""GradientStore: chunked on-disk extraction, load, and resume after a crash."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from gradalign import GradAlignError, GRPOObjective, Rollouts
from gradalign.extractors import FactorizedGradient, FullGradient, GradientExtractor, GroupGradients
from gradalign.store import GradientStore
from tests.helpers import make_rollouts

GROUPS = [i // 3 * 7 for i in range(30)]  # 10 groups of 3, ids 0, 7, ..., 63
REWARDS = [float((i * 5) % 3 == 0) for i in range(30)]


class _Flaky(GradientExtractor):
    """Wraps an extractor, records the groups it is asked for, and can crash mid-stream."""

    def __init__(self, inner: GradientExtractor, crash_after_parts: int | None = None) -> None:
        self.inner, self.crash_after, self.parts, self.seen = inner, crash_after_parts, 0, []

    def __repr__(self) -> str:
        return repr(self.inner)

    def iter_groups(
        self,
        model: nn.Module,
        rollouts: Rollouts,
        objective: GRPOObjective | None = None,
        *,
        progress: bool = False,
    ) -> Iterator[GroupGradients]:
        self.seen += rollouts.unique_groups.tolist()
        for part in self.inner.iter_groups(model, rollouts, objective):
            if self.crash_after is not None and self.parts == self.crash_after:
                raise KeyboardInterrupt("simulated crash")
            self.parts += 1
            yield part


@pytest.fixture(scope="module")
def pool(qwen: nn.Module) -> Rollouts:
    return make_rollouts(vocab=qwen.config.vocab_size, groups=GROUPS, rewards=REWARDS, seed=2)


def _equal(a: GroupGradients, b: GroupGradients, exact: bool = True) -> None:
    """Same groups and metadata; bitwise-equal rows, or equal up to float32 rounding (rows
    computed in other micro-batches see other padding widths)."""
    assert a.group_ids.tolist() == b.group_ids.tolist()
    tol = {"rtol": 0.0, "atol": 0.0} if exact else {"rtol": 1e-4, "atol": 1e-6}
    torch.testing.assert_close(a.grads, b.grads, **tol)
    for key in ("num_sequences", "num_tokens", "zero_spread"):
        assert getattr(a, key).tolist() == getattr(b, key).tolist()
    assert a.segments == b.segments


def test_extract_and_load_equal_per_group(qwen: nn.Module, pool: Rollouts, tmp_path: Path) -> None:
    ext = FactorizedGradient(dim_in=4, dim_out=4, group_chunk=2)
    store = GradientStore(tmp_path / "s")
    assert store.extract(ext, qwen, pool, chunk_groups=3) == 10
    _equal(store.load(), ext.per_group(qwen, pool), exact=False)
    again = GradientStore(tmp_path / "s")  # reopen from disk
    assert len(again) == 10 and again.dim == store.dim
    assert again.extract(ext, qwen, pool, chunk_groups=3) == 0
    sub = again.load([63, 7])
    assert sub.group_ids.tolist() == [7, 63]
    torch.testing.assert_close(sub.grads, store.load().grads[[1, 9]])
    chunks = list(again.iter_chunks(4))
    assert [len(c) for c in chunks] == [4, 4, 2]
    _equal(GroupGradients.concat(chunks), store.load())
    with pytest.raises(GradAlignError, match=r"groups \[5\] are not stored"):
        again.load([5])


@pytest.mark.parametrize("objective", [GRPOObjective(), GRPOObjective(scale_rewards="batch")])
def test_resume_after_crash_gives_identical_results(
    qwen: nn.Module, pool: Rollouts, tmp_path: Path, objective: GRPOObjective
) -> None:
    ext = FactorizedGradient(dim_in=4, dim_out=4, group_chunk=2)
    reference = GradientStore(tmp_path / "ref")
    reference.extract(ext, qwen, pool, objective, chunk_groups=4)
    # Chunks of 4 groups arrive as parts of 2: crash after 3 parts, inside the second chunk.
    flaky = _Flaky(ext, crash_after_parts=3)
    with pytest.raises(KeyboardInterrupt):
        GradientStore(tmp_path / "s").extract(flaky, qwen, pool, objective, chunk_groups=4)
    store = GradientStore(tmp_path / "s")
    assert store.group_ids.tolist() == [0, 7, 14, 21]  # only the committed chunk
    assert not (tmp_path / "s" / "index.json.tmp").exists()
    resumed = _Flaky(ext)
    assert store.extract(resumed, qwen, pool, objective, chunk_groups=4) == 6
    assert resumed.seen == [28, 35, 42, 49, 56, 63]  # finished groups are never recomputed
    _equal(store.load(), reference.load())
    _equal(store.load(), ext.per_group(qwen, pool, objective), exact=False)


def test_settings_are_checked(qwen: nn.Module, pool: Rollouts, tmp_path: Path) -> None:
    GradientStore(tmp_path / "s").extract(FactorizedGradient(dim_in=2, dim_out=2), qwen, pool)
    with pytest.raises(GradAlignError, match="holds gradients of FactorizedGradient"):
        GradientStore(tmp_path / "s").extract(FactorizedGradient(dim_in=3), qwen, pool)
    with pytest.raises(GradAlignError, match=r"holds D=.*, got dim=5"):
        GradientStore(tmp_path / "s", dim=5)
    with pytest.raises(GradAlignError, match="holds float32, got dtype"):
        GradientStore(tmp_path / "s", dtype=torch.float16)
    with pytest.raises(GradAlignError, match="dtype must be float32 or float16"):
        GradientStore(tmp_path / "t", dtype=torch.int8)
    with pytest.raises(GradAlignError, match="chunk_groups must be an int >= 1, got 0"):
        GradientStore(tmp_path / "s").extract(FactorizedGradient(), qwen, pool, chunk_groups=0)
    with pytest.raises(GradAlignError, match="holds no groups yet"):
        GradientStore(tmp_path / "empty").load()
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    assert len(index["group_ids"]) == 10 and index["dim"] == GradientStore(tmp_path / "s").dim


def test_float16_store_and_full_gradient(qwen: nn.Module, tmp_path: Path) -> None:
    ro = make_rollouts(vocab=qwen.config.vocab_size, groups=[1, 1, 2, 2], rewards=[1, 0, 0, 1])
    ext = FullGradient(target_modules=["lm_head"])
    store = GradientStore(tmp_path / "h", dtype=torch.float16)
    store.extract(ext, qwen, ro, chunk_groups=1)
    ref = ext.per_group(qwen, ro)
    out = store.load()
    assert out.grads.dtype == torch.float32 and out.segments == ref.segments
    torch.testing.assert_close(out.grads, ref.grads.half().float())
