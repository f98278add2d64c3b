"""Diagnostics: which modules a score comes from.

Implementations: [`score_breakdown`][gradalign.diagnostics.score_breakdown] (per-segment contributions to the cosine or inner-product
score of every candidate, summing exactly to the score), [`ScoreBreakdown`][gradalign.diagnostics.ScoreBreakdown] (its result, with
merging of segments, e.g. by layer) and [`segment_norms`][gradalign.diagnostics.segment_norms] (per-segment gradient norms).

Segments come from `GroupGradients.segments`: one per parameter for
[`FullGradient`][gradalign.extractors.full.FullGradient] and
[`LoRAGradient`][gradalign.extractors.lora.LoRAGradient], one per module (weight then bias) for
[`FactorizedGradient`][gradalign.extractors.factorized.FactorizedGradient]. Jointly projected gradients
(``RandomProjectedGradient``) mix all modules in every column and have no segments.

Shape glossary: G candidate groups, D gradient dimension, P segments.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gradalign.errors import GradAlignError
from gradalign.extractors.base import GroupGradients, Segment
from gradalign.scoring import SCORERS, scaled_rows

__all__ = ["ScoreBreakdown", "layer_of", "score_breakdown", "segment_norms"]

OTHER = "(other)"  # columns no segment claims

_LAYER = re.compile(r"^(.*?\.(?:layers|h|blocks|layer)\.\d+)\.")


def layer_of(name: str) -> str:
    """The decoder layer a segment belongs to (``model.layers.3.mlp.up_proj`` -> ``model.layers.3``).

    Names outside numbered layers (embeddings, final norm, output head) are returned unchanged.

    Examples:
        >>> layer_of("model.layers.3.mlp.up_proj.weight"), layer_of("lm_head")
        ('model.layers.3', 'lm_head')
    """
    match = _LAYER.match(name)
    return match.group(1) if match else name


@dataclass(frozen=True, eq=False)
class ScoreBreakdown:
    """Per-segment contributions to each candidate's score.

    Attributes:
        group_ids: (G,) candidate group ids.
        names: (P,) segment names, in column order.
        contributions: (G, P) float32; each row sums to ``scores`` (up to rounding).
        scores: (G,) the scores themselves (``gradalign.cosine`` or ``inner_product`` with the
            unit-norm target).
        scorer: "cosine" or "inner_product".

    Examples:
        >>> import torch, gradalign as ga
        >>> ro = ga.Rollouts.from_token_ids([[5, 6], [5, 6], [7, 8], [7, 8]],
        ...     [[9, 1], [10, 1], [11, 1], [12, 1]], [1.0, 0.0, 1.0, 1.0], [0, 0, 1, 1])
        >>> from gradalign.testing import tiny_model
        >>> model = tiny_model()
        >>> out = ga.FactorizedGradient(4, 4).per_group(model, ro)
        >>> from gradalign.diagnostics import score_breakdown
        >>> parts = score_breakdown(out, out.grads[0])  # which layers make each score
        >>> parts.scores.round(decimals=4)  # group 0 against its own gradient
        tensor([1., 0.])
        >>> round(sum(parts.of(0).values()), 4)
        1.0
    """

    group_ids: torch.Tensor
    names: tuple[str, ...]
    contributions: torch.Tensor
    scores: torch.Tensor
    scorer: str

    def merge(self, key: Callable[[str], str] = layer_of) -> ScoreBreakdown:
        """Sum the contributions of segments with the same ``key(name)`` (default: by layer).

        Merged names keep the order of their first segment.
        """
        merged: dict[str, int] = {}
        index = torch.tensor([merged.setdefault(key(n), len(merged)) for n in self.names])
        out = torch.zeros(len(self.group_ids), len(merged), dtype=self.contributions.dtype)
        out.index_add_(1, index, self.contributions)  # (G, P')
        return ScoreBreakdown(self.group_ids, tuple(merged), out, self.scores, self.scorer)

    def mean(self) -> dict[str, float]:
        """Mean contribution of each segment over the candidates, largest magnitude first."""
        means = self.contributions.mean(dim=0).tolist() if len(self.group_ids) else []
        pairs = sorted(zip(self.names, means, strict=True), key=lambda kv: -abs(kv[1]))
        return dict(pairs)

    def of(self, group_id: int) -> dict[str, float]:
        """Contributions to one candidate's score, largest magnitude first."""
        hits = (self.group_ids == int(group_id)).nonzero().flatten()
        if hits.numel() == 0:
            raise GradAlignError(f"ScoreBreakdown.of: no candidate group {group_id!r}")
        row = self.contributions[int(hits[0])].tolist()
        return dict(sorted(zip(self.names, row, strict=True), key=lambda kv: -abs(kv[1])))


def _covering(call: str, candidates: GroupGradients) -> list[Segment]:
    """The segments sorted by column, checked to be disjoint ranges inside the row."""
    segments = sorted(candidates.segments, key=lambda s: s.start)
    if not segments:
        raise GradAlignError(
            f"{call}: candidates have no segments (a joint random projection mixes every module "
            "in every column); use FullGradient, FactorizedGradient or LoRAGradient(dim=None)"
        )
    claimed = torch.zeros(candidates.dim, dtype=torch.bool)
    for seg in segments:
        if not 0 <= seg.start <= seg.stop <= candidates.dim or claimed[seg.start : seg.stop].any():
            raise GradAlignError(
                f"{call}: segments must be disjoint column ranges of D={candidates.dim}, got {seg}"
            )
        claimed[seg.start : seg.stop] = True
    return segments


def score_breakdown(
    candidates: GroupGradients, target: torch.Tensor, scorer: str = "cosine"
) -> ScoreBreakdown:
    """Split every candidate's score into per-segment (per-module) contributions.

    The inner product is a sum over columns, so ``<g, t> = sum_p <g_p, t_p>``; dividing each term
    by the score's normaliser (``|g| |t|`` for cosine, ``|t|`` for the inner product with the
    unit-norm target) gives contributions that add up exactly to the score. A zero-norm candidate
    or target gets all-zero contributions, as its score is 0.

    Args:
        candidates: (G, D) candidate gradients with ``segments``.
        target: (D,) target direction.
        scorer: "cosine" (default) or "inner_product".

    Returns:
        A [`ScoreBreakdown`][gradalign.diagnostics.ScoreBreakdown]; unclaimed columns, if any, form an ``"(other)"`` segment.

    Examples:
        >>> from gradalign.scoring import build_target
        >>> cands = FactorizedGradient(dim_in=8, dim_out=8).per_group(model, rollouts)
        >>> parts = score_breakdown(cands, build_target(cands)).merge()  # one row per layer
        >>> parts.names
        ('model.layers.0', 'model.layers.1', 'lm_head')
        >>> torch.allclose(parts.contributions.sum(1), parts.scores, atol=1e-5)
        True
    """
    call = "score_breakdown"
    if scorer not in SCORERS:
        raise GradAlignError(f"{call}: scorer must be one of {SCORERS}, got {scorer!r}")
    if not isinstance(target, torch.Tensor) or tuple(target.shape) != (candidates.dim,):
        shape = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        raise GradAlignError(f"{call}: target must have shape (D={candidates.dim},), got {shape}")
    segments = _covering(call, candidates)
    # The scoring kernel's scaled rows: products neither overflow nor underflow.
    grads, g_scale = scaled_rows(candidates.grads)  # (G, D), (G,)
    t, _ = scaled_rows(target.float().to(candidates.grads.device)[None])  # (1, D)
    index = torch.full((candidates.dim,), len(segments), dtype=torch.long)  # (D,) -> segment
    for i, seg in enumerate(segments):
        index[seg.start : seg.stop] = i
    dots = torch.zeros(len(candidates), len(segments) + 1, dtype=torch.float64)
    dots.index_add_(1, index, (grads * t).double())  # (G, P + 1), scaled
    t_norm = t.norm().double()
    if scorer == "cosine":  # the scales cancel
        denom = grads.norm(dim=1).double() * t_norm  # (G,)
    else:  # <g, t/|t|>: the candidate's scale stays
        denom = t_norm / torch.where(g_scale > 0, g_scale, 1.0)  # (G,)
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    parts = torch.where(denom[:, None] > 0, dots / safe[:, None], 0.0).float()  # (G, P + 1)
    names = [s.name for s in segments]
    if bool((index == len(segments)).any()):
        names.append(OTHER)
    else:
        parts = parts[:, : len(segments)]
    return ScoreBreakdown(
        group_ids=candidates.group_ids,
        names=tuple(names),
        contributions=parts,
        scores=parts.sum(dim=1),
        scorer=scorer,
    )


def segment_norms(candidates: GroupGradients) -> tuple[tuple[str, ...], torch.Tensor]:
    """Per-segment gradient norms: which modules carry each candidate's gradient.

    Returns:
        (P,) segment names and a (G, P) float32 tensor of norms.

    Examples:
        >>> import torch, gradalign as ga
        >>> ro = ga.Rollouts.from_token_ids([[5, 6], [5, 6], [7, 8], [7, 8]],
        ...     [[9, 1], [10, 1], [11, 1], [12, 1]], [1.0, 0.0, 1.0, 1.0], [0, 0, 1, 1])
        >>> from gradalign.testing import tiny_model
        >>> model = tiny_model()
        >>> from gradalign.diagnostics import segment_norms
        >>> names, norms = segment_norms(ga.FactorizedGradient(4, 4).per_group(model, ro))
        >>> names[0], norms.shape
        ('model.layers.0.self_attn.q_proj', torch.Size([2, 15]))
    """
    segments = _covering("segment_norms", candidates)
    norms = [candidates.grads[:, s.start : s.stop].float().norm(dim=1) for s in segments]
    return tuple(s.name for s in segments), torch.stack(norms, dim=1)
