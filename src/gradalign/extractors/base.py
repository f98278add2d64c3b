"""Base pieces shared by every gradient extractor.

Implementations: [`GroupGradients`][gradalign.extractors.base.GroupGradients] (the result: one gradient row per problem group),
[`GradientExtractor`][gradalign.extractors.base.GradientExtractor] (the base class: ``per_group`` and the streaming ``iter_groups``) and
[`extraction_mode`][gradalign.extractors.base.extraction_mode] (puts a model in a defined state and restores it exactly, also after an
exception).

Shape glossary: S sequences, T tokens, G groups, D gradient dimension.
"""

from __future__ import annotations

import contextlib
import itertools
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import InitVar, dataclass
from typing import Any

import torch
from torch import nn

from gradalign._calls import current_call
from gradalign._options import check_options
from gradalign.errors import GradAlignError
from gradalign.extractors._forward import OnForward, response_logprobs
from gradalign.objective import Objective, TokenWeights
from gradalign.rollouts import Rollouts

DEFAULT_BATCH_SIZE = 16
"""Sequences per forward/backward of every extractor unless told."""

CHUNK_BYTES = 2**30
"""float32 bytes of group gradients an extractor holds before it yields a chunk (group_chunk=None)."""

__all__ = ["GradientExtractor", "GroupGradients", "Segment", "extraction_mode"]


@dataclass(frozen=True)
class Segment:
    """Columns ``start:stop`` of a gradient row belong to module or parameter ``name``."""

    name: str
    start: int
    stop: int


@dataclass(frozen=True, eq=False)
class GroupGradients:
    """Per-group gradients of the GRPO loss.

    Attributes:
        group_ids: (G,) int64 group ids, sorted ascending.
        grads: (G, D) float32 gradient (or projected gradient) of each group's loss.
        num_sequences: (G,) rollouts per group.
        num_tokens: (G,) response tokens per group.
        zero_spread: (G,) True where the group's rewards have no spread (its gradient is zero
            unless a KL term is on).
        segments: which columns belong to which module or parameter (empty when projected jointly).

    Every row must be finite: a NaN or inf row raises a GradAlignError naming its group ids, so no
    broken gradient ever turns into a score. ``call`` (not stored) is the public call that
    produced the rows, for that message.

    Examples:
        >>> import torch, gradalign as ga
        >>> ro = ga.Rollouts.from_token_ids([[5, 6], [5, 6], [7, 8], [7, 8]],
        ...     [[9, 1], [10, 1], [11, 1], [12, 1]], [1.0, 0.0, 1.0, 1.0], [0, 0, 1, 1])
        >>> from gradalign.testing import tiny_model
        >>> model = tiny_model()
        >>> out = ga.FactorizedGradient(4, 4).per_group(model, ro)
        >>> out.group_ids, out.grads.shape, out.zero_spread
        (tensor([0, 1]), torch.Size([2, 264]), tensor([False,  True]))
    """

    group_ids: torch.Tensor
    grads: torch.Tensor
    num_sequences: torch.Tensor
    num_tokens: torch.Tensor
    zero_spread: torch.Tensor
    segments: tuple[Segment, ...] = ()
    call: InitVar[str] = "GroupGradients"

    def __post_init__(self, call: str) -> None:
        g = int(self.group_ids.numel())
        if self.grads.dim() != 2 or self.grads.shape[0] != g:
            raise GradAlignError(
                f"GroupGradients: grads must be (G={g}, D), got {tuple(self.grads.shape)}"
            )
        for name in ("num_sequences", "num_tokens", "zero_spread"):
            value = getattr(self, name)
            if tuple(value.shape) != (g,):
                raise GradAlignError(
                    f"GroupGradients: {name} must have shape ({g},), got {tuple(value.shape)}"
                )
        check_finite_rows(call, self.group_ids, self.grads)

    def __len__(self) -> int:
        return int(self.group_ids.numel())

    @property
    def dim(self) -> int:
        """D, the gradient dimension."""
        return int(self.grads.shape[1])

    def segment(self, name: str) -> torch.Tensor:
        """(G, d) columns of one module or parameter."""
        for seg in self.segments:
            if seg.name == name:
                return self.grads[:, seg.start : seg.stop]
        known = [s.name for s in self.segments]
        raise GradAlignError(f"GroupGradients.segment: no segment {name!r}; known: {known[:20]}")

    @classmethod
    def concat(cls, parts: Iterable[GroupGradients]) -> GroupGradients:
        """Stack results over disjoint groups (e.g. the chunks of a stream), sorted by id."""
        items = list(parts)
        if not items:
            raise GradAlignError("GroupGradients.concat: needs at least one part, got none")
        ids = torch.cat([p.group_ids for p in items])
        order = torch.argsort(ids)
        in_order = bool((order == torch.arange(len(ids))).all())
        if in_order and len(items) == 1:
            return items[0]  # already sorted: no copy of the (G, D) rows

        def stack(parts: list[torch.Tensor]) -> torch.Tensor:
            out = torch.cat(parts)
            return out if in_order else out[order]  # streams come sorted: one copy, not two

        return cls(
            group_ids=stack([p.group_ids for p in items]),
            grads=stack([p.grads for p in items]),
            num_sequences=stack([p.num_sequences for p in items]),
            num_tokens=stack([p.num_tokens for p in items]),
            zero_spread=stack([p.zero_spread for p in items]),
            segments=items[0].segments,
        )


def check_finite_rows(call: str, group_ids: torch.Tensor, grads: torch.Tensor) -> None:
    """Raise a GradAlignError naming the groups whose (G, D) gradient rows hold NaN or inf.

    Every extractor's rows pass through [`GroupGradients`][gradalign.extractors.base.GroupGradients], so this is the one check
    between a broken forward or backward and the scorers, which would otherwise score a NaN row 0.
    """
    if not grads.is_floating_point() or grads.numel() == 0:
        return
    low, high = torch.aminmax(grads, dim=1)  # (G,), (G,): NaN and inf survive both reductions
    bad = ~(torch.isfinite(low) & torch.isfinite(high))
    if not bool(bad.any()):
        return
    ids = group_ids.reshape(-1)[bad.to(group_ids.device)].tolist()
    where = current_call(call)
    source = "" if where == call else f" (from {call})"
    raise GradAlignError(
        f"{where}: group gradients must be finite, got NaN or inf in {len(ids)} of {len(bad)} "
        f"groups, ids {ids[:10]}{' ...' if len(ids) > 10 else ''}{source}. Likely causes: a "
        "NaN or inf weight in the model, float16 logits or activations that overflow (run the "
        "model in bfloat16 or float32), or token weights too large to differentiate (e.g. huge "
        "rewards with GRPOObjective(scale_rewards='none'))"
    )


@contextlib.contextmanager
def extraction_mode(
    model: nn.Module, grad_params: Iterable[nn.Parameter], *, call: str = "extraction_mode"
) -> Iterator[None]:
    """Eval mode and requires_grad only on ``grad_params``; restores both exactly on exit.

    ``.grad`` is never touched by the extractors (they use ``torch.autograd.grad``). A caller's
    ``torch.inference_mode()`` is left for the block, since extraction must record autograd:
    that is sound because tensors made under inference mode (rollouts, token weights) are only
    read there, and what is written or differentiated is made inside the block. Parameters made
    under inference mode cannot be differentiated: a GradAlignError says so.
    """
    frozen = [name for name, p in model.named_parameters() if p.is_inference()]
    if frozen:
        raise GradAlignError(
            f"{call}: the model's parameters must be normal tensors, got inference tensors "
            f"{frozen[:3]} (the model was created or loaded under torch.inference_mode()); "
            "create or load it outside inference_mode"
        )
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    wanted = {id(p) for p in grad_params}
    # Only inside inference mode: inference_mode(False) also turns grad mode on.
    inside = torch.is_inference_mode_enabled()
    with torch.inference_mode(False) if inside else contextlib.nullcontext():
        try:
            model.eval()
            for p, _ in flags:
                p.requires_grad_(id(p) in wanted)
            yield
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
            for m, training in modes:
                m.training = training


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def group_rows(rollouts: Rollouts) -> list[torch.Tensor]:
    """Row indices of each group, in ``rollouts.unique_groups`` order."""
    order = torch.argsort(rollouts.group_index, stable=True)
    return list(torch.split(order, rollouts.group_sizes().tolist()))


def pack_groups(local: torch.Tensor, batch_size: int) -> list[slice]:
    """Micro-batches of consecutive rows that never split a group, unless it alone is too big.

    Args:
        local: (R,) group of each row, rows of a group adjacent.
        batch_size: most rows per micro-batch.

    Returns:
        Row ranges: whole groups packed greedily up to ``batch_size`` rows; a group larger than
        ``batch_size`` gets micro-batches of its own. Keeping a group together lets its rollouts
        share their prompt's forward pass.

    Examples:
        >>> pack_groups(torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 2]), 4)
        [slice(0, 2, None), slice(2, 5, None), slice(5, 9, None), slice(9, 10, None)]
    """
    out: list[slice] = []
    start = pos = 0
    for n in torch.unique_consecutive(local, return_counts=True)[1].tolist():
        if pos + n - start > batch_size and pos > start:
            out.append(slice(start, pos))
            start = pos
        if n > batch_size:
            out += [slice(i, min(pos + n, i + batch_size)) for i in range(pos, pos + n, batch_size)]
            start = pos + n
        pos += n
    if pos > start:
        out.append(slice(start, pos))
    return out


def packs_of_rows(local: torch.Tensor, batch_size: int, num_groups: int) -> list[int]:
    """Group counts of the packs that [`pack_groups`][gradalign.extractors.base.pack_groups] forms over rows of groups ``local``.

    Groups without rows join the next pack (the last one, at the end); a group split over several
    micro-batches is one pack.
    """
    starts = {0}
    for mb in pack_groups(local, batch_size):
        first = int(local[mb.start])
        if mb.start == 0 or int(local[mb.start - 1]) != first:
            starts.add(first)
    bounds = [*sorted(starts), num_groups]
    return [b - a for a, b in itertools.pairwise(bounds) if b > a]


def chunk_size(group_chunk: int | None, dim: int) -> int:
    """Groups per yielded chunk: ``group_chunk``, else as many as keep a chunk's (Gc, D) float32
    rows under ``CHUNK_BYTES``. The one rule of every extractor."""
    return group_chunk or max(1, CHUNK_BYTES // (4 * max(1, dim)))


@dataclass(frozen=True, eq=False)
class GroupColumns:
    """The per-group columns of every chunk of one extraction call, computed once per call.

    ``result`` assembles a chunk's [`GroupGradients`][gradalign.extractors.base.GroupGradients]
    from them: every extractor assembles its chunks here.
    """

    group_ids: torch.Tensor  # (G,) ascending
    num_sequences: torch.Tensor  # (G,)
    num_tokens: torch.Tensor  # (G,)
    zero_spread: torch.Tensor  # (G,) bool

    @classmethod
    def of(cls, rollouts: Rollouts, prepared: TokenWeights) -> GroupColumns:
        return cls(
            group_ids=rollouts.unique_groups.cpu(),
            num_sequences=rollouts.group_sizes().cpu(),
            num_tokens=rollouts.group_token_counts().cpu(),
            zero_spread=prepared.zero_spread(rollouts).cpu(),
        )

    def result(
        self, groups: range, grads: torch.Tensor, segments: tuple[Segment, ...], call: str
    ) -> GroupGradients:
        """The groups at positions ``groups`` with their (Gc, D) rows ``grads``."""
        lo, hi = groups.start, groups.stop
        return GroupGradients(
            group_ids=self.group_ids[lo:hi],
            grads=grads.cpu(),
            num_sequences=self.num_sequences[lo:hi],
            num_tokens=self.num_tokens[lo:hi],
            zero_spread=self.zero_spread[lo:hi],
            segments=segments,
            call=call,
        )


def weighted_loss(
    model: nn.Module,
    rollouts: Rollouts,
    prepared: TokenWeights,
    rows: torch.Tensor,
    width: int,
    weights: torch.Tensor | None,
    *,
    max_logits_elements: int,
    share_keys: torch.Tensor | None,
    on_forward: OnForward | None = None,
) -> torch.Tensor:
    """The micro-batch loss every extractor differentiates: ``-(w * log pi).sum()`` over ``rows``
    (their first ``width`` columns), with grad mode on.

    Args:
        weights: (S', W) token weights of ``rows``; None computes them from the current
            log-probs (PPO ratio or KL term: ``prepared.needs_logprobs``).
        share_keys: (S',) rows with equal keys share their prompt's forward (None: no sharing).
        on_forward: called before the decoder's forward (hook-based extractors lay out rows).
    """
    device = model_device(model)
    with torch.enable_grad():
        logp = response_logprobs(
            model,
            rollouts.input_ids[rows, :width].to(device),
            rollouts.attention_mask[rows, :width].to(device),
            rollouts.response_mask[rows, :width].to(device),
            max_logits_elements=max_logits_elements,
            share_keys=share_keys,
            on_forward=on_forward,
        )  # (S', W)
        if weights is None:
            weights = prepared.token_weights(
                logp.detach().to(rollouts.device), rows=rows, width=width
            )  # (S', W)
        return -(weights.to(logp.device) * logp).sum()


class GroupCounter:
    """A progress bar that counts groups (not chunks); a no-op when disabled."""

    def __init__(self, *, enabled: bool, total: int, desc: str) -> None:
        self._bar: Any = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="group", leave=False)

    def update(self, groups: int) -> None:
        if self._bar is not None:
            self._bar.update(groups)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class GradientExtractor(ABC):
    """Computes one gradient row per problem group.

    Subclasses implement [`iter_groups`][gradalign.extractors.base.GradientExtractor.iter_groups], which yields [`GroupGradients`][gradalign.extractors.base.GroupGradients] over chunks of
    groups so that callers can stream a pool without holding every gradient at once.

    Examples:
        >>> import torch, gradalign as ga
        >>> ro = ga.Rollouts.from_token_ids([[5, 6], [5, 6], [7, 8], [7, 8]],
        ...     [[9, 1], [10, 1], [11, 1], [12, 1]], [1.0, 0.0, 1.0, 1.0], [0, 0, 1, 1])
        >>> from gradalign.testing import tiny_model
        >>> model = tiny_model()
        >>> ext = ga.FullGradient(target_modules=["lm_head"])  # any extractor: per_group or a stream
        >>> [len(chunk) for chunk in ext.iter_groups(model, ro)]
        [2]
    """

    def __post_init__(self) -> None:
        """The extractors are frozen dataclasses: check every declared setting once, here."""
        check_options(self)

    def per_group(
        self,
        model: nn.Module,
        rollouts: Rollouts,
        objective: Objective | TokenWeights | None = None,
        *,
        progress: bool = False,
    ) -> GroupGradients:
        """(G, D) gradients of each group's GRPO loss, groups sorted by id.

        Args:
            model: a causal LM (transformers or peft) returning logits.
            rollouts: the rollouts to differentiate.
            objective: the loss (default ``GRPOObjective()``), or its weights already prepared for
                ``rollouts`` ([`TokenWeights`][gradalign.token_weights.TokenWeights]).
            progress: show a progress bar.
        """
        return GroupGradients.concat(
            self.iter_groups(model, rollouts, objective, progress=progress)
        )

    def group_packs(
        self, rollouts: Rollouts, objective: Objective | TokenWeights | None = None
    ) -> list[int]:
        """How many consecutive groups (ascending ids) share each pass of this extractor.

        A group's result depends only on the groups of its pack, so extracting any union of whole
        packs gives bit-identical rows ([`GradientStore`][gradalign.store.GradientStore] chunks by packs).
        The default: every group alone.
        """
        del objective
        return [1] * rollouts.num_groups

    @abstractmethod
    def iter_groups(
        self,
        model: nn.Module,
        rollouts: Rollouts,
        objective: Objective | TokenWeights | None = None,
        *,
        progress: bool = False,
    ) -> Iterator[GroupGradients]:
        """Yield [`GroupGradients`][gradalign.extractors.base.GroupGradients] for consecutive chunks of groups (ascending ids)."""

    @staticmethod
    def _check_inputs(call: str, model: Any, rollouts: Any) -> None:
        if not isinstance(model, nn.Module):
            raise GradAlignError(
                f"{call}: model must be a torch.nn.Module, got {type(model).__name__}"
            )
        if not isinstance(rollouts, Rollouts):
            raise GradAlignError(
                f"{call}: rollouts must be a gradalign.Rollouts, got {type(rollouts).__name__}"
            )
        get_emb = getattr(model, "get_input_embeddings", None)
        vocab = getattr(get_emb(), "num_embeddings", None) if callable(get_emb) else None
        top = int(rollouts.input_ids.max())
        if isinstance(vocab, int) and top >= vocab:
            row = int((rollouts.input_ids >= vocab).any(1).nonzero()[0])
            raise GradAlignError(
                f"{call}: input_ids hold token id {top} (row {row}) but the model's vocabulary "
                f"has {vocab} entries (ids 0..{vocab - 1}); padding ids are embedded too"
            )
