"""Similarity scores between candidate gradients and validation targets.

Implementations: :func:`cosine` and :func:`inner_product` (the scorers), :func:`build_target` and
:class:`TargetAccumulator` (one or several target directions from validation gradients, streamed),
:func:`aggregate_tasks` (several targets reduced to one score).

A zero-norm candidate row (a zero-spread group) scores exactly 0 under either scorer; no NaN is ever
returned.

Shape glossary: G candidate groups, D gradient dimension, Q targets (validation tasks).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from gradalign.errors import GradAlignError
from gradalign.extractors.base import GroupGradients
from gradalign.objective import GRPOObjective

__all__ = [
    "TARGET_REDUCTIONS",
    "TASK_AGGREGATIONS",
    "TargetAccumulator",
    "aggregate_tasks",
    "build_target",
    "cosine",
    "inner_product",
    "zero_rows",
]

TARGET_REDUCTIONS = ("mean", "normalized-mean", "batch")
TASK_AGGREGATIONS = ("max", "mean", "min")


def _check_pair(call: str, grads: torch.Tensor, target: torch.Tensor) -> None:
    if not isinstance(grads, torch.Tensor) or grads.dim() != 2:
        shape = tuple(grads.shape) if isinstance(grads, torch.Tensor) else type(grads).__name__
        raise GradAlignError(f"{call}: grads must be a 2-D (G, D) tensor, got {shape}")
    if not isinstance(target, torch.Tensor) or target.dim() not in (1, 2):
        shape = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        raise GradAlignError(f"{call}: target must be (D,) or (Q, D), got {shape}")
    if target.shape[-1] != grads.shape[1]:
        raise GradAlignError(
            f"{call}: target has D={target.shape[-1]} but grads have D={grads.shape[1]}"
        )
    for name, x in (("grads", grads), ("target", target)):
        if not bool(torch.isfinite(x).all()):
            raise GradAlignError(f"{call}: {name} contains NaN or inf")


def zero_rows(grads: torch.Tensor) -> torch.Tensor:
    """(G,) bool, True where a gradient row is exactly zero."""
    return ~(grads != 0).any(dim=1)


def _dot(grads: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    t = target.to(device=grads.device, dtype=torch.float32)
    t2 = t[None] if t.dim() == 1 else t  # (Q, D)
    return grads.float() @ t2.T  # (G, Q)


def cosine(grads: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each gradient row with the target(s).

    Args:
        grads: (G, D) candidate gradients.
        target: (D,) one target, or (Q, D) several.

    Returns:
        (G,) for a (D,) target, (G, Q) for a (Q, D) target; exactly 0 where either norm is 0.

    Example:
        >>> cosine(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([2.0, 0.0]))
        tensor([1., 0.])
    """
    _check_pair("cosine", grads, target)
    dot = _dot(grads, target)  # (G, Q)
    g_norm = grads.float().norm(dim=1)  # (G,)
    t2 = target[None] if target.dim() == 1 else target
    t_norm = t2.float().norm(dim=1).to(grads.device)  # (Q,)
    denom = g_norm[:, None] * t_norm[None, :]  # (G, Q)
    out = torch.where(denom > 0, dot / denom.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    return out.clamp(-1.0, 1.0).squeeze(1) if target.dim() == 1 else out.clamp(-1.0, 1.0)


def inner_product(
    grads: torch.Tensor, target: torch.Tensor, *, normalize_target: bool = False
) -> torch.Tensor:
    """Inner product of each gradient row with the target(s).

    Args:
        grads: (G, D) candidate gradients.
        target: (D,) or (Q, D).
        normalize_target: divide each target by its norm first (the paper's inner-product score
            ``<g_P, g_V / |g_V|>``); a zero target then scores 0.

    Returns:
        (G,) or (G, Q), like :func:`cosine`.
    """
    _check_pair("inner_product", grads, target)
    t = target.float()
    if normalize_target:
        norms = t.norm(dim=-1, keepdim=True)
        t = torch.where(norms > 0, t / norms.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    out = _dot(grads, t)  # (G, Q)
    return out.squeeze(1) if target.dim() == 1 else out


def aggregate_tasks(scores: torch.Tensor, how: str = "max") -> torch.Tensor:
    """(G, Q) per-task scores -> (G,) by "max", "mean" or "min"; a (G,) input passes through."""
    if how not in TASK_AGGREGATIONS:
        raise GradAlignError(
            f"aggregate_tasks: how must be one of {TASK_AGGREGATIONS}, got {how!r}"
        )
    if scores.dim() == 1:
        return scores
    if scores.dim() != 2 or scores.shape[1] == 0:
        raise GradAlignError(
            f"aggregate_tasks: scores must be (G,) or (G, Q>=1), got {tuple(scores.shape)}"
        )
    if how == "max":
        return scores.max(dim=1).values
    if how == "min":
        return scores.min(dim=1).values
    return scores.mean(dim=1)


def _task_index(
    call: str, group_ids: torch.Tensor, tasks: Any, labels: list[Any] | None
) -> tuple[torch.Tensor, list[Any]]:
    """(G,) index of each group's task, and the task labels in order."""
    if tasks is None:
        return torch.zeros(len(group_ids), dtype=torch.long), [0]
    if isinstance(tasks, Mapping):
        missing = [int(g) for g in group_ids if int(g) not in tasks]
        if missing:
            raise GradAlignError(f"{call}: tasks has no entry for validation groups {missing[:10]}")
        per_group = [tasks[int(g)] for g in group_ids]
    else:
        raise GradAlignError(
            f"{call}: tasks must map each validation group id to a task label, "
            f"got {type(tasks).__name__}"
        )
    if labels is None:
        labels = sorted(set(per_group), key=str)
    position = {label: i for i, label in enumerate(labels)}
    return torch.tensor([position[t] for t in per_group], dtype=torch.long), labels


class TargetAccumulator:
    """Builds target directions from validation gradients streamed chunk by chunk.

    Args:
        reduction: "mean" (mean of the validation groups' gradients, default), "normalized-mean"
            (mean of unit vectors: every problem's direction counts equally; zero rows skipped) or
            "batch" (the gradient of one loss over the whole validation set, aggregated like the
            objective aggregates tokens — the paper's reference).
        objective: the GRPO objective (needed by "batch" for its aggregation).
        tasks: optional mapping validation group id -> task label, giving one target per task.
        task_labels: the order of the task labels (default: sorted by their string form).
    """

    def __init__(
        self,
        reduction: str = "mean",
        objective: GRPOObjective | None = None,
        tasks: Mapping[int, Any] | None = None,
        task_labels: Sequence[Any] | None = None,
    ) -> None:
        if reduction not in TARGET_REDUCTIONS:
            raise GradAlignError(
                f"build_target: reduction must be one of {TARGET_REDUCTIONS}, got {reduction!r}"
            )
        self.reduction = reduction
        self.objective = GRPOObjective() if objective is None else objective
        self.tasks = tasks
        if task_labels is None and tasks is not None:
            task_labels = sorted(set(tasks.values()), key=str)
        self.labels: list[Any] | None = None if task_labels is None else list(task_labels)
        self._sum: torch.Tensor | None = None  # (Q, D)
        self._weight: torch.Tensor | None = None  # (Q,)

    def add(self, chunk: GroupGradients) -> None:
        """Add the contribution of a chunk of validation groups."""
        index, labels = _task_index("build_target", chunk.group_ids, self.tasks, self.labels)
        self.labels = labels
        q = len(labels)
        grads = chunk.grads.float()  # (Gc, D)
        if self.reduction == "normalized-mean":
            norms = grads.norm(dim=1, keepdim=True)
            grads = torch.where(norms > 0, grads / norms.clamp_min(1e-30), 0.0)
            weight = (norms.squeeze(1) > 0).float()
        elif self.reduction == "batch":
            weight = self.objective.batch_group_weights(chunk.num_tokens, chunk.num_sequences)
            grads = grads * weight[:, None]
        else:
            weight = torch.ones(len(chunk), dtype=torch.float32)
        total = torch.zeros(q, grads.shape[1], dtype=torch.float32).index_add_(0, index, grads)
        counts = torch.zeros(q, dtype=torch.float32).index_add_(0, index, weight)
        self._sum = total if self._sum is None else self._sum + total
        self._weight = counts if self._weight is None else self._weight + counts

    def state(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The running (Q, D) sum and (Q,) weight; all-reduce both to combine processes."""
        if self._sum is None or self._weight is None:
            raise GradAlignError("build_target: no validation gradients were added")
        return self._sum, self._weight

    def result(
        self, sums: torch.Tensor | None = None, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(Q, D) targets (Q = 1 without tasks)."""
        if sums is None or weights is None:
            sums, weights = self.state()
        return torch.where(weights[:, None] > 0, sums / weights.clamp_min(1e-30)[:, None], 0.0)


def build_target(
    validation: GroupGradients,
    reduction: str = "mean",
    *,
    objective: GRPOObjective | None = None,
    tasks: Mapping[int, Any] | None = None,
) -> torch.Tensor:
    """Target direction(s) from validation group gradients.

    Args:
        validation: (G_v, D) validation group gradients.
        reduction: "mean", "normalized-mean" or "batch" (see :class:`TargetAccumulator`).
        objective: the GRPO objective ("batch" aggregates like it).
        tasks: optional mapping validation group id -> task label.

    Returns:
        (D,) without tasks, else (Q, D) with one row per task label (sorted).

    Example:
        >>> target = build_target(val_grads, "normalized-mean")  # doctest: +SKIP
    """
    acc = TargetAccumulator(reduction, objective, tasks)
    acc.add(validation)
    out = acc.result()
    return out[0] if tasks is None else out
