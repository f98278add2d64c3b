"""score_breakdown and segment_norms: per-module contributions that add up to the score."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradalign import GradAlignError
from gradalign.diagnostics import layer_of, score_breakdown, segment_norms
from gradalign.extractors import FactorizedGradient, GroupGradients, Segment
from gradalign.scoring import cosine, inner_product
from tests.helpers import make_rollouts


def _grads(rows: torch.Tensor, segments: tuple[Segment, ...]) -> GroupGradients:
    g = rows.shape[0]
    return GroupGradients(
        group_ids=torch.arange(g) * 10,
        grads=rows,
        num_sequences=torch.ones(g, dtype=torch.long),
        num_tokens=torch.ones(g, dtype=torch.long),
        zero_spread=torch.zeros(g, dtype=torch.bool),
        segments=segments,
    )


@pytest.mark.parametrize("scorer", ["cosine", "inner_product"])
def test_contributions_sum_to_score(qwen: nn.Module, scorer: str) -> None:
    ro = make_rollouts(
        vocab=qwen.config.vocab_size, groups=[1, 1, 2, 2, 3, 3], rewards=[1, 0, 0, 1, 1, 1]
    )
    cands = FactorizedGradient(dim_in=8, dim_out=8).per_group(qwen, ro)
    target = cands.grads[0] + 0.5 * torch.randn(
        cands.dim, generator=torch.Generator().manual_seed(0)
    )
    parts = score_breakdown(cands, target, scorer)
    expected = (
        cosine(cands.grads, target)
        if scorer == "cosine"
        else inner_product(cands.grads, target, normalize_target=True)
    )
    torch.testing.assert_close(parts.scores, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.contributions.sum(1), expected, rtol=1e-5, atol=1e-6)
    assert parts.names == tuple(s.name for s in cands.segments)
    assert not parts.contributions[2].any()  # zero-spread group: score 0, contributions 0
    by_layer = parts.merge()
    assert by_layer.names == ("model.layers.0", "model.layers.1", "lm_head")
    torch.testing.assert_close(by_layer.contributions.sum(1), expected, rtol=1e-5, atol=1e-6)
    top = by_layer.of(1)
    assert set(top) == set(by_layer.names)
    assert list(top.values()) == sorted(top.values(), key=lambda v: -abs(v))
    assert set(by_layer.mean()) == set(by_layer.names)


def test_uncovered_columns_and_norms() -> None:
    rows = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    cands = _grads(rows, (Segment("b", 2, 3), Segment("a", 0, 2)))
    target = torch.tensor([1.0, 0.0, 1.0, 1.0])
    parts = score_breakdown(cands, target, "inner_product")
    assert parts.names == ("a", "b", "(other)")
    norm = target.norm()
    torch.testing.assert_close(parts.contributions[0], torch.tensor([1.0, 3.0, 4.0]) / norm)
    assert not parts.contributions[1].any()
    names, norms = segment_norms(cands)
    assert names == ("a", "b")
    torch.testing.assert_close(norms[0], torch.tensor([5.0**0.5, 3.0]))


def test_errors() -> None:
    rows = torch.ones(2, 4)
    with pytest.raises(GradAlignError, match="candidates have no segments"):
        score_breakdown(_grads(rows, ()), torch.ones(4))
    seg = (Segment("a", 0, 4),)
    with pytest.raises(GradAlignError, match=r"target must have shape \(D=4,\), got \(3,\)"):
        score_breakdown(_grads(rows, seg), torch.ones(3))
    with pytest.raises(GradAlignError, match="scorer must be one of"):
        score_breakdown(_grads(rows, seg), torch.ones(4), "dot")
    with pytest.raises(GradAlignError, match="segments must be disjoint"):
        score_breakdown(_grads(rows, (Segment("a", 0, 3), Segment("b", 2, 4))), torch.ones(4))
    with pytest.raises(GradAlignError, match="no candidate group 5"):
        score_breakdown(_grads(rows, seg), torch.ones(4)).of(5)


def test_layer_of() -> None:
    assert layer_of("model.layers.12.self_attn.q_proj") == "model.layers.12"
    assert layer_of("transformer.h.3.attn.c_attn.weight") == "transformer.h.3"
    assert layer_of("model.embed_tokens.weight") == "model.embed_tokens.weight"
