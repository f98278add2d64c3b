"""GradientStore under faults: a crash inside repair, hand-edited or partly written files, and
pools whose batch statistics differ from those the stored rows were prepared with."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from gradalign import GradAlignError, GRPOObjective, Rollouts
from gradalign.extractors import FactorizedGradient
from gradalign.objective import Objective
from gradalign.store import GradientStore
from gradalign.token_weights import BatchStats, TokenWeights
from tests.helpers import make_rollouts

GROUPS = [g for g in range(12) for _ in range(3)]  # 12 groups of 3, ids 0..11
REWARDS = [float((i * 5) % 3 == 0) for i in range(36)]
EXT = FactorizedGradient(dim_in=2, dim_out=2)
DAMAGED_ROW = 3


@pytest.fixture(scope="module")
def pool(qwen: nn.Module) -> Rollouts:
    return make_rollouts(vocab=qwen.config.vocab_size, groups=GROUPS, rewards=REWARDS, seed=4)


@pytest.fixture(scope="module")
def template(qwen: nn.Module, pool: Rollouts, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store of the 12 groups, extracted once; tests damage copies of it."""
    path = tmp_path_factory.mktemp("template") / "s"
    GradientStore(path).extract(EXT, qwen, pool)
    return path


def _copy(template: Path, where: Path) -> Path:
    return Path(shutil.copytree(template, where / "s"))


def _rows(path: Path) -> dict[int, bytes]:
    """Group id -> the raw bytes of its committed row, as the files say."""
    index = json.loads((path / "index.json").read_text())
    size = 4 * index["dim"]  # float32
    raw = (path / "grads.bin").read_bytes()
    return {g: raw[i * size : (i + 1) * size] for i, g in enumerate(index["group_ids"])}


def _flip_a_bit(path: Path, row: int) -> int:
    """Damage one committed row; returns its group id."""
    index = json.loads((path / "index.json").read_text())
    raw = bytearray((path / "grads.bin").read_bytes())
    raw[row * 4 * index["dim"] + 5] ^= 0x10
    (path / "grads.bin").write_bytes(bytes(raw))
    return int(index["group_ids"][row])


def _edit_index(path: Path, edit: Callable[[dict[str, Any]], None], *, legacy: bool) -> None:
    """Edit index.json by hand: its stale checksum stays, or it becomes a format 2 index."""
    file = path / "index.json"
    index = json.loads(file.read_text())
    edit(index)
    if legacy:
        index["format"] = 2
        del index["checksum"]
    file.write_text(json.dumps(index))


def _files(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir()) if f.name != "writer.lock"}


# --- defect: a crash inside repair -------------------------------------------------------------


class _Crash(Exception):
    pass


def _durable_steps(monkeypatch: pytest.MonkeyPatch, crash_at: int | None) -> list[str]:
    """Record every fsync and rename (the steps that reach the disk); raise at step crash_at."""
    steps: list[str] = []
    for name in ("fsync", "replace"):
        real = getattr(os, name)

        def step(*args: Any, _real: Any = real, _name: str = name) -> Any:
            steps.append(_name)
            if len(steps) == crash_at:
                raise _Crash(f"simulated crash at step {len(steps)} ({_name})")
            return _real(*args)

        monkeypatch.setattr(os, name, step)
    return steps


def _steps_of_a_repair(path: Path) -> list[str]:
    """The durable steps of one uninterrupted repair of ``path``."""
    with pytest.MonkeyPatch.context() as m:
        steps = _durable_steps(m, crash_at=None)
        GradientStore.repair(path)
    return steps


def _crash_repair(path: Path, at: int) -> None:
    """Repair ``path`` and crash at durable step ``at``: no cleanup runs, as after a kill."""
    with pytest.MonkeyPatch.context() as m, pytest.raises(_Crash):
        _durable_steps(m, crash_at=at)
        GradientStore.repair(path)


def _assert_repaired(path: Path, intact: dict[int, bytes], bad: int) -> None:
    """Every intact row is kept with its exact bytes; only the damaged one is gone."""
    assert _rows(path) == {g: b for g, b in intact.items() if g != bad}
    assert GradientStore(path).group_ids.tolist() == sorted(g for g in intact if g != bad)
    assert not [f.name for f in path.iterdir() if f.name.endswith((".repair", ".tmp"))]


def test_repair_crashing_at_any_step_never_drops_an_intact_row(
    template: Path, tmp_path: Path
) -> None:
    intact = _rows(template)
    clean = _copy(template, tmp_path / "clean")
    bad = _flip_a_bit(clean, DAMAGED_ROW)
    steps = _steps_of_a_repair(clean)
    assert steps.count("replace") >= 2  # data and index: the crash points that matter
    _assert_repaired(clean, intact, bad)
    for k in range(1, len(steps) + 1):
        path = _copy(template, tmp_path / f"crash{k}")
        _flip_a_bit(path, DAMAGED_ROW)
        _crash_repair(path, at=k)
        # A crash before the journal is on disk leaves the damaged row to drop; after it, the
        # next repair only finishes the interrupted one.
        assert GradientStore.repair(path) in ([bad], []), f"crash at step {k}"
        _assert_repaired(path, intact, bad)


def test_an_incomplete_repair_journal_is_discarded(template: Path, tmp_path: Path) -> None:
    intact = _rows(template)
    path = _copy(template, tmp_path)
    bad = _flip_a_bit(path, DAMAGED_ROW)
    steps = _steps_of_a_repair(_copy(path, tmp_path / "count"))
    _crash_repair(path, at=steps.index("replace") + 1)  # the journal is complete, nothing renamed
    journal = path / "index.json.repair"
    journal.write_text(journal.read_text()[:100])  # as if the crash had cut its write short
    assert GradientStore.repair(path) == [bad]
    _assert_repaired(path, intact, bad)


def test_a_journal_whose_new_data_went_missing_does_not_replace_the_index(
    template: Path, tmp_path: Path
) -> None:
    intact = _rows(template)
    path = _copy(template, tmp_path)
    bad = _flip_a_bit(path, DAMAGED_ROW)
    steps = _steps_of_a_repair(_copy(path, tmp_path / "count"))
    _crash_repair(path, at=steps.index("replace") + 1)  # the journal is complete, nothing renamed
    (path / "grads.bin.repair").unlink()  # the old data is still in place
    assert GradientStore.repair(path) == [bad]
    _assert_repaired(path, intact, bad)


def test_extract_finishes_an_interrupted_repair(
    qwen: nn.Module, pool: Rollouts, template: Path, tmp_path: Path
) -> None:
    intact, reference = _rows(template), GradientStore(template).load()
    path = _copy(template, tmp_path)
    bad = _flip_a_bit(path, DAMAGED_ROW)
    store = GradientStore(path)  # opened before the repair
    steps = _steps_of_a_repair(_copy(path, tmp_path / "count"))
    _crash_repair(path, at=len(steps) - steps[::-1].index("replace"))  # new data, old index
    with pytest.raises(GradAlignError, match=r"is damaged: .*GradientStore\.repair"):
        GradientStore(path)  # the old index does not describe the new data: never misread
    assert store.extract(EXT, qwen, pool) == 1  # the repair is finished first: only the bad group
    kept = {g: b for g, b in _rows(path).items() if g != bad}
    assert kept == {g: b for g, b in intact.items() if g != bad}
    torch.testing.assert_close(GradientStore(path).load().grads, reference.grads)


# --- defect: a hand-edited dim ---------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("delta", [-1, 1, 10_000])
def test_repair_refuses_an_index_whose_dim_does_not_fit(
    template: Path, tmp_path: Path, legacy: bool, delta: int
) -> None:
    path = _copy(template, tmp_path)
    _edit_index(path, lambda index: index.update(dim=index["dim"] + delta), legacy=legacy)
    before = _files(path)
    with pytest.raises(
        GradAlignError,
        match=r"GradientStore\.repair: none of the 12 rows .* matches its checksum in grads\.bin "
        r"\(\d+ bytes\) with dim=\d+, dtype=float32: .*dim or dtype edited.*Nothing was changed",
    ):
        GradientStore.repair(path)
    assert _files(path) == before


# --- defect: a partial trailing write --------------------------------------------------------


@pytest.mark.parametrize("extra", [1, 3, 4 * 5 + 2])
def test_partial_write_past_the_committed_rows_is_ignored(
    template: Path, tmp_path: Path, extra: int
) -> None:
    """An interrupted chunk's partial write past the index is a leftover the next extract
    overwrites (the store's design); load reads the committed rows exactly."""
    path = _copy(template, tmp_path)
    reference = GradientStore(path).load()
    with open(path / "grads.bin", "ab") as fh:
        fh.write(b"\x7f" * extra)
    out = GradientStore(path).load()
    torch.testing.assert_close(out.grads, reference.grads, rtol=0.0, atol=0.0)
    assert GradientStore.repair(path) == []


def test_data_file_cut_inside_the_committed_rows_is_damaged(template: Path, tmp_path: Path) -> None:
    path = _copy(template, tmp_path)
    store = GradientStore(path)  # opened while intact
    data = path / "grads.bin"
    data.write_bytes(data.read_bytes()[:-3])  # the last row's write cut short
    with pytest.raises(GradAlignError, match=r"is damaged: grads\.bin .*GradientStore\.repair\("):
        store.load()
    assert GradientStore.repair(path) == [11]


# --- defect: no checksum of the index --------------------------------------------------------


def _swap_first_ids(index: dict[str, Any]) -> None:
    ids = index["group_ids"]
    ids[0], ids[1] = ids[1], ids[0]


def test_swapped_ids_fail_the_index_checksum_and_repair_sets_the_files_aside(
    qwen: nn.Module, pool: Rollouts, template: Path, tmp_path: Path
) -> None:
    reference = GradientStore(template).load()
    path = _copy(template, tmp_path)
    _edit_index(path, _swap_first_ids, legacy=False)
    before = _files(path)
    with pytest.raises(
        GradAlignError,
        match=r"GradientStore: .*index\.json fails its checksum: .*GradientStore\.repair\(",
    ):
        GradientStore(path)
    assert GradientStore.repair(path) == [1, 0, *range(2, 12)]  # no row can be vouched for
    assert {f"{k}.rejected": v for k, v in before.items()} == _files(path)  # kept, set aside
    store = GradientStore(path)
    assert len(store) == 0
    assert store.extract(EXT, qwen, pool) == 12
    # The same process, packs and threads as the template: bit-identical rows.
    torch.testing.assert_close(store.load().grads, reference.grads, rtol=0.0, atol=0.0)


def test_format_2_index_without_checksum_is_accepted_and_upgraded(
    template: Path, tmp_path: Path
) -> None:
    path = _copy(template, tmp_path)
    reference = GradientStore(path).load()
    _edit_index(path, lambda index: None, legacy=True)
    torch.testing.assert_close(GradientStore(path).load().grads, reference.grads)
    assert GradientStore.repair(path) == []  # the next write adds the checksum
    index = json.loads((path / "index.json").read_text())
    assert index["format"] == 3 and len(index["checksum"]) == 64
    _edit_index(path, _swap_first_ids, legacy=False)
    with pytest.raises(GradAlignError, match="fails its checksum"):
        GradientStore(path)


def test_format_3_index_without_checksum_is_refused(template: Path, tmp_path: Path) -> None:
    path = _copy(template, tmp_path)
    _edit_index(path, lambda index: index.pop("checksum"), legacy=False)
    with pytest.raises(GradAlignError, match=r"index\.json fails its checksum"):
        GradientStore(path)


# --- defect: rows of one store prepared with other batch statistics --------------------------


def _shorter_responses(pool: Rollouts) -> Rollouts:
    """The groups whose responses are all shorter than the pool's longest."""
    lengths = pool.response_mask.sum(1)  # (S,)
    longest = int(lengths.max())
    ids = [g for g in pool.unique_groups.tolist() if lengths[pool.group_ids == g].max() < longest]
    assert 0 < len(ids) < 12
    return pool.select_groups(torch.tensor(ids))


@pytest.mark.parametrize(
    ("objective", "statistic"),
    [
        (GRPOObjective(scale_rewards="batch"), "reward_std"),
        (GRPOObjective(loss_agg="seq-mean-token-sum-norm"), "max_response_length"),
    ],
)
def test_extending_with_other_batch_statistics_is_refused(
    qwen: nn.Module, pool: Rollouts, tmp_path: Path, objective: GRPOObjective, statistic: str
) -> None:
    first = _shorter_responses(pool)
    assert BatchStats.of(first).reward_std != BatchStats.of(pool).reward_std
    store = GradientStore(tmp_path / "s")
    store.extract(EXT, qwen, first, objective)
    with pytest.raises(
        GradAlignError,
        match=rf"GradientStore\.extract: the rows stored at .* were prepared with another batch's "
        rf"statistics \({statistic}: stored \S+, got \S+\).*new path.*same rollouts",
    ):
        store.extract(EXT, qwen, pool, objective)
    assert len(GradientStore(tmp_path / "s")) == len(first.unique_groups)  # nothing added
    assert store.extract(EXT, qwen, first, objective) == 0  # the same batch still resumes


@pytest.mark.parametrize(
    "objective",
    [GRPOObjective(), GRPOObjective(loss_agg="seq-mean-token-sum-norm", max_response_length=9)],
)
def test_extending_is_allowed_where_no_batch_statistic_counts(
    qwen: nn.Module, pool: Rollouts, tmp_path: Path, objective: GRPOObjective
) -> None:
    first = _shorter_responses(pool)
    store = GradientStore(tmp_path / "s")
    store.extract(EXT, qwen, first, objective)
    assert store.extract(EXT, qwen, pool, objective) == 12 - len(first.unique_groups)
    torch.testing.assert_close(
        store.load().grads, EXT.per_group(qwen, pool, objective).grads, rtol=1e-4, atol=1e-6
    )


class _Negated(Objective):
    """An objective of the user's own: the store cannot know which statistics it uses."""

    def prepare(self, rollouts: Rollouts, stats: BatchStats | None = None) -> TokenWeights:
        tw = GRPOObjective().prepare(rollouts, stats)
        return TokenWeights(-tw.advantages, tw.aggregation, tw.response_mask, tw.row_zero_spread)


def test_other_objectives_record_every_batch_statistic(
    qwen: nn.Module, pool: Rollouts, tmp_path: Path
) -> None:
    objective, first = _Negated(), _shorter_responses(pool)
    store = GradientStore(tmp_path / "s")
    store.extract(EXT, qwen, first, objective)
    with pytest.raises(GradAlignError, match=r"another batch's statistics \(count: stored"):
        store.extract(EXT, qwen, pool, objective)


def test_store_from_before_batch_records_refuses_a_batch_objective(
    qwen: nn.Module, pool: Rollouts, tmp_path: Path
) -> None:
    objective = GRPOObjective(scale_rewards="batch")
    GradientStore(tmp_path / "s").extract(EXT, qwen, pool.select_groups(torch.arange(6)), objective)
    _edit_index(tmp_path / "s", lambda index: index.pop("batch"), legacy=True)
    with pytest.raises(
        GradAlignError, match=r"written before stores recorded batch statistics.*\(reward_std\)"
    ):
        GradientStore(tmp_path / "s").extract(EXT, qwen, pool, objective)
