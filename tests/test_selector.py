"""GradAlign end to end on a tiny model, against scores computed by hand from exact gradients."""

from __future__ import annotations

import pytest
import torch

from gradalign import GradAlignError, GRPOObjective
from gradalign.extractors import FullGradient, RandomProjectedGradient
from gradalign.policies import TopK
from gradalign.selector import GradAlign
from tests.helpers import make_rollouts

CAND_GROUPS = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
CAND_REWARDS = [1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]  # group 1: no spread
VAL_GROUPS = [10, 10, 11, 11, 12, 12]
VAL_REWARDS = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]


@pytest.fixture()
def data(qwen: torch.nn.Module) -> tuple:
    v = qwen.config.vocab_size
    cands = make_rollouts(vocab=v, groups=CAND_GROUPS, rewards=CAND_REWARDS, seed=11)
    val = make_rollouts(vocab=v, groups=VAL_GROUPS, rewards=VAL_REWARDS, seed=12)
    return cands, val


def _reference_scores(model: torch.nn.Module, cands, val) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact gradients, a mean target, then cosine / unit-target inner product by hand."""
    ext = FullGradient()
    g = ext.per_group(model, cands).grads.double()
    t = ext.per_group(model, val).grads.double().mean(0)
    cos = torch.zeros(len(g), dtype=torch.float64)
    for i in range(len(g)):
        n = g[i].norm()
        cos[i] = 0.0 if n == 0 else g[i] @ t / (n * t.norm())
    return cos.float(), (g @ t / t.norm()).float()


def test_scores_and_selection_match_hand_computation(qwen: torch.nn.Module, data: tuple) -> None:
    cands, val = data
    cos, ip = _reference_scores(qwen, cands, val)
    sel = GradAlign(FullGradient(group_chunk=1), policy=TopK(k=2)).select(qwen, cands, val)
    table = sel.candidates
    torch.testing.assert_close(table.scores, cos, rtol=1e-4, atol=1e-6)
    assert table.scores[1].item() == 0.0 and table.zero_gradient.tolist() == [
        False,
        True,
        False,
        False,
    ]
    assert table.accuracy.tolist() == pytest.approx([2 / 3, 1.0, 1 / 3, 1 / 3])
    expected = torch.argsort(cos, descending=True, stable=True)[:2]
    assert sel.ids.tolist() == expected.tolist()
    torch.testing.assert_close(sel.scores, cos[expected], rtol=1e-4, atol=1e-6)
    al = GradAlign(FullGradient()).alignment(qwen, cands, val)
    torch.testing.assert_close(al.inner_product, ip, rtol=1e-4, atol=1e-6)
    table_ip = GradAlign(FullGradient(), scorer="inner_product").score(qwen, cands, val)
    torch.testing.assert_close(table_ip.scores, ip, rtol=1e-4, atol=1e-6)


def test_projected_scores_approximate_exact_ones(qwen: torch.nn.Module, data: tuple) -> None:
    cands, val = data
    exact = GradAlign(FullGradient()).alignment(qwen, cands, val).cosine
    approx = GradAlign(RandomProjectedGradient(dim=4096, kind="sjlt")).alignment(qwen, cands, val)
    assert (approx.cosine - exact).abs().max() < 0.1
    assert approx.cosine[1] == 0.0


def test_several_tasks_and_aggregation(qwen: torch.nn.Module, data: tuple) -> None:
    cands, val = data
    tasks = {10: "a", 11: "a", 12: "b"}
    al = GradAlign(FullGradient(), aggregate="min").alignment(qwen, cands, val, tasks=tasks)
    ext = FullGradient()
    g = ext.per_group(qwen, cands).grads
    vg = ext.per_group(qwen, val).grads
    targets = torch.stack([vg[:2].mean(0), vg[2]])
    per_task = torch.nn.functional.cosine_similarity(g[:, None], targets[None], dim=-1)
    per_task[1] = 0.0
    torch.testing.assert_close(al.task_cosine, per_task, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(al.cosine, per_task.min(1).values, rtol=1e-4, atol=1e-6)
    assert al.task_labels == ("a", "b")


def test_zero_validation_signal_is_an_error(qwen: torch.nn.Module, data: tuple) -> None:
    cands, _ = data
    flat = make_rollouts(vocab=qwen.config.vocab_size, groups=[5, 5], rewards=[1.0, 1.0])
    with pytest.raises(GradAlignError, match="validation gradient is zero"):
        GradAlign().select(qwen, cands, flat)


def test_bad_settings() -> None:
    with pytest.raises(GradAlignError, match="scorer must be one of"):
        GradAlign(scorer="dot")
    with pytest.raises(GradAlignError, match="target must be one of"):
        GradAlign(target="median")
    with pytest.raises(GradAlignError, match="extractor must be a GradientExtractor"):
        GradAlign(extractor="full")  # type: ignore[arg-type]
    with pytest.raises(GradAlignError, match="policy must be callable"):
        GradAlign(policy=3)  # type: ignore[arg-type]


def test_objective_variant_is_used(qwen: torch.nn.Module, data: tuple) -> None:
    cands, val = data
    obj = GRPOObjective(scale_rewards="none", loss_agg="seq-mean-token-sum")
    al = GradAlign(FullGradient(), objective=obj).alignment(qwen, cands, val)
    ext = FullGradient()
    g = ext.per_group(qwen, cands, obj).grads
    t = ext.per_group(qwen, val, obj).grads.mean(0)
    assert al.dot.dtype == torch.float64  # float64 terms: no overflow for any finite gradient
    torch.testing.assert_close(al.dot[:, 0].float(), g @ t, rtol=1e-4, atol=1e-7)
