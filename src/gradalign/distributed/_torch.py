"""`TorchDistributed`, the communicator over a torch.distributed group, and `DistributedGradAlign`."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from gradalign._fingerprint import check_same_fingerprint, fingerprint
from gradalign.alignment import Alignment
from gradalign.candidates import Candidates
from gradalign.distributed._collectives import (
    _gather_objects,
    all_gather_alignment,
    all_gather_candidates,
    all_reduce_batch_stats,
    all_reduce_target_state,
)
from gradalign.distributed._settings import Distributed
from gradalign.errors import GradAlignError
from gradalign.objective import BatchStats
from gradalign.rollouts import Rollouts
from gradalign.scoring import row_norms

if TYPE_CHECKING:
    from gradalign.selector import GradAlign


class TorchDistributed:
    """The [`Communicator`][gradalign.communicator.Communicator] over a ``torch.distributed`` group.

    Every rank passes its own shard (group ids unique across ranks; None for a rank without one).
    Batch statistics and target sums are all-reduced, candidate rows and tables all-gathered and
    sorted by id; before each collective a monitored barrier waits at most ``settings.timeout``.

    Args:
        settings: the process group and timeout.
    """

    sharded = True

    def __init__(self, settings: Distributed) -> None:
        self.settings = settings

    def check_same(self, selector: GradAlign, model: nn.Module) -> None:
        per_rank = _gather_objects(
            "the comparison of settings", fingerprint(selector, model), self.settings
        )
        check_same_fingerprint(per_rank)

    def batch_stats(self, rollouts: Rollouts | None, what: str) -> BatchStats | None:
        local = None if rollouts is None else BatchStats.of(rollouts)
        return all_reduce_batch_stats(
            local, self.settings, phase=f"the exchange of {what} statistics"
        )

    def reduce_target(
        self,
        sums: torch.Tensor | None,
        weights: torch.Tensor | None,
        group_ids: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return all_reduce_target_state(sums, weights, self.settings, group_ids=group_ids)

    def gather_alignment(
        self,
        local: Alignment | None,
        *,
        target: torch.Tensor,
        labels: tuple[Any, ...],
        aggregate: str,
    ) -> Alignment:
        ids, dot, norm, spread, grads = all_gather_alignment(
            None if local is None else local.ids,
            None if local is None else local.dot,
            None if local is None else local.grad_norm,
            None if local is None else local.zero_spread,
            self.settings,
            grads=None if local is None else local.grads,
        )
        return Alignment(
            ids=ids,
            dot=dot,
            grad_norm=norm,
            target_norm=row_norms(target),
            zero_spread=spread,
            task_labels=labels,
            grads=grads,
            aggregate=aggregate,
        )

    def gather_candidates(self, rollouts: Rollouts | None) -> Candidates:
        return all_gather_candidates(rollouts, self.settings)


class DistributedGradAlign:
    """A [`GradAlign`][gradalign.selector.GradAlign] bound to a process group: a thin alias.

    ``GradAlign(distributed="auto")`` (the default) already runs over every rank when
    ``torch.distributed`` is initialized with several; this alias pins the group and timeout
    (``GradAlign(..., distributed=Distributed(group, timeout))`` does the same) and refuses to
    start without an initialized process group. Every method is the selector's, on a copy of it.

    Args:
        selector: the settings: extractor, objective, scorer, policy, target.
        settings: the process group and timeout; None for the default group.

    Examples:
        Inside a ``torchrun`` job, after ``torch.distributed.init_process_group``:

        ```python
        driver = DistributedGradAlign(GradAlign(FactorizedGradient()))
        sel = driver.select(model, my_candidate_shard, my_validation_shard)  # same on every rank
        ```
    """

    def __init__(self, selector: GradAlign, settings: Distributed | None = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise GradAlignError(
                "DistributedGradAlign: torch.distributed is not initialized; call "
                "torch.distributed.init_process_group first"
            )
        self.settings = Distributed() if settings is None else settings
        self.selector = copy.copy(selector)
        self.selector.distributed = self.settings

    def __getattr__(self, name: str) -> Any:
        # targets, alignment, score, select, apply_policy: the bound selector's
        return getattr(self.__dict__["selector"], name)
