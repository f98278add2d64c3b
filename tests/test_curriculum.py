"""Tests for gradalign.curriculum: chunk coverage, seeding, exact resume, history, sampler."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from gradalign.curriculum import Curriculum, SelectionSampler
from gradalign.errors import GradAlignError


def _pass_chunks(cur: Curriculum) -> list[torch.Tensor]:
    return [cur.next_chunk() for _ in range(cur.chunks_per_pass)]


def _fake_selection(chunk: torch.Tensor, r: int) -> SimpleNamespace:
    """A deterministic selection: scores and pass rates exact in float32, top half kept."""
    scores = ((chunk * 7 + r) % 11).float() / 8 - 0.5  # (C,)
    accuracy: torch.Tensor | None = (chunk % 5).float() / 4  # (C,)
    if r % 3 == 2:
        accuracy = None  # some rounds report no pass rates
    order = torch.argsort(scores, descending=True, stable=True)[: max(1, len(chunk) // 2)]
    candidates = SimpleNamespace(ids=chunk, scores=scores, accuracy=accuracy)
    return SimpleNamespace(ids=chunk[order], scores=scores[order], candidates=candidates)


def _snapshot(cur: Curriculum) -> dict[str, Any]:
    stats = cur.stats()
    return {
        "histories": [cur.history(i) for i in range(cur.pool_size)],
        "stats": {k: v.tolist() for k, v in vars(stats).items()},
        "selected": cur.selected_ids().tolist(),
        "round": cur.round,
        "pass": cur.pass_index,
    }


# --- Curriculum: chunks -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pool", "chunk"), [(1, 1), (10, 3), (12, 4), (7, 7), (5, 8), (100, 33), (9, 1)]
)
def test_each_pass_covers_the_pool_exactly_once(pool: int, chunk: int) -> None:
    cur = Curriculum(pool_size=pool, chunk_size=chunk, seed=3)
    for p in range(3):
        chunks = _pass_chunks(cur)
        assert cur.pass_index == p
        assert all(c.dtype == torch.int64 for c in chunks)
        sizes = [len(c) for c in chunks]
        last = pool - chunk * (len(chunks) - 1)
        assert sizes == [min(chunk, pool)] * (len(chunks) - 1) + [last]
        assert sorted(torch.cat(chunks).tolist()) == list(range(pool))
    assert cur.round == 3 * cur.chunks_per_pass - 1
    cur.next_chunk()
    assert cur.pass_index == 3


def test_passes_differ_and_seed_determines_everything() -> None:
    def run(seed: int) -> list[list[int]]:
        cur = Curriculum(pool_size=50, chunk_size=7, seed=seed)
        return [torch.cat(_pass_chunks(cur)).tolist() for _ in range(3)]

    a = run(0)
    assert a[0] != a[1] != a[2] != a[0]
    assert run(0) == a
    assert run(1) != a


def test_global_rng_is_untouched() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    cur = Curriculum(pool_size=20, chunk_size=6, seed=0)
    for r in range(5):
        cur.record(_fake_selection(cur.next_chunk(), r))
    list(SelectionSampler(cur, num_generations=2, seed=1))
    assert torch.equal(torch.get_rng_state(), before)


def test_chunks_are_copies() -> None:
    cur, ref = Curriculum(pool_size=6, chunk_size=3), Curriculum(pool_size=6, chunk_size=3)
    cur.next_chunk().fill_(0)
    ref.next_chunk()
    assert cur.next_chunk().tolist() == ref.next_chunk().tolist()


# --- Curriculum: history ------------------------------------------------------------------------


def test_history_after_hand_made_records() -> None:
    cur = Curriculum(pool_size=6, chunk_size=3, seed=0)
    cur.next_chunk()
    cand0 = SimpleNamespace(
        ids=torch.tensor([4, 1, 2]),
        scores=torch.tensor([0.5, -0.25, 0.0]),
        accuracy=torch.tensor([1.0, 0.5, 0.0]),
    )
    cur.record(SimpleNamespace(ids=torch.tensor([4, 1]), scores=None, candidates=cand0))
    cur.next_chunk()
    # no candidate scores: the selection's scores fill in; 3 is selected without being a candidate
    cand1 = SimpleNamespace(ids=torch.tensor([0, 4, 5]), scores=None, accuracy=[0.25, 0.75, 0.5])
    cur.record(torch.tensor([5, 3]), candidates=cand1)
    cur.next_chunk()
    cur.record(SimpleNamespace(ids=torch.tensor([2]), scores=torch.tensor([0.125])))

    assert cur.history(4) == {
        "seen_count": 2,
        "last_round": 1,
        "selected_count": 1,
        "selected_rounds": [0],
        "last_score": 0.5,
        "last_accuracy": 0.75,
        "scores": [(0, 0.5)],
        "accuracies": [(0, 1.0), (1, 0.75)],
    }
    assert cur.history(2) == {
        "seen_count": 2,
        "last_round": 2,
        "selected_count": 1,
        "selected_rounds": [2],
        "last_score": 0.125,
        "last_accuracy": 0.0,
        "scores": [(0, 0.0), (2, 0.125)],
        "accuracies": [(0, 0.0)],
    }
    assert cur.history(3) == {
        "seen_count": 1,
        "last_round": 1,
        "selected_count": 1,
        "selected_rounds": [1],
        "last_score": None,
        "last_accuracy": None,
        "scores": [],
        "accuracies": [],
    }
    stats = cur.stats()
    assert stats.seen.tolist() == [True, True, True, True, True, True]
    assert stats.seen_count.tolist() == [1, 1, 2, 1, 2, 1]
    assert stats.last_round.tolist() == [1, 0, 2, 1, 1, 1]
    assert stats.selected_count.tolist() == [0, 1, 1, 1, 1, 1]
    assert stats.last_score.tolist() == [0.0, -0.25, 0.125, 0.0, 0.5, 0.0]
    assert stats.has_score.tolist() == [False, True, True, False, True, False]
    assert stats.last_accuracy.tolist() == [0.25, 0.5, 0.0, 0.0, 0.75, 0.5]
    assert stats.has_accuracy.tolist() == [True, True, True, False, True, True]
    assert cur.times_selected().tolist() == [0, 1, 1, 1, 1, 1]
    assert cur.selected_ids().tolist() == [2]
    assert cur.num_records == 3


def test_unseen_problem_and_empty_state() -> None:
    cur = Curriculum(pool_size=3, chunk_size=2)
    assert cur.round == -1 and cur.pass_index == 0 and cur.num_records == 0
    assert cur.selected_ids().tolist() == []
    assert cur.history(2)["last_round"] == -1
    stats = cur.stats()
    assert not stats.seen.any() and stats.last_round.tolist() == [-1, -1, -1]
    assert not torch.isnan(stats.last_score).any()


# --- Curriculum: exact resume -------------------------------------------------------------------


def _roundtrip_torch(state: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer)


@pytest.mark.parametrize(
    "roundtrip", [_roundtrip_torch, lambda s: json.loads(json.dumps(s))], ids=["torch", "json"]
)
def test_resume_matches_the_uninterrupted_run(roundtrip: Any) -> None:
    args = {"pool_size": 23, "chunk_size": 5, "seed": 11}  # 3 rounds = mid-pass, 7 = next pass
    full = Curriculum(**args)
    chunks, snapshots = [], []
    for r in range(7):
        chunks.append(full.next_chunk().tolist())
        full.record(_fake_selection(torch.tensor(chunks[-1]), r))
        snapshots.append(_snapshot(full))

    part = Curriculum(**args)
    for r in range(3):
        part.record(_fake_selection(part.next_chunk(), r))
    state = roundtrip(part.state_dict())
    part.next_chunk()  # the saved state must not alias the live object
    resumed = Curriculum(**args)
    resumed.load_state_dict(state)
    assert _snapshot(resumed) == snapshots[2]
    for r in range(3, 7):
        chunk = resumed.next_chunk()
        assert chunk.tolist() == chunks[r]
        resumed.record(_fake_selection(chunk, r))
        assert _snapshot(resumed) == snapshots[r]


def test_resume_between_next_chunk_and_record() -> None:
    full = Curriculum(pool_size=8, chunk_size=3, seed=2)
    full.record(_fake_selection(full.next_chunk(), 0))
    chunk = full.next_chunk()
    resumed = Curriculum(pool_size=8, chunk_size=3, seed=2)
    resumed.load_state_dict(full.state_dict())
    resumed.record(_fake_selection(chunk, 1))
    full.record(_fake_selection(chunk, 1))
    assert _snapshot(resumed) == _snapshot(full)
    assert resumed.next_chunk().tolist() == full.next_chunk().tolist()


# --- Curriculum: errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pool_size": 0, "chunk_size": 1}, r"Curriculum: pool_size must be an int >= 1, got 0"),
        ({"pool_size": 4, "chunk_size": 0}, r"Curriculum: chunk_size must be an int >= 1, got 0"),
        (
            {"pool_size": 4.0, "chunk_size": 2},
            r"Curriculum: pool_size must be an int >= 1, got 4.0",
        ),
        ({"pool_size": 4, "chunk_size": True}, r"chunk_size must be an int >= 1, got True"),
        ({"pool_size": 4, "chunk_size": 2, "seed": "0"}, r"seed must be an int, got '0'"),
    ],
)
def test_bad_constructor_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(GradAlignError, match=match):
        Curriculum(**kwargs)


def test_record_errors_leave_history_unchanged() -> None:
    cur = Curriculum(pool_size=5, chunk_size=3)
    with pytest.raises(GradAlignError, match=r"Curriculum.record: no round has started"):
        cur.record(torch.tensor([0]))
    cur.next_chunk()
    before = _snapshot(cur)
    bad: list[tuple[Any, str]] = [
        (torch.tensor([5]), r"selection.ids must be in \[0, 5\), got \[5\]"),
        (torch.tensor([-1, 2]), r"selection.ids must be in \[0, 5\), got \[-1\]"),
        (torch.tensor([1, 1]), r"selection.ids must not repeat a problem, got \[1, 1\]"),
        (
            torch.tensor([0.0]),
            r"selection.ids must be 1-D integers, got shape \(1,\) torch.float32",
        ),
        (torch.tensor([[0]]), r"selection.ids must be 1-D integers, got shape \(1, 1\)"),
        (SimpleNamespace(ids=[0, 1], scores=[0.5]), r"selection.scores must have shape \(2,\)"),
        (SimpleNamespace(ids=[0], scores=[float("nan")]), r"selection.scores must be finite"),
        (
            SimpleNamespace(ids=[0], candidates=SimpleNamespace(ids=[0, 9])),
            r"candidates.ids must be in \[0, 5\), got \[9\]",
        ),
        (
            SimpleNamespace(ids=[0], candidates=SimpleNamespace(ids=[0], accuracy=[1.0, 0.0])),
            r"candidates.accuracy must have shape \(1,\), got \(2,\)",
        ),
        (SimpleNamespace(ids=[0], candidates=object()), r"candidates.ids must be a tensor"),
    ]
    for selection, match in bad:
        with pytest.raises(GradAlignError, match=r"^Curriculum.record: " + match):
            cur.record(selection)
    assert _snapshot(cur) == before
    cur.record(torch.tensor([0]))
    with pytest.raises(GradAlignError, match=r"Curriculum.record: round 0 is already recorded"):
        cur.record(torch.tensor([1]))
    with pytest.raises(GradAlignError, match=r"Curriculum.history: problem_id must be < N, got 5"):
        cur.history(5)


def test_load_state_dict_errors_leave_the_curriculum_unchanged() -> None:
    cur = Curriculum(pool_size=6, chunk_size=4, seed=1)
    cur.record(_fake_selection(cur.next_chunk(), 0))
    state = cur.state_dict()
    target = Curriculum(pool_size=6, chunk_size=4, seed=1)
    target.next_chunk()
    before = _snapshot(target)
    cases: list[tuple[dict[str, Any], str]] = [
        ({**state, "pool_size": 7}, r"state has pool_size=7, expected 6"),
        ({**state, "chunk_size": 2}, r"state has chunk_size=2, expected 4"),
        ({**state, "seed": 5}, r"state has seed=5, expected 1"),
        ({k: v for k, v in state.items() if k != "offset"}, r"state lacks keys \['offset'\]"),
        (
            {**state, "round": 4, "chunk_rounds": [0, 1, 2, 3, 4]},
            r"round=4, pass_index=0, offset=4 and 5 drawn chunks do not fit",
        ),
        ({**state, "round": 4}, r"chunk_rounds must list the round of every drawn chunk"),
        ({**state, "records": [{**state["records"][0], "round": 3}]}, r"record rounds must rise"),
        (
            {**state, "records": [{**state["records"][0], "seen": [8]}]},
            r"records\[round=0\]: seen must be in \[0, 6\)",
        ),
        ({**state, "records": [{"round": 0}]}, r"records\[round=0\] is malformed"),
    ]
    for bad, match in cases:
        with pytest.raises(GradAlignError, match=r"^Curriculum.load_state_dict: .*" + match):
            target.load_state_dict(bad)
        assert _snapshot(target) == before
    with pytest.raises(GradAlignError, match=r"state has pool_size=6, expected 7"):
        Curriculum(pool_size=7, chunk_size=4, seed=1).load_state_dict(state)


# --- SelectionSampler ---------------------------------------------------------------------------


def _curriculum_with_selection(ids: list[int], pool_size: int = 40) -> Curriculum:
    cur = Curriculum(pool_size=pool_size, chunk_size=pool_size, seed=0)
    cur.next_chunk()
    cur.record(torch.tensor(ids))
    return cur


def test_sampler_repeats_each_problem_consecutively() -> None:
    cur = _curriculum_with_selection([7, 3, 9, 1, 4])
    indices = list(SelectionSampler(cur, num_generations=3, seed=0))
    assert len(indices) == 15
    groups = [indices[i : i + 3] for i in range(0, 15, 3)]
    assert all(len(set(g)) == 1 for g in groups)
    assert sorted(g[0] for g in groups) == [1, 3, 4, 7, 9]


def test_sampler_without_shuffle_keeps_rank_order_and_follows_trl_layout() -> None:
    cur = _curriculum_with_selection([7, 3, 9, 1])
    sampler = SelectionSampler(cur, num_generations=2, shuffle=False, batch_size=2, repeat_count=2)
    expected = [7, 7, 3, 3, 7, 7, 3, 3, 9, 9, 1, 1, 9, 9, 1, 1]
    assert list(sampler) == expected and len(sampler) == len(expected)
    sampler = SelectionSampler(cur, shuffle=False, batch_size=3)  # last block wraps around
    assert list(sampler) == [7, 3, 9, 1, 7, 3]


@pytest.mark.parametrize(("k", "replicas"), [(12, 3), (12, 4), (10, 4), (3, 5), (1, 2)])
def test_sampler_ranks_share_one_order(k: int, replicas: int) -> None:
    cur = _curriculum_with_selection(list(range(2 * k, 3 * k)))
    single = list(SelectionSampler(cur, num_generations=1, seed=5))
    per_rank = [
        list(SelectionSampler(cur, num_generations=2, seed=5, num_replicas=replicas, rank=r))
        for r in range(replicas)
    ]
    size = -(-k // replicas)
    padded = [single[i % k] for i in range(size * replicas)]
    for r, indices in enumerate(per_rank):
        assert len(indices) == 2 * size
        assert indices[::2] == indices[1::2] == padded[r::replicas]
    union = [i for indices in per_rank for i in indices[::2]]
    assert sorted(set(union)) == list(range(2 * k, 3 * k))
    if k % replicas == 0:
        assert len(union) == len(set(union)) == k  # disjoint


def test_sampler_seed_and_epoch() -> None:
    cur = _curriculum_with_selection(list(range(30)))
    sampler = SelectionSampler(cur, seed=0)
    first = list(sampler)
    assert list(sampler) == first
    assert list(SelectionSampler(cur, seed=0)) == first
    assert list(SelectionSampler(cur, seed=1)) != first
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and sorted(second) == sorted(first)
    sampler.set_epoch(0)
    assert list(sampler) == first


def test_sampler_follows_new_selections() -> None:
    cur = Curriculum(pool_size=10, chunk_size=10, seed=0)
    sampler = SelectionSampler(cur, num_generations=2, seed=0)
    assert len(sampler) == 20 and sorted(set(sampler)) == list(range(10))  # whole pool first
    initial = SelectionSampler(cur, shuffle=False, initial_ids=torch.tensor([8, 2]))
    assert list(initial) == [8, 2] and len(initial) == 2

    running = iter(sampler)
    first = next(running)
    chunk = cur.next_chunk()
    cur.record(chunk[:6])
    rest = list(running)  # a running iterator keeps its snapshot
    assert len(rest) == 19 and sorted(set([first, *rest])) == list(range(10))
    order = list(sampler)
    assert sorted(set(order)) == sorted(chunk[:6].tolist()) and len(sampler) == len(order) == 12
    assert list(initial) == chunk[:6].tolist()

    cur.next_chunk()
    cur.record(chunk[:6])  # same selection, new record: a new seeded order
    again = list(sampler)
    assert again != order and sorted(again) == sorted(order)
    assert list(SelectionSampler(cur, num_generations=2, seed=0)) == again


def test_sampler_in_a_dataloader_yields_whole_groups() -> None:
    cur = _curriculum_with_selection([5, 0, 11, 3], pool_size=12)
    dataset = TensorDataset(torch.arange(12) * 10)
    sampler = SelectionSampler(cur, num_generations=4, seed=0)
    batches = [b[0].tolist() for b in DataLoader(dataset, batch_size=8, sampler=sampler)]
    assert len(batches) == 2
    for batch in batches:
        assert batch[:4] == [batch[0]] * 4 and batch[4:] == [batch[4]] * 4
    assert sorted({v // 10 for b in batches for v in b}) == [0, 3, 5, 11]


def test_sampler_errors() -> None:
    cur = Curriculum(pool_size=5, chunk_size=2)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"num_generations": 0}, r"SelectionSampler: num_generations must be an int >= 1, got 0"),
        ({"num_replicas": 2, "rank": 2}, r"SelectionSampler: rank must be < num_replicas=2, got 2"),
        ({"rank": -1}, r"SelectionSampler: rank must be an int >= 0, got -1"),
        ({"repeat_count": 0}, r"SelectionSampler: repeat_count must be an int >= 1, got 0"),
        ({"batch_size": 0}, r"SelectionSampler: batch_size must be an int >= 1, got 0"),
        ({"initial_ids": torch.tensor([5])}, r"SelectionSampler: initial_ids must be in \[0, 5\)"),
    ]
    for kwargs, match in cases:
        with pytest.raises(GradAlignError, match=match):
            SelectionSampler(cur, **kwargs)
    with pytest.raises(GradAlignError, match=r"SelectionSampler: source must have pool_size"):
        SelectionSampler(torch.arange(3))  # type: ignore[arg-type]
    sampler = SelectionSampler(cur)
    with pytest.raises(GradAlignError, match=r"set_epoch: epoch must be an int >= 0, got -1"):
        sampler.set_epoch(-1)
    cur.next_chunk()
    cur.record(torch.tensor([], dtype=torch.int64))
    with pytest.raises(GradAlignError, match=r"SelectionSampler.__iter__: the selection .* empty"):
        iter(sampler)
    with pytest.raises(GradAlignError, match=r"SelectionSampler.__len__: the selection .* empty"):
        len(sampler)


def test_observations_join_the_history_and_pass_rates() -> None:
    cur = Curriculum(pool_size=6, chunk_size=3, seed=0)
    cur.observe([1, 4], [0.5, 1.0], counts=[4, 2])
    chunk = cur.next_chunk()
    cur.record(chunk[:1])
    cur.observe([1], [0.0], counts=[4])
    rates = cur.pass_rates()
    assert rates["count"].tolist() == [0, 8, 0, 0, 2, 0]
    assert rates["mean"].tolist() == [0.0, 0.25, 0.0, 0.0, 1.0, 0.0]  # (0.5 * 4 + 0 * 4) / 8
    assert rates["last"][1].item() == 0.0 and rates["last_observation"].tolist()[1] == 1
    assert cur.history(1)["accuracies"] == [(-1, 0.5), (0, 0.0)]
    assert cur.num_records == 1 and cur.num_observations == 2
    assert cur.selected_ids().tolist() == chunk[:1].tolist()  # observations never select
    again = Curriculum(pool_size=6, chunk_size=3, seed=0)
    again.load_state_dict(cur.state_dict())
    assert again.pass_rates()["mean"].tolist() == rates["mean"].tolist()
    assert again.history(1) == cur.history(1)
    with pytest.raises(GradAlignError, match=r"Curriculum.observe: counts must be"):
        cur.observe([2], [0.5], counts=[0])
    with pytest.raises(GradAlignError, match=r"Curriculum.observe: ids"):
        cur.observe([9], [0.5])
