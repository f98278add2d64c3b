"""gradalign.integrations.verl against verl's DataProto layout, its dataloader and its v1 buffer.

Every test runs on a stand-in DataProto (``.batch`` tensors, ``.non_tensor_batch`` numpy object
arrays, the field names of verl's ``ray_trainer``); where verl imports (``make test`` installs verl
0.9.1 without its dependencies), the same tests also run on verl's own ``DataProto``. verl 0.7's
``data.sampler`` loader runs where ``verl.experimental.dataset.sampler`` exists. Rows of one uid
are never contiguous, as after verl's batch balancing.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import gradalign.integrations.verl as gverl
from gradalign import GradAlign, GradAlignError, Rollouts
from gradalign.integrations.verl import (
    GradAlignSampler,
    group_batch,
    rollouts_from_dataproto,
)
from gradalign.policies import TopK

P, R = 5, 4  # prompt and response columns
# (uid, dataset index, prompt length, response lengths, rewards): problem 4 is sampled twice.
PROMPTS = [
    ("u-a", 4, 3, [2, 4], [1.0, 0.0]),
    ("u-b", 1, 5, [1, 3], [1.0, 1.0]),
    ("u-c", 7, 2, [4, 2], [0.0, 1.0]),
    ("u-d", 4, 3, [3, 1], [1.0, 1.0]),
]
ROW_ORDER = [5, 0, 3, 6, 1, 7, 2, 4]  # row i of the batch is rollout ROW_ORDER[i]
POOL = 10


@dataclass
class StandInDataProto:
    """verl's DataProto as seen by a sampler: per-row tensors and per-row numpy object arrays."""

    batch: dict[str, torch.Tensor]
    non_tensor_batch: dict[str, np.ndarray]
    meta_info: dict[str, Any] = field(default_factory=dict)


def _has(module: str) -> bool:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # verl announces the engines it cannot load
        try:
            importlib.import_module(module)
        except ImportError:
            return False
    return True


HAS_VERL = _has("verl.protocol")
HAS_V07_LOADER = HAS_VERL and _has("verl.experimental.dataset.sampler")
HAS_V1 = HAS_VERL and _has("verl.trainer.ppo.v1.replay_buffer")

KINDS = [
    "stand-in",
    pytest.param("verl", marks=pytest.mark.skipif(not HAS_VERL, reason="no verl")),
]


def _rollouts_by_hand(vocab: int, seed: int) -> list[dict[str, Any]]:
    """One dict per rollout (in ROW_ORDER): prompt/response token lists, reward, uid, index."""
    g = torch.Generator().manual_seed(seed)
    flat = []
    for uid, index, plen, rlens, rewards in PROMPTS:
        prompt = torch.randint(2, vocab, (plen,), generator=g).tolist()
        for rlen, reward in zip(rlens, rewards, strict=True):
            response = torch.randint(2, vocab, (rlen,), generator=g).tolist()
            flat.append(
                {
                    "uid": uid,
                    "index": index,
                    "prompt": prompt,
                    "response": response,
                    "reward": reward,
                    "logp": (-torch.rand(rlen, generator=g)).tolist(),
                }
            )
    return [flat[i] for i in ROW_ORDER]


def _proto(kind: str, rows: list[dict[str, Any]], *, index: bool = True) -> Any:
    """verl's layout: left-padded prompts, right-padded responses, reward on the last token."""
    s = len(rows)
    prompts = torch.zeros(s, P, dtype=torch.long)
    responses = torch.zeros(s, R, dtype=torch.long)
    prompt_mask = torch.zeros(s, P, dtype=torch.long)
    response_mask = torch.zeros(s, R, dtype=torch.long)
    scores = torch.zeros(s, R)
    old = torch.zeros(s, R)
    for i, row in enumerate(rows):
        plen, rlen = len(row["prompt"]), len(row["response"])
        prompts[i, P - plen :] = torch.tensor(row["prompt"])
        prompt_mask[i, P - plen :] = 1
        responses[i, :rlen] = torch.tensor(row["response"])
        response_mask[i, :rlen] = 1
        scores[i, rlen - 1] = row["reward"]
        old[i, :rlen] = torch.tensor(row["logp"])
    tensors = {
        "prompts": prompts,
        "responses": responses,
        "input_ids": torch.cat([prompts, responses], 1),
        "attention_mask": torch.cat([prompt_mask, response_mask], 1),
        "response_mask": response_mask,
        "token_level_scores": scores,
        "token_level_rewards": scores - 0.25 * response_mask,  # a KL-in-reward penalty
        "old_log_probs": old,
    }
    non_tensors = {
        "uid": np.array([r["uid"] for r in rows], dtype=object),
        "extra_info": np.array(
            [{"index": r["index"], "split": "train"} for r in rows], dtype=object
        ),
        "data_source": np.array(["toy"] * s, dtype=object),
    }
    if index:
        non_tensors["index"] = np.array([r["index"] for r in rows], dtype=object)
    if kind == "verl":
        from verl import DataProto

        return DataProto.from_dict(tensors=tensors, non_tensors=non_tensors)
    return StandInDataProto(tensors, non_tensors)


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture()
def rows() -> list[dict[str, Any]]:
    return _rollouts_by_hand(vocab=100, seed=0)


def test_group_batch_groups_by_uid_not_position(kind: str, rows: list[dict[str, Any]]) -> None:
    groups = group_batch(_proto(kind, rows))
    assert groups.uids == ("u-c", "u-a", "u-b", "u-d")  # order of first appearance
    assert groups.group_ids.tolist() == [7, 4, 1, 4]
    assert [groups.uids[g] for g in groups.row_group.tolist()] == [r["uid"] for r in rows]
    assert groups.rewards.tolist() == [r["reward"] for r in rows]
    assert groups.row_ids.tolist() == [r["index"] for r in rows]
    ids, counts, means = groups.problem_pass_rates()  # the two uids of problem 4 merge
    assert ids.tolist() == [1, 4, 7] and counts.tolist() == [2, 4, 2]
    assert means.tolist() == pytest.approx([1.0, 0.75, 0.5])
    kl = group_batch(_proto(kind, rows), reward_key="token_level_rewards")
    lengths = torch.tensor([len(r["response"]) for r in rows])
    torch.testing.assert_close(kl.rewards, groups.rewards - 0.25 * lengths)


def test_index_from_extra_info_and_its_errors(kind: str, rows: list[dict[str, Any]]) -> None:
    groups = group_batch(_proto(kind, rows, index=False))
    assert groups.group_ids.tolist() == [7, 4, 1, 4]
    shifted = group_batch(_proto(kind, rows), index_to_position={1: 0, 4: 2, 7: 9})
    assert shifted.group_ids.tolist() == [9, 2, 0, 2]
    assert group_batch(_proto(kind, rows), index_key=None).group_ids.tolist() == [0, 1, 2, 3]
    bad = [dict(r) for r in rows]
    bad[0]["index"] = 5  # a row of u-c (index 7) claims another problem
    with pytest.raises(
        GradAlignError,
        match=r"group_batch: the rows of one uid must share one index, got \{'u-c': \[5, 7\]\}",
    ):
        group_batch(_proto(kind, bad))
    with pytest.raises(GradAlignError, match=r"values \[1\] are not in the dataset's index map"):
        group_batch(_proto(kind, rows), index_to_position={4: 0, 7: 1})
    with pytest.raises(GradAlignError, match="batch must be a verl DataProto"):
        group_batch({"uid": [1]})


def test_rollouts_from_dataproto_matches_a_hand_packing(
    kind: str, rows: list[dict[str, Any]]
) -> None:
    ro = rollouts_from_dataproto(_proto(kind, rows), include_logprobs=True)
    expected = Rollouts.from_token_ids(
        [r["prompt"] for r in rows],
        [r["response"] for r in rows],
        [r["reward"] for r in rows],
        [r["index"] for r in rows],
    )
    assert torch.equal(ro.input_ids, expected.input_ids)
    assert torch.equal(ro.attention_mask, expected.attention_mask)
    assert torch.equal(ro.response_mask, expected.response_mask)
    assert torch.equal(ro.rewards, expected.rewards)
    assert ro.group_ids.tolist() == [r["index"] for r in rows]
    assert ro.unique_groups.tolist() == [1, 4, 7]
    for i, r in enumerate(rows):  # old log-probs sit on the response tokens they belong to
        assert ro.old_logprobs[i][ro.response_mask[i]].tolist() == pytest.approx(r["logp"])
    assert ro.ref_logprobs is None


def test_sampler_update_records_pass_rates_by_problem(
    kind: str, rows: list[dict[str, Any]]
) -> None:
    seen: list[int] = []
    sampler = GradAlignSampler(
        range(POOL), {"gradalign": {}}, on_update=lambda s, b: seen.append(s.num_updates)
    )
    sampler.update(_proto(kind, rows))
    rates = sampler.pass_rates
    assert rates["count"].tolist() == [0, 2, 0, 0, 4, 0, 0, 2, 0, 0]
    assert rates["mean"][[1, 4, 7]].tolist() == pytest.approx([1.0, 0.75, 0.5])
    assert rates["last_update"][[0, 1, 4, 7]].tolist() == [-1, 0, 0, 0]
    flipped = [dict(r, reward=1.0 - r["reward"]) for r in rows]
    sampler.update(_proto(kind, flipped))
    rates = sampler.pass_rates
    assert rates["count"][4].item() == 8 and rates["mean"][4].item() == pytest.approx(0.5)
    assert rates["last"][[1, 4, 7]].tolist() == pytest.approx([0.0, 0.25, 0.5])
    assert seen == [1, 2]
    with pytest.raises(GradAlignError, match=r"indices must be in \[0, 5\), got \[7\]"):
        GradAlignSampler(range(5), {}).update(_proto(kind, rows))


def _load_module(path: str) -> Any:
    """verl's ``load_module``: ``pkg://dotted.name`` or a file path."""
    if path.startswith("pkg://"):
        return importlib.import_module(path[len("pkg://") :])
    spec = importlib.util.spec_from_file_location("gradalign_verl_sampler_file", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _create_rl_sampler(data_config: Any, dataset: Any, kind: str) -> Any:
    """verl 0.7's ``create_rl_sampler`` for a ``data.sampler.class_path`` (its loader if present)."""
    path, name = data_config["sampler"]["class_path"], data_config["sampler"]["class_name"]
    if kind == "verl" and HAS_V07_LOADER:
        from verl.experimental.dataset.sampler import AbstractSampler
        from verl.utils.import_utils import load_extern_object

        sampler = load_extern_object(path, name)(data_source=dataset, data_config=data_config)
        assert isinstance(sampler, AbstractSampler)
        return sampler
    return getattr(_load_module(path), name)(data_source=dataset, data_config=data_config)


@pytest.mark.parametrize("form", ["pkg", "file"])
def test_loaded_from_class_path_like_verl(kind: str, form: str, rows: list[dict[str, Any]]) -> None:
    path = "pkg://gradalign.integrations.verl" if form == "pkg" else gverl.__file__
    config = {
        "sampler": {"class_path": path, "class_name": "GradAlignSampler"},
        "dataloader_num_workers": 0,
        "train_batch_size": 4,
        "seed": 3,
        "gradalign": {"chunk_size": 4, "select_k": 3},
    }
    if kind == "verl":
        from omegaconf import OmegaConf

        config = OmegaConf.create(config)
    sampler = _create_rl_sampler(config, list(range(POOL)), kind)
    assert type(sampler).__name__ == "GradAlignSampler"
    assert sampler.settings.seed == 3 and sampler.curriculum.chunk_size == 4
    first = list(sampler)
    assert len(first) == len(sampler) == 12 and set(first) == set(range(POOL))  # padded to 3 x 4
    chunk = sampler.next_candidates()
    sampler.record(chunk[:3])
    served = list(sampler)
    assert len(served) == 4 and set(served) == set(chunk[:3].tolist())  # one padded batch
    sampler.update(_proto(kind, rows))
    state = sampler.state_dict()
    fresh = _create_rl_sampler(config, list(range(POOL)), kind)
    fresh.load_state_dict(state)
    assert list(fresh) == served and fresh.state_dict() == state
    if kind == "verl" and HAS_V07_LOADER:
        from verl.experimental.dataset.sampler import AbstractCurriculumSampler

        assert isinstance(sampler, AbstractCurriculumSampler)


def test_score_and_select_serves_the_gradalign_selection(qwen: torch.nn.Module, kind: str) -> None:
    vocab = qwen.config.vocab_size
    sampler = GradAlignSampler(range(POOL), {"gradalign": {"select_k": 2, "shuffle": False}})
    with pytest.raises(GradAlignError, match="call next_candidates"):
        sampler.score_and_select(qwen, None, None)
    sampler.next_candidates()
    cands = rollouts_from_dataproto(_proto(kind, _rollouts_by_hand(vocab, seed=1)))
    val_rows = _rollouts_by_hand(vocab, seed=2)
    val = rollouts_from_dataproto(_proto(kind, val_rows), index_key=None)  # groups by uid alone
    assert val.unique_groups.tolist() == [0, 1, 2, 3]
    # Groups by uid alone get ordinals 0..3; one collides with a candidate id: a warning says so.
    with pytest.warns(UserWarning, match=r"group ids \[1\] are both candidates and validation"):
        sel = sampler.score_and_select(qwen, cands, val)
    with pytest.warns(UserWarning, match="are both candidates and validation"):
        ref = GradAlign(policy=TopK(2)).select(qwen, cands, val)
    assert sel.ids.tolist() == ref.ids.tolist()
    assert list(sampler) == ref.ids.tolist()
    assert sampler.curriculum.history(int(ref.ids[0]))["selected_count"] == 1


def test_settings_are_checked() -> None:
    with pytest.raises(GradAlignError, match=r"unknown data.gradalign keys \['chunksize'\]"):
        GradAlignSampler(range(3), {"gradalign": {"chunksize": 2}})
    with pytest.raises(GradAlignError, match="dataloader_num_workers must be 0"):
        GradAlignSampler(range(3), {"dataloader_num_workers": 8})
    with pytest.raises(GradAlignError, match=r"on_update must be 'package\.module:function'"):
        GradAlignSampler(range(3), {"gradalign": {"on_update": "gradalign:nothing_here"}})
    hook = GradAlignSampler(range(3), {"gradalign": {"on_update": "builtins:print"}})
    assert hook._on_update is print
    with pytest.raises(GradAlignError, match="selection is empty"):
        sampler = GradAlignSampler(range(3), None)
        sampler.next_candidates()
        sampler.record([])


def test_module_imports_without_verl(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without verl the sampler is a plain torch Sampler (verl >= 0.8 has no curriculum base)."""
    monkeypatch.setitem(sys.modules, "verl", None)
    monkeypatch.setitem(sys.modules, "verl.experimental.dataset.sampler", None)
    module = _load_module(str(Path(gverl.__file__)))
    assert module.GradAlignSampler.__mro__[1] is torch.utils.data.Sampler


def test_old_score_key_was_removed_in_0_3() -> None:
    with pytest.raises(GradAlignError, match=r"unknown data.gradalign keys \['score'\]"):
        GradAlignSampler(range(3), {"gradalign": {"score": "inner_product"}})


# -- verl 0.9: the v1 trainer's replay buffer, and RayPPOTrainer(train_sampler=...) -----------------

V1 = pytest.mark.skipif(not HAS_V1, reason="no verl v1 trainer (verl >= 0.9)")
VERL_IMPORT_WARNINGS = "ignore::UserWarning"  # verl lists the engines it cannot load


class FakeTransferQueue:
    """The TransferQueue calls a replay buffer makes, over a dict (the real one is a Ray service).

    Prompt keys are uids with ``{"is_prompt": True, "status", "global_steps"}`` tags; trajectory
    keys are ``{uid}_{session}_{index}``. ``dispatch(n)`` is the trainer's refill: n new prompts
    whose k rollouts finish at once.
    """

    def __init__(self, k: int = 2) -> None:
        self.k, self.data, self.dispatched, self._next = k, {"train": {}}, [], 0

    def add(self, uid: str, step: int = 0) -> None:
        part = self.data["train"]
        part[uid] = {"is_prompt": True, "status": "finished", "global_steps": step}
        for s in range(self.k):
            part[f"{uid}_{s}_0"] = {"status": "finished", "reward": 1.0}

    def dispatch(self, n: int) -> int:
        self.dispatched.append(n)
        for _ in range(n):
            self.add(f"r{self._next}", step=1)
            self._next += 1
        return n

    def kv_list(self) -> dict[str, dict[str, dict]]:
        return {p: dict(items) for p, items in self.data.items()}

    def kv_clear(self, partition_id: str, keys: list[str]) -> None:
        for key in keys:
            self.data[partition_id].pop(key, None)


def _buffer(monkeypatch: pytest.MonkeyPatch, scorer: Any, **kwargs: Any) -> tuple[Any, Any]:
    import verl.trainer.ppo.v1.replay_buffer as rb

    from gradalign.integrations.verl_v1 import GradAlignReplayBuffer

    fake = FakeTransferQueue()
    for name in ("kv_list", "kv_clear"):
        monkeypatch.setattr(rb.tq, name, getattr(fake, name))
    buffer = GradAlignReplayBuffer(
        "sync",
        {},
        None,
        "drop",
        {"scorer": scorer, **kwargs},
        poll_interval=0.0,
        refill_fn=fake.dispatch,
    )
    return buffer, fake


@V1
@pytest.mark.filterwarnings(VERL_IMPORT_WARNINGS)
def test_v1_buffer_trains_on_the_best_aligned_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def scorer(partition_id: str, uids: list[str], trajectories: dict) -> dict[str, float]:
        assert partition_id == "train" and all(f"{u}_0_0" in trajectories for u in uids)
        calls.append(list(uids))
        return {u: {"u7": 0.1, "u3": -0.5, "r0": 0.9, "r1": 0.4}[u] for u in uids}

    buffer, fake = _buffer(monkeypatch, scorer, select_fraction=0.5)
    fake.add("u7")
    fake.add("u3")
    batch, _ = buffer.sample(global_steps=1, partition_id="train", batch_size=2)
    assert fake.dispatched == [2]  # two more prompts, to choose 2 of 4 finished groups
    assert sorted(calls[0]) == ["r0", "r1", "u3", "u7"]
    assert sorted({key.split("_")[0] for key in batch.keys}) == ["r0", "r1"]
    assert len(batch.keys) == 4  # both rollouts of each chosen group
    assert not {k for k in fake.data["train"] if k.split("_")[0] in {"u3", "u7"}}  # discarded
    assert buffer.last_scores["r0"] == 0.9 and buffer.num_selections == 1


@V1
@pytest.mark.filterwarnings(VERL_IMPORT_WARNINGS)
def test_v1_buffer_settings_and_scorer_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    from gradalign.integrations.verl_v1 import GradAlignReplayBuffer

    with pytest.raises(GradAlignError, match=r"sampler_kwargs\.scorer is required"):
        GradAlignReplayBuffer("sync", {}, None, "drop", {}, refill_fn=print)
    with pytest.raises(GradAlignError, match="only trainer_mode='sync'"):
        GradAlignReplayBuffer("async", {}, None, "drop", {"scorer": print}, refill_fn=print)
    with pytest.raises(GradAlignError, match=r"unknown sampler_kwargs \['fraction'\]"):
        GradAlignReplayBuffer("sync", {}, None, "drop", {"scorer": print, "fraction": 1})
    buffer, fake = _buffer(monkeypatch, lambda **kw: {"u1": float("nan")}, select_fraction=1.0)
    fake.add("u1")
    with pytest.raises(GradAlignError, match=r"non-finite scores for \['u1'\]"):
        buffer.sample(global_steps=1, partition_id="train", batch_size=1)
    with pytest.raises(GradAlignError, match=r"scorer must be 'package\.module:function'"):
        _buffer(monkeypatch, "gradalign.integrations.verl:nothing", select_fraction=1.0)


@V1
@pytest.mark.filterwarnings(VERL_IMPORT_WARNINGS)
def test_ray_ppo_trainer_dataloader_serves_the_selection() -> None:
    """verl 0.9's RayPPOTrainer builds its train dataloader around a train_sampler we give."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer

    sampler = GradAlignSampler(
        range(POOL), OmegaConf.create({"train_batch_size": 2, "gradalign": {"chunk_size": 5}})
    )
    config = OmegaConf.create(
        {
            "data": {"train_batch_size": 2, "dataloader_num_workers": 0, "val_batch_size": None},
            "trainer": {"total_epochs": 1, "total_training_steps": None},
        }
    )
    stub = SimpleNamespace(config=config)
    rows = [{"index": i} for i in range(POOL)]
    RayPPOTrainer._create_dataloader(
        stub, rows, rows[:2], lambda b: [r["index"] for r in b], sampler
    )
    first = [i for batch in stub.train_dataloader for i in batch]
    assert sorted(first) == list(range(POOL))  # the whole pool before any selection
    chunk = sampler.next_candidates()
    sampler.record(chunk[:2])
    served = [i for batch in stub.train_dataloader for i in batch]
    assert sorted(served) == sorted(chunk[:2].tolist())
