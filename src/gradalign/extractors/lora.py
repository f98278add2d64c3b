"""Per-group gradients of a peft model's LoRA adapter weights only.

Implementations: [`LoRAGradient`][gradalign.extractors.lora.LoRAGradient]. The adapters' ``lora_A`` and ``lora_B`` pieces are plain
``nn.Linear`` layers, so their exact per-group gradients come from the hook engine of
[`gradalign.extractors.factorized`][gradalign.extractors.factorized] (unprojected): one forward plus an activation-only backward
over many groups at once, no weight-gradient GEMM of the base model. With ``dim`` the exact rows are
then projected like [`RandomProjectedGradient`][gradalign.extractors.full.RandomProjectedGradient] projects them.

Shape glossary: G groups, D adapter parameters, K projection dimension.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from gradalign._options import boolean, choice, instance, integer, option, seed_rule
from gradalign.errors import GradAlignError
from gradalign.extractors._forward import DEFAULT_LOGITS_ELEMENTS
from gradalign.extractors.base import DEFAULT_BATCH_SIZE, GradientExtractor, GroupGradients
from gradalign.extractors.factorized import factorized_chunks, factorized_packs
from gradalign.objective import Objective, TokenWeights
from gradalign.projection import DEFAULT_KIND, ProjectionKind, Projector
from gradalign.projection._projector import PROJECTOR_RULE
from gradalign.rollouts import Rollouts

__all__ = ["LoRAGradient", "lora_modules"]


def _active(layer: nn.Module) -> list[str]:
    active = getattr(layer, "active_adapters", None)
    if active is None:
        active = getattr(layer, "active_adapter", [])
    return [active] if isinstance(active, str) else list(active)


def lora_modules(
    model: nn.Module, adapter_name: str | None = None, *, call: str = "lora_modules"
) -> list[tuple[str, nn.Module]]:
    """(parameter name, linear piece) of every active LoRA ``lora_A``/``lora_B`` weight.

    Args:
        model: a peft model (or a model with LoRA layers injected).
        adapter_name: restrict to this adapter; None takes every active adapter.
        call: the public call, for error messages.

    Raises:
        GradAlignError: when the model has no LoRA adapters, the adapter is unknown or inactive,
            adapters are merged, or an active adapter has weights outside linear pieces (DoRA
            magnitudes, embedding or convolution LoRA), whose gradients the hooks cannot see.
    """
    layers = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(getattr(m, "lora_A", None), nn.ModuleDict)
    ]
    if not layers:
        raise GradAlignError(
            f"{call}: the model has no LoRA adapters (no module with lora_A/lora_B); wrap it with "
            f"peft.get_peft_model(model, LoraConfig(...)) first, got {type(model).__name__}"
        )
    pieces: list[tuple[str, nn.Module]] = []
    seen: set[str] = set()
    for name, layer in layers:
        if getattr(layer, "merged", False):
            raise GradAlignError(f"{call}: adapters of {name!r} are merged; unmerge them first")
        for adapter in _active(layer):
            if adapter_name is not None and adapter != adapter_name:
                continue
            if adapter not in layer.lora_A:
                continue
            seen.add(adapter)
            for part in ("lora_A", "lora_B"):
                pieces.append((f"{name}.{part}.{adapter}.weight", getattr(layer, part)[adapter]))
    if adapter_name is not None and adapter_name not in seen:
        known = sorted({a for _, layer in layers for a in layer.lora_A})
        raise GradAlignError(
            f"{call}: adapter_name={adapter_name!r} is not an active adapter; adapters: {known}"
        )
    _check_covered(model, pieces, seen, call)
    return pieces


def _check_covered(
    model: nn.Module, pieces: list[tuple[str, nn.Module]], adapters: set[str], call: str
) -> None:
    """Every weight of the chosen adapters must sit in a hooked linear piece."""
    covered = {id(p) for _, m in pieces for p in m.parameters()}
    bad_type = [n for n, m in pieces if not isinstance(m, nn.Linear)]
    missing = [
        n
        for n, p in model.named_parameters()
        if "lora_" in n and id(p) not in covered and adapters & set(n.split("."))
    ]
    if bad_type or missing:
        raise GradAlignError(
            f"{call}: only linear LoRA (no DoRA, embedding or convolution adapters) is supported; "
            f"got adapter weights {(bad_type + missing)[:5]}"
        )


@dataclass(frozen=True)
class LoRAGradient(GradientExtractor):
    """Exact per-group gradients of the LoRA adapter weights of a peft model.

    Args:
        dim: None for the exact gradients (one segment per ``lora_A``/``lora_B`` weight, named like
            ``model.named_parameters()``); an int K projects them to K dimensions with the seeded
            projection of [`RandomProjectedGradient`][gradalign.extractors.full.RandomProjectedGradient].
        kind: projection kind when ``dim`` is set (one of ``gradalign.projection.KINDS``; default
            "sjlt").
        seed: projection seed.
        adapter_name: differentiate only this adapter; None takes every active adapter.
        batch_size: sequences per forward/backward (many groups share one pass).
        group_chunk: groups per yielded chunk; None keeps a chunk under 1 GiB.
        max_logits_elements: size of one (rows, V) chunk of the vocabulary projection.
        share_prompts: run a group's prompt once per micro-batch, as in
            [`FactorizedGradient`][gradalign.extractors.factorized.FactorizedGradient].
        projection: a [`Projector`][gradalign.projection.Projector] (instead of ``dim``, ``kind`` and
            ``seed``).

    The model is left as found (requires_grad, ``.grad``, hooks, train/eval mode); adapter dropout
    is off during extraction (eval mode).

    Examples:
        >>> out = LoRAGradient().per_group(peft_model, rollouts)
        >>> out.grads.shape  # (groups, LoRA parameters)
        torch.Size([4, 1792])
    """

    dim: int | None = option(None, integer(1, none=True))
    kind: ProjectionKind = option(DEFAULT_KIND, choice(ProjectionKind))
    seed: int = option(0, seed_rule())
    adapter_name: str | None = option(None, instance(str, "str"))
    batch_size: int = option(DEFAULT_BATCH_SIZE, integer(1))
    group_chunk: int | None = option(None, integer(1, none=True))
    max_logits_elements: int = option(DEFAULT_LOGITS_ELEMENTS, integer(1))
    share_prompts: bool = option(True, boolean())
    projection: Projector | None = option(None, PROJECTOR_RULE)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.projection is not None and self.dim is not None:
            raise GradAlignError(f"{type(self).__name__}: give projection or dim, not both")

    def group_packs(
        self, rollouts: Rollouts, objective: Objective | TokenWeights | None = None
    ) -> list[int]:
        return factorized_packs(rollouts, objective, self.batch_size)

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
        named = lora_modules(model, self.adapter_name, call=call)
        chunks = factorized_chunks(
            model,
            named,
            rollouts,
            objective,
            batch_size=self.batch_size,
            group_chunk=self.group_chunk,
            max_logits_elements=self.max_logits_elements,
            share_prompts=self.share_prompts,
            call=call,
            progress=progress,
        )
        projector = self.projector
        return chunks if projector is None else (self._project(part, projector) for part in chunks)

    @property
    def projector(self) -> Projector | None:
        """The projection in use: ``projection``, else one built from ``dim``/``kind``/``seed``."""
        if self.projection is not None or self.dim is None:
            return self.projection
        return Projector(dim=self.dim, kind=self.kind, seed=self.seed)

    def _project(self, part: GroupGradients, projector: Projector) -> GroupGradients:
        """(Gc, D) exact rows -> (Gc, K), summing each weight's own seeded projection."""
        out = torch.zeros(len(part), projector.dim, dtype=torch.float32)  # (Gc, K)
        for seg in part.segments:
            out += projector(part.segment(seg.name), name=seg.name)
        return dataclasses.replace(
            part, grads=out, segments=(), call=f"{type(self).__name__}.per_group"
        )
