"""GradAlign over two gloo processes: the same selection as one process, and no hang on a dead rank.

One ``torch.multiprocessing.spawn`` of two ranks runs every scenario (process start-up dominates the
cost); the ranks write their results to files and the parent compares them with single-process runs.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gradalign import GradAlign, GradAlignError, GRPOObjective, Rollouts
from gradalign.distributed import Distributed, check_distributed_option, resolve
from gradalign.extractors import FactorizedGradient, FullGradient, RandomProjectedGradient
from gradalign.policies import Chain, DiverseTopK, DropZeroVariance, TopFraction, TopK
from gradalign.testing import tiny_model
from tests.helpers import assert_selection_stable, make_rollouts

pytestmark = pytest.mark.distributed

CAND_IDS = [40, 3, 17, 8, 25, 11, 30, 2]  # not sorted, not contiguous
CAND_REWARDS = [
    1,
    0,
    1,
    1,
    1,
    1,
    0,
    0,
    1,
    1,
    0,
    0,
    0,
    1,
    1,
    0,
    0,
    0,
    1,
    0,
    0,
    1,
    1,
    0,
]  # 3 per group
VAL_IDS = [101, 100, 103, 102, 104]
VAL_REWARDS = [1, 0, 0, 1, 1, 0, 1, 1, 0, 1]  # 2 per group; group 103 has no spread
TASKS = {100: "math", 101: "code", 102: "math", 103: "code", 104: "math"}
DEAD_RANK_TIMEOUT = 2.0


def _data(vocab: int) -> tuple[Rollouts, Rollouts]:
    cands = make_rollouts(
        vocab=vocab,
        groups=[g for g in CAND_IDS for _ in range(3)],
        rewards=[float(r) for r in CAND_REWARDS],
        seed=21,
        max_response=8,
    )
    val = make_rollouts(
        vocab=vocab,
        groups=[g for g in VAL_IDS for _ in range(2)],
        rewards=[float(r) for r in VAL_REWARDS],
        seed=20,
        max_response=8,
    )
    return cands, val


def _scenario(name: str) -> tuple[dict[str, Any], dict[int, str] | None]:
    """GradAlign settings and tasks of a scenario (built from its name in every process)."""
    if name == "mean-cosine":
        return {"extractor": FullGradient(), "policy": TopK(3)}, None
    if name == "batch-inner-product-tasks":
        return {
            "extractor": FullGradient(group_chunk=2),
            "objective": GRPOObjective(scale_rewards="none", loss_agg="seq-mean-token-sum-norm"),
            "scorer": "inner_product",
            "target": "batch",
            "policy": Chain(DropZeroVariance(), TopFraction(0.5)),
        }, TASKS
    if name == "batch-scaled-rewards":  # each shard's reward std differs from the whole batch's
        return {
            "extractor": FactorizedGradient(4, 4, batch_size=4),
            "objective": GRPOObjective(scale_rewards="batch"),
            "scorer": "inner_product",  # scales with the advantages, unlike the cosine
            "policy": TopK(3),
        }, None
    if name == "normalized-projected-grads":
        return {
            "extractor": RandomProjectedGradient(
                dim=64, seed=4
            ),  # seed 3 tied groups 3 and 11 at the cut
            "target": "normalized-mean",
            "keep_grads": True,
            "policy": DiverseTopK(4, redundancy=0.3),
        }, None
    raise KeyError(name)


SCENARIOS = (
    "mean-cosine",
    "batch-inner-product-tasks",
    "batch-scaled-rewards",
    "normalized-projected-grads",
)


def _shard(ro: Rollouts, ids: list[int]) -> Rollouts | None:
    return ro.select_groups(ids) if ids else None


def _shards(rank: int, name: str) -> tuple[list[int], list[int]]:
    """Candidate and validation group ids of ``rank``; uneven, and rank 1 may have no validation."""
    if name == "normalized-projected-grads":  # rank 0 holds all validation, rank 1 most candidates
        return (CAND_IDS[:2], VAL_IDS) if rank == 0 else (CAND_IDS[2:], [])
    return CAND_IDS[rank::2], VAL_IDS[rank::2]


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=60),
    )
    # One group per failure case: a group that failed once is not used again.
    late_groups = {case: dist.new_group(backend="gloo") for case in ("hung", "dead")}
    model = tiny_model("qwen2", seed=0)
    cands, val = _data(model.config.vocab_size)
    results: dict[str, Any] = {}
    for name in SCENARIOS:
        settings, tasks = _scenario(name)
        cand_ids, val_ids = _shards(rank, name)
        sel = GradAlign(**settings).select(
            model, _shard(cands, cand_ids), _shard(val, val_ids), tasks=tasks
        )
        results[name] = {"ids": sel.ids, "scores": sel.scores, "table": sel.candidates.to_dict()}
    try:  # every rank passing the whole pool is a mistake that must be named
        GradAlign().select(model, cands, val)
    except GradAlignError as exc:
        results["duplicates"] = str(exc)
    # One rank with another extractor seed, k or model: both ranks must refuse, naming the field.
    mismatched = {
        "seed": (GradAlign(RandomProjectedGradient(dim=64, seed=rank)), model),
        "k": (GradAlign(policy=TopK(2 + rank)), model),
        "model": (GradAlign(), tiny_model("qwen2", seed=rank)),
    }
    for case, (selector, m) in mismatched.items():
        try:
            selector.select(m, _shard(cands, CAND_IDS[rank::2]), _shard(val, VAL_IDS[rank::2]))
            results[f"mismatch-{case}"] = "no error"
        except GradAlignError as exc:
            results[f"mismatch-{case}"] = str(exc)
    torch.save(results, Path(out) / f"rank{rank}.pt")
    if rank == 1:  # hangs past the timeout, then dies without a word: rank 0 must not wait
        time.sleep(DEAD_RANK_TIMEOUT + 1.5)
        os._exit(0)
    outcome = {"hung": _timed_failure(model, cands, val, late_groups["hung"])}
    time.sleep(2.5)  # rank 1 has exited by now
    outcome["dead"] = _timed_failure(model, cands, val, late_groups["dead"])
    torch.save(outcome, Path(out) / "dead.pt")
    os._exit(0)  # the peer is gone: skip destroy_process_group


def _timed_failure(
    model: torch.nn.Module, cands: Rollouts, val: Rollouts, group: Any
) -> tuple[str, float]:
    start = time.monotonic()
    try:
        GradAlign(distributed=Distributed(group, timeout=DEAD_RANK_TIMEOUT)).select(
            model, _shard(cands, CAND_IDS[::2]), _shard(val, VAL_IDS[::2])
        )
        message = "no error"
    except GradAlignError as exc:
        message = str(exc)
    return message, time.monotonic() - start


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=2, join=True)
    return {
        "ranks": [torch.load(out / f"rank{r}.pt") for r in range(2)],
        "dead": torch.load(out / "dead.pt"),
    }


@pytest.mark.parametrize("name", SCENARIOS)
def test_every_rank_returns_the_single_process_selection(
    two_ranks: dict[str, Any], qwen: torch.nn.Module, name: str
) -> None:
    settings, tasks = _scenario(name)
    cands, val = _data(qwen.config.vocab_size)
    ref = GradAlign(**settings, distributed=False).select(qwen, cands, val, tasks=tasks)
    expected = ref.candidates.to_dict()
    # Ranks run at 1 thread, this process at 2: scores agree to rounding, so selections are
    # compared only where rounding cannot change them.
    assert_selection_stable(settings["policy"], ref.candidates, ref.ids.tolist())
    for rank, results in enumerate(two_ranks["ranks"]):
        got = results[name]
        assert got["ids"].tolist() == ref.ids.tolist(), f"rank {rank}"
        torch.testing.assert_close(got["scores"], ref.scores, rtol=1e-5, atol=1e-6)
        table = got["table"]
        assert table.keys() == expected.keys()
        for field, value in expected.items():
            if field in ("ids", "accuracy", "reward_std", "zero_gradient"):  # exact, per group
                assert torch.equal(table[field], value), (rank, field)
            else:
                torch.testing.assert_close(table[field], value, rtol=1e-5, atol=1e-6)
    first, second = (r[name] for r in two_ranks["ranks"])
    assert torch.equal(first["ids"], second["ids"]) and torch.equal(
        first["scores"], second["scores"]
    )
    assert all(torch.equal(first["table"][k], second["table"][k]) for k in first["table"])


def test_shards_have_different_longest_responses() -> None:
    """Else the "seq-mean-token-sum-norm" scenario would not test the global response length."""
    cands, val = _data(vocab=104)
    for ro, ids in ((cands, CAND_IDS), (val, VAL_IDS)):
        longest = [int(ro.select_groups(ids[r::2]).response_mask.sum(1).max()) for r in (0, 1)]
        assert longest[0] != longest[1]


def test_shards_have_different_reward_spreads() -> None:
    """Else the "batch-scaled-rewards" scenario would not test the global reward std."""
    cands, _ = _data(vocab=104)
    whole = float(cands.rewards.std())
    for r in (0, 1):
        assert abs(float(cands.select_groups(CAND_IDS[r::2]).rewards.std()) - whole) > 0.005


def test_group_ids_on_two_ranks_are_named(two_ranks: dict[str, Any]) -> None:
    for results in two_ranks["ranks"]:
        message = results["duplicates"]
        assert message.startswith("GradAlign.select: validation group ids must be unique")
        assert "100 (ranks [0, 1])" in message


@pytest.mark.parametrize(
    ("case", "field", "shown"),
    [("seed", "extractor", "seed=1"), ("k", "policy", "k=3"), ("model", "model", "ranks [1]")],
)
def test_ranks_with_different_settings_or_models_are_refused(
    two_ranks: dict[str, Any], case: str, field: str, shown: str
) -> None:
    for results in two_ranks["ranks"]:
        message = results[f"mismatch-{case}"]
        assert message.startswith("GradAlign.select: every rank must use the same settings"), (
            message
        )
        assert f"differ in {field} (" in message and shown in message and "ranks [0]" in message


@pytest.mark.parametrize("case", ["hung", "dead"])
def test_a_late_or_dead_rank_raises_within_the_timeout(
    two_ranks: dict[str, Any], case: str
) -> None:
    message, seconds = two_ranks["dead"][case]
    assert message.startswith("GradAlign.select: rank 1 did not reach "), message
    assert f"within {DEAD_RANK_TIMEOUT:g} s" in message
    assert seconds < DEAD_RANK_TIMEOUT + 3
    if case == "hung":
        assert seconds >= DEAD_RANK_TIMEOUT * 0.9


def test_options_without_an_initialized_group() -> None:
    assert resolve("auto") is None and resolve(False) is None
    with pytest.raises(GradAlignError, match=r"torch\.distributed is not initialized"):
        resolve(True)
    with pytest.raises(GradAlignError, match=r"GradAlign: distributed must be 'auto'.*got 'yes'"):
        GradAlign(distributed="yes")
    with pytest.raises(GradAlignError, match="timeout must be > 0"):
        Distributed(timeout=0)
    assert Distributed(timeout=2).timedelta == timedelta(seconds=2)
    assert check_distributed_option("GradAlign", False) is False


# --- FSDP2: a sharded model ----------------------------------------------------------------------


def _torchrun(module: str, out: Path, n: int = 2) -> list[dict[str, Any]]:
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n)]
    cmd += ["--master_port", str(_free_port()), "-m", module, str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    files = sorted(out.glob("rank*.pt"))
    assert len(files) == n, proc.stderr[-3000:]
    return [torch.load(f) for f in files]


def test_factorized_gradients_on_an_fsdp2_sharded_model(tmp_path: Path) -> None:
    from tests import fsdp_worker

    ranks = _torchrun("tests.fsdp_worker", tmp_path)
    model = tiny_model("qwen2", seed=0)  # the same weights, unsharded, one process
    cands, val = fsdp_worker.data()
    expected = {
        "exact": FactorizedGradient(None, None).per_group(model, cands).grads,
        "projected": FactorizedGradient(8, 8).per_group(model, cands).grads,
    }
    selector = GradAlign(FactorizedGradient(8, 8), policy=TopK(3), distributed=False)
    ref = selector.select(model, cands, val)
    reference = ref.ids.tolist()
    assert_selection_stable(TopK(3), ref.candidates, reference)  # before comparing across processes
    for r in ranks:
        torch.testing.assert_close(r["exact"], expected["exact"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(r["shared"], expected["exact"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(r["projected"], expected["projected"], rtol=1e-5, atol=1e-7)
        assert r["selection"].tolist() == reference
        assert r["sharded_selection"].tolist() == reference
        assert r["full"].startswith("FullGradient.per_group: the model is sharded with FSDP2")


def test_fingerprint_is_the_same_for_equal_settings_built_twice() -> None:
    from gradalign.distributed import check_same_fingerprint, fingerprint

    def build() -> GradAlign:
        return GradAlign(RandomProjectedGradient(dim=64, seed=4), policy=lambda c: c.ids[:1])

    a = fingerprint(build(), tiny_model("qwen2", seed=0))
    b = fingerprint(build(), tiny_model("qwen2", seed=0))
    assert a == b and " at 0x" not in a["policy"]  # addresses removed: lambdas compare equal
    check_same_fingerprint([a, b])
    other = tiny_model("qwen2", seed=0)
    with torch.no_grad():
        next(other.parameters())[0, 0] += 1e-3  # one sampled weight changed
    c = fingerprint(build(), other)
    assert c["model"] != a["model"]
    with pytest.raises(GradAlignError, match=r"differ in model \(ranks \[0\]: .*; ranks \[1\]: "):
        check_same_fingerprint([a, c])
