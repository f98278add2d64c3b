"""The collectives of a selection round, behind one small interface.

[`GradAlign`][gradalign.selector.GradAlign] runs a single pipeline (batch statistics -> validation
sums -> targets -> candidate rows -> candidate table -> policy) and asks a communicator to combine
each stage across processes. [`Local`][gradalign.communicator.Local] combines nothing (one process
holds every group); [`TorchDistributed`][gradalign.distributed.TorchDistributed] all-reduces and
all-gathers over a ``torch.distributed`` process group, with a timeout. Both give every caller the
single-process result, so the pipeline has one code path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from gradalign.alignment import Alignment
from gradalign.candidates import Candidates
from gradalign.objective import BatchStats
from gradalign.rollouts import Rollouts

if TYPE_CHECKING:
    from gradalign.selector import GradAlign

__all__ = ["Communicator", "Local"]


class Communicator(Protocol):
    """How one stage's per-process results become the whole batch's.

    Attributes:
        sharded: True when each process passes its own shard of groups (a process without a
            shard passes None); False when one process holds them all.
    """

    sharded: bool

    def check_same(self, selector: GradAlign, model: nn.Module) -> None:
        """Refuse processes whose settings or model differ (once per public call)."""

    def batch_stats(self, rollouts: Rollouts | None, what: str) -> BatchStats | None:
        """The whole batch's statistics, or None where the rollouts are the whole batch."""

    def reduce_target(
        self,
        sums: torch.Tensor | None,
        weights: torch.Tensor | None,
        group_ids: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The (Q, D) sums and (Q,) weights of the validation gradients of every process."""

    def gather_alignment(
        self,
        local: Alignment | None,
        *,
        target: torch.Tensor,
        labels: tuple[Any, ...],
        aggregate: str,
    ) -> Alignment:
        """Every process's candidate rows (None for a process without candidates), merged and
        sorted by group id, against the (Q, D) ``target`` every process shares."""

    def gather_candidates(self, rollouts: Rollouts | None) -> Candidates:
        """The unscored candidate table of every process's groups."""


class Local:
    """One process holds every group: each stage's result is already the whole batch's.

    Examples:
        >>> comm = Local()
        >>> comm.sharded, comm.batch_stats(rollouts, "candidate") is None
        (False, True)
    """

    sharded = False

    def check_same(self, selector: GradAlign, model: nn.Module) -> None:
        return None

    def batch_stats(self, rollouts: Rollouts | None, what: str) -> BatchStats | None:
        return None  # the objective computes them from the rollouts themselves

    def reduce_target(
        self,
        sums: torch.Tensor | None,
        weights: torch.Tensor | None,
        group_ids: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert sums is not None and weights is not None  # the pipeline checked the validation
        return sums, weights

    def gather_alignment(
        self,
        local: Alignment | None,
        *,
        target: torch.Tensor,
        labels: tuple[Any, ...],
        aggregate: str,
    ) -> Alignment:
        assert local is not None  # the pipeline checked the candidates
        return local

    def gather_candidates(self, rollouts: Rollouts | None) -> Candidates:
        assert rollouts is not None
        return Candidates.from_rollouts(rollouts)
