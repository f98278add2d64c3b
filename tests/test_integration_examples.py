"""Every code block of docs/integrations.md runs: the pages include these example files."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "integrations"


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _run(*args: str, n: int = 0) -> str:
    if n:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n)]
        cmd += ["--master_port", str(port), *args]
    else:
        cmd = [sys.executable, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_plain_loop() -> None:
    out = _run(str(EXAMPLES / "plain_loop.py"))
    assert out.count("selected") == 2


def test_trl_one_process() -> None:
    pytest.importorskip("trl")
    assert "selections:" in _run(str(EXAMPLES / "trl_one_process.py"))


@pytest.mark.distributed
def test_trl_torchrun() -> None:
    pytest.importorskip("trl")
    out = _run(str(EXAMPLES / "trl_torchrun.py"), n=2)
    assert out.count("selections:") == 1  # printed by the main process


@pytest.mark.distributed
def test_fsdp2() -> None:
    # Both ranks print to one pipe; their lines may arrive interleaved on one line.
    found = dict(
        re.findall(r"rank (\d+): selected (\[[^\]]*\])", _run(str(EXAMPLES / "fsdp2.py"), n=2))
    )
    assert sorted(found) == ["0", "1"]
    assert found["0"] == found["1"]  # every rank, the same selection


@pytest.mark.filterwarnings("ignore::UserWarning")  # verl lists the engines it cannot load
def test_verl_v1_scorer(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("verl.trainer.ppo.v1.replay_buffer")
    import transfer_queue as tq
    from examples.integrations import verl_v1_scorer

    import gradalign as ga
    from gradalign.testing import tiny_model
    from tests.test_integrations_verl import _buffer

    gen = torch.Generator().manual_seed(0)
    store: dict[str, dict[str, Any]] = {}

    def kv_batch_get(keys: list[str], partition_id: str, select_fields: list[str]) -> dict:
        return {f: [store[k][f] for k in keys] for f in select_fields}

    monkeypatch.setattr(tq, "kv_batch_get", kv_batch_get)
    val_prompts = [[int(t) for t in torch.randint(2, 90, (4,), generator=gen)] for _ in range(2)]
    val_done = [[int(t) for t in torch.randint(2, 90, (3,), generator=gen)] for _ in range(4)]
    verl_v1_scorer.POLICY = tiny_model()
    verl_v1_scorer.VALIDATION = ga.Rollouts.from_token_ids(
        [val_prompts[i // 2] for i in range(4)], val_done, [1.0, 0.0, 0.0, 1.0], [-1, -1, -2, -2]
    )
    buffer, fake = _buffer(
        monkeypatch, "examples.integrations.verl_v1_scorer:score_groups", select_fraction=0.5
    )
    original_add = fake.add

    def add(uid: str, step: int = 0) -> None:  # each rollout also gets its token ids and reward
        original_add(uid, step)
        prompt = torch.randint(2, 90, (4,), generator=gen)
        for s in range(fake.k):
            store[f"{uid}_{s}_0"] = {
                "prompts": prompt,
                "responses": torch.randint(2, 90, (3,), generator=gen),
                "rm_scores": torch.tensor([0.0, 0.0, float(s % 2)]),
            }

    fake.add = add  # type: ignore[method-assign]
    fake.add("u1")
    fake.add("u2")
    batch, _ = buffer.sample(global_steps=1, partition_id="train", batch_size=2)
    assert len({key.split("_")[0] for key in batch.keys}) == 2
    assert set(buffer.last_scores) == {"u1", "u2", "r0", "r1"}
    assert all(-1.0 <= v <= 1.0 for v in buffer.last_scores.values())
