"""Exact and random-projected per-group gradients by plain autograd.

Implementations: [`FullGradient`][gradalign.extractors.full.FullGradient] (the exact gradient of every trainable parameter, or of the
parameters of ``target_modules``) and [`RandomProjectedGradient`][gradalign.extractors.full.RandomProjectedGradient] (the same gradient projected
to ``dim`` by a seeded projection regenerated block by block, never stored).

Both run one micro-batched backward per group (groups need separate backwards for separate
gradients) and accumulate in float32 whatever the model's dtype.

Shape glossary: S sequences, T tokens, G groups, D gradient dimension, K projection dimension.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from gradalign._forward import DEFAULT_LOGITS_ELEMENTS, fsdp_root, response_logprobs
from gradalign._modules import TargetModules, check_target_modules, target_parameters
from gradalign._validate import check_int
from gradalign.errors import GradAlignError
from gradalign.extractors.base import (
    CHUNK_BYTES,
    DEFAULT_BATCH_SIZE,
    GradientExtractor,
    GroupCounter,
    GroupGradients,
    Segment,
    extraction_mode,
    group_rows,
    model_device,
)
from gradalign.objective import Objective, TokenWeights, prepare_weights
from gradalign.projection import DEFAULT_KIND, Projector
from gradalign.rollouts import Rollouts, micro_batch_width

__all__ = ["FullGradient", "RandomProjectedGradient"]


def _group_gradient(
    model: nn.Module,
    rollouts: Rollouts,
    prepared: TokenWeights,
    rows: torch.Tensor,
    params: list[nn.Parameter],
    out: list[torch.Tensor],
    *,
    batch_size: int,
    max_logits_elements: int,
    share_prompts: bool,
) -> None:
    """Add one group's float32 loss gradient w.r.t. ``params`` into ``out`` (zeroed views)."""
    device = model_device(model)
    needs_logprobs = prepared.needs_logprobs
    for mb in rows.split(batch_size):
        width = micro_batch_width(rollouts.attention_mask[mb])
        if not needs_logprobs:
            weights = prepared.token_weights(rows=mb, width=width)  # (S', W)
            if not bool(weights.any()):
                continue  # zero-spread rows contribute exactly nothing
        # Extraction differentiates even when the caller runs under torch.no_grad().
        with torch.enable_grad():
            logp = response_logprobs(
                model,
                rollouts.input_ids[mb, :width].to(device),
                rollouts.attention_mask[mb, :width].to(device),
                rollouts.response_mask[mb, :width].to(device),
                max_logits_elements=max_logits_elements,
                # One group: every row of the micro-batch may share its prompt with the others.
                share_keys=torch.zeros(len(mb), dtype=torch.long) if share_prompts else None,
            )  # (S', W)
            if needs_logprobs:
                weights = prepared.token_weights(
                    logp.detach().to(rollouts.device), rows=mb, width=width
                )
            loss = -(weights.to(logp.device) * logp).sum()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        for a, g in zip(out, grads, strict=True):
            if g is not None:
                a.add_(g.float())


@dataclass
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
            for every rollout (the same numbers up to float rounding; see
            [`FactorizedGradient`][gradalign.extractors.factorized.FactorizedGradient]).

    The model is left as found: requires_grad flags, ``.grad`` and train/eval mode (extraction runs
    in eval mode so dropout is off).

    Examples:
        >>> out = FullGradient(batch_size=4).per_group(model, rollouts)
        >>> out.grads.shape  # (groups, parameters)
        torch.Size([4, 87616])
    """

    target_modules: TargetModules = None
    batch_size: int = DEFAULT_BATCH_SIZE
    group_chunk: int | None = None
    max_logits_elements: int = DEFAULT_LOGITS_ELEMENTS
    preconditioner: Mapping[str, torch.Tensor] | None = None
    share_prompts: bool = False
    projection: Projector | None = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.projection is not None and not isinstance(self.projection, Projector):
            raise GradAlignError(
                f"{name}: projection must be a gradalign.projection.Projector or None, got "
                f"{type(self.projection).__name__}"
            )
        check_target_modules(name, self.target_modules)
        check_int(name, "batch_size", self.batch_size, 1)
        check_int(name, "group_chunk", self.group_chunk, 1, allow_none=True)
        check_int(name, "max_logits_elements", self.max_logits_elements, 1)
        if not isinstance(self.share_prompts, bool):
            raise GradAlignError(
                f"{name}: share_prompts must be a bool, got {self.share_prompts!r}"
            )

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

    def _precondition(self, segments: tuple[Segment, ...], flat: torch.Tensor) -> None:
        """Scale one group's flat gradient in place, parameter by parameter."""
        if self.preconditioner is None:
            return
        for seg in segments:
            scale = self.preconditioner.get(seg.name)
            if scale is not None:
                flat[seg.start : seg.stop].mul_(scale.to(flat.device, flat.dtype).flatten())

    def _project_into(
        self, segments: tuple[Segment, ...], flat: torch.Tensor, row: torch.Tensor
    ) -> None:
        """Project one group's full gradient as soon as it exists, parameter by parameter.

        Only the (G, K) rows and one group's full gradient are ever held, however large the pool.
        """
        assert self.projection is not None
        for seg in segments:
            row += self.projection(flat[seg.start : seg.stop][None], name=seg.name)[0]  # (K,)

    def iter_groups(
        self,
        model: nn.Module,
        rollouts: Rollouts,
        objective: Objective | TokenWeights | None = None,
        *,
        progress: bool = False,
    ) -> Iterator[GroupGradients]:
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
        prepared = prepare_weights(call, objective, rollouts)
        return self._chunks(model, rollouts, prepared, named, progress)

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
        params = [p for _, p in named]
        segments, dim = self._segments(named), self._row_dim(named)
        chunk = self.group_chunk or max(1, CHUNK_BYTES // (4 * max(1, dim)))
        zero_spread = prepared.zero_spread(rollouts).cpu()
        tokens, sizes = rollouts.group_token_counts().cpu(), rollouts.group_sizes().cpu()
        all_rows = group_rows(rollouts)
        counter = GroupCounter(enabled=progress, total=len(all_rows), desc=type(self).__name__)
        device = model_device(model)
        # A projected row needs one group's full gradient as scratch; an exact row is that itself.
        scratch = None if self.projection is None else torch.zeros(segments[-1].stop, device=device)
        try:
            for lo in range(0, len(all_rows), chunk):
                hi = min(len(all_rows), lo + chunk)
                buffer = torch.zeros(hi - lo, dim, dtype=torch.float32, device=device)  # (Gc, D)
                with extraction_mode(model, params):
                    for g in range(lo, hi):
                        flat = buffer[g - lo] if scratch is None else scratch.zero_()
                        views = [
                            flat[s.start : s.stop].view(p.shape)
                            for s, p in zip(segments, params, strict=True)
                        ]
                        _group_gradient(
                            model,
                            rollouts,
                            prepared,
                            all_rows[g],
                            params,
                            views,
                            batch_size=self.batch_size,
                            max_logits_elements=self.max_logits_elements,
                            share_prompts=self.share_prompts,
                        )
                        self._precondition(segments, flat)
                        if scratch is not None:
                            self._project_into(segments, flat, buffer[g - lo])
                        counter.update(1)
                yield GroupGradients(
                    group_ids=rollouts.unique_groups[lo:hi].cpu(),
                    grads=buffer.cpu(),
                    num_sequences=sizes[lo:hi],
                    num_tokens=tokens[lo:hi],
                    zero_spread=zero_spread[lo:hi],
                    segments=segments if self.projection is None else (),
                )
        finally:
            counter.close()


@dataclass(init=False)
class RandomProjectedGradient(FullGradient):
    """[`FullGradient`][gradalign.extractors.full.FullGradient] with ``projection=Projector(dim, kind, seed)``: a thin alias.

    The projection of parameter ``name`` is regenerated block by block from ``(seed, name)``, so no
    dense (D, K) matrix ever sits in memory, and the same seed gives the same numbers whatever the
    batch size, chunking or device. Inner products are preserved in expectation
    (Johnson-Lindenstrauss).

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
        kind: str = DEFAULT_KIND,
        seed: int = 0,
        target_modules: TargetModules = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        group_chunk: int | None = None,
        max_logits_elements: int = DEFAULT_LOGITS_ELEMENTS,
        preconditioner: Mapping[str, torch.Tensor] | None = None,
        share_prompts: bool = False,
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
