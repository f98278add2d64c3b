"""Exact and random-projected per-group gradients by plain autograd.

Implementations: :class:`FullGradient` (the exact gradient of every trainable parameter, or of the
parameters of ``target_modules``) and :class:`RandomProjectedGradient` (the same gradient projected
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

from gradalign._forward import DEFAULT_LOGITS_ELEMENTS, response_logprobs
from gradalign._modules import TargetModules, target_parameters
from gradalign.errors import GradAlignError
from gradalign.extractors.base import (
    GradientExtractor,
    GroupGradients,
    Segment,
    extraction_mode,
    group_rows,
    model_device,
    progress_bar,
)
from gradalign.objective import GRPOObjective
from gradalign.projection import KINDS, project
from gradalign.rollouts import Rollouts, micro_batch_width

__all__ = ["FullGradient", "RandomProjectedGradient"]

_CHUNK_BYTES = 2**30  # float32 bytes of group gradients held before a chunk is yielded


def _group_gradient(
    model: nn.Module,
    rollouts: Rollouts,
    objective: GRPOObjective,
    rows: torch.Tensor,
    params: list[nn.Parameter],
    *,
    batch_size: int,
    max_logits_elements: int,
    share_prompts: bool,
) -> list[torch.Tensor]:
    """float32 gradients of one group's loss w.r.t. ``params``, micro-batch by micro-batch."""
    acc = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
    device = model_device(model)
    needs_logprobs = objective.needs_logprobs(rollouts)
    for mb in rows.split(batch_size):
        width = micro_batch_width(rollouts.attention_mask[mb])
        if not needs_logprobs:
            weights = objective.token_weights(rollouts, rows=mb, width=width)  # (S', W)
            if not bool(weights.any()):
                continue  # zero-spread rows contribute exactly nothing
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
            weights = objective.token_weights(
                rollouts, logp.detach().to(rollouts.device), rows=mb, width=width
            )
        loss = -(weights.to(logp.device) * logp).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for a, g in zip(acc, grads, strict=True):
            if g is not None:
                a.add_(g.float())
    return acc


@dataclass
class FullGradient(GradientExtractor):
    """The exact gradient of each group's GRPO loss (the paper's reference computation).

    Args:
        target_modules: None for every trainable parameter (requires_grad=True), else peft-style
            module selection ("all-linear", a regex, or a list of name suffixes) whose parameters
            are differentiated whether or not they are trainable.
        batch_size: sequences per forward/backward; bounds activation memory.
        group_chunk: groups per streamed chunk in :meth:`iter_groups`; None keeps a chunk of
            gradients under 1 GiB.
        max_logits_elements: size of one (rows, V) chunk of the vocabulary projection.
        preconditioner: optional parameter name -> scale (e.g. :class:`AdamPreconditioner`) that
            multiplies each parameter's gradient before it is reduced or projected.
        share_prompts: run the group's prompt once per micro-batch and reuse its key/value cache
            for every rollout (the same numbers up to float rounding; see
            :class:`~gradalign.extractors.factorized.FactorizedGradient`).

    The model is left as found: requires_grad flags, ``.grad`` and train/eval mode (extraction runs
    in eval mode so dropout is off).

    Example:
        >>> out = FullGradient(batch_size=4).per_group(model, rollouts)  # doctest: +SKIP
        >>> out.grads.shape  # (G, D)  # doctest: +SKIP
    """

    target_modules: TargetModules = None
    batch_size: int = 8
    group_chunk: int | None = None
    max_logits_elements: int = DEFAULT_LOGITS_ELEMENTS
    preconditioner: Mapping[str, torch.Tensor] | None = None
    share_prompts: bool = False

    def __post_init__(self) -> None:
        name = type(self).__name__
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise GradAlignError(f"{name}: batch_size must be an int >= 1, got {self.batch_size!r}")
        if self.group_chunk is not None and self.group_chunk < 1:
            raise GradAlignError(
                f"{name}: group_chunk must be >= 1 or None, got {self.group_chunk}"
            )
        if self.max_logits_elements < 1:
            raise GradAlignError(
                f"{name}: max_logits_elements must be >= 1, got {self.max_logits_elements}"
            )

    def _output_dim(self, named: list[tuple[str, nn.Parameter]]) -> int:
        return sum(p.numel() for _, p in named)

    def _reduce(
        self, named: list[tuple[str, nn.Parameter]], grads: list[torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[Segment, ...]]:
        """Per-parameter (Gc, n_i) gradients -> (Gc, D) rows and their segments."""
        segments, start = [], 0
        for name, p in named:
            segments.append(Segment(name, start, start + p.numel()))
            start += p.numel()
        return torch.cat([g.flatten(1) for g in grads], dim=1), tuple(segments)

    def _precondition(
        self, named: list[tuple[str, nn.Parameter]], grads: list[torch.Tensor]
    ) -> None:
        if self.preconditioner is None:
            return
        for (name, _), g in zip(named, grads, strict=True):
            scale = self.preconditioner.get(name)
            if scale is not None:
                g.mul_(scale.to(device=g.device, dtype=g.dtype))  # (Gc, *shape) * (*shape)

    def iter_groups(
        self,
        model: nn.Module,
        rollouts: Rollouts,
        objective: GRPOObjective | None = None,
        *,
        progress: bool = False,
    ) -> Iterator[GroupGradients]:
        call = f"{type(self).__name__}.per_group"
        self._check_inputs(call, model, rollouts)
        objective = GRPOObjective() if objective is None else objective
        named = target_parameters(model, self.target_modules, call=call)
        params = [p for _, p in named]
        chunk = self.group_chunk or max(1, _CHUNK_BYTES // (4 * max(1, self._output_dim(named))))
        zero_spread = objective.zero_spread(rollouts).cpu()
        tokens = rollouts.group_token_counts().cpu()
        sizes = rollouts.group_sizes().cpu()
        all_rows = group_rows(rollouts)
        bar = progress_bar(
            range(len(all_rows)), enabled=progress, total=len(all_rows), desc=type(self).__name__
        )
        pending: list[list[torch.Tensor]] = []
        with extraction_mode(model, params):
            for g in bar:
                pending.append(
                    _group_gradient(
                        model,
                        rollouts,
                        objective,
                        all_rows[g],
                        params,
                        batch_size=self.batch_size,
                        max_logits_elements=self.max_logits_elements,
                        share_prompts=self.share_prompts,
                    )
                )
                if len(pending) == chunk or g == len(all_rows) - 1:
                    lo = g + 1 - len(pending)
                    stacked = [torch.stack(per_param) for per_param in zip(*pending, strict=True)]
                    pending = []
                    self._precondition(named, stacked)
                    grads, segments = self._reduce(named, stacked)
                    yield GroupGradients(
                        group_ids=rollouts.unique_groups[lo : g + 1].cpu(),
                        grads=grads.cpu(),
                        num_sequences=sizes[lo : g + 1],
                        num_tokens=tokens[lo : g + 1],
                        zero_spread=zero_spread[lo : g + 1],
                        segments=segments,
                    )


@dataclass(init=False)
class RandomProjectedGradient(FullGradient):
    """Per-group gradients projected to ``dim`` by a seeded random projection.

    The projection of parameter ``name`` is regenerated block by block from ``(seed, name)``, so no
    dense (D, K) matrix ever sits in memory, and the same seed gives the same numbers whatever the
    batch size, chunking or device. Inner products are preserved in expectation
    (Johnson-Lindenstrauss).

    Args:
        dim: K, the projected dimension.
        kind: "rademacher" (default), "gaussian" or "sjlt" (sparse, fastest on large models).
        seed: projection seed.
        target_modules: as in :class:`FullGradient`.
        batch_size: as in :class:`FullGradient`.
        group_chunk: as in :class:`FullGradient`.
        max_logits_elements: as in :class:`FullGradient`.
        preconditioner: as in :class:`FullGradient`.
        share_prompts: as in :class:`FullGradient`.

    Example:
        >>> out = RandomProjectedGradient(dim=1024, seed=0).per_group(model, rollouts)  # doctest: +SKIP
        >>> out.grads.shape  # (G, 1024)  # doctest: +SKIP
    """

    dim: int = 8192
    kind: str = "rademacher"
    seed: int = 0
    exact = False

    def __init__(
        self,
        dim: int = 8192,
        kind: str = "rademacher",
        seed: int = 0,
        target_modules: TargetModules = None,
        batch_size: int = 8,
        group_chunk: int | None = None,
        max_logits_elements: int = DEFAULT_LOGITS_ELEMENTS,
        preconditioner: Mapping[str, torch.Tensor] | None = None,
        share_prompts: bool = False,
    ) -> None:
        self.dim, self.kind, self.seed = dim, kind, seed
        self.share_prompts = share_prompts
        self.target_modules, self.batch_size = target_modules, batch_size
        self.group_chunk, self.max_logits_elements = group_chunk, max_logits_elements
        self.preconditioner = preconditioner
        self.__post_init__()

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if not isinstance(self.dim, int) or self.dim < 1:
            raise GradAlignError(f"{name}: dim must be an int >= 1, got {self.dim!r}")
        if self.kind not in KINDS:
            raise GradAlignError(f"{name}: kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.seed, int):
            raise GradAlignError(f"{name}: seed must be an int, got {self.seed!r}")

    def _reduce(
        self, named: list[tuple[str, nn.Parameter]], grads: list[torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[Segment, ...]]:
        out = None
        for (name, _), g in zip(named, grads, strict=True):
            part = project(g.flatten(1), kind=self.kind, dim=self.dim, seed=self.seed, name=name)
            out = part if out is None else out + part  # (Gc, K)
        assert out is not None  # target_parameters never returns an empty list
        return out, ()
