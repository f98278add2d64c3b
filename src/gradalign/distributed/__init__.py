"""Selection over several processes: each rank scores its shard of groups, all ranks agree.

Implementations: [`Distributed`][gradalign.distributed.Distributed] (which process group, how long to wait for a late rank),
[`TorchDistributed`][gradalign.distributed.TorchDistributed] (the
[`Communicator`][gradalign.communicator.Communicator] that ``GradAlign`` uses over the ranks),
[`DistributedGradAlign`][gradalign.distributed.DistributedGradAlign] (a ``GradAlign`` pinned to a group), [`resolve`][gradalign.distributed.resolve] (``GradAlign(distributed=...)`` to a
[`Distributed`][gradalign.distributed.Distributed] or None), [`is_distributed`][gradalign.distributed.is_distributed], [`barrier`][gradalign.distributed.barrier] (a monitored barrier that
names the ranks that did not arrive), [`fingerprint`][gradalign.distributed.fingerprint] and the collectives
[`all_reduce_batch_stats`][gradalign.distributed.all_reduce_batch_stats],
[`all_reduce_target_state`][gradalign.distributed.all_reduce_target_state] (sums the target accumulators of all ranks), [`all_gather_rows`][gradalign.distributed.all_gather_rows]
and [`all_gather_alignment`][gradalign.distributed.all_gather_alignment] (variable-size per-rank rows merged by group id) and
[`all_reduce_max`][gradalign.distributed.all_reduce_max].

[`GradAlign`][gradalign.selector.GradAlign] runs its one pipeline through
[`TorchDistributed`][gradalign.distributed.TorchDistributed] when ``distributed`` resolves to a
group of several ranks (``"auto"``, the default, does when ``torch.distributed`` is initialized
with more than one rank): every rank passes its own shard of candidate and validation groups (group
ids unique across ranks; a rank without a shard passes None). Batch statistics are all-reduced
first, so each shard is weighted as in the whole batch (``scale_rewards="batch"`` included).
Validation gradients are accumulated locally and the (Q, D) sums and (Q,) weights are all-reduced,
so the target equals the single-process one for every reduction ("mean", "normalized-mean" and
"batch" are all sums). Candidate rows (dot products, norms, flags, pass rates) are all-gathered and
sorted by id, so every rank holds the whole candidate table and runs the (deterministic) policy to
the same selection.

At the first collective of every call the ranks compare a fingerprint of their settings
(extractor, objective, scorer, target, policy and its k) and of the model (class, parameter names,
shapes and dtypes, and a strided sample of the weights of every parameter that is not sharded):
a rank with another seed, model or k gives a [`GradAlignError`][gradalign.errors.GradAlignError]
naming the field and the ranks, instead of one agreed wrong selection.

Before every collective a ``monitored_barrier`` (gloo groups) waits at most ``timeout``; a rank
that died or hangs gives a [`GradAlignError`][gradalign.errors.GradAlignError] naming it instead of a hang. Other
backends (NCCL) have no monitored barrier: there the process group's own timeout applies
(``init_process_group(timeout=...)``; set ``TORCH_NCCL_ASYNC_ERROR_HANDLING=1``).

Shape glossary: G candidate groups (G_r on rank r), Q targets, D gradient dimension.
"""

from __future__ import annotations

from gradalign._fingerprint import check_same_fingerprint, fingerprint
from gradalign.distributed._collectives import (
    all_gather_alignment,
    all_gather_candidates,
    all_gather_rows,
    all_reduce_batch_stats,
    all_reduce_max,
    all_reduce_target_state,
    barrier,
)
from gradalign.distributed._settings import (
    Distributed,
    check_distributed_option,
    is_distributed,
    resolve,
)
from gradalign.distributed._torch import DistributedGradAlign, TorchDistributed

__all__ = [
    "Distributed",
    "DistributedGradAlign",
    "TorchDistributed",
    "all_gather_alignment",
    "all_gather_candidates",
    "all_gather_rows",
    "all_reduce_batch_stats",
    "all_reduce_max",
    "all_reduce_target_state",
    "barrier",
    "check_distributed_option",
    "check_same_fingerprint",
    "fingerprint",
    "is_distributed",
    "resolve",
]
