"""What a selection round produces: the targets, every candidate's alignment with them, the result.

[`Targets`][gradalign.alignment.Targets] (the validation directions of one round, reusable across
chunks), [`Alignment`][gradalign.alignment.Alignment] (the raw terms from which both scores are
computed, the same type on one process and gathered from several) and
[`Selection`][gradalign.alignment.Selection] (the selected ids, their scores and the scored table).
[`GradAlign`][gradalign.selector.GradAlign] produces all three.

Shape glossary: G candidate groups, D gradient dimension, Q targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from gradalign.candidates import Candidates
from gradalign.scoring import aggregate_tasks, cosine_from_terms, unit_target_product

__all__ = ["Alignment", "Selection", "Targets"]


class Targets(NamedTuple):
    """The target directions of one round, from [`GradAlign.targets`][gradalign.selector.GradAlign.targets].

    Pass them where validation rollouts go (``select(model, candidates, targets)``) to score
    several batches of candidates against the same targets without recomputing the validation
    gradients, e.g. each chunk that [`fill_round`][gradalign.rounds.fill_round] draws. They belong to the model
    they were computed on: recompute them after a training step.

    Attributes:
        directions: (Q, D) float32 target gradients, one row per validation task.
        labels: the task label of each row.

    Examples:
        >>> selector = GradAlign(FactorizedGradient(8, 8), policy=policies.TopK(1))
        >>> targets = selector.targets(model, rollouts.select_groups([0, 1]))
        >>> tuple(targets.directions.shape), targets.labels
        ((1, 1008), (0,))
        >>> selector.select(model, rollouts.select_groups([2, 3]), targets).ids.tolist()
        [3]
    """

    directions: torch.Tensor
    labels: tuple[Any, ...]


@dataclass(frozen=True, eq=False)
class Alignment:
    """Raw alignment statistics of every candidate group with the target(s).

    Attributes:
        ids: (G,) candidate group ids, ascending.
        dot: (G, Q) float64 inner products with the (unnormalised) targets.
        grad_norm: (G,) float64 norms of the candidate gradients.
        target_norm: (Q,) float64 norms of the targets.
        zero_spread: (G,) groups whose rewards have no spread.
        task_labels: the label of each target.
        grads: (G, D) candidate gradients when kept (``keep_grads=True``), else None.
        aggregate: how per-task scores reduce to one ("max", "mean", "min").

    Examples:
        >>> import torch, gradalign as ga
        >>> ro = ga.Rollouts.from_token_ids([[5, 6], [5, 6], [7, 8], [7, 8]],
        ...     [[9, 1], [10, 1], [11, 1], [12, 1]], [1.0, 0.0, 1.0, 1.0], [0, 0, 1, 1])
        >>> from gradalign.testing import tiny_model
        >>> model = tiny_model()
        >>> val = ga.Rollouts.from_token_ids([[5, 6], [5, 6]], [[9, 1], [10, 1]], [1.0, 0.0], [100, 100])
        >>> selector = ga.GradAlign(ga.FactorizedGradient(4, 4), policy=ga.policies.TopK(1))
        >>> al = selector.alignment(model, ro, val)
        >>> al.ids, al.cosine.round(decimals=4), al.zero_gradient
        (tensor([0, 1]), tensor([1., 0.]), tensor([False,  True]))
    """

    ids: torch.Tensor
    dot: torch.Tensor
    grad_norm: torch.Tensor
    target_norm: torch.Tensor
    zero_spread: torch.Tensor
    task_labels: tuple[Any, ...]
    grads: torch.Tensor | None = None
    aggregate: str = "max"

    @property
    def zero_gradient(self) -> torch.Tensor:
        """(G,) True where a candidate's gradient is exactly zero (its scores are 0)."""
        return self.grad_norm == 0

    @property
    def task_cosine(self) -> torch.Tensor:
        """(G, Q) float32 cosine with each target; 0 where a norm is 0."""
        return cosine_from_terms(self.dot, self.grad_norm, self.target_norm)

    @property
    def task_inner_product(self) -> torch.Tensor:
        """(G, Q) inner product with each unit-norm target (the paper's inner-product score)."""
        return unit_target_product(self.dot, self.target_norm)

    @property
    def cosine(self) -> torch.Tensor:
        """(G,) cosine scores, per-task scores reduced by ``aggregate``."""
        return aggregate_tasks(self.task_cosine, self.aggregate)

    @property
    def inner_product(self) -> torch.Tensor:
        """(G,) inner-product scores, per-task scores reduced by ``aggregate``."""
        return aggregate_tasks(self.task_inner_product, self.aggregate)

    def scores(self, scorer: str) -> torch.Tensor:
        """(G,) scores of ``scorer`` ("cosine" or "inner_product")."""
        return self.cosine if scorer == "cosine" else self.inner_product


@dataclass(frozen=True, eq=False)
class Selection:
    """The result of one selection round.

    Attributes:
        ids: (k,) selected group ids in rank order.
        scores: (k,) their scores (None when the candidates carry no scores).
        candidates: the full scored candidate table.
        alignment: the [`Alignment`][gradalign.alignment.Alignment] the scores came from (both
            scorers' values, per task, the norms), when [`GradAlign.select`][gradalign.selector.GradAlign.select]
            made the selection; None from ``apply_policy`` on a table.

    Examples:
        >>> import torch, gradalign as ga
        >>> ro = ga.Rollouts.from_token_ids([[5, 6], [5, 6], [7, 8], [7, 8]],
        ...     [[9, 1], [10, 1], [11, 1], [12, 1]], [1.0, 0.0, 1.0, 1.0], [0, 0, 1, 1])
        >>> from gradalign.testing import tiny_model
        >>> model = tiny_model()
        >>> val = ga.Rollouts.from_token_ids([[5, 6], [5, 6]], [[9, 1], [10, 1]], [1.0, 0.0], [100, 100])
        >>> selector = ga.GradAlign(ga.FactorizedGradient(4, 4), policy=ga.policies.TopK(1))
        >>> sel = selector.select(model, ro, val)
        >>> sel.ids, sel.scores.round(decimals=4)
        (tensor([0]), tensor([1.]))
    """

    ids: torch.Tensor
    scores: torch.Tensor | None
    candidates: Candidates
    alignment: Alignment | None = None
