"""GradAlign in one call: extractor + objective + scorer + policy.

[`GradAlign`][gradalign.selector.GradAlign] runs one pipeline, ``targets`` -> ``alignment`` ->
``score`` -> ``select``, producing [`Targets`][gradalign.alignment.Targets],
[`Alignment`][gradalign.alignment.Alignment], a scored [`Candidates`][gradalign.candidates.Candidates]
table and a [`Selection`][gradalign.alignment.Selection]. Each stage that needs the whole batch asks a
[`Communicator`][gradalign.communicator.Communicator] to combine it: [`Local`][gradalign.communicator.Local]
in one process, [`TorchDistributed`][gradalign.distributed.TorchDistributed] over the ranks of a
``torch.distributed`` group (chosen by ``distributed=``). There is no second pipeline.

Candidate gradients are streamed: only the (Q, D) targets and one chunk of candidate gradients sit in
memory, so exact full-parameter scores work on models whose G x D gradients would not fit.

Shape glossary: G candidate groups, D gradient dimension, Q targets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from gradalign import distributed as _dist
from gradalign._calls import api_call
from gradalign._inputs import (
    check_rollouts,
    check_selected,
    check_tasks,
    checked_targets,
    warn_shared_ids,
)
from gradalign._options import Rule, boolean, choice, function, instance
from gradalign.alignment import Alignment, Selection, Targets
from gradalign.communicator import Communicator, Local
from gradalign.errors import GradAlignError
from gradalign.extractors.base import GradientExtractor
from gradalign.extractors.factorized import FactorizedGradient
from gradalign.objective import BatchStats, GRPOObjective, Objective
from gradalign.policies import Candidates, TopFraction
from gradalign.rollouts import Rollouts
from gradalign.scoring import (
    SCORERS,
    Scorer,
    TargetAccumulator,
    TargetReduction,
    TaskAggregation,
    alignment_terms,
    row_norms,
)

# Alignment, Selection and Targets live in gradalign.alignment; importable from here as before.
__all__ = ["SCORERS", "Alignment", "GradAlign", "Selection", "Targets"]


_RULES: dict[str, Rule] = {
    "extractor": instance(GradientExtractor, "GradientExtractor"),
    "objective": instance(Objective, "gradalign Objective (e.g. GRPOObjective)"),
    "scorer": choice(Scorer),
    "target": choice(TargetReduction),
    "aggregate": choice(TaskAggregation),
    "policy": function(none=True),
    "keep_grads": boolean(),
}
"""The checks of GradAlign's settings, in the declarative rules of every settings class."""


def _setting(name: str, value: Any) -> Any:
    """``value`` checked (and normalized) by the rule of GradAlign's setting ``name``."""
    return _RULES[name]("GradAlign", name, value)


class GradAlign:
    """Gradient-aligned selection of RL training problems.

    Args:
        extractor: computes per-group gradients; default
            ``FactorizedGradient(32, 32)``: every linear layer's gradient projected to a 32 x 32
            block (32 input and 32 output directions per layer), all candidates from one batched
            backward, each group's prompt run once. ``FullGradient()`` is the exact, unprojected
            gradient the paper uses (D = every trainable parameter: memory G x D).
        objective: the GRPO loss; default ``GRPOObjective()``.
        scorer: "cosine" (the paper's default) or "inner_product" (with the unit-norm target).
        policy: ``Candidates -> selected ids``; default ``TopFraction(0.25)``, the best quarter.
        target: how validation gradients form the target: "mean", "normalized-mean" or "batch".
        aggregate: with several validation tasks, how per-task scores reduce ("max", "mean", "min").
        keep_grads: keep candidate gradients on the result (for diversity-aware policies); costs
            G x D memory.
        distributed: "auto" (default) runs every call over the ranks of ``torch.distributed``
            (through [`TorchDistributed`][gradalign.distributed.TorchDistributed]) when it is
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
        scorer: Scorer = "cosine",
        policy: Callable[[Candidates], torch.Tensor] | None = None,
        *,
        target: TargetReduction = "mean",
        aggregate: TaskAggregation = "max",
        keep_grads: bool = False,
        preconditioner: Mapping[str, torch.Tensor] | None = None,
        distributed: bool | str | _dist.Distributed = "auto",
    ) -> None:
        # The same declared rules as the settings dataclasses (gradalign._options), applied here
        # because a GradAlign is a driver that integrations rebind, not a frozen value.
        extractor = _setting("extractor", extractor)
        objective = _setting("objective", objective)
        self.scorer: Scorer = _setting("scorer", scorer)
        self.target: TargetReduction = _setting("target", target)
        self.aggregate: TaskAggregation = _setting("aggregate", aggregate)
        policy = _setting("policy", policy)
        self.keep_grads = _setting("keep_grads", keep_grads)
        self.extractor = FactorizedGradient(32, 32) if extractor is None else extractor
        self.objective = GRPOObjective() if objective is None else objective
        self.policy = TopFraction(0.25) if policy is None else policy
        self.distributed = _dist.check_distributed_option("GradAlign", distributed)
        if preconditioner is not None and not hasattr(self.extractor, "preconditioner"):
            raise GradAlignError(
                "GradAlign: preconditioner needs an extractor over named parameters "
                f"(FullGradient, RandomProjectedGradient), got {type(self.extractor).__name__}; pass extractor=FullGradient() (the default is FactorizedGradient(32, 32))"
            )
        self.preconditioner = preconditioner

    def __repr__(self) -> str:
        return (
            f"GradAlign(extractor={self.extractor!r}, objective={self.objective!r}, "
            f"scorer={self.scorer!r}, policy={self.policy!r}, target={self.target!r})"
        )

    def _communicator(self) -> Communicator:
        """Local, or the torch.distributed group that ``distributed`` resolves to now."""
        settings = _dist.resolve(self.distributed)
        return Local() if settings is None else _dist.TorchDistributed(settings)

    # The public stages: each checks the processes agree, then runs the one pipeline. ----------

    @api_call("GradAlign.targets")
    def targets(
        self,
        model: nn.Module,
        validation: Rollouts | None,
        *,
        tasks: Mapping[int, Any] | None = None,
        progress: bool = False,
    ) -> Targets:
        """(Q, D) target directions from the validation rollouts, and their task labels.

        Args:
            model: the current policy.
            validation: rollouts of the trusted validation problems (with several processes,
                this rank's shard; None for a rank without one).
            tasks: optional mapping validation group id -> task label (one target per task).
            progress: show progress bars.

        Returns:
            [`Targets`][gradalign.alignment.Targets] ``(directions, labels)``: pass them in place of the
            validation rollouts to score more candidates against the same targets.
        """
        comm = self._communicator()
        comm.check_same(self, model)
        return self._targets(comm, model, validation, tasks, progress)

    @api_call("GradAlign.alignment")
    def alignment(
        self,
        model: nn.Module,
        candidates: Rollouts | None,
        validation: Rollouts | Targets | None,
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
                or the [`Targets`][gradalign.alignment.Targets] already computed from them this round.
            tasks: optional mapping validation group id -> task label (one target per task).
            progress: show progress bars.
        """
        comm = self._communicator()
        comm.check_same(self, model)
        return self._alignment(comm, model, candidates, validation, tasks, progress)

    @api_call("GradAlign.score")
    def score(
        self,
        model: nn.Module,
        candidates: Rollouts | None,
        validation: Rollouts | Targets | None,
        *,
        tasks: Mapping[int, Any] | None = None,
        progress: bool = False,
    ) -> Candidates:
        """The candidate table with scores, accuracy, reward spread and zero-gradient flags.

        Arguments as for [`alignment`][gradalign.selector.GradAlign.alignment]; with several
        processes every rank gets the whole table (every rank's groups).
        """
        comm = self._communicator()
        comm.check_same(self, model)
        return self._score(comm, model, candidates, validation, tasks, progress)

    @api_call("GradAlign.select")
    def select(
        self,
        model: nn.Module,
        candidates: Rollouts | None,
        validation: Rollouts | Targets | None,
        *,
        tasks: Mapping[int, Any] | None = None,
        progress: bool = False,
    ) -> Selection:
        """Score the candidates and apply the policy: the selected ids in rank order.

        Args:
            model: the current policy (a ``torch.nn.Module``; a peft model for ``LoRAGradient``).
            candidates: rollouts of the candidate problems, one group per problem (group id =
                problem id); with several processes, this rank's shard (None for none).
            validation: rollouts of the trusted validation problems (this rank's shard,
                likewise), or the [`Targets`][gradalign.alignment.Targets] of
                [`targets`][gradalign.selector.GradAlign.targets] computed earlier this round.
            tasks: optional mapping validation group id -> task label: one target per task,
                per-task scores reduced by ``aggregate``.
            progress: show progress bars.

        Returns:
            [`Selection`][gradalign.alignment.Selection]: ``ids`` (k,) in rank order,
            their ``scores``, the whole scored ``candidates`` table and the ``alignment`` (both
            scorers' values). With several processes every rank returns the same selection,
            the one a single process holding every shard would make.

        Raises:
            GradAlignError: a bad input (not Rollouts, NaN rewards, mismatched shapes), every
                validation group without reward spread (no target), non-finite gradients, a
                policy returning ids that are not candidates, or ranks that disagree.

        Examples:
            >>> selector = GradAlign(FactorizedGradient(8, 8), policy=policies.TopK(1))
            >>> validation = rollouts.select_groups([0, 1])
            >>> sel = selector.select(model, rollouts.select_groups([2, 3]), validation)
            >>> sel.ids.tolist(), sel.candidates.ids.tolist()
            ([3], [2, 3])
            >>> sel.alignment.cosine.shape, sel.alignment.inner_product.shape  # both scorers
            (torch.Size([2]), torch.Size([2]))
        """
        comm = self._communicator()
        comm.check_same(self, model)
        table, al = self._scored(comm, model, candidates, validation, tasks, progress)
        return dataclasses.replace(self.apply_policy(table), alignment=al)

    # The pipeline (one path; the communicator combines what spans processes). ----------------

    def _targets(
        self,
        comm: Communicator,
        model: nn.Module,
        validation: Rollouts | None,
        tasks: Mapping[int, Any] | None,
        progress: bool,
    ) -> Targets:
        if not comm.sharded:
            check_rollouts("validation", validation)
        check_tasks(tasks, None if comm.sharded else validation)  # sharded: labels may be elsewhere
        stats = comm.batch_stats(validation, "validation")
        acc = TargetAccumulator(self.target, self.objective, tasks)
        sums = weights = ids = None
        if validation is not None:
            acc = self._target_state(model, validation, tasks, stats, progress)
            (sums, weights), ids = acc.state(), validation.unique_groups
        sums, weights = comm.reduce_target(sums, weights, ids)
        return self._check_targets(acc.result(sums, weights), tuple(acc.labels or (0,)), tasks)

    def _alignment(
        self,
        comm: Communicator,
        model: nn.Module,
        candidates: Rollouts | None,
        validation: Rollouts | Targets | None,
        tasks: Mapping[int, Any] | None,
        progress: bool,
    ) -> Alignment:
        if not comm.sharded:
            check_rollouts("candidates", candidates)
            if not isinstance(validation, Targets):
                check_rollouts("validation", validation, " or the Targets of GradAlign.targets")
        warn_shared_ids(candidates, validation)
        if isinstance(validation, Targets):
            target, labels = checked_targets(validation)
        else:
            target, labels = self._targets(comm, model, validation, tasks, progress)
        stats = comm.batch_stats(candidates, "candidate")
        local = None
        if candidates is not None:
            local = self._candidate_rows(model, candidates, target, labels, stats, progress)
        return comm.gather_alignment(local, target=target, labels=labels, aggregate=self.aggregate)

    def _score(
        self,
        comm: Communicator,
        model: nn.Module,
        candidates: Rollouts | None,
        validation: Rollouts | Targets | None,
        tasks: Mapping[int, Any] | None,
        progress: bool,
    ) -> Candidates:
        return self._scored(comm, model, candidates, validation, tasks, progress)[0]

    def _scored(
        self,
        comm: Communicator,
        model: nn.Module,
        candidates: Rollouts | None,
        validation: Rollouts | Targets | None,
        tasks: Mapping[int, Any] | None,
        progress: bool,
    ) -> tuple[Candidates, Alignment]:
        al = self._alignment(comm, model, candidates, validation, tasks, progress)
        table = comm.gather_candidates(candidates)
        per_task = al.task_cosine if self.scorer == "cosine" else al.task_inner_product
        scored = dataclasses.replace(
            table,
            scores=al.scores(self.scorer),
            zero_spread=al.zero_spread,
            zero_gradient=al.zero_gradient,
            task_scores=per_task,
            grads=al.grads,
        )
        return scored, al

    def _target_state(
        self,
        model: nn.Module,
        validation: Rollouts,
        tasks: Mapping[int, Any] | None,
        stats: BatchStats | None,
        progress: bool,
    ) -> TargetAccumulator:
        """This process's validation gradients summed into a TargetAccumulator (``stats``: the
        whole validation set's batch statistics when ``validation`` is a shard of it)."""
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

    def _check_targets(
        self, target: torch.Tensor, labels: tuple[Any, ...], tasks: Mapping[int, Any] | None
    ) -> Targets:
        """The targets if every one is non-zero, else a GradAlignError that says why."""
        empty = [labels[i] for i in (target == 0).all(dim=1).nonzero().flatten().tolist()]
        if empty:
            which = f" for tasks {empty}" if tasks is not None else ""
            raise GradAlignError(
                f"GradAlign.targets: the validation gradient is zero{which}; every validation group "
                "has zero reward spread (all rollouts right or all wrong), or no rank holds a "
                "validation group of the task. Sample more validation rollouts or use problems "
                "of intermediate difficulty"
            )
        return Targets(target, labels)

    def _candidate_rows(
        self,
        model: nn.Module,
        candidates: Rollouts,
        target: torch.Tensor,
        labels: tuple[Any, ...],
        stats: BatchStats | None,
        progress: bool,
    ) -> Alignment:
        """This process's candidates against ``target`` (Q, D), streamed, sorted by id."""
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
        return Alignment(
            ids=all_ids[order],
            dot=torch.cat(dots)[order],
            grad_norm=torch.cat(norms)[order],
            target_norm=row_norms(target),
            zero_spread=torch.cat(spread)[order],
            task_labels=labels,
            grads=torch.cat(kept)[order] if self.keep_grads else None,
            aggregate=self.aggregate,
        )

    def apply_policy(self, table: Candidates) -> Selection:
        """Run the policy on an already scored candidate table."""
        ids = check_selected(self.policy, self.policy(table), table)
        scores = None if table.scores is None else table.scores[table.positions(ids)]
        return Selection(ids=ids, scores=scores, candidates=table)
