"""FSDP2 worker: ``torchrun --nproc_per_node 2 -m tests.fsdp_worker OUT``.

Shards a tiny Qwen2 with ``fully_shard`` (each decoder layer, then the root) on a CPU device mesh,
extracts factorized per-group gradients (exact and projected, with and without shared prompts),
selects with GradAlign on every rank (same rollouts) and with DistributedGradAlign (equal shards),
and writes ``OUT/rank{r}.pt``. FullGradient must refuse the sharded model.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import gradalign as ga
from gradalign.distributed import DistributedGradAlign
from gradalign.testing import tiny_model
from tests.helpers import make_rollouts

GROUPS = [g for g in range(8) for _ in range(3)]
REWARDS = [float((i * 7 + 3) % 5 < 2) for i in range(24)]
VAL_GROUPS = [g for g in range(100, 104) for _ in range(3)]
VAL_REWARDS = [float(i % 2) for i in range(12)]


def data() -> tuple[ga.Rollouts, ga.Rollouts]:
    cands = make_rollouts(vocab=104, groups=GROUPS, rewards=REWARDS, seed=3, group_prompts=True)
    val = make_rollouts(vocab=104, groups=VAL_GROUPS, rewards=VAL_REWARDS, seed=4)
    return cands, val


def main() -> None:
    warnings.filterwarnings("ignore")
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = tiny_model("qwen2", seed=0)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    cands, val = data()
    result: dict[str, object] = {}
    for name, ext in {
        "exact": ga.FactorizedGradient(None, None, batch_size=6),
        "projected": ga.FactorizedGradient(8, 8, batch_size=6),
        "shared": ga.FactorizedGradient(None, None, batch_size=6, share_prompts=True),
    }.items():
        result[name] = ext.per_group(model, cands).grads
    selector = ga.GradAlign(ga.FactorizedGradient(8, 8), policy=ga.policies.TopK(3))
    result["selection"] = (
        selector.__class__(selector.extractor, policy=selector.policy, distributed=False)
        .select(model, cands, val)
        .ids
    )
    mine = cands.select_groups(list(range(rank * 4, rank * 4 + 4)))  # equal shards
    val_mine = val.select_groups([100 + 2 * rank, 101 + 2 * rank])
    result["sharded_selection"] = DistributedGradAlign(selector).select(model, mine, val_mine).ids
    try:
        ga.FullGradient().per_group(model, cands)
        result["full"] = "no error"
    except ga.GradAlignError as exc:
        result["full"] = str(exc)
    torch.save(result, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
