"""Scorers and targets against numpy and direct backward computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradalign import GradAlignError, GRPOObjective
from gradalign.extractors import FullGradient, GroupGradients
from gradalign.scoring import aggregate_tasks, build_target, cosine, inner_product
from tests.helpers import make_rollouts


def _np_cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))


def test_cosine_and_inner_product_against_numpy() -> None:
    rng = np.random.default_rng(0)
    g = rng.normal(size=(5, 7)).astype(np.float32)
    g[2] = 0.0
    t = rng.normal(size=(3, 7)).astype(np.float32)
    cos = cosine(torch.from_numpy(g), torch.from_numpy(t))
    assert cos.shape == (5, 3)
    expected = np.array([[_np_cos(g[i], t[q]) for q in range(3)] for i in range(5)])
    np.testing.assert_allclose(cos.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert (cos[2] == 0).all()
    one = cosine(torch.from_numpy(g), torch.from_numpy(t[0]))
    assert one.shape == (5,)
    ip = inner_product(torch.from_numpy(g), torch.from_numpy(t[0]))
    np.testing.assert_allclose(ip.numpy(), g @ t[0], rtol=1e-5)
    ipn = inner_product(torch.from_numpy(g), torch.from_numpy(t[0]), normalize_target=True)
    np.testing.assert_allclose(ipn.numpy(), g @ t[0] / np.linalg.norm(t[0]), rtol=1e-5)
    zero_t = cosine(torch.from_numpy(g), torch.zeros(7))
    assert (zero_t == 0).all() and not torch.isnan(zero_t).any()


def test_scorer_errors() -> None:
    with pytest.raises(GradAlignError, match="cosine: target has D=3 but grads have D=4"):
        cosine(torch.zeros(2, 4), torch.zeros(3))
    with pytest.raises(GradAlignError, match="grads must be a 2-D"):
        cosine(torch.zeros(4), torch.zeros(4))
    with pytest.raises(GradAlignError, match="grads contains NaN"):
        inner_product(torch.tensor([[float("nan"), 1.0]]), torch.ones(2))
    with pytest.raises(GradAlignError, match="aggregate must be one of"):
        aggregate_tasks(torch.zeros(2, 2), "median")


def test_aggregate_tasks() -> None:
    s = torch.tensor([[0.1, 0.5], [-0.2, -0.4]])
    assert aggregate_tasks(s, "max").tolist() == pytest.approx([0.5, -0.2])
    assert aggregate_tasks(s, "min").tolist() == pytest.approx([0.1, -0.4])
    assert aggregate_tasks(s, "mean").tolist() == pytest.approx([0.3, -0.3])


def _gg(grads: list[list[float]], tokens: list[int], seqs: list[int]) -> GroupGradients:
    g = len(grads)
    return GroupGradients(
        group_ids=torch.arange(g),
        grads=torch.tensor(grads),
        num_sequences=torch.tensor(seqs),
        num_tokens=torch.tensor(tokens),
        zero_spread=torch.zeros(g, dtype=torch.bool),
    )


def test_target_reductions_by_hand() -> None:
    val = _gg([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]], tokens=[2, 5, 3], seqs=[2, 1, 1])
    assert build_target(val, "mean").tolist() == pytest.approx([4 / 3, 4 / 3])
    assert build_target(val, "normalized-mean").tolist() == pytest.approx([(0.6 + 1) / 2, 0.4])
    assert build_target(val, "batch").tolist() == pytest.approx([(2 * 3 + 3 * 1) / 10, 8 / 10])
    seq = GRPOObjective(loss_agg="seq-mean-token-mean")
    assert build_target(val, "batch", objective=seq).tolist() == pytest.approx([7 / 4, 8 / 4])
    per_task = build_target(val, "mean", tasks={0: "math", 1: "code", 2: "math"})
    assert per_task.tolist() == [[0.0, 0.0], [2.0, 2.0]]  # labels sorted: code, math
    with pytest.raises(GradAlignError, match="tasks has no entry for validation groups \\[2\\]"):
        build_target(val, tasks={0: "a", 1: "b"})
    with pytest.raises(GradAlignError, match="target must be one of"):
        build_target(val, "sum")


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_batch_target_equals_one_backward_over_validation(qwen: torch.nn.Module, agg: str) -> None:
    groups = [0, 0, 0, 5, 5, 5, 2, 2]
    rewards = [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    ro = make_rollouts(vocab=qwen.config.vocab_size, groups=groups, rewards=rewards, seed=2)
    obj = GRPOObjective(loss_agg=agg)
    target = build_target(FullGradient().per_group(qwen, ro, obj), "batch", objective=obj)
    # One loss over the whole validation batch: advantages per problem, aggregation over the batch.
    adv = obj.advantages(ro)
    mask = ro.response_mask.float()
    per_token = mask / mask.sum() if agg == "token-mean" else None
    agg_w = per_token if per_token is not None else mask / mask.sum(1, keepdim=True) / len(ro)
    logits = qwen(input_ids=ro.input_ids, attention_mask=ro.attention_mask).logits
    lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ro.input_ids[:, 1:, None])[..., 0]
    loss = -(adv[:, None] * agg_w[:, 1:] * lp).sum()
    ref = torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(qwen.parameters()))])
    torch.testing.assert_close(target, ref, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1.0, 1e20, 3e37])
def test_scores_finite_and_scale_free_at_any_magnitude(scale: float) -> None:
    g = torch.Generator().manual_seed(0)
    grads, target = torch.randn(5, 16, generator=g), torch.randn(3, 16, generator=g)
    ref = cosine(grads.double(), target.double())  # float64 reference at unit scale
    got = cosine(grads * scale, target * scale)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref.float(), rtol=1e-5, atol=1e-6)
    ip = inner_product(grads * scale, target, normalize_target=True)
    torch.testing.assert_close(ip / scale, inner_product(grads, target, normalize_target=True))


def test_issue_examples_of_huge_and_tiny_inputs() -> None:
    assert cosine(torch.full((2, 4), 1e20), torch.full((4,), 1e20)).tolist() == [1.0, 1.0]
    assert cosine(torch.full((2, 4), 1e-30), torch.full((4,), 1e-30)).tolist() == [1.0, 1.0]
    ip = inner_product(torch.full((2, 4), 1e20), torch.full((4,), 1e20), normalize_target=True)
    torch.testing.assert_close(ip, torch.full((2,), 2e20))
    with pytest.raises(GradAlignError, match="overflows float32"):
        inner_product(torch.full((2, 4), 1e20), torch.full((4,), 1e20))


def test_deprecated_parameter_names_were_removed_in_0_3() -> None:
    scores = torch.tensor([[0.1, 0.5], [0.3, -0.2]])
    with pytest.raises(TypeError, match="how"):
        aggregate_tasks(scores, how="min")  # type: ignore[call-arg]
    grads = GroupGradients(
        group_ids=torch.tensor([0]), grads=torch.ones(1, 2), num_tokens=torch.ones(1),
        num_sequences=torch.ones(1), zero_spread=torch.zeros(1, dtype=torch.bool)
    )  # fmt: skip
    with pytest.raises(TypeError, match="reduction"):
        build_target(grads, reduction="mean")  # type: ignore[call-arg]
