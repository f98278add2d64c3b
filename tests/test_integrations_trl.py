"""gradalign.integrations.trl against a real ``trl.GRPOTrainer`` on CPU with the tiny test model."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import RepeatSampler

import gradalign as ga
from gradalign.integrations.trl import (
    GradAlignGRPOTrainer,
    StreamingSelectionSampler,
    objective_from_config,
)
from gradalign.testing import tiny_model, tiny_tokenizer
from tests.helpers import assert_selection_stable

# TRL 1.16 calls a transformers 5 alias during training; nothing we can change.
TRL_DEPRECATION = "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # The tiny model's GEMMs are too small to gain from threads; two threads on a shared
    # two-core machine run TRL's generate loop several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(tmp_path: Any, **overrides: Any) -> GRPOConfig:
    settings: dict[str, Any] = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": 8,
        "num_generations": 4,
        "max_completion_length": 8,
        "learning_rate": 5e-3,
        "logging_steps": 10_000,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "bf16": False,
        "activation_checkpointing": False,
        "disable_tqdm": True,
        "seed": 0,
    }
    settings.update(overrides)
    return GRPOConfig(**settings)


def _tokenizer() -> Any:
    tok = tiny_tokenizer()
    tok.padding_side = "left"  # as TRL asks of a processing class
    return tok


def _lowercase_share(completions: list[str], **_: Any) -> list[float]:
    """Easy reward with spread from the start: the share of lowercase letters in 8 characters."""
    return [sum(c.islower() for c in text) / 8 for text in completions]


def _datasets(n_pool: int = 16, n_val: int = 4) -> tuple[Dataset, Dataset]:
    pool = Dataset.from_dict({"prompt": [f"q{i}:" for i in range(n_pool)], "pid": range(n_pool)})
    val = Dataset.from_dict({"prompt": [f"v{i}:" for i in range(n_val)], "pid": range(-n_val, 0)})
    return pool, val


# -- objective_from_config ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loss_type", "loss_agg"),
    [
        ("grpo", "seq-mean-token-mean"),
        ("sapo", "seq-mean-token-mean"),
        ("bnpo", "token-mean"),
        ("dapo", "token-mean"),
        ("cispo", "token-mean"),
        ("vespo", "token-mean"),
        ("dr_grpo", "seq-mean-token-sum-norm"),
        ("luspo", "seq-mean-token-sum"),
    ],
)
def test_objective_from_config_maps_loss_type(tmp_path: Any, loss_type: str, loss_agg: str) -> None:
    obj = objective_from_config(_config(tmp_path, loss_type=loss_type, max_completion_length=12))
    assert obj.loss_agg == loss_agg
    assert obj.max_response_length == (12 if loss_type == "dr_grpo" else None)


@pytest.mark.parametrize(
    ("scale", "expected"),
    [(True, "group"), ("group", "group"), (False, "none"), ("none", "none"), ("batch", "batch")],
)
def test_objective_from_config_maps_scale_rewards(
    tmp_path: Any, scale: bool | str, expected: str
) -> None:
    assert objective_from_config(_config(tmp_path, scale_rewards=scale)).scale_rewards == expected
    raw = SimpleNamespace(loss_type="grpo", scale_rewards=scale)  # before GRPOConfig normalises
    assert objective_from_config(raw).scale_rewards == expected


def test_objective_from_config_clip_kl_and_defaults(tmp_path: Any) -> None:
    default = objective_from_config(_config(tmp_path))
    assert (default.loss_agg, default.scale_rewards) == ("token-mean", "group")  # TRL: dapo
    assert (default.clip_low, default.clip_high, default.kl_coef, default.eps) == (
        0.2,
        None,
        0.0,
        1e-4,
    )
    args = _config(tmp_path, epsilon=0.1, epsilon_high=0.28, beta=0.04)
    obj = objective_from_config(args)
    assert (obj.clip_low, obj.clip_high, obj.kl_coef) == (0.1, 0.28, 0.0)
    assert objective_from_config(args, include_kl=True).kl_coef == 0.04


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"loss_type": "ppo", "scale_rewards": "group"}, "loss_type must be one of"),
        ({"loss_type": "grpo", "scale_rewards": "std"}, "scale_rewards must be"),
        ({"loss_type": "dr_grpo", "scale_rewards": "none"}, "loss_type=.dr_grpo. divides by"),
    ],
)
def test_objective_from_config_rejects(settings: dict[str, Any], match: str) -> None:
    with pytest.raises(ga.GradAlignError, match=f"objective_from_config: {match}"):
        objective_from_config(SimpleNamespace(**settings))


@pytest.mark.parametrize(
    "loss_type", ["grpo", "bnpo", "dapo", "dr_grpo", "luspo", "sapo", "cispo", "vespo"]
)
def test_mapped_objective_matches_trl_loss_gradient(tmp_path: Any, loss_type: str) -> None:
    """One group on-policy: gradalign's group gradient equals the gradient of TRL's own loss."""
    model = tiny_model("qwen2", seed=0)
    pool, _ = _datasets()
    args = _config(
        tmp_path,
        loss_type=loss_type,
        max_completion_length=7,
        scale_rewards="none",
        epsilon_high=5.0,
    )
    trainer = GRPOTrainer(
        model, _lowercase_share, args=args, train_dataset=pool, processing_class=_tokenizer()
    )
    g = torch.Generator().manual_seed(3)
    prompts = torch.randint(2, 90, (4, 3), generator=g)  # equal lengths: no left padding
    lengths = [5, 2, 7, 3]
    completions = [torch.randint(2, 90, (n,), generator=g).tolist() for n in lengths]
    rewards = torch.tensor([0.9, 0.1, 0.4, 0.0])
    rollouts = ga.Rollouts.from_token_ids(prompts.tolist(), completions, rewards, [0, 0, 0, 0])
    objective = objective_from_config(args)
    completion_ids = torch.zeros(4, 7, dtype=torch.long)
    completion_mask = torch.zeros(4, 7, dtype=torch.long)
    for row, ids in enumerate(completions):
        completion_ids[row, : len(ids)] = torch.tensor(ids)
        completion_mask[row, : len(ids)] = 1
    inputs = {
        "prompt_ids": prompts,
        "prompt_mask": torch.ones_like(prompts),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": objective.advantages(rollouts),
        "num_items_in_batch": completion_mask.sum(),
    }
    model.eval()  # TRL's eval mode: no gradient-accumulation divisor
    model.zero_grad()
    trainer.compute_loss(model, inputs).backward()
    ours = ga.FullGradient().per_group(model, rollouts, objective)
    for name, param in model.named_parameters():
        torch.testing.assert_close(
            ours.segment(name)[0], param.grad.flatten(), rtol=1e-4, atol=1e-6, msg=name
        )


# -- StreamingSelectionSampler --------------------------------------------------------------


def _take(stream: Iterator[int], n: int) -> list[int]:
    return [next(stream) for _ in range(n)]


def test_sampler_layout_matches_trl_repeat_sampler() -> None:
    cur = ga.Curriculum(pool_size=6, chunk_size=6)
    ours = StreamingSelectionSampler(
        cur, num_generations=2, batch_size=3, repeat_count=2, shuffle=False
    )
    trl_order = list(
        RepeatSampler(range(6), mini_repeat_count=2, batch_size=3, repeat_count=2, shuffle=False)
    )
    assert _take(iter(ours), len(trl_order)) == trl_order


def test_sampler_switches_to_a_new_selection_at_the_next_block() -> None:
    cur = ga.Curriculum(pool_size=10, chunk_size=5, seed=1)
    sampler = StreamingSelectionSampler(cur, num_generations=2, batch_size=2, seed=4)
    stream = iter(sampler)
    _take(stream, 4)
    cur.next_chunk()
    cur.record(torch.tensor([7, 2, 9]))
    served = _take(stream, 2 * 12)  # six blocks of two problems, two generations each
    assert served[::2] == served[1::2]  # each problem twice in a row
    problems = served[::2]
    # Blocks walk the selection in passes: every run of three serves each problem once.
    assert [set(problems[i : i + 3]) for i in range(0, 12, 3)] == [{2, 7, 9}] * 4
    assert set(sampler.current_ids().tolist()) == {2, 7, 9}


def test_sampler_has_no_length_and_checks_settings() -> None:
    cur = ga.Curriculum(pool_size=4, chunk_size=4)
    with pytest.raises(TypeError):
        len(StreamingSelectionSampler(cur))  # type: ignore[arg-type]
    with pytest.raises(ga.GradAlignError, match="StreamingSelectionSampler: batch_size"):
        StreamingSelectionSampler(cur, batch_size=0)


# -- GradAlignGRPOTrainer -------------------------------------------------------------------


def test_trainer_rejects_unsupported_settings(tmp_path: Any) -> None:
    pool, val = _datasets()
    common = {"processing_class": _tokenizer(), "validation_dataset": val}
    with pytest.raises(ga.GradAlignError, match=r"args\.max_steps must be > 0"):
        GradAlignGRPOTrainer(tiny_model(), _lowercase_share, _config(tmp_path), pool, **common)
    args = _config(tmp_path, max_steps=2)
    with pytest.raises(ga.GradAlignError, match="chunk_size or curriculum, not both"):
        curriculum = ga.Curriculum(pool_size=16, chunk_size=4)
        GradAlignGRPOTrainer(
            tiny_model(),
            _lowercase_share,
            args,
            pool,
            curriculum=curriculum,
            chunk_size=4,
            **common,
        )
    with pytest.raises(ga.GradAlignError, match="must not have a 'gradalign_index' column"):
        tagged = pool.add_column("gradalign_index", list(range(16)))
        GradAlignGRPOTrainer(tiny_model(), _lowercase_share, args, tagged, **common)


@pytest.mark.filterwarnings(TRL_DEPRECATION)
def test_trainer_serves_only_selected_problems(tmp_path: Any) -> None:
    pool, val = _datasets()
    calls: list[tuple[bool, set[int], set[int]]] = []  # (in a round, pids, selection in force)
    trainer: GradAlignGRPOTrainer | None = None

    def recorded(completions: list[str], pid: list[int], **kwargs: Any) -> list[float]:
        assert trainer is not None
        in_force = set(trainer.curriculum.selected_ids().tolist())
        calls.append((trainer.in_selection_round, set(pid), in_force))
        return _lowercase_share(completions)

    trainer = GradAlignGRPOTrainer(
        tiny_model("qwen2", seed=0),
        recorded,
        _config(tmp_path, max_steps=6),
        pool,
        validation_dataset=val,
        processing_class=_tokenizer(),
        selector=ga.GradAlign(policy=ga.policies.TopK(3)),
        chunk_size=8,
        rescore_every=2,
    )
    trainer.train()

    records = trainer.curriculum.state_dict()["records"]
    assert [r["round"] for r in records] == [0, 1, 2]  # before step 1, after steps 2 and 4
    selections = [set(r["selected"]) for r in records]
    assert all(len(s) == 3 for s in selections)
    # Rounds sample in batches of generation_batch_size rows: consecutive calls form one round.
    rounds: list[set[int]] = []
    for k, (in_round, pids, _) in enumerate(calls):
        if in_round and (k == 0 or not calls[k - 1][0]):
            rounds.append(set())
        if in_round:
            rounds[-1] |= pids
    assert len(rounds) == 3
    for pids, selection in zip(rounds, selections, strict=True):
        candidates = {p for p in pids if p >= 0}
        assert len(candidates) == 8 and selection <= candidates  # the chunk, then ...
        assert pids - candidates == {-4, -3, -2, -1}  # ... the validation set
    served = [(pids, in_force) for in_round, pids, in_force in calls if not in_round]
    assert len(served) == 6  # one generation batch per step
    for pids, in_force in served:
        assert pids <= in_force
    # Each selection gets two generation batches of two problems: all three are served.
    for k, selection in enumerate(selections):
        assert set().union(*(pids for pids, _ in served[2 * k : 2 * k + 2])) == selection
    # The batch read ahead before each later round was swapped for a block of the new selection.
    assert trainer.replaced_batches >= 1
    assert trainer.last_selection is not None
    assert set(trainer.last_selection.ids.tolist()) == selections[-1]


@pytest.mark.filterwarnings(TRL_DEPRECATION)
def test_training_with_selection_converges_on_easy_reward(tmp_path: Any) -> None:
    pool, val = _datasets()
    trainer: GradAlignGRPOTrainer | None = None
    means: list[float] = []

    def tracked(completions: list[str], **kwargs: Any) -> list[float]:
        rewards = _lowercase_share(completions)
        assert trainer is not None
        if not trainer.in_selection_round:
            means.append(sum(rewards) / len(rewards))
        return rewards

    trainer = GradAlignGRPOTrainer(
        tiny_model("qwen2", seed=0),
        tracked,
        _config(tmp_path, max_steps=30, learning_rate=1e-2),
        pool,
        validation_dataset=val,
        processing_class=_tokenizer(),
        chunk_size=8,
        rescore_every=10,
    )
    trainer.train()
    assert len(means) == 30
    early, late = sum(means[:5]) / 5, sum(means[-5:]) / 5
    assert trainer.curriculum.num_records >= 1
    assert late > early + 0.4, (early, late)


# -- rounds with nothing to select --------------------------------------------------------------


def _constant(completions: list[str], **_: Any) -> list[float]:
    return [1.0 for _ in completions]


@pytest.mark.filterwarnings(TRL_DEPRECATION)
@pytest.mark.parametrize("on_empty", ["previous", "all", "random", "error"])
def test_a_round_without_reward_spread_falls_back_loudly(tmp_path: Any, on_empty: str) -> None:
    pool, val = _datasets()
    trainer = GradAlignGRPOTrainer(
        tiny_model("qwen2", seed=0),
        _constant,
        _config(tmp_path, max_steps=2),
        pool,
        validation_dataset=val,
        processing_class=_tokenizer(),
        selector=ga.GradAlign(policy=ga.policies.TopFraction(0.5)),
        chunk_size=8,
        rescore_every=10,
        on_empty=on_empty,
    )
    if on_empty == "error":
        with (
            pytest.raises(ga.GradAlignError, match=r"every validation group has zero reward"),
            pytest.warns(UserWarning, match="on_empty='error'"),
        ):
            trainer.run_selection_round()
        return
    with pytest.warns(UserWarning, match=r"round 0 at step 0: every validation group has zero"):
        out = trainer.run_selection_round()
    assert trainer.fallback_rounds == 1
    assert trainer._metrics["train"]["gradalign/fallback"] == [1.0]
    chunk = trainer.curriculum.state_dict()  # the round's chunk is the first of pass 0
    if on_empty == "previous":
        assert out is None and trainer.curriculum.num_records == 0
        return
    assert out is not None
    (record,) = chunk["records"]
    if on_empty == "all":
        assert len(record["selected"]) == 8
    else:
        assert len(record["selected"]) == 4  # half the chunk before any selection


def test_on_empty_is_checked(tmp_path: Any) -> None:
    pool, val = _datasets()
    with pytest.raises(ga.GradAlignError, match=r"on_empty must be one of"):
        GradAlignGRPOTrainer(
            tiny_model(),
            _constant,
            _config(tmp_path, max_steps=2),
            pool,
            validation_dataset=val,
            processing_class=_tokenizer(),
            on_empty="skip",
        )


# -- several processes (torchrun, gloo on CPU) --------------------------------------------------


def _torchrun(out: Any, n: int, *extra: str) -> list[dict[str, Any]]:
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as sock:  # a free port for this run's rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n)]
    cmd += ["--master_port", str(port), "-m", "tests.trl_worker", str(out), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    files = sorted(Path(out).glob("rank*.json"))
    assert len(files) == n, proc.stderr[-3000:]
    return [json.loads(f.read_text()) for f in files]


@pytest.mark.distributed
def test_two_processes_select_once_and_serve_each_rank_its_part(tmp_path: Any) -> None:
    one = _torchrun(tmp_path / "one", 1)[0]
    two = _torchrun(tmp_path / "two", 2)
    assert all(r["error"] is None for r in [one, *two]), [r["error"] for r in [one, *two]]
    # Every rank records the same selections: the selection is computed once, for all ranks.
    assert two[0]["selections"] == two[1]["selections"]
    assert len(two[0]["selections"]) == 2
    # The first round scores the same policy with the same rollouts (seeded per generation call,
    # not per process): the 2-process selection equals the 1-process one, where the 1-process
    # scores leave no near-tie at the cut (the all-reduce sums in another order).
    first = one["records"][0]
    table = ga.Candidates(
        ids=torch.tensor(first["scores_ids"]), scores=torch.tensor(first["scores"])
    )
    assert_selection_stable(ga.policies.TopK(3), table, one["selections"][0])
    assert two[0]["selections"][0] == one["selections"][0]
    # Each rank trains on its half of every generation batch, and only on selected problems.
    for rank in two:
        first, second = rank["served"][:8], rank["served"][8:]
        assert set(first) <= set(two[0]["selections"][0])
        assert set(second) <= set(two[0]["selections"][1])
    both = two[0]["served"][:8] + two[1]["served"][:8]
    assert set(both) == set(two[0]["selections"][0])


@pytest.mark.distributed
def test_a_stalled_rank_fails_the_round_within_the_timeout(tmp_path: Any) -> None:
    ranks = _torchrun(tmp_path / "stall", 2, "--stall-rank", "1", "--stall", "9")
    error = ranks[0]["error"]
    assert error is not None and error.startswith(
        "GradAlign: rank 1 did not reach selection round 1 within 5 s"
    ), error
    assert ranks[0]["waited"] < 5 + 10  # the first round and two steps, then the 5 s timeout
