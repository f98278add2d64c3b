"""Similarity scores between candidate gradients and validation targets.

Implementations: [`cosine`][gradalign.scoring.cosine] and [`inner_product`][gradalign.scoring.inner_product] (the scorers), [`build_target`][gradalign.scoring.build_target] and
[`TargetAccumulator`][gradalign.scoring.TargetAccumulator] (one or several target directions from validation gradients, streamed),
[`aggregate_tasks`][gradalign.scoring.aggregate_tasks] (several targets reduced to one score).

A zero-norm candidate row (a zero-spread group) scores exactly 0 under either scorer; no NaN is ever
returned.

Shape glossary: G candidate groups, D gradient dimension, Q targets (validation tasks).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch

from gradalign._options import choices
from gradalign.errors import GradAlignError
from gradalign.extractors.base import GroupGradients
from gradalign.objective import GRPOObjective, Objective

__all__ = [
    "SCORERS",
    "TARGET_REDUCTIONS",
    "TASK_AGGREGATIONS",
    "TargetAccumulator",
    "aggregate_tasks",
    "alignment_terms",
    "build_target",
    "cosine",
    "inner_product",
    "row_norms",
    "scaled_rows",
    "unit_rows",
]

Scorer = Literal["cosine", "inner_product"]
"""How a candidate's gradient is compared with the target (``GradAlign(scorer=...)``)."""
TargetReduction = Literal["mean", "normalized-mean", "batch"]
"""How the validation gradients become a target (``GradAlign(target=...)``)."""
TaskAggregation = Literal["max", "mean", "min"]
"""How the scores against several task targets become one (``GradAlign(aggregate=...)``)."""
SCORERS: tuple[str, ...] = choices(Scorer)
TARGET_REDUCTIONS: tuple[str, ...] = choices(TargetReduction)
TASK_AGGREGATIONS: tuple[str, ...] = choices(TaskAggregation)


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


def _work_dtype(*xs: torch.Tensor) -> torch.dtype:
    """float64 when an input is float64, else float32 (half and bfloat16 inputs are widened)."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def scaled_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) float32 rows divided by their largest magnitude (entries in [-1, 1]) and (N,) float64
    scales.

    Products and squares of the scaled rows neither overflow nor underflow in float32, whatever the
    magnitude of the input (1e20 or 1e-30 alike, and 1e-200 or 1e200 in float64: rows are scaled
    in their own precision before they are cast); a zero row stays zero with scale 0.
    """
    x = x.to(_work_dtype(x))
    scale = _max_abs(x)  # (N,)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (x / safe[:, None]).float(), scale.double()


def _max_abs(x: torch.Tensor) -> torch.Tensor:
    """(N,) largest magnitude of each row of a float (N, D), without an (N, D) temporary."""
    if not x.shape[1]:
        return x.new_zeros(x.shape[0])
    low, high = torch.aminmax(x, dim=1)
    return torch.maximum(high, -low)


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """(N, D) float32 rows of unit norm (zero rows stay zero), free of overflow and underflow."""
    scaled, _ = scaled_rows(x)
    norm = scaled.norm(dim=1, keepdim=True)  # (N, 1), >= 1 for a non-zero row
    return torch.where(norm > 0, scaled / torch.where(norm > 0, norm, 1.0), 0.0)


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """(N,) float64 norms of the rows of ``x`` (N, D), free of overflow and underflow."""
    scaled, scale = scaled_rows(x)
    return scaled.norm(dim=1).double() * scale


_SCORE_BLOCK = 1 << 22
"""Columns per block of [`alignment_terms`][gradalign.scoring.alignment_terms]: 16 MiB of each scaled row."""


class _ScaledTerms(NamedTuple):
    """Alignment terms of rows scaled to unit max-magnitude, and the (float64) scales."""

    dot: torch.Tensor  # (G, Q) inner products of the scaled rows
    grad_norm: torch.Tensor  # (G,) norms of the scaled grads
    target_norm: torch.Tensor  # (Q,) norms of the scaled targets
    grad_scale: torch.Tensor  # (G,)
    target_scale: torch.Tensor  # (Q,)


def _scaled_terms(grads: torch.Tensor, targets: torch.Tensor) -> _ScaledTerms:
    """Inner products and norms of the scaled rows of ``grads`` (G, D) and ``targets`` (Q, D).

    Scaling comes first, in the inputs' own precision (float64 stays float64: a float64 row of
    1e-200 would be 0 in float32 before its scale could save it), so every term is finite.
    """
    dtype = _work_dtype(grads, targets)
    grads, targets = grads.to(dtype), targets.to(grads.device, dtype)
    g_scale, t_scale = _max_abs(grads), _max_abs(targets)  # (G,), (Q,)
    g_safe = torch.where(g_scale > 0, g_scale, torch.ones_like(g_scale))[:, None]
    t_safe = torch.where(t_scale > 0, t_scale, torch.ones_like(t_scale))[:, None]
    dot = torch.zeros(grads.shape[0], targets.shape[0], dtype=torch.float64, device=grads.device)
    g_sq = torch.zeros(grads.shape[0], dtype=torch.float64, device=grads.device)
    t_sq = torch.zeros(targets.shape[0], dtype=torch.float64, device=grads.device)
    # Column blocks: only a block of the scaled rows is ever held, never a copy of (G + Q, D).
    for a in range(0, max(1, grads.shape[1]), _SCORE_BLOCK):
        gs = grads[:, a : a + _SCORE_BLOCK] / g_safe  # (G, d)
        ts = targets[:, a : a + _SCORE_BLOCK] / t_safe  # (Q, d)
        dot += (gs @ ts.T).double()
        g_sq += gs.norm(dim=1).double().square()
        t_sq += ts.norm(dim=1).double().square()
    return _ScaledTerms(dot, g_sq.sqrt(), t_sq.sqrt(), g_scale.double(), t_scale.double())


def alignment_terms(
    grads: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(G, Q) inner products, (G,) and (Q,) norms of ``grads`` (G, D) and ``targets`` (Q, D).

    The one scoring kernel: rows are scaled to unit max-magnitude before multiplying and the
    results are float64, so any finite float32 input gives finite terms (float64 inputs beyond
    about 1e+-150 may not: [`cosine`][gradalign.scoring.cosine] never unscales them). Cosine is
    ``dot / (grad_norm * target_norm)``; the paper's inner product is ``dot / target_norm``.
    """
    t = _scaled_terms(grads, targets)
    dot = t.dot * t.grad_scale[:, None] * t.target_scale[None, :]  # (G, Q)
    return dot, t.grad_norm * t.grad_scale, t.target_norm * t.target_scale


def cosine_from_terms(
    dot: torch.Tensor, grad_norm: torch.Tensor, target_norm: torch.Tensor
) -> torch.Tensor:
    """(G, Q) float32 cosine from [`alignment_terms`][gradalign.scoring.alignment_terms]; exactly 0 where a norm is 0."""
    denom = grad_norm[:, None] * target_norm[None, :]  # (G, Q)
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.where(denom > 0, dot / safe, 0.0).clamp(-1.0, 1.0).float()


def unit_target_product(dot: torch.Tensor, target_norm: torch.Tensor) -> torch.Tensor:
    """(G, Q) float32 ``<g, t / |t|>`` from [`alignment_terms`][gradalign.scoring.alignment_terms]; 0 for a zero target."""
    t = target_norm[None, :]
    return torch.where(t > 0, dot / torch.where(t > 0, t, torch.ones_like(t)), 0.0).float()


def _finite32(call: str, out: torch.Tensor) -> torch.Tensor:
    if not bool(torch.isfinite(out).all()):
        big = float(out[~torch.isfinite(out)][0])
        raise GradAlignError(
            f"{call}: a score overflows float32 ({big}); the inputs are too large for an "
            "unnormalised inner product: use normalize_target=True or cosine"
        )
    return out


def cosine(grads: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each gradient row with the target(s).

    Args:
        grads: (G, D) candidate gradients.
        target: (D,) one target, or (Q, D) several.

    Returns:
        (G,) for a (D,) target, (G, Q) for a (Q, D) target; exactly 0 where either norm is 0, and
        finite for any finite input (rows are scaled before they are multiplied).

    Examples:
        >>> cosine(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([2.0, 0.0]))
        tensor([1., 0.])
    """
    _check_pair("cosine", grads, target)
    t2 = target[None] if target.dim() == 1 else target  # (Q, D)
    # The scales cancel: cosine of the scaled rows, never of unscaled terms that a float64
    # input of 1e-200 or 1e200 would underflow or overflow.
    terms = _scaled_terms(grads, t2)
    out = cosine_from_terms(terms.dot, terms.grad_norm, terms.target_norm)  # (G, Q)
    return out.squeeze(1) if target.dim() == 1 else out


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
        (G,) or (G, Q), like [`cosine`][gradalign.scoring.cosine].

    Raises:
        GradAlignError: If a score does not fit in float32 (only possible without
            ``normalize_target`` or with gradients near the float32 limit).

    Examples:
        >>> inner_product(torch.tensor([[3.0, 4.0]]), torch.tensor([2.0, 0.0]), normalize_target=True)
        tensor([3.])
    """
    _check_pair("inner_product", grads, target)
    t2 = target[None] if target.dim() == 1 else target  # (Q, D)
    terms = _scaled_terms(grads, t2)
    dot = terms.dot * terms.grad_scale[:, None]  # (G, Q) <g, t_scaled>
    if normalize_target:  # the target's scale cancels: never unscaled, never under/overflowed
        out = unit_target_product(dot, terms.target_norm)
    else:
        out = (dot * terms.target_scale[None, :]).float()
    out = _finite32("inner_product", out)
    return out.squeeze(1) if target.dim() == 1 else out


def aggregate_tasks(scores: torch.Tensor, aggregate: str = "max") -> torch.Tensor:
    """(G, Q) per-task scores -> (G,) by "max", "mean" or "min"; a (G,) input passes through.

    ``aggregate`` is ``GradAlign(aggregate=...)``'s name.

    Examples:
        >>> import torch
        >>> aggregate_tasks(torch.tensor([[0.2, 0.9], [0.5, 0.1]]), "max")
        tensor([0.9000, 0.5000])
    """
    if aggregate not in TASK_AGGREGATIONS:
        raise GradAlignError(
            f"aggregate_tasks: aggregate must be one of {TASK_AGGREGATIONS}, got {aggregate!r}"
        )
    if scores.dim() == 1:
        return scores
    if scores.dim() != 2 or scores.shape[1] == 0:
        raise GradAlignError(
            f"aggregate_tasks: scores must be (G,) or (G, Q>=1), got {tuple(scores.shape)}"
        )
    if aggregate == "max":
        return scores.max(dim=1).values
    if aggregate == "min":
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
        target: "mean" (mean of the validation groups' gradients, default), "normalized-mean"
            (mean of unit vectors: every problem's direction counts equally; zero rows skipped) or
            "batch" (the gradient of one loss over the whole validation set, aggregated like the
            objective aggregates tokens — the paper's reference); ``GradAlign(target=...)``.
        objective: the GRPO objective (needed by "batch" for its aggregation).
        tasks: optional mapping validation group id -> task label, giving one target per task.
        task_labels: the order of the task labels (default: sorted by their string form).
    """

    def __init__(
        self,
        target: str = "mean",
        objective: Objective | None = None,
        tasks: Mapping[int, Any] | None = None,
        task_labels: Sequence[Any] | None = None,
    ) -> None:
        if target not in TARGET_REDUCTIONS:
            raise GradAlignError(
                f"build_target: target must be one of {TARGET_REDUCTIONS}, got {target!r}"
            )
        self.target = target
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
        if self.target == "normalized-mean":
            grads = unit_rows(grads)  # (Gc, D)
            weight = (grads != 0).any(dim=1).float()
        elif self.target == "batch":
            weight = self.objective.batch_group_weights(chunk.num_tokens, chunk.num_sequences)
            grads = grads * weight[:, None]
        else:
            weight = torch.ones(len(chunk), dtype=torch.float32)
        if self._sum is None or self._sum.shape != (q, grads.shape[1]):
            total = torch.zeros(q, grads.shape[1], dtype=torch.float32).index_add_(0, index, grads)
            self._sum = total if self._sum is None else self._sum + total
        else:
            self._sum.index_add_(0, index, grads)  # in place: the (Q, D) sum is held once
        counts = torch.zeros(q, dtype=torch.float32).index_add_(0, index, weight)
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
        out = sums / weights.clamp_min(1e-30)[:, None]  # one new (Q, D), no where-copy
        out[~(weights > 0)] = 0.0
        return out


def build_target(
    validation: GroupGradients,
    target: str = "mean",
    *,
    objective: Objective | None = None,
    tasks: Mapping[int, Any] | None = None,
) -> torch.Tensor:
    """Target direction(s) from validation group gradients.

    Args:
        validation: (G_v, D) validation group gradients.
        target: "mean", "normalized-mean" or "batch" (see [`TargetAccumulator`][gradalign.scoring.TargetAccumulator]).
        objective: the GRPO objective ("batch" aggregates like it).
        tasks: optional mapping validation group id -> task label.

    Returns:
        (D,) without tasks, else (Q, D) with one row per task label (sorted).

    Examples:
        >>> val_grads = FactorizedGradient(8, 8).per_group(model, rollouts)
        >>> build_target(val_grads, "normalized-mean").shape  # mean of unit-norm rows
        torch.Size([1008])
    """
    acc = TargetAccumulator(target, objective, tasks)
    acc.add(validation)
    out = acc.result()
    return out[0] if tasks is None else out
