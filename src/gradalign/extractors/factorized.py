"""Per-group gradients of linear layers from module hooks, one batched backward for many groups.

Implementations: :class:`FactorizedGradient` (the public extractor) on top of
:func:`factorized_chunks` (the engine, shared with :class:`~gradalign.extractors.lora.LoRAGradient`).

The weight gradient of a linear layer ``y = W a + b`` summed over a sequence's tokens is
``sum_t g_t a_t^T`` (``g_t`` the gradient of the loss w.r.t. ``y_t``), so with projections
``P_in`` (K_in, d_in) and ``P_out`` (K_out, d_out) the projected gradient is
``P_out (sum_t g_t a_t^T) P_in^T = sum_t (P_out g_t)(P_in a_t)^T``. A forward hook projects each layer
input, a hook on the layer output projects the incoming gradient, and their per-group sums of outer
products are scatter-added into the rows of the chunk: no per-sequence full gradient ever exists.
Sequences are independent, so one backward over a micro-batch of many groups gives every group's
gradient. All parameters are frozen during extraction, which skips every weight-gradient GEMM;
gradient flows from the input embeddings' output, made a leaf that requires grad.

Projection matrices are rows of a :class:`gradalign.projection.Projector` keyed by
``(seed, module name, side="in"|"out")``, built once per call and never stored.

Shape glossary: S sequences, T tokens, G groups, D gradient dimension, K projection dimension,
R token rows reaching a layer.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradalign._forward import (
    DEFAULT_LOGITS_ELEMENTS,
    _split_model,
    response_logprobs,
)
from gradalign._modules import TargetModules, check_target_modules, match_modules
from gradalign._validate import check_choice, check_int, check_seed
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
    pack_groups,
    packs_of_rows,
)
from gradalign.objective import Objective, TokenWeights, prepare_weights
from gradalign.projection import DEFAULT_KIND, KINDS, Projector
from gradalign.rollouts import Rollouts, micro_batch_width

__all__ = ["FactorizedGradient", "check_settings", "factorized_chunks", "factorized_packs"]


@dataclass
class _Site:
    """One hooked linear layer and where its gradient goes in a row."""

    name: str
    module: nn.Module
    d_in: int
    d_out: int
    transposed: bool  # transformers' Conv1D stores its weight as (d_in, d_out)
    has_bias: bool
    start: int = 0
    r_in: torch.Tensor | None = None  # (d_in, K_in), None = unprojected
    r_out: torch.Tensor | None = None  # (d_out, K_out)

    @property
    def k_in(self) -> int:
        return self.d_in if self.r_in is None else int(self.r_in.shape[1])

    @property
    def k_out(self) -> int:
        return self.d_out if self.r_out is None else int(self.r_out.shape[1])

    @property
    def size(self) -> int:
        return self.k_out * self.k_in + (self.k_out if self.has_bias else 0)


def _make_site(name: str, module: nn.Module, call: str) -> _Site:
    if isinstance(module, nn.Linear):
        d_in, d_out, transposed = module.in_features, module.out_features, False
    elif type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        d_in, d_out, transposed = int(module.nx), int(module.nf), True  # type: ignore[arg-type]
    else:
        raise GradAlignError(
            f"{call}: module {name!r} is a {type(module).__name__}, not a linear layer "
            "(nn.Linear or transformers' Conv1D)"
        )
    return _Site(name, module, d_in, d_out, transposed, getattr(module, "bias", None) is not None)


def _build_sites(
    named: list[tuple[str, nn.Module]],
    dims: tuple[int | None, int | None],
    kind: str,
    seed: int,
    call: str,
) -> tuple[list[_Site], tuple[Segment, ...]]:
    """Sites with their projection matrices and column ranges, plus the row's segments."""
    sites, segments, start = [], [], 0
    for name, module in named:
        site = _make_site(name, module, call)
        device = next(module.parameters()).device
        for side, k, d in (("in", dims[0], site.d_in), ("out", dims[1], site.d_out)):
            if k is not None:
                projector = Projector(dim=k, kind=kind, seed=seed)
                r = projector.block(name=name, start=0, stop=d, side=side, device=device)
                setattr(site, f"r_{side}", r)  # (d, K)
        site.start = start
        start += site.size
        segments.append(Segment(name, site.start, start))
        sites.append(site)
    return sites, tuple(segments)


@dataclass(frozen=True, eq=False)
class _Runs:
    """Rows of one layer call as consecutive runs, each run from one group."""

    groups: torch.Tensor  # (R,) chunk-local group of every row
    ids: torch.Tensor  # (n,) group of each run
    counts: list[int]  # rows in each run

    @classmethod
    def of(cls, groups: torch.Tensor) -> _Runs:
        ids, counts = torch.unique_consecutive(groups, return_counts=True)
        return cls(groups, ids, counts.tolist())


@dataclass(eq=False)
class _Recorder:
    """Hook state of one chunk: the (Gc, D) buffer and the layout of the forward in flight."""

    sites: list[_Site]
    head: set[int]  # ids of the output head and its submodules (LoRA pieces of a wrapped head)
    buffer: torch.Tensor  # (Gc, D) float32
    seq_group: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    row_group: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    shape: tuple[int, int] = (0, 0)
    head_group: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    cursors: dict[int, int] = field(default_factory=dict)  # per head module: rows seen so far
    recording: bool = False
    leaves: list[torch.Tensor] = field(default_factory=list)
    _per_seq: dict[int, _Runs] = field(default_factory=dict)

    def begin(self, seq_group: torch.Tensor) -> None:
        """Start a micro-batch: (S',) chunk-local group of each sequence."""
        self.seq_group, self.leaves = seq_group, []

    def layout(self, row_seq: torch.Tensor, width: int, head_seq: torch.Tensor) -> None:
        """Start a decoder forward (the micro-batch runs one, or two with shared prompts).

        Args:
            row_seq: (B,) the sequence each batch row stands for (a shared prompt: any of its).
            width: tokens per batch row.
            head_seq: (N,) the sequence of each row the output head will see, in order.
        """
        self.row_group, self.shape = self.seq_group[row_seq], (len(row_seq), width)
        self.head_group, self.cursors, self._per_seq = self.seq_group[head_seq], {}, {}
        self.recording = True

    def _repeat(self, per: int) -> _Runs:
        """Runs of the rows when every batch row has ``per`` rows (cached per forward)."""
        if per not in self._per_seq:
            self._per_seq[per] = _Runs.of(self.row_group.repeat_interleave(per))
        return self._per_seq[per]

    def token_groups(self, site: _Site, x: torch.Tensor) -> _Runs | None:
        """Groups of the rows of ``x`` flattened to (R, d_in); None to skip this call."""
        s, t = self.shape
        if id(site.module) in self.head and x.dim() == 2:
            if not self.recording:
                return None  # recompute of a checkpointed head chunk: its hooks never fire
            start = self.cursors.get(id(site.module), 0)
            self.cursors[id(site.module)] = start + x.shape[0]
            return _Runs.of(self.head_group[start : start + x.shape[0]])
        if x.dim() >= 2 and x.shape[0] == s and x.numel() % (s * site.d_in) == 0:
            return self._repeat(x.numel() // (s * site.d_in))
        if x.dim() == 2 and x.shape[0] == s * t:
            return self._repeat(t)
        raise GradAlignError(
            f"FactorizedGradient: module {site.name!r} got an input of shape {tuple(x.shape)} "
            f"whose rows cannot be traced to the forward's {s} rows of {t} tokens; "
            "leave it out with target_modules"
        )

    def leaf_hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        """Make the input embeddings' output the leaf that gradients flow back to."""
        if not (self.recording and torch.is_grad_enabled() and isinstance(output, torch.Tensor)):
            return None
        leaf = output.detach().requires_grad_()
        self.leaves.append(leaf)
        return leaf

    def forward_hook(self, site: _Site, module: nn.Module, args: Any, output: Any) -> None:
        """Project the layer input and attach the backward half to the layer output."""
        if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor)):
            return
        if not output.requires_grad or not args:
            return  # e.g. the no-grad first pass of reentrant checkpointing
        x = args[0]
        runs = self.token_groups(site, x)
        if runs is None or not runs.counts:
            return
        a = x.detach().reshape(-1, site.d_in).float()  # (R, d_in)
        if a.shape[0] != runs.groups.shape[0]:
            raise GradAlignError(
                f"FactorizedGradient: module {site.name!r} got {a.shape[0]} rows but the "
                f"micro-batch layout accounts for {runs.groups.shape[0]}"
            )
        if site.r_in is not None:
            a = a @ site.r_in  # (R, K_in)
        output.register_hook(functools.partial(self._accumulate, site, a, runs))

    def _accumulate(self, site: _Site, a: torch.Tensor, runs: _Runs, grad: torch.Tensor) -> None:
        g = grad.reshape(-1, site.d_out).float()  # (R, d_out)
        if site.r_out is not None:
            g = g @ site.r_out  # (R, K_out)
        left, right = (a, g) if site.transposed else (g, a)
        n, m = len(runs.counts), runs.counts[0]
        if all(c == m for c in runs.counts):
            w = torch.bmm(
                left.view(n, m, -1).transpose(1, 2), right.view(n, m, -1)
            )  # (n, K_left, K_right)
        else:
            pieces = zip(left.split(runs.counts), right.split(runs.counts), strict=True)
            w = torch.stack([lp.T @ rp for lp, rp in pieces])  # (n, K_left, K_right)
        n_w = site.k_out * site.k_in
        self.buffer.narrow(1, site.start, n_w).index_add_(0, runs.ids, w.flatten(1))
        if site.has_bias:
            self.buffer.narrow(1, site.start + n_w, site.k_out).index_add_(0, runs.groups, g)


@contextlib.contextmanager
def _hooked(model: nn.Module, recorder: _Recorder, call: str) -> Iterator[None]:
    """Register the recorder's hooks; remove every one of them on exit, also after an error."""
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    if not isinstance(emb, nn.Module):
        raise GradAlignError(
            f"{call}: the model must expose get_input_embeddings() (gradients flow back to the "
            f"embeddings' output), got {type(model).__name__} without it"
        )
    handles = []
    try:
        handles.append(emb.register_forward_hook(recorder.leaf_hook))
        for site in recorder.sites:
            hook = functools.partial(recorder.forward_hook, site)
            handles.append(site.module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


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
    device = model_device(model)
    width = micro_batch_width(rollouts.attention_mask[rows])
    local = local.to(device)
    recorder.begin(local)
    with torch.enable_grad():
        logp = response_logprobs(
            model,
            rollouts.input_ids[rows, :width].to(device),
            rollouts.attention_mask[rows, :width].to(device),
            rollouts.response_mask[rows, :width].to(device),
            max_logits_elements=job.max_logits_elements,
            share_keys=local if job.share_prompts else None,
            on_forward=recorder.layout,
        )  # (S', W)
        recorder.recording = False
        if weights is None:
            w = job.prepared.token_weights(
                logp.detach().to(rollouts.device), rows=rows, width=width
            )  # (S', W)
        else:
            w = weights[rows, :width]  # (S', W)
        loss = -(w.to(logp.device) * logp).sum()
        if not recorder.leaves or not loss.requires_grad:
            raise GradAlignError(
                f"{job.call}: no gradient reached the loss from the input embeddings' output; the "
                "model must embed input_ids with the module returned by get_input_embeddings()"
            )
        # Not autograd.grad: reentrant checkpointing only supports a plain backward. Nothing but
        # the embedding-output leaves requires grad, so no parameter's .grad is touched.
        loss.backward()


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
    """The group packs :func:`factorized_chunks` runs together (see ``group_packs``)."""
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
    kind: str = DEFAULT_KIND,
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
        kind: projection kind, as in :class:`FactorizedGradient`.
        seed: projection seed.
        batch_size: sequences per forward/backward.
        group_chunk: groups per yielded chunk.
        max_logits_elements: size of one (rows, V) chunk of the vocabulary projection.
        share_prompts: run each group's prompt once per micro-batch (see FactorizedGradient).
        call: the public call, for error messages.
        progress: show a progress bar.

    Yields:
        :class:`GroupGradients` with one segment per module: weight (K_out * K_in, or
        K_in * K_out for Conv1D, the parameter's own layout) then bias (K_out).
    """
    sites, segments = _build_sites(named, dims, kind, seed, call)
    dim = segments[-1].stop
    split = _split_model(model)
    head = {id(m) for m in split[1].modules()} if split is not None else set()
    chunk = group_chunk or max(1, CHUNK_BYTES // (4 * dim))
    prepared = prepare_weights(call, objective, rollouts)
    weights, active = _active_rows(prepared)
    job = _Job(model, rollouts, prepared, weights, max_logits_elements, share_prompts, call)
    zero_spread = prepared.zero_spread(rollouts).cpu()
    tokens = rollouts.group_token_counts().cpu()
    sizes = rollouts.group_sizes().cpu()
    by_group = group_rows(rollouts)
    n_groups = len(by_group)
    counter = GroupCounter(enabled=progress, total=n_groups, desc=call.split(".")[0])
    for lo in range(0, n_groups, chunk):
        hi = min(n_groups, lo + chunk)
        rows = torch.cat(by_group[lo:hi])  # (S_c,) grouped, groups ascending
        rows = rows[active[rows].to(rows.device)]
        local = rollouts.group_index[rows] - lo  # (S_c,)
        buffer = torch.zeros(hi - lo, dim, dtype=torch.float32, device=model_device(model))
        recorder = _Recorder(sites, head, buffer)
        done = 0  # groups of the chunk finished so far
        try:
            with extraction_mode(model, []), _hooked(model, recorder, call):
                for mb in pack_groups(local, batch_size):
                    _micro_batch(job, recorder, rows[mb], local[mb])
                    last = int(local[mb.stop - 1])
                    ends = mb.stop == len(local) or int(local[mb.stop]) != last
                    counter.update(last + int(ends) - done)
                    done = last + int(ends)
        except BaseException:
            counter.close()
            raise
        counter.update(hi - lo - done)  # zero-spread groups at the end run no rows
        if hi == n_groups:
            counter.close()
        yield GroupGradients(
            group_ids=rollouts.unique_groups[lo:hi].cpu(),
            grads=buffer.cpu(),
            num_sequences=sizes[lo:hi],
            num_tokens=tokens[lo:hi],
            zero_spread=zero_spread[lo:hi],
            segments=segments,
        )


def check_settings(ext: Any) -> None:
    """Validate the settings shared by the hook-based extractors (``kind``, ``seed``, sizes)."""
    name = type(ext).__name__
    check_choice(name, "kind", ext.kind, KINDS)
    check_seed(name, ext.seed)
    check_int(name, "batch_size", ext.batch_size, 1)
    check_int(name, "group_chunk", ext.group_chunk, 1, allow_none=True)
    check_int(name, "max_logits_elements", ext.max_logits_elements, 1)
    if not isinstance(ext.share_prompts, bool):
        raise GradAlignError(f"{name}: share_prompts must be a bool, got {ext.share_prompts!r}")


@dataclass
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
            the larger the prompt next to the responses, the larger the saving. Needs a
            transformers model whose decoder returns a key/value cache.

    The model is left as found (requires_grad, ``.grad``, hooks, train/eval mode), also after an
    exception. With tied embeddings the head's segment holds only the output-head use of the
    shared weight. On a peft model, layers wrapped by LoRA are not linear layers any more: use
    :class:`~gradalign.extractors.lora.LoRAGradient` for the adapters.

    Example:
        >>> ext = FactorizedGradient(dim_in=16, dim_out=16, seed=0)
        >>> out = ext.per_group(model, rollouts)  # doctest: +SKIP
        >>> out.grads.shape  # (G, sum over layers of 16 * 16 [+ 16 for a bias])  # doctest: +SKIP
    """

    dim_in: int | None = 16
    dim_out: int | None = 16
    kind: str = DEFAULT_KIND
    seed: int = 0
    target_modules: TargetModules = None
    batch_size: int = DEFAULT_BATCH_SIZE
    group_chunk: int | None = None
    max_logits_elements: int = DEFAULT_LOGITS_ELEMENTS
    share_prompts: bool = False

    def __post_init__(self) -> None:
        name = type(self).__name__
        for what in ("dim_in", "dim_out"):
            check_int(name, what, getattr(self, what), 1, allow_none=True)
        check_target_modules(name, self.target_modules)
        check_settings(self)

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
