"""GRPOObjective: every variant against weights computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from gradalign import GradAlignError, GRPOObjective, Rollouts
from tests.helpers import make_rollouts


def _rollouts(**extra: torch.Tensor) -> Rollouts:
    # group 10: rows 0, 2 (2 and 3 response tokens); group 4: rows 1, 3, 4 (1, 2, 1 tokens)
    resp = torch.tensor(
        [
            [0, 1, 1, 0, 0],
            [0, 0, 0, 0, 1],
            [0, 0, 1, 1, 1],
            [0, 0, 0, 1, 1],
            [0, 1, 0, 0, 0],
        ]
    ).bool()
    return Rollouts(
        input_ids=torch.arange(25).reshape(5, 5),
        attention_mask=torch.ones(5, 5, dtype=torch.long),
        response_mask=resp,
        rewards=torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0]),
        group_ids=torch.tensor([10, 4, 10, 4, 4]),
        **extra,
    )


def _std(xs: list[float]) -> float:
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _hand_advantages(scale: str, eps: float = 1e-4) -> list[float]:
    r = [1.0, 0.0, 0.0, 1.0, 1.0]
    g10, g4 = [1.0, 0.0], [0.0, 1.0, 1.0]
    m10, m4 = 0.5, 2 / 3
    centred = [1 - m10, 0 - m4, 0 - m10, 1 - m4, 1 - m4]
    if scale == "none":
        return centred
    if scale == "batch":
        return [c / (_std(r) + eps) for c in centred]
    s10, s4 = _std(g10), _std(g4)
    return [centred[0] / (s10 + eps), centred[1] / (s4 + eps), centred[2] / (s10 + eps)] + [
        centred[i] / (s4 + eps) for i in (3, 4)
    ]


@pytest.mark.parametrize("scale", ["group", "none", "batch"])
def test_advantages(scale: str) -> None:
    adv = GRPOObjective(scale_rewards=scale).advantages(_rollouts())
    assert adv.tolist() == pytest.approx(_hand_advantages(scale), rel=1e-6)


# per-row aggregation factor by hand: lengths [2, 1, 3, 2, 1], group 10 = rows 0, 2; 4 = rows 1, 3, 4
_AGG = {
    "token-mean": [1 / 5, 1 / 4, 1 / 5, 1 / 4, 1 / 4],
    "seq-mean-token-mean": [1 / (2 * 2), 1 / (3 * 1), 1 / (2 * 3), 1 / (3 * 2), 1 / (3 * 1)],
    "seq-mean-token-sum": [1 / 2, 1 / 3, 1 / 2, 1 / 3, 1 / 3],
    "seq-mean-token-sum-norm": [1 / (2 * 3), 1 / (3 * 3), 1 / (2 * 3), 1 / (3 * 3), 1 / (3 * 3)],
}


@pytest.mark.parametrize("agg", list(_AGG))
@pytest.mark.parametrize("scale", ["group", "none"])
def test_token_weights_match_hand_computation(agg: str, scale: str) -> None:
    ro = _rollouts()
    w = GRPOObjective(scale_rewards=scale, loss_agg=agg).token_weights(ro)
    adv = _hand_advantages(scale)
    expected = torch.zeros(5, 5)
    for i in range(5):
        expected[i][ro.response_mask[i]] = adv[i] * _AGG[agg][i]
    torch.testing.assert_close(w, expected, rtol=1e-6, atol=1e-7)


def test_sum_norm_uses_given_length() -> None:
    w = GRPOObjective(
        scale_rewards="none", loss_agg="seq-mean-token-sum-norm", max_response_length=8
    )
    weights = w.token_weights(_rollouts())
    assert weights[0, 1].item() == pytest.approx(0.5 / (2 * 8))


def test_clipped_ratio_and_kl_weights() -> None:
    old = torch.full((5, 5), -1.0)
    ref = torch.full((5, 5), -2.0)
    ro = _rollouts(old_logprobs=old, ref_logprobs=ref)
    logp = torch.full((5, 5), -1.0)
    logp[0, 1] = -1.0 + math.log(1.5)  # A > 0, ratio 1.5 > 1.2: clipped, no gradient
    logp[0, 2] = -1.0 + math.log(0.5)  # A > 0, ratio 0.5 < 0.8: unclipped side, gradient * 0.5
    logp[1, 4] = -1.0 + math.log(0.5)  # A < 0, ratio 0.5 < 0.8: clipped, no gradient
    logp[2, 2] = -1.0 + math.log(1.1)  # A < 0, ratio 1.1 inside the range
    obj = GRPOObjective(scale_rewards="none", kl_coef=0.1, clip_low=0.2, clip_high=0.2)
    w = obj.token_weights(ro, logp)
    adv = _hand_advantages("none")
    agg = _AGG["token-mean"]

    def kl_term(lp: float) -> float:
        return -0.1 * (1 - math.exp(-2.0 - lp))

    assert w[0, 1].item() == pytest.approx(agg[0] * (0.0 + kl_term(logp[0, 1].item())), rel=1e-5)
    assert w[0, 2].item() == pytest.approx(
        agg[0] * (adv[0] * 0.5 + kl_term(logp[0, 2].item())), rel=1e-5
    )
    assert w[1, 4].item() == pytest.approx(agg[1] * (0.0 + kl_term(logp[1, 4].item())), rel=1e-5)
    assert w[2, 2].item() == pytest.approx(
        agg[2] * (adv[2] * 1.1 + kl_term(logp[2, 2].item())), rel=1e-5
    )
    assert w[2, 0].item() == 0.0  # not a response token


def test_zero_spread_and_errors() -> None:
    ro = Rollouts(
        input_ids=torch.ones(3, 3, dtype=torch.long),
        attention_mask=torch.ones(3, 3),
        response_mask=torch.tensor([[0, 1, 1]] * 3).bool(),
        rewards=torch.tensor([1.0, 1.0, 0.0]),
        group_ids=torch.tensor([0, 0, 1]),
    )
    obj = GRPOObjective()
    assert obj.zero_spread(ro).tolist() == [True, True]
    assert not obj.token_weights(ro).any()
    with pytest.raises(GradAlignError, match="scale_rewards must be one of"):
        GRPOObjective(scale_rewards="std")
    with pytest.raises(GradAlignError, match=r"loss_agg must be one of .* got 'mean'"):
        GRPOObjective(loss_agg="mean")
    with pytest.raises(GradAlignError, match=r"needs rollouts\.ref_logprobs"):
        GRPOObjective(kl_coef=0.1).token_weights(ro, torch.zeros(3, 3))
    with pytest.raises(GradAlignError, match="logprobs must have shape"):
        obj.token_weights(ro, torch.zeros(2, 3))


@pytest.mark.parametrize("scale", ["group", "batch"])
def test_zero_eps_gives_zero_advantages_for_zero_spread(scale: str) -> None:
    ro = make_rollouts(vocab=50, groups=[0, 0, 1, 1], rewards=[1.0, 1.0, 0.0, 1.0])
    adv = GRPOObjective(scale_rewards=scale, eps=0.0).advantages(ro)
    assert torch.isfinite(adv).all()
    assert adv[:2].tolist() == [0.0, 0.0]
    same = make_rollouts(vocab=50, groups=[0, 0], rewards=[1.0, 1.0])
    assert GRPOObjective(scale_rewards=scale, eps=0.0).advantages(same).tolist() == [0.0, 0.0]


def test_zero_eps_extractors_give_exact_zeros(qwen: torch.nn.Module) -> None:
    from gradalign import FactorizedGradient, FullGradient, GradAlign

    ro = make_rollouts(
        vocab=qwen.config.vocab_size, groups=[0, 0, 1, 1], rewards=[1.0, 1.0, 0.0, 1.0]
    )
    obj = GRPOObjective(eps=0.0)
    for ext in (FullGradient(), FactorizedGradient(4, 4)):
        grads = ext.per_group(qwen, ro, obj).grads
        assert torch.isfinite(grads).all()
        assert grads[0].abs().sum() == 0 and grads[1].abs().sum() > 0
    val = Rollouts(
        input_ids=ro.input_ids,
        attention_mask=ro.attention_mask,
        response_mask=ro.response_mask,
        rewards=ro.rewards,
        group_ids=ro.group_ids + 100,  # the same rollouts as validation problems 100, 101
    )
    scores = GradAlign(objective=obj).score(qwen, ro, val).scores
    assert scores is not None and torch.isfinite(scores).all() and scores[1] > 0.99


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kl_coef": float("inf")}, "kl_coef must be finite"),
        ({"eps": float("nan")}, "eps must be finite"),
        ({"clip_high": float("inf")}, "clip_high must be finite"),
        ({"eps": "1"}, "eps must be a real number, got str"),
        ({"clip_low": True}, "clip_low must be a real number, got bool"),
        ({"max_response_length": 2.5}, "max_response_length must be an int"),
    ],
)
def test_non_finite_and_mistyped_settings_are_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(GradAlignError, match=match):
        GRPOObjective(**kwargs)


def test_prepare_once_equals_token_weights_and_slices_rows() -> None:
    from gradalign.objective import TokenWeights

    ro = make_rollouts(vocab=50, groups=[3, 3, 3, 9, 9], rewards=[1.0, 0.0, 1.0, 0.0, 1.0])
    obj = GRPOObjective(loss_agg="seq-mean-token-sum-norm")
    prepared = obj.prepare(ro)
    assert isinstance(prepared, TokenWeights)
    torch.testing.assert_close(prepared.token_weights(), obj.token_weights(ro))
    rows = torch.tensor([4, 1])
    sub = prepared.select(rows, width=5)
    torch.testing.assert_close(sub.token_weights(), obj.token_weights(ro, rows=rows, width=5))
    assert prepared.zero_spread(ro).tolist() == [False, False]


def test_batch_stats_of_shards_give_the_whole_batch_weights() -> None:
    from gradalign.objective import BatchStats

    ro = make_rollouts(vocab=50, groups=[0, 0, 1, 1, 2, 2], rewards=[1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    obj = GRPOObjective(scale_rewards="batch", loss_agg="seq-mean-token-sum-norm")
    shards = [ro.select_groups([0]), ro.select_groups([1, 2])]
    stats = BatchStats.of(shards[0]).combine(BatchStats.of(shards[1]))
    assert stats.reward_std == pytest.approx(float(ro.rewards.std()))
    assert stats.max_response_length == int(ro.response_mask.sum(1).max())
    whole = obj.token_weights(ro)
    for shard, rows in zip(shards, ([0, 1], [2, 3, 4, 5]), strict=True):
        got = obj.prepare(shard, stats).token_weights()
        width = got.shape[1]
        torch.testing.assert_close(got, whole[rows, :width])


def test_token_weight_objective_is_a_per_example_sft_loss(qwen: torch.nn.Module) -> None:
    """Per-example gradients of the mean token NLL, against a hand-written backward per row."""
    from gradalign import FullGradient
    from gradalign.objective import TokenWeightObjective

    ro = make_rollouts(vocab=qwen.config.vocab_size, groups=[0, 1, 2], rewards=[0.0, 0.0, 0.0])
    lengths = ro.response_mask.sum(1, keepdim=True).float()
    obj = TokenWeightObjective(ro.response_mask.float() / lengths)
    got = FullGradient(target_modules=["lm_head"]).per_group(qwen, ro, obj)
    assert got.zero_spread.tolist() == [False, False, False]
    head = qwen.lm_head.weight
    for i in range(3):
        ids = ro.input_ids[i : i + 1]
        logits = qwen(input_ids=ids, attention_mask=ro.attention_mask[i : i + 1]).logits[0]
        lp = torch.log_softmax(logits[:-1].float(), -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        nll = -(lp * ro.response_mask[i, 1:]).sum() / lengths[i]
        (expected,) = torch.autograd.grad(nll, [head])
        torch.testing.assert_close(got.grads[i], expected.flatten(), rtol=1e-4, atol=1e-7)
    with pytest.raises(GradAlignError, match=r"TokenWeightObjective\.prepare: weights must be"):
        TokenWeightObjective(torch.ones(2, 2)).prepare(ro)
