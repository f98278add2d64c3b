"""GradientStore: chunked on-disk extraction, load, and resume after a crash."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from gradalign import GradAlignError, GRPOObjective, Rollouts
from gradalign.extractors import FactorizedGradient, FullGradient, GradientExtractor, GroupGradients
from gradalign.store import GradientStore
from tests import store_worker
from tests.helpers import left_pad, make_rollouts

GROUPS = [i // 3 * 7 for i in range(30)]  # 10 groups of 3, ids 0, 7, ..., 63
REWARDS = [float((i * 5) % 3 == 0) for i in range(30)]


class _Flaky(GradientExtractor):
    """Wraps an extractor, records the groups it is asked for, and can crash mid-stream."""

    def __init__(self, inner: GradientExtractor, crash_after_parts: int | None = None) -> None:
        self.inner, self.crash_after, self.parts, self.seen = inner, crash_after_parts, 0, []

    def __repr__(self) -> str:
        return repr(self.inner)

    def group_packs(self, rollouts: Rollouts, objective: GRPOObjective | None = None) -> list[int]:
        return self.inner.group_packs(rollouts, objective)

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


def _equal(a: GroupGradients, b: GroupGradients, exact: bool = True, *, rtol: float = 1e-4) -> None:
    """Same groups and metadata; bitwise-equal rows, or equal up to float32 rounding (rows
    computed in other micro-batches see other padding widths)."""
    assert a.group_ids.tolist() == b.group_ids.tolist()
    tol = {"rtol": 0.0, "atol": 0.0} if exact else {"rtol": rtol, "atol": 1e-6}
    torch.testing.assert_close(a.grads, b.grads, **tol)
    for key in ("num_sequences", "num_tokens", "zero_spread"):
        assert getattr(a, key).tolist() == getattr(b, key).tolist()
    assert a.segments == b.segments


def test_extract_and_load_equal_per_group(qwen: nn.Module, pool: Rollouts, tmp_path: Path) -> None:
    ext = FactorizedGradient(dim_in=4, dim_out=4, group_chunk=2)
    store = GradientStore(tmp_path / "s")
    assert store.extract(ext, qwen, pool, group_chunk=3) == 10
    _equal(store.load(), ext.per_group(qwen, pool), exact=False)
    again = GradientStore(tmp_path / "s")  # reopen from disk
    assert len(again) == 10 and again.dim == store.dim
    assert again.extract(ext, qwen, pool, group_chunk=3) == 0
    sub = again.load([63, 7])
    assert sub.group_ids.tolist() == [7, 63]
    torch.testing.assert_close(sub.grads, store.load().grads[[1, 9]])
    chunks = list(again.iter_chunks(4))
    assert [len(c) for c in chunks] == [4, 4, 2]
    _equal(GroupGradients.concat(chunks), store.load())
    assert [len(c) for c in again.iter_chunks()] == [10]  # None: the 1 GiB rule, all fit
    with pytest.raises(GradAlignError, match=r"groups \[5\] are not stored"):
        again.load([5])


def test_iter_chunks_default_is_the_extractors_memory_rule(
    qwen: nn.Module, pool: Rollouts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gradalign.extractors.base as base

    ext = FactorizedGradient(dim_in=4, dim_out=4)
    store = GradientStore(tmp_path / "s")
    store.extract(ext, qwen, pool)
    assert store.dim is not None
    monkeypatch.setattr(base, "CHUNK_BYTES", 3 * 4 * store.dim)  # three float32 rows
    assert [len(c) for c in store.iter_chunks()] == [3, 3, 3, 1]
    assert [len(c.grads) for c in ext.iter_groups(qwen, pool)] == [3, 3, 3, 1]  # the same rule
    with pytest.raises(
        GradAlignError, match="iter_chunks: group_chunk must be an int >= 1 or None"
    ):
        next(store.iter_chunks(0))


@pytest.mark.parametrize("objective", [GRPOObjective(), GRPOObjective(scale_rewards="batch")])
def test_resume_after_crash_gives_identical_results(
    qwen: nn.Module, pool: Rollouts, tmp_path: Path, objective: GRPOObjective
) -> None:
    ext = FactorizedGradient(dim_in=4, dim_out=4, group_chunk=2)
    reference = GradientStore(tmp_path / "ref")
    reference.extract(ext, qwen, pool, objective, group_chunk=4)
    # 15 rows (5 groups of 3) fill a micro-batch of 16, so a chunk of 4 groups rounds up to the
    # whole pack of 5; it arrives as parts of 2, 2, 1: crash after 3 parts, inside the second.
    flaky = _Flaky(ext, crash_after_parts=3)
    with pytest.raises(KeyboardInterrupt):
        GradientStore(tmp_path / "s").extract(flaky, qwen, pool, objective, group_chunk=4)
    store = GradientStore(tmp_path / "s")
    assert store.group_ids.tolist() == [0, 7, 14, 21, 28]  # only the committed chunk
    assert not (tmp_path / "s" / "index.json.tmp").exists()
    resumed = _Flaky(ext)
    assert store.extract(resumed, qwen, pool, objective, group_chunk=4) == 5
    assert resumed.seen == [35, 42, 49, 56, 63]  # finished groups are never recomputed
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
    with pytest.raises(GradAlignError, match="group_chunk must be an int >= 1, got 0"):
        GradientStore(tmp_path / "s").extract(FactorizedGradient(), qwen, pool, group_chunk=0)
    with pytest.raises(GradAlignError, match="holds no groups yet"):
        GradientStore(tmp_path / "empty").load()
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    assert len(index["group_ids"]) == 10 and index["dim"] == GradientStore(tmp_path / "s").dim


def test_float16_store_and_full_gradient(qwen: nn.Module, tmp_path: Path) -> None:
    ro = make_rollouts(vocab=qwen.config.vocab_size, groups=[1, 1, 2, 2], rewards=[1, 0, 0, 1])
    ext = FullGradient(target_modules=["lm_head"])
    store = GradientStore(tmp_path / "h", dtype=torch.float16)
    store.extract(ext, qwen, ro, group_chunk=1)
    ref = ext.per_group(qwen, ro)
    out = store.load()
    assert out.grads.dtype == torch.float32 and out.segments == ref.segments
    torch.testing.assert_close(out.grads, ref.grads.half().float())


# --- fault injection -------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def _worker(path: Path, which: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.store_worker", str(path), which, *extra],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def _wait_for(file: Path, proc: subprocess.Popen[str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not file.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the worker never signalled"
        time.sleep(0.05)


def _reference(which: str) -> GroupGradients:
    model = store_worker.model()
    return store_worker.EXTRACTOR.per_group(
        model, store_worker.pool(which, model.config.vocab_size)
    )


def test_two_writers_one_store(tmp_path: Path) -> None:
    """A second process gets a clear error while the first writes; afterwards it can add its
    own pool, and every row holds its own group's gradient."""
    path, started, release = tmp_path / "s", tmp_path / "started", tmp_path / "release"
    first = _worker(path, "a", "--hold", str(started), str(release))
    _wait_for(started, first)
    second = _worker(path, "b")
    out, err = second.communicate(timeout=120)
    assert f"another process (pid {first.pid}) is writing the store" in out, (out, err)
    release.touch()
    assert first.communicate(timeout=120)[0].strip() == "ok"
    model = store_worker.model()
    b = store_worker.pool("b", model.config.vocab_size)
    assert GradientStore(path).extract(store_worker._Paced(None, None), model, b) == 10
    _equal(GradientStore(path).load(), _reference("all"), exact=False)


def test_stale_objects_of_one_store_append_correctly(qwen: nn.Module, tmp_path: Path) -> None:
    model = store_worker.model()
    a, b = GradientStore(tmp_path / "s"), GradientStore(tmp_path / "s")  # both opened empty
    ext = store_worker._Paced(None, None)
    a.extract(ext, model, store_worker.pool("a", model.config.vocab_size), group_chunk=3)
    b.extract(ext, model, store_worker.pool("b", model.config.vocab_size), group_chunk=3)
    _equal(GradientStore(tmp_path / "s").load(), _reference("all"), exact=False)


def test_kill_during_extraction_then_resume_bit_identical(tmp_path: Path) -> None:
    path, stalled = tmp_path / "s", tmp_path / "stalled"
    proc = _worker(path, "all", "--stall-after", "3", str(stalled))
    _wait_for(stalled, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    store = GradientStore(path)
    assert len(store) == 6  # three committed chunks of 2 groups
    killed = store.group_ids  # written by the worker, at 1 thread
    model = store_worker.model()
    rollouts = store_worker.pool("all", model.config.vocab_size)
    assert store.extract(store_worker._Paced(None, None), model, rollouts, group_chunk=5) == 14
    ref = GradientStore(tmp_path / "ref")
    ref.extract(store_worker._Paced(None, None), model, rollouts, group_chunk=20)
    resumed = store.group_ids[~torch.isin(store.group_ids, killed)]
    # Bit-identity is promised within one process with the same shapes and threads: the rows
    # resumed here with another chunk size and the reference must not differ by a bit.
    _equal(store.load(resumed), ref.load(resumed), exact=True)
    # The worker ran at 1 thread in another process, so its GEMMs may split their reductions
    # otherwise (AMD CPUs: 268 of 5280 elements off by up to 1.3e-7, one float32 ulp near 1).
    # atol=1e-6 is ~8x that yet ~1/30000 of a typical element (~0.03); rtol=1e-5 is ~80 ulp.
    # A row of another group, pack or objective misses by the size of the values themselves.
    _equal(store.load(killed), ref.load(killed), exact=False, rtol=1e-5)


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_short_or_missing_data_file_is_refused_then_repaired(
    qwen: nn.Module, pool: Rollouts, tmp_path: Path, damage: str
) -> None:
    ext = FactorizedGradient(dim_in=4, dim_out=4)
    store = GradientStore(tmp_path / "s")
    store.extract(ext, qwen, pool, group_chunk=3)
    reference = store.load()
    data = tmp_path / "s" / "grads.bin"
    if damage == "truncate":
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    else:
        data.unlink()
    with pytest.raises(GradAlignError, match=r"is damaged: grads.bin .* GradientStore.repair"):
        GradientStore(tmp_path / "s")
    with pytest.raises(GradAlignError, match="is damaged"):
        store.extract(ext, qwen, pool)  # the open object re-checks before writing
    dropped = GradientStore.repair(tmp_path / "s")
    assert len(dropped) == (5 if damage == "truncate" else 10)
    repaired = GradientStore(tmp_path / "s")
    assert repaired.extract(ext, qwen, pool, group_chunk=3) == len(dropped)
    # Re-extracted groups run without their former pack-mates: equal up to float rounding.
    _equal(repaired.load(), reference, exact=len(dropped) == 10)


def test_flipped_byte_fails_its_checksum(qwen: nn.Module, pool: Rollouts, tmp_path: Path) -> None:
    ext = FactorizedGradient(dim_in=4, dim_out=4)
    store = GradientStore(tmp_path / "s")
    store.extract(ext, qwen, pool)
    reference = store.load()
    data = tmp_path / "s" / "grads.bin"
    raw = bytearray(data.read_bytes())
    row = 4 * store.dim  # type: ignore[operator]
    raw[3 * row + 7] ^= 0x40  # one bit of the 4th row (group 21)
    data.write_bytes(bytes(raw))
    with pytest.raises(GradAlignError, match=r"groups \[21\] fail their checksum"):
        GradientStore(tmp_path / "s").load()
    assert GradientStore(tmp_path / "s").load([0, 7]).group_ids.tolist() == [0, 7]
    assert GradientStore.repair(tmp_path / "s") == [21]
    again = GradientStore(tmp_path / "s")
    assert again.extract(ext, qwen, pool) == 1
    _equal(again.load(), reference, exact=False)  # group 21 ran alone this time


def test_fingerprint_covers_values_model_and_rollouts(
    qwen: nn.Module, pool: Rollouts, tmp_path: Path
) -> None:
    names = [n for n, _ in qwen.named_parameters()]
    big = {names[0]: torch.ones(5000)}
    other = {names[0]: torch.ones(5000)}
    other[names[0]][2500] = 2.0  # the same repr (elided middle), other values
    assert repr(big) == repr(other)
    ro = make_rollouts(vocab=qwen.config.vocab_size, groups=[1, 1, 2, 2], rewards=[1, 0, 0, 1])
    GradientStore(tmp_path / "p").extract(
        FullGradient(preconditioner=big, target_modules=["lm_head"]), qwen, ro
    )
    with pytest.raises(GradAlignError, match="holds gradients of"):
        GradientStore(tmp_path / "p").extract(
            FullGradient(preconditioner=other, target_modules=["lm_head"]), qwen, ro
        )
    ext = FactorizedGradient(dim_in=2, dim_out=2)
    GradientStore(tmp_path / "m").extract(ext, qwen, pool, group_chunk=3)
    changed = copy.deepcopy(qwen)
    with torch.no_grad():
        next(changed.parameters()).view(-1)[0] += 1.0
    with pytest.raises(GradAlignError, match="other model weights"):
        GradientStore(tmp_path / "m").extract(ext, changed, pool)
    flipped = Rollouts(
        input_ids=pool.input_ids,
        attention_mask=pool.attention_mask,
        response_mask=pool.response_mask,
        rewards=1.0 - pool.rewards,
        group_ids=pool.group_ids,
    )
    with pytest.raises(GradAlignError, match=r"groups \[0, 7, .*are stored from other rollouts"):
        GradientStore(tmp_path / "m").extract(ext, qwen, flipped)
    # The same rollouts left-padded are the same content: nothing to redo, no error.
    assert GradientStore(tmp_path / "m").extract(ext, qwen, left_pad(pool)) == 0


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda text: text[: len(text) // 2], "is not valid JSON"),
        (lambda text: "[1, 2]", "has format"),
        (lambda text: text.replace('"group_ids": [0,', '"group_ids": [7,'), "each group id once"),
        (lambda text: text.replace('"dim": ', '"dim": -'), "has dim="),
        (lambda text: text.replace('"dtype": "float32"', '"dtype": "int8"'), "has dim="),
        (lambda text: text.replace('"crc32": [', '"crc32": [1, '), "lists .* of one length"),
    ],
)
def test_damaged_index_is_a_clear_error(
    qwen: nn.Module, pool: Rollouts, tmp_path: Path, edit: Any, match: str
) -> None:
    GradientStore(tmp_path / "s").extract(FactorizedGradient(dim_in=2, dim_out=2), qwen, pool)
    index = tmp_path / "s" / "index.json"
    text = json.dumps(json.loads(index.read_text()), separators=(",", ": "))
    index.write_text(edit(text))
    with pytest.raises(GradAlignError, match=match):
        GradientStore(tmp_path / "s").load()


@pytest.mark.parametrize("legacy", [False, True])
def test_hand_edited_dim_fails_the_checksums(
    qwen: nn.Module, pool: Rollouts, tmp_path: Path, legacy: bool
) -> None:
    GradientStore(tmp_path / "s").extract(FactorizedGradient(dim_in=2, dim_out=2), qwen, pool)
    index = tmp_path / "s" / "index.json"
    data = json.loads(index.read_text())
    data["dim"] -= 1
    if legacy:  # a format 2 store has no index checksum: the rows' CRCs catch the edit
        data["format"] = 2
        del data["checksum"]
    index.write_text(json.dumps(data))
    match = "fail their checksum" if legacy else "index.json fails its checksum"
    with pytest.raises(GradAlignError, match=match):
        GradientStore(tmp_path / "s").load()


def test_float16_store_refuses_values_it_cannot_hold(qwen: nn.Module, tmp_path: Path) -> None:
    ro = make_rollouts(vocab=qwen.config.vocab_size, groups=[1, 1, 2, 2], rewards=[1, 0, 0, 1])
    names = [n for n, _ in qwen.named_parameters() if n.startswith("lm_head")]
    huge = {n: torch.full_like(dict(qwen.named_parameters())[n], 1e9) for n in names}
    store = GradientStore(tmp_path / "h", dtype=torch.float16)
    with pytest.raises(GradAlignError, match="exceed the float16 range"):
        store.extract(FullGradient(target_modules=["lm_head"], preconditioner=huge), qwen, ro)
    assert len(GradientStore(tmp_path / "h", dtype=torch.float16)) == 0


def test_chunk_groups_was_removed_in_0_3(qwen: nn.Module, pool: Rollouts, tmp_path: Path) -> None:
    store = GradientStore(tmp_path / "s")
    with pytest.raises(TypeError, match="chunk_groups"):
        store.extract(FactorizedGradient(dim_in=2, dim_out=2), qwen, pool, chunk_groups=4)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="chunk_groups"):
        store.iter_chunks(chunk_groups=5)  # type: ignore[call-arg]
