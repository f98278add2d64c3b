"""Exact and random-projected per-group gradients by plain autograd.

Implementations: [`FullGradient`][gradalign.extractors.full.FullGradient] (the exact gradient of every trainable parameter, or of the
parameters of ``target_modules``) and [`RandomProjectedGradient`][gradalign.extractors.full.RandomProjectedGradient] (the same gradient projected
to ``dim`` by a seeded projection regenerated block by block, never stored).

Both run one micro-batched backward per group (groups need separate backwards for separate
gradients) and accumulate in float32 whatever the model's dtype. A tensor hook on every
differentiated parameter takes its gradient the moment autograd produces it: exact rows add it
into their slice of the preallocated result, projected rows stream it into the projection's sum.
Autograd gets a zero-stride zero back, so the whole gradient of a group never exists at once.

Shape glossary: S sequences, T tokens, G groups, D gradient dimension, K projection dimension.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from gradalign._modules import TARGET_MODULES_RULE, TargetModules, target_parameters
from gradalign._options import boolean, integer, option
from gradalign._validate import check_int
from gradalign.errors import GradAlignError
from gradalign.extractors._forward import DEFAULT_LOGITS_ELEMENTS, fsdp_root
from gradalign.extractors._hooks import ParameterSink
from gradalign.extractors.base import (
    DEFAULT_BATCH_SIZE,
    GradientExtractor,
    GroupColumns,
    GroupCounter,
    GroupGradients,
    Segment,
    chunk_size,
    extraction_mode,
    group_rows,
    model_device,
    weighted_loss,
)
from gradalign.objective import Objective, TokenWeights, prepare_weights
from gradalign.projection import DEFAULT_KIND, ProjectionKind, ProjectionSum, Projector
from gradalign.projection._projector import PROJECTOR_RULE
from gradalign.rollouts import Rollouts, micro_batch_width

__all__ = ["FullGradient", "RandomProjectedGradient"]


def _group_gradient(
    model: nn.Module,
    rollouts: Rollouts,
    prepared: TokenWeights,
    rows: torch.Tensor,
    params: list[nn.Parameter],
    sink: ParameterSink,
    *,
    batch_size: int,
    max_logits_elements: int,
    share_prompts: bool,
) -> None:
    """Hand one group's loss gradient w.r.t. ``params`` to ``sink``, parameter by parameter."""
    batches = rows.split(batch_size)
    for i, mb in enumerate(batches):
        sink.last = i == len(batches) - 1
        width = micro_batch_width(rollouts.attention_mask[mb])
        weights = None
        if not prepared.needs_logprobs:
            weights = prepared.token_weights(rows=mb, width=width)  # (S', W)
            if not bool(weights.any()):
                continue  # zero-spread rows contribute exactly nothing
        # Extraction differentiates even when the caller runs under torch.no_grad().
        with torch.enable_grad():
            loss = weighted_loss(
                model,
                rollouts,
                prepared,
                mb,
                width,
                weights,
                max_logits_elements=max_logits_elements,
                # One group: every row of the micro-batch may share its prompt with the others.
                share_keys=torch.zeros(len(mb), dtype=torch.long) if share_prompts else None,
            )
            # The hooks take every gradient; what autograd returns is zero-stride zeros.
            torch.autograd.grad(loss, params, allow_unused=True)


class _FiniteSum:
    """A projection sum that turns a NaN or inf gradient into a NaN row instead of an error.

    The projection refuses a NaN or inf projection (of a non-finite gradient, or one so large that
    its projection overflows) without knowing the group; a NaN row reaches
    [`GroupGradients`][gradalign.extractors.base.GroupGradients], whose one finiteness check names the
    groups and the likely cause, as for every other extractor. The extractor fixes every other
    input of the accumulator (names, shapes), so that refusal is its only possible error.
    """

    def __init__(self, acc: ProjectionSum) -> None:
        self._acc = acc
        self._broken = False

    def add(self, x: torch.Tensor, *, name: str) -> None:
        if self._broken:
            return
        try:
            self._acc.add(x, name=name)
        except GradAlignError:
            self._broken = True

    def result(self) -> torch.Tensor:
        """(1, K) projected row; all NaN when a gradient was not finite."""
        if not self._broken:
            try:
                return self._acc.result()
            except GradAlignError:
                pass
        return torch.full((1, self._acc.projector.dim), float("nan"), device=self._acc.device)


@dataclass(frozen=True)
class FullGradient(GradientExtractor):
    """The exact gradient of each group's GRPO loss (the paper's reference computation).

    Args:
        target_modules: None for every trainable parameter (requires_grad=True), else peft-style
            module selection ("all-linear", a regex, or a list of name suffixes) whose parameters
            are differentiated whether or not they are trainable.
        batch_size: sequences per forward/backward; bounds activation memory.
        group_chunk: groups per streamed chunk in `iter_groups`; None keeps a chunk of
            gradients under 1 GiB.
        max_logits_elements: size of one (rows, V) chunk of the vocabulary projection.
        preconditioner: optional parameter name -> scale (e.g. `AdamPreconditioner`) that
            multiplies each parameter's gradient before it is reduced or projected.
        projection: a [`Projector`][gradalign.projection.Projector]: each group's gradient is projected
            to K as soon as it is computed (rows are (K,)); None keeps exact rows.
        share_prompts: run the group's prompt once per micro-batch and reuse its key/value cache
            for every rollout (the same numbers up to float rounding; on by default, see
            [`FactorizedGradient`][gradalign.extractors.factorized.FactorizedGradient]).

    The model is left as found: requires_grad flags, ``.grad`` and train/eval mode (extraction runs
    in eval mode so dropout is off).

    Memory: exact rows are written parameter by parameter into a preallocated (G, D) float32
    result, so `per_group` peaks at about ``(G + 2) * D * 4`` bytes over the model itself (the
    result, one parameter's gradient in flight, the activations of one micro-batch) and
    `iter_groups` at ``(group_chunk + 2) * D * 4`` per chunk held. With ``projection`` only the
    (G, K) rows and one parameter's gradient are held, however large the pool.

    Examples:
        >>> out = FullGradient(batch_size=4).per_group(model, rollouts)
        >>> out.grads.shape  # (groups, parameters)
        torch.Size([4, 87616])
        >>> G, D = out.grads.shape  # the peak memory over the model is about (G + 2) * D * 4 bytes
        >>> round((G + 2) * D * 4 / 2**20, 1)  # MiB
        2.0
    """

    target_modules: TargetModules = option(None, TARGET_MODULES_RULE)
    batch_size: int = option(DEFAULT_BATCH_SIZE, integer(1))
    group_chunk: int | None = option(None, integer(1, none=True))
    max_logits_elements: int = option(DEFAULT_LOGITS_ELEMENTS, integer(1))
    preconditioner: Mapping[str, torch.Tensor] | None = None
    share_prompts: bool = option(True, boolean())
    projection: Projector | None = option(None, PROJECTOR_RULE)

    def _segments(self, named: list[tuple[str, nn.Parameter]]) -> tuple[Segment, ...]:
        segments, start = [], 0
        for name, p in named:
            segments.append(Segment(name, start, start + p.numel()))
            start += p.numel()
        return tuple(segments)

    def _row_dim(self, named: list[tuple[str, nn.Parameter]]) -> int:
        """D of a yielded row: K when projected, else the number of parameters."""
        return (
            self.projection.dim if self.projection is not None else sum(p.numel() for _, p in named)
        )

    def _scale(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """One parameter's gradient times its preconditioner scale (float32, flat)."""
        scale = None if self.preconditioner is None else self.preconditioner.get(name)
        if scale is None:
            return grad.reshape(-1)
        return grad.reshape(-1).float() * scale.to(grad.device, torch.float32).flatten()

    def iter_groups(
        self,
        model: nn.Module,
        rollouts: Rollouts,
        objective: Objective | TokenWeights | None = None,
        *,
        progress: bool = False,
    ) -> Iterator[GroupGradients]:
        named, prepared = self._prepare(model, rollouts, objective)
        return self._chunks(model, rollouts, prepared, named, progress)

    def per_group(
        self,
        model: nn.Module,
        rollouts: Rollouts,
        objective: Objective | TokenWeights | None = None,
        *,
        progress: bool = False,
    ) -> GroupGradients:
        """(G, D) gradients of each group's loss, groups sorted by id, written into one buffer.

        Exact rows go straight into a preallocated (G, D) result, parameter by parameter, so the
        peak memory is about (G + 2) * D * 4 bytes over the model (the result, one parameter's
        gradient in flight and the activations of one micro-batch); nothing is concatenated.
        """
        named, prepared = self._prepare(model, rollouts, objective)
        total = rollouts.num_groups
        counter = GroupCounter(enabled=progress, total=total, desc=type(self).__name__)
        try:
            columns = GroupColumns.of(rollouts, prepared)
            return self._fill(model, rollouts, prepared, named, range(0, total), columns, counter)
        finally:
            counter.close()

    def _prepare(
        self, model: nn.Module, rollouts: Rollouts, objective: Objective | TokenWeights | None
    ) -> tuple[list[tuple[str, nn.Parameter]], TokenWeights]:
        call = f"{type(self).__name__}.per_group"
        self._check_inputs(call, model, rollouts)
        if fsdp_root(model) is not None:
            raise GradAlignError(
                f"{call}: the model is sharded with FSDP2 (fully_shard); per-parameter gradients "
                "would gather every weight gradient of every group. Use FactorizedGradient (or "
                "LoRAGradient), which needs only layer inputs and output gradients and works on "
                "sharded weights"
            )
        named = target_parameters(model, self.target_modules, call=call)
        return named, prepare_weights(call, objective, rollouts)

    def _chunks(
        self,
        model: nn.Module,
        rollouts: Rollouts,
        prepared: TokenWeights,
        named: list[tuple[str, nn.Parameter]],
        progress: bool,
    ) -> Iterator[GroupGradients]:
        """Chunks of rows, each written into a preallocated (Gc, D) buffer.

        The model is put in extraction mode for each chunk and restored before the chunk is
        yielded, so a paused or abandoned stream never leaves the model in eval mode.
        """
        chunk = chunk_size(self.group_chunk, self._row_dim(named))
        total = rollouts.num_groups
        counter = GroupCounter(enabled=progress, total=total, desc=type(self).__name__)
        columns = GroupColumns.of(rollouts, prepared)  # once per call, sliced per chunk
        try:
            for lo in range(0, total, chunk):
                groups = range(lo, min(total, lo + chunk))
                yield self._fill(model, rollouts, prepared, named, groups, columns, counter)
        finally:
            counter.close()

    def _fill(
        self,
        model: nn.Module,
        rollouts: Rollouts,
        prepared: TokenWeights,
        named: list[tuple[str, nn.Parameter]],
        groups: range,
        columns: GroupColumns,
        counter: GroupCounter,
    ) -> GroupGradients:
        """Rows of the groups at positions ``groups`` (ascending ids), one preallocated buffer."""
        params = [p for _, p in named]
        segments = self._segments(named)
        lo = groups.start
        all_rows = group_rows(rollouts)
        call = f"{type(self).__name__}.per_group"
        with extraction_mode(model, params, call=call):
            # Made inside extraction mode: rows are written in place, which a tensor made
            # under a caller's inference_mode() would refuse.
            dim = self._row_dim(named)
            buffer = torch.zeros(len(groups), dim, device=model_device(model))  # (Gc, D)
            sink = ParameterSink(params)
            try:
                for g in groups:
                    args = (model, rollouts, prepared, all_rows[g], named, sink, buffer[g - lo])
                    if self.projection is None:
                        self._exact_row(*args, segments)
                    else:
                        self._projected_row(*args)
                    counter.update(1)
            finally:
                sink.close()
        kept = segments if self.projection is None else ()
        return columns.result(groups, buffer, kept, call)

    def _backward(
        self,
        model: nn.Module,
        rollouts: Rollouts,
        prepared: TokenWeights,
        rows: torch.Tensor,
        params: list[nn.Parameter],
        sink: ParameterSink,
    ) -> None:
        _group_gradient(
            model,
            rollouts,
            prepared,
            rows,
            params,
            sink,
            batch_size=self.batch_size,
            max_logits_elements=self.max_logits_elements,
            share_prompts=self.share_prompts,
        )

    def _exact_row(
        self,
        model: nn.Module,
        rollouts: Rollouts,
        prepared: TokenWeights,
        rows: torch.Tensor,
        named: list[tuple[str, nn.Parameter]],
        sink: ParameterSink,
        row: torch.Tensor,
        segments: tuple[Segment, ...],
    ) -> None:
        """One group's exact gradient, added into ``row`` (D,) parameter by parameter."""
        views = [row[s.start : s.stop] for s in segments]

        def take(k: int, grad: torch.Tensor) -> None:
            views[k].add_(grad.reshape(-1))

        sink.take = take
        self._backward(model, rollouts, prepared, rows, [p for _, p in named], sink)
        if self.preconditioner is not None:
            for seg, view in zip(segments, views, strict=True):
                scale = self.preconditioner.get(seg.name)
                if scale is not None:
                    view.mul_(scale.to(view.device, view.dtype).flatten())

    def _projected_row(
        self,
        model: nn.Module,
        rollouts: Rollouts,
        prepared: TokenWeights,
        rows: torch.Tensor,
        named: list[tuple[str, nn.Parameter]],
        sink: ParameterSink,
        row: torch.Tensor,
    ) -> None:
        """One group's projected gradient (K,) into ``row``: each parameter's block is projected
        as soon as autograd produces it and dropped, so no (D,) vector is ever held.

        ``sjlt`` streams every micro-batch's block into its intermediate sum at once (two passes
        over the block); the dense kinds keep a parameter's float32 sum only while more
        micro-batches of the group follow, and project it once.
        """
        assert self.projection is not None
        acc = _FiniteSum(self.projection.accumulator(device=row.device))
        pending: dict[int, torch.Tensor] = {}
        streamed = self.projection.kind == "sjlt"

        def add(k: int, grad: torch.Tensor) -> None:
            name = named[k][0]
            acc.add(self._scale(name, grad)[None], name=name)

        def take(k: int, grad: torch.Tensor) -> None:
            if streamed:
                add(k, grad)
            elif k in pending:
                pending[k].add_(grad)
                if sink.last:
                    add(k, pending.pop(k))
            elif sink.last:
                add(k, grad)
            else:
                pending[k] = grad.to(torch.float32, copy=True)

        sink.take = take
        self._backward(model, rollouts, prepared, rows, [p for _, p in named], sink)
        for k in list(pending):  # the group's last micro-batch was skipped (zero weights)
            add(k, pending.pop(k))
        row.copy_(acc.result()[0])


@dataclass(frozen=True, init=False)
class RandomProjectedGradient(FullGradient):
    """[`FullGradient`][gradalign.extractors.full.FullGradient] with ``projection=Projector(dim, kind, seed)``: a thin alias.

    The projection of parameter ``name`` is regenerated block by block from ``(seed, name)``, so no
    dense (D, K) matrix ever sits in memory, and the same seed gives the same numbers whatever the
    batch size, chunking or device. Inner products are preserved in expectation
    (Johnson-Lindenstrauss). Each parameter's gradient is projected as soon as autograd produces
    it and then dropped: only the (G, K) rows and one parameter's gradient are ever held. With
    the default ``kind="sjlt"`` a parameter costs two passes over its gradient (see
    [`ProjectionSum`][gradalign.projection.ProjectionSum]), about 0.1x a training step on
    SmolLM2-135M at ``dim=8192``.

    Args:
        dim: K, the projected dimension.
        kind: one of ``gradalign.projection.KINDS``; default "sjlt" (sparse, fastest).
        seed: projection seed.
        target_modules: as in [`FullGradient`][gradalign.extractors.full.FullGradient].
        batch_size: as in [`FullGradient`][gradalign.extractors.full.FullGradient].
        group_chunk: as in [`FullGradient`][gradalign.extractors.full.FullGradient].
        max_logits_elements: as in [`FullGradient`][gradalign.extractors.full.FullGradient].
        preconditioner: as in [`FullGradient`][gradalign.extractors.full.FullGradient].
        share_prompts: as in [`FullGradient`][gradalign.extractors.full.FullGradient].
        projection: a [`Projector`][gradalign.projection.Projector] instead of ``dim``/``kind``/``seed``.

    Examples:
        >>> out = RandomProjectedGradient(dim=1024, seed=0).per_group(model, rollouts)
        >>> out.grads.shape
        torch.Size([4, 1024])
    """

    def __init__(
        self,
        dim: int = 8192,
        kind: ProjectionKind = DEFAULT_KIND,
        seed: int = 0,
        target_modules: TargetModules = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        group_chunk: int | None = None,
        max_logits_elements: int = DEFAULT_LOGITS_ELEMENTS,
        preconditioner: Mapping[str, torch.Tensor] | None = None,
        share_prompts: bool = True,
        projection: Projector | None = None,
    ) -> None:
        if projection is None:
            projection = Projector(dim=_dim(dim), kind=kind, seed=seed)
        super().__init__(
            target_modules=target_modules,
            batch_size=batch_size,
            group_chunk=group_chunk,
            max_logits_elements=max_logits_elements,
            preconditioner=preconditioner,
            share_prompts=share_prompts,
            projection=projection,
        )

    @property
    def dim(self) -> int:
        """K, the projected dimension."""
        assert self.projection is not None
        return self.projection.dim

    @property
    def kind(self) -> str:
        """The projection kind."""
        assert self.projection is not None
        return self.projection.kind

    @property
    def seed(self) -> int:
        """The projection seed."""
        assert self.projection is not None
        return self.projection.seed


def _dim(dim: object) -> int:
    return int(check_int("RandomProjectedGradient", "dim", dim, 1))
