"""GradAlign on a model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Run: ``torchrun --nproc_per_node 2 examples/integrations/fsdp2.py``. FactorizedGradient needs only
layer inputs and output gradients, so it runs on sharded weights without gathering any weight
gradient; FullGradient refuses a sharded model. Every rank must run the same number of forward
passes (FSDP gathers each layer's weights collectively): give every rank the same candidates, or
equal shards to DistributedGradAlign.
"""

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import gradalign as ga
from gradalign.testing import tiny_model

dist.init_process_group("gloo")  # "nccl" on GPUs, with a "cuda" device mesh
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
model = tiny_model()
for layer in model.model.layers:
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)

gen = torch.Generator().manual_seed(0)  # the same rollouts on every rank
prompts = [[int(t) for t in torch.randint(2, 90, (5,), generator=gen)] for _ in range(6)]
completions = [[int(t) for t in torch.randint(2, 90, (3,), generator=gen)] for _ in range(24)]
rewards = (torch.rand(24, generator=gen) < 0.5).float()
candidates = ga.Rollouts.from_token_ids(
    [prompts[i // 4] for i in range(16)],
    completions[:16],
    rewards[:16],
    [i // 4 for i in range(16)],
)
validation = ga.Rollouts.from_token_ids(
    [prompts[4 + i // 4] for i in range(8)],
    completions[16:],
    rewards[16:],
    [100 + i // 4 for i in range(8)],
)
selector = ga.GradAlign(
    ga.FactorizedGradient(16, 16), policy=ga.policies.TopK(2), distributed=False
)
selection = selector.select(model, candidates, validation)
print(f"rank {dist.get_rank()}: selected {selection.ids.tolist()}")
dist.destroy_process_group()
