"""Per-group gradients of linear layers from module hooks, one batched backward for many groups.

Implementations: [`FactorizedGradient`][gradalign.extractors.factorized.FactorizedGradient] (the public extractor) on top of
[`factorized_chunks`][gradalign.extractors.factorized.factorized_chunks] (the engine, shared with [`LoRAGradient`][gradalign.extractors.lora.LoRAGradient]).

The weight gradient of a linear layer ``y = W a + b`` summed over a sequence's tokens is
``sum_t g_t a_t^T`` (``g_t`` the gradient of the loss w.r.t. ``y_t``), so with projections
``P_in`` (K_in, d_in) and ``P_out`` (K_out, d_out) the projected gradient is
``P_out (sum_t g_t a_t^T) P_in^T = sum_t (P_out g_t)(P_in a_t)^T``. A forward hook projects each layer
input, a hook on the layer output projects the incoming gradient, and their per-group sums of outer
products are scatter-added into the rows of the chunk: no per-sequence full gradient ever exists.
Sequences are independent, so one backward over a micro-batch of many groups gives every group's
gradient. All parameters are frozen during extraction, which skips every weight-gradient GEMM;
gradient flows from the input embeddings' output, made a leaf that requires grad.

Projection matrices are rows of a [`gradalign.projection.Projector`][gradalign.projection.Projector] keyed by
``(seed, module name, side="in"|"out")``, built once per call and never stored.

Shape glossary: S sequences, T tokens, G groups, D gradient dimension, K projection dimension,
R token rows reaching a layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from gradalign._modules import TARGET_MODULES_RULE, TargetModules, match_modules
from gradalign._options import boolean, choice, integer, option, seed_rule
from gradalign.errors import GradAlignError
from gradalign.extractors._forward import (
    DEFAULT_LOGITS_ELEMENTS,
    _split_model,
    unsharded_root,
)
from gradalign.extractors._hooks import Recorder as _Recorder
from gradalign.extractors._hooks import _Site
from gradalign.extractors._hooks import build_sites as _build_sites
from gradalign.extractors._hooks import hooked as _hooked
from gradalign.extractors.base import (
    DEFAULT_BATCH_SIZE,
    GradientExtractor,
    GroupColumns,
    GroupCounter,
    GroupGradients,
    chunk_size,
    extraction_mode,
    group_rows,
    model_device,
    pack_groups,
    packs_of_rows,
    weighted_loss,
)
from gradalign.objective import Objective, TokenWeights, prepare_weights
from gradalign.projection import DEFAULT_KIND, ProjectionKind
from gradalign.rollouts import Rollouts, micro_batch_width

__all__ = ["FactorizedGradient", "factorized_chunks", "factorized_packs"]


@dataclass(frozen=True, eq=False)
class _Job:
    """What every micro-batch of one extraction call shares."""

    model: nn.Module
    rollouts: Rollouts
    prepared: TokenWeights
    weights: torch.Tensor | None  # (S, T) token weights, when they do not depend on log-probs
    max_logits_elements: int
    share_prompts: bool
    call: str


def _micro_batch(job: _Job, recorder: _Recorder, rows: torch.Tensor, local: torch.Tensor) -> None:
    """One forward + activation-only backward over ``rows`` (local groups ``local``)."""
    model, rollouts, weights = job.model, job.rollouts, job.weights
    width = micro_batch_width(rollouts.attention_mask[rows])
    local = local.to(model_device(model))
    recorder.begin(local)
    with torch.enable_grad(), unsharded_root(model):
        loss = weighted_loss(
            model,
            rollouts,
            job.prepared,
            rows,
            width,
            None if weights is None else weights[rows, :width],
            max_logits_elements=job.max_logits_elements,
            share_keys=local if job.share_prompts else None,
            on_forward=recorder.layout,
        )
        recorder.recording = False
        if not recorder.leaves or not loss.requires_grad:
            raise GradAlignError(
                f"{job.call}: no gradient reached the loss from the input embeddings' output; the "
                "model must embed input_ids with the module returned by get_input_embeddings()"
            )
        # Not autograd.grad: reentrant checkpointing only supports a plain backward. Nothing but
        # the embedding-output leaves requires grad, so no parameter's .grad is touched.
        loss.backward()


def _run_chunk(
    job: _Job,
    sites: list[_Site],
    head: set[int],
    shape: tuple[int, int],
    rows: torch.Tensor,
    local: torch.Tensor,
    batch_size: int,
    counter: GroupCounter,
) -> tuple[torch.Tensor, int]:
    """The (Gc, D) rows of one chunk and how many of its groups ran (the rest have no rows).

    Args:
        shape: (Gc, D) of the chunk's rows.
        rows: (S_c,) rollout rows of the chunk, grouped, groups ascending.
        local: (S_c,) chunk-local group of each row.
    """
    done = 0  # groups of the chunk finished so far
    with extraction_mode(job.model, [], call=job.call):
        # Made inside extraction mode: the hooks add into it in place, which a tensor made under
        # a caller's inference_mode() would refuse.
        buffer = torch.zeros(shape, dtype=torch.float32, device=model_device(job.model))  # (Gc, D)
        recorder = _Recorder(sites, head, buffer)
        with _hooked(job.model, recorder, job.call):
            for mb in pack_groups(local, batch_size):
                _micro_batch(job, recorder, rows[mb], local[mb])
                last = int(local[mb.stop - 1])
                ends = mb.stop == len(local) or int(local[mb.stop]) != last
                counter.update(last + int(ends) - done)
                done = last + int(ends)
    return buffer, done


def _active_rows(
    prepared: TokenWeights,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(S, T) token weights (None when they need log-probs) and (S,) rows that run at all.

    Rows with all-zero weights (zero-spread groups) add nothing: their forward is skipped.
    """
    weights = None if prepared.needs_logprobs else prepared.token_weights()
    active = torch.ones(len(prepared), dtype=torch.bool) if weights is None else weights.any(1)
    return weights, active


def factorized_packs(
    rollouts: Rollouts, objective: Objective | TokenWeights | None, batch_size: int
) -> list[int]:
    """The group packs [`factorized_chunks`][gradalign.extractors.factorized.factorized_chunks] runs together (see ``group_packs``)."""
    _, active = _active_rows(prepare_weights("group_packs", objective, rollouts))
    rows = torch.cat(group_rows(rollouts))
    rows = rows[active[rows].to(rows.device)]
    return packs_of_rows(rollouts.group_index[rows].cpu(), batch_size, rollouts.num_groups)


def factorized_chunks(
    model: nn.Module,
    named: list[tuple[str, nn.Module]],
    rollouts: Rollouts,
    objective: Objective | TokenWeights | None,
    *,
    dims: tuple[int | None, int | None] = (None, None),
    kind: ProjectionKind = DEFAULT_KIND,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    group_chunk: int | None = None,
    max_logits_elements: int = DEFAULT_LOGITS_ELEMENTS,
    share_prompts: bool = False,
    call: str = "FactorizedGradient.per_group",
    progress: bool = False,
) -> Iterator[GroupGradients]:
    """Yield per-group (projected) gradients of the linear layers ``named``, chunk by chunk.

    Args:
        named: (segment name, linear module) pairs; the name also keys the projections.
        model: the model (its hooks and state are restored before each chunk is yielded).
        rollouts: the rollouts to differentiate.
        objective: the loss, or its weights prepared for ``rollouts``.
        dims: (K_in, K_out); None leaves that side unprojected.
        kind: projection kind, as in [`FactorizedGradient`][gradalign.extractors.factorized.FactorizedGradient].
        seed: projection seed.
        batch_size: sequences per forward/backward.
        group_chunk: groups per yielded chunk.
        max_logits_elements: size of one (rows, V) chunk of the vocabulary projection.
        share_prompts: run each group's prompt once per micro-batch (see FactorizedGradient).
        call: the public call, for error messages.
        progress: show a progress bar.

    Yields:
        [`GroupGradients`][gradalign.extractors.base.GroupGradients] with one segment per module: weight (K_out * K_in, or
        K_in * K_out for Conv1D, the parameter's own layout) then bias (K_out).
    """
    sites, segments = _build_sites(named, dims, kind, seed, call)
    dim = segments[-1].stop
    split = _split_model(model)
    head = {id(m) for m in split[1].modules()} if split is not None else set()
    chunk = chunk_size(group_chunk, dim)
    prepared = prepare_weights(call, objective, rollouts)
    weights, active = _active_rows(prepared)
    job = _Job(model, rollouts, prepared, weights, max_logits_elements, share_prompts, call)
    columns = GroupColumns.of(rollouts, prepared)  # once per call, sliced per chunk
    by_group = group_rows(rollouts)
    n_groups = len(by_group)
    counter = GroupCounter(enabled=progress, total=n_groups, desc=call.split(".")[0])
    for lo in range(0, n_groups, chunk):
        hi = min(n_groups, lo + chunk)
        rows = torch.cat(by_group[lo:hi])  # (S_c,) grouped, groups ascending
        rows = rows[active[rows].to(rows.device)]
        local = rollouts.group_index[rows] - lo  # (S_c,)
        try:
            buffer, done = _run_chunk(
                job, sites, head, (hi - lo, dim), rows, local, batch_size, counter
            )
        except BaseException:
            counter.close()
            raise
        counter.update(hi - lo - done)  # zero-spread groups at the end run no rows
        if hi == n_groups:
            counter.close()
        yield columns.result(range(lo, hi), buffer, segments, call)


@dataclass(frozen=True)
class FactorizedGradient(GradientExtractor):
    """Per-group gradients of linear layers, each side randomly projected, from hooks.

    For every targeted layer the row holds ``P_out G P_in^T`` (weight, K_out x K_in) and ``P_out gb``
    (bias), where ``G``/``gb`` is the group's exact gradient of that layer; ``dim_in=None`` or
    ``dim_out=None`` leaves that side unprojected, so both None give the exact gradient. Cost: one
    forward plus the input-gradient half of one backward over all rollouts.

    Args:
        dim_in: K_in, projection of each layer's input side; None for none.
        dim_out: K_out, projection of each layer's output side; None for none.
        kind: projection kind, one of ``gradalign.projection.KINDS`` (default "sjlt").
        seed: projection seed; matrices are regenerated from (seed, module name, side).
        target_modules: peft-style selection of linear layers (None: every nn.Linear and
            transformers Conv1D, the output head included; "all-linear" leaves the head out).
        batch_size: most sequences per forward/backward; whole groups are packed together (a
            group larger than this is split).
        group_chunk: groups per yielded chunk; None keeps a chunk under 1 GiB.
        max_logits_elements: size of one (rows, V) chunk of the vocabulary projection.
        share_prompts: run the prompt of a group's rollouts once per micro-batch and reuse its
            key/value cache for every rollout (the same numbers up to float rounding). A group of k
            rollouts then costs one prompt plus k responses instead of k prompts plus k responses:
            the larger the prompt next to the responses, the larger the saving. On by default
            (since 0.3.0): rows share only when their group and prompt tokens are equal, and a
            model that is not a transformers decoder runs unshared. A transformers decoder without
            a reorderable key/value cache raises; pass ``share_prompts=False`` for it.

    The model is left as found (requires_grad, ``.grad``, hooks, train/eval mode), also after an
    exception. With tied embeddings the head's segment holds only the output-head use of the
    shared weight. On a peft model, layers wrapped by LoRA are not linear layers any more: use
    [`LoRAGradient`][gradalign.extractors.lora.LoRAGradient] for the adapters.

    Examples:
        >>> ext = FactorizedGradient(dim_in=16, dim_out=16, seed=0)
        >>> out = ext.per_group(model, rollouts)
        >>> out.grads.shape  # (groups, sum over linear layers of 16 * 16 [+ 16 for a bias])
        torch.Size([4, 3936])
    """

    dim_in: int | None = option(16, integer(1, none=True))
    dim_out: int | None = option(16, integer(1, none=True))
    kind: ProjectionKind = option(DEFAULT_KIND, choice(ProjectionKind))
    seed: int = option(0, seed_rule())
    target_modules: TargetModules = option(None, TARGET_MODULES_RULE)
    batch_size: int = option(DEFAULT_BATCH_SIZE, integer(1))
    group_chunk: int | None = option(None, integer(1, none=True))
    max_logits_elements: int = option(DEFAULT_LOGITS_ELEMENTS, integer(1))
    share_prompts: bool = option(True, boolean())

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
        named = match_modules(model, self.target_modules, call=call, linear_only=True)
        return factorized_chunks(
            model,
            named,
            rollouts,
            objective,
            dims=(self.dim_in, self.dim_out),
            kind=self.kind,
            seed=self.seed,
            batch_size=self.batch_size,
            group_chunk=self.group_chunk,
            max_logits_elements=self.max_logits_elements,
            share_prompts=self.share_prompts,
            call=call,
            progress=progress,
        )
