"""GradAlign in one call: extractor + objective + scorer + policy.

Implementations: [`GradAlign`][gradalign.selector.GradAlign] (``alignment`` -> ``score`` -> ``select``), [`Alignment`][gradalign.selector.Alignment]
(both scores from one pass over the candidates) and [`Selection`][gradalign.selector.Selection] (the result of a round).

Candidate gradients are streamed: only the (Q, D) targets and one chunk of candidate gradients sit in
memory, so exact full-parameter scores work on models whose G x D gradients would not fit.

Shape glossary: G candidate groups, D gradient dimension, Q targets.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from gradalign import distributed as _dist
from gradalign._calls import api_call, current_call
from gradalign.errors import GradAlignError
from gradalign.extractors.base import GradientExtractor
from gradalign.extractors.full import FullGradient
from gradalign.objective import BatchStats, GRPOObjective, Objective
from gradalign.policies import Candidates, TopFraction
from gradalign.rollouts import Rollouts
from gradalign.scoring import (
    SCORERS,
    TARGET_REDUCTIONS,
    TASK_AGGREGATIONS,
    TargetAccumulator,
    aggregate_tasks,
    alignment_terms,
    cosine_from_terms,
    row_norms,
    unit_target_product,
)

__all__ = ["SCORERS", "Alignment", "CandidateRows", "GradAlign", "Selection", "Targets"]


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
class CandidateRows:
    """One process's candidate rows before they become an [`Alignment`][gradalign.selector.Alignment].

    Attributes:
        ids: (G,) group ids, ascending.
        dot: (G, Q) float64 inner products with the targets.
        grad_norm: (G,) float64 gradient norms.
        zero_spread: (G,) zero-spread flags.
        grads: (G, D) gradients when kept, else None.
    """

    ids: torch.Tensor
    dot: torch.Tensor
    grad_norm: torch.Tensor
    zero_spread: torch.Tensor
    grads: torch.Tensor | None = None


@dataclass(frozen=True, eq=False)
class Selection:
    """The result of one selection round.

    Attributes:
        ids: (k,) selected group ids in rank order.
        scores: (k,) their scores (None when the candidates carry no scores).
        candidates: the full scored candidate table.

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


def _check_selected(policy: Any, out: Any, table: Candidates) -> torch.Tensor:
    """A policy's output as (k,) int64 ids: integers, 1-D, unique, all among the candidates."""
    call = f"GradAlign.apply_policy: the policy {getattr(policy, '__name__', repr(policy))}"
    try:
        ids = torch.as_tensor(out) if out is not None else None
    except (TypeError, ValueError, RuntimeError):
        ids = None
    if ids is None or ids.dim() != 1 or not (ids.numel() == 0 or _is_int(ids)):
        shape = "" if ids is None else f" {ids.dtype} of shape {tuple(ids.shape)}"
        raise GradAlignError(
            f"{call} must return a 1-D sequence of integer candidate ids, got "
            f"{type(out).__name__}{shape}"
        )
    ids = ids.long().cpu()
    unknown = ids[~torch.isin(ids, table.ids)]
    if unknown.numel():
        raise GradAlignError(
            f"{call} returned ids that are not candidates: {unknown[:10].tolist()}"
        )
    if ids.unique().numel() != ids.numel():
        raise GradAlignError(f"{call} returned an id twice: {ids.tolist()[:20]}")
    return ids


def _is_int(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


class GradAlign:
    """Gradient-aligned selection of RL training problems.

    Args:
        extractor: computes per-group gradients; default [`FullGradient`][gradalign.extractors.full.FullGradient] (exact, the paper's).
        objective: the GRPO loss; default ``GRPOObjective()``.
        scorer: "cosine" (the paper's default) or "inner_product" (with the unit-norm target).
        policy: ``Candidates -> selected ids``; default ``TopFraction(0.5)``.
        target: how validation gradients form the target: "mean", "normalized-mean" or "batch".
        aggregate: with several validation tasks, how per-task scores reduce ("max", "mean", "min").
        keep_grads: keep candidate gradients on the result (for diversity-aware policies); costs
            G x D memory.
        distributed: "auto" (default) hands every call to
            [`DistributedGradAlign`][gradalign.distributed.DistributedGradAlign] when ``torch.distributed`` is
            initialized with several ranks; True requires it; False never communicates; a
            [`Distributed`][gradalign.distributed.Distributed] picks the process group and timeout. On
            that path every rank passes its own shard of candidate and validation groups (ids
            unique across ranks, None for a rank without one): batch statistics and targets are
            all-reduced, scores all-gathered, and every rank returns the single-process selection.
        preconditioner: optimizer-aware targets: parameter name -> scale applied to the validation
            gradient before the target is formed, e.g. ``AdamPreconditioner.from_optimizer(opt,
            model)`` (the LESS preconditioning ``g_V / (sqrt(v_hat) + eps)``); needs an extractor
            that works on named parameters (FullGradient, RandomProjectedGradient).

    Examples:
        >>> from gradalign.policies import TopK
        >>> selector = GradAlign(RandomProjectedGradient(dim=1024), policy=TopK(2))
        >>> validation = Rollouts.from_token_ids(  # rollouts of trusted validation problems
        ...     [[5, 6, 7]] * 2, [[20, 1], [21, 1]], [1.0, 0.0], group_ids=[100, 100])
        >>> sel = selector.select(model, rollouts, validation)
        >>> sel.ids.shape  # the 2 best-aligned problems, best first
        torch.Size([2])
    """

    def __init__(
        self,
        extractor: GradientExtractor | None = None,
        objective: Objective | None = None,
        scorer: str = "cosine",
        policy: Callable[[Candidates], torch.Tensor] | None = None,
        *,
        target: str = "mean",
        aggregate: str = "max",
        keep_grads: bool = False,
        preconditioner: Mapping[str, torch.Tensor] | None = None,
        distributed: bool | str | _dist.Distributed = "auto",
    ) -> None:
        if extractor is not None and not isinstance(extractor, GradientExtractor):
            raise GradAlignError(
                f"GradAlign: extractor must be a GradientExtractor, got {type(extractor).__name__}"
            )
        if scorer not in SCORERS:
            raise GradAlignError(f"GradAlign: scorer must be one of {SCORERS}, got {scorer!r}")
        if target not in TARGET_REDUCTIONS:
            raise GradAlignError(
                f"GradAlign: target must be one of {TARGET_REDUCTIONS}, got {target!r}"
            )
        if aggregate not in TASK_AGGREGATIONS:
            raise GradAlignError(
                f"GradAlign: aggregate must be one of {TASK_AGGREGATIONS}, got {aggregate!r}"
            )
        if objective is not None and not isinstance(objective, Objective):
            raise GradAlignError(
                "GradAlign: objective must be a gradalign Objective (e.g. GRPOObjective), got "
                f"{type(objective).__name__}"
            )
        if policy is not None and not callable(policy):
            raise GradAlignError(f"GradAlign: policy must be callable, got {type(policy).__name__}")
        self.extractor = FullGradient() if extractor is None else extractor
        self.objective = GRPOObjective() if objective is None else objective
        self.scorer = scorer
        self.policy = TopFraction(0.5) if policy is None else policy
        self.target = target
        self.aggregate = aggregate
        self.keep_grads = keep_grads
        self.distributed = _dist.check_distributed_option("GradAlign", distributed)
        if preconditioner is not None and not hasattr(self.extractor, "preconditioner"):
            raise GradAlignError(
                "GradAlign: preconditioner needs an extractor over named parameters "
                f"(FullGradient, RandomProjectedGradient), got {type(self.extractor).__name__}"
            )
        self.preconditioner = preconditioner

    def __repr__(self) -> str:
        return (
            f"GradAlign(extractor={self.extractor!r}, objective={self.objective!r}, "
            f"scorer={self.scorer!r}, policy={self.policy!r}, target={self.target!r})"
        )

    def driver(self) -> _dist.DistributedGradAlign | None:
        """The multi-process driver when ``distributed`` resolves to several ranks, else None."""
        settings = _dist.resolve(self.distributed)
        return None if settings is None else _dist.DistributedGradAlign(self, settings)

    # Seams: one process's share of each stage (the distributed driver combines them). ----------

    def target_state(
        self,
        model: nn.Module,
        validation: Rollouts,
        *,
        tasks: Mapping[int, Any] | None = None,
        stats: BatchStats | None = None,
        progress: bool = False,
    ) -> TargetAccumulator:
        """The validation gradients of ``validation`` summed into a [`TargetAccumulator`][gradalign.scoring.TargetAccumulator].

        Args:
            stats: the batch statistics of the whole validation set when ``validation`` is a
                shard of it (see [`Objective.prepare`][gradalign.objective.Objective.prepare]).
        """
        acc = TargetAccumulator(self.target, self.objective, tasks)
        extractor = self.extractor
        if self.preconditioner is not None:
            # Only the target is preconditioned; candidates keep their plain gradients.
            extractor = dataclasses.replace(extractor, preconditioner=self.preconditioner)  # type: ignore[type-var]
        prepared = self.objective.prepare(validation, stats)
        for chunk in extractor.iter_groups(model, validation, prepared, progress=progress):
            acc.add(chunk)
            del chunk  # free it before the extractor fills the next one
        return acc

    def check_targets(
        self, target: torch.Tensor, labels: tuple[Any, ...], tasks: Mapping[int, Any] | None
    ) -> tuple[torch.Tensor, tuple[Any, ...]]:
        """``(target, labels)`` if every target is non-zero, else a GradAlignError that says why."""
        empty = [labels[i] for i in (target == 0).all(dim=1).nonzero().flatten().tolist()]
        if empty:
            which = f" for tasks {empty}" if tasks is not None else ""
            raise GradAlignError(
                f"GradAlign.targets: the validation gradient is zero{which}; every validation group "
                "has zero reward spread (all rollouts right or all wrong), or no rank holds a "
                "validation group of the task. Sample more validation rollouts or use problems "
                "of intermediate difficulty"
            )
        return target, labels

    def candidate_rows(
        self,
        model: nn.Module,
        candidates: Rollouts,
        target: torch.Tensor,
        *,
        stats: BatchStats | None = None,
        progress: bool = False,
    ) -> CandidateRows:
        """The alignment terms of ``candidates`` with ``target`` (Q, D), streamed, sorted by id."""
        prepared = self.objective.prepare(candidates, stats)
        ids, dots, norms, spread, kept = [], [], [], [], []
        for chunk in self.extractor.iter_groups(model, candidates, prepared, progress=progress):
            grads = chunk.grads.float()  # (Gc, D)
            ids.append(chunk.group_ids)
            dot, norm, _ = alignment_terms(grads, target)  # (Gc, Q), (Gc,), (Q,)
            dots.append(dot)
            norms.append(norm)
            spread.append(chunk.zero_spread)
            if self.keep_grads:
                kept.append(grads)
            del chunk, grads  # only the (Q, D) targets and one chunk are ever held
        all_ids = torch.cat(ids)
        order = torch.argsort(all_ids)
        return CandidateRows(
            ids=all_ids[order],
            dot=torch.cat(dots)[order],
            grad_norm=torch.cat(norms)[order],
            zero_spread=torch.cat(spread)[order],
            grads=torch.cat(kept)[order] if self.keep_grads else None,
        )

    def make_alignment(
        self, rows: CandidateRows, target: torch.Tensor, labels: tuple[Any, ...]
    ) -> Alignment:
        """An [`Alignment`][gradalign.selector.Alignment] from candidate rows and the targets they were scored against."""
        return Alignment(
            ids=rows.ids,
            dot=rows.dot,
            grad_norm=rows.grad_norm,
            target_norm=row_norms(target),
            zero_spread=rows.zero_spread,
            task_labels=labels,
            grads=rows.grads,
            aggregate=self.aggregate,
        )

    def make_table(self, table: Candidates, al: Alignment) -> Candidates:
        """The candidate table with this selector's scores, per-task scores and flags."""
        per_task = al.task_cosine if self.scorer == "cosine" else al.task_inner_product
        return dataclasses.replace(
            table,
            scores=al.scores(self.scorer),
            zero_spread=al.zero_spread,
            zero_gradient=al.zero_gradient,
            task_scores=per_task,
            grads=al.grads,
        )

    # The stages, single-process (several processes: the driver runs them). --------------------

    @api_call("GradAlign.targets")
    def targets(
        self,
        model: nn.Module,
        validation: Rollouts,
        *,
        tasks: Mapping[int, Any] | None = None,
        progress: bool = False,
    ) -> Targets:
        """(Q, D) target directions from the validation rollouts, and their task labels.

        Returns:
            [`Targets`][gradalign.selector.Targets] ``(directions, labels)``: pass them in place of the
            validation rollouts to score more candidates against the same targets.
        """
        if (driver := self.driver()) is not None:
            return Targets(*driver.targets(model, validation, tasks=tasks, progress=progress))
        check_rollouts("validation", validation)
        check_tasks(tasks, validation)
        acc = self.target_state(model, validation, tasks=tasks, progress=progress)
        return Targets(*self.check_targets(acc.result(), tuple(acc.labels or (0,)), tasks))

    def resolve_targets(
        self,
        model: nn.Module,
        validation: Rollouts | Targets,
        *,
        tasks: Mapping[int, Any] | None,
        progress: bool,
    ) -> Targets:
        """``validation`` itself when it is [`Targets`][gradalign.selector.Targets], else the targets computed from it."""
        if isinstance(validation, Targets):
            directions = validation.directions
            if not isinstance(directions, torch.Tensor) or directions.dim() != 2:
                raise GradAlignError(
                    "GradAlign.alignment: Targets.directions must be a (Q, D) tensor, got "
                    f"{type(directions).__name__} {tuple(getattr(directions, 'shape', ()))}"
                )
            if len(validation.labels) != directions.shape[0]:
                raise GradAlignError(
                    f"GradAlign.alignment: Targets has {directions.shape[0]} directions but "
                    f"{len(validation.labels)} labels"
                )
            return validation
        return self.targets(model, validation, tasks=tasks, progress=progress)

    @api_call("GradAlign.alignment")
    def alignment(
        self,
        model: nn.Module,
        candidates: Rollouts,
        validation: Rollouts | Targets,
        *,
        tasks: Mapping[int, Any] | None = None,
        progress: bool = False,
    ) -> Alignment:
        """Alignment of every candidate group with the validation target(s), in one pass.

        Args:
            model: the current policy.
            candidates: rollouts of the candidate problems (one group per problem); with several
                processes, this rank's shard (None for none).
            validation: rollouts of the trusted validation problems (this rank's shard, likewise),
                or the [`Targets`][gradalign.selector.Targets] already computed from them this round.
            tasks: optional mapping validation group id -> task label (one target per task).
            progress: show progress bars.
        """
        if (driver := self.driver()) is not None:
            return driver.alignment(model, candidates, validation, tasks=tasks, progress=progress)
        check_rollouts("candidates", candidates)
        if not isinstance(validation, Targets):
            check_rollouts("validation", validation, " or the Targets of GradAlign.targets")
        warn_shared_ids(candidates, validation)
        target, labels = self.resolve_targets(model, validation, tasks=tasks, progress=progress)
        rows = self.candidate_rows(model, candidates, target, progress=progress)
        return self.make_alignment(rows, target, labels)

    @api_call("GradAlign.score")
    def score(
        self,
        model: nn.Module,
        candidates: Rollouts,
        validation: Rollouts | Targets,
        *,
        tasks: Mapping[int, Any] | None = None,
        progress: bool = False,
    ) -> Candidates:
        """The candidate table with scores, accuracy, reward spread and zero-gradient flags."""
        if (driver := self.driver()) is not None:
            return driver.score(model, candidates, validation, tasks=tasks, progress=progress)
        al = self.alignment(model, candidates, validation, tasks=tasks, progress=progress)
        return self.make_table(Candidates.from_rollouts(candidates), al)

    @api_call("GradAlign.select")
    def select(
        self,
        model: nn.Module,
        candidates: Rollouts,
        validation: Rollouts | Targets,
        *,
        tasks: Mapping[int, Any] | None = None,
        progress: bool = False,
    ) -> Selection:
        """Score the candidates and apply the policy: the selected ids in rank order."""
        table = self.score(model, candidates, validation, tasks=tasks, progress=progress)
        return self.apply_policy(table)

    def apply_policy(self, table: Candidates) -> Selection:
        """Run the policy on an already scored candidate table."""
        ids = _check_selected(self.policy, self.policy(table), table)
        scores = None if table.scores is None else table.scores[table.positions(ids)]
        return Selection(ids=ids, scores=scores, candidates=table)


def check_rollouts(what: str, value: Any, alternative: str = "") -> None:
    """A single-process call needs ``what`` as Rollouts (or ``alternative``): None stands for a
    rank without any, which only several processes (torch.distributed) can make up for."""
    if isinstance(value, Rollouts):
        return
    got = type(value).__name__
    if value is None:
        got = "None (only a rank without any passes None, when torch.distributed runs several)"
    raise GradAlignError(
        f"{current_call('GradAlign.alignment')}: {what} must be a gradalign.Rollouts"
        f"{alternative}, got {got}"
    )


def check_tasks(tasks: Any, validation: Rollouts | None) -> None:
    """``tasks`` must be a mapping, and every label must have a group in ``validation``."""
    if tasks is None:
        return
    if not isinstance(tasks, Mapping):
        raise GradAlignError(
            "GradAlign.targets: tasks must map each validation group id to a task label "
            f"(a dict), got {type(tasks).__name__}"
        )
    if validation is None:
        return
    present = {tasks[int(g)] for g in validation.unique_groups if int(g) in tasks}
    absent = sorted({t for t in tasks.values() if t not in present}, key=str)
    if absent:
        raise GradAlignError(
            f"GradAlign.targets: tasks labels {absent} have no validation group among the "
            "validation rollouts; give each task at least one validation problem or drop those "
            "labels"
        )


def warn_shared_ids(candidates: Rollouts | None, validation: Any) -> None:
    """A UserWarning when a group id is both a candidate and a validation problem."""
    if candidates is None or not isinstance(validation, Rollouts):
        return
    cand = candidates.unique_groups
    shared = cand[torch.isin(cand, validation.unique_groups.to(cand.device))]
    if shared.numel():
        warnings.warn(
            f"GradAlign.alignment: group ids {shared[:10].tolist()} are both candidates and "
            "validation problems; if they are different problems, give them distinct ids "
            "(policies, the curriculum and the store tell problems apart by id)",
            UserWarning,
            stacklevel=4,
        )
