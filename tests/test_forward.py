"""Response log-probs: padding side never matters, and shared prompts give the same numbers.

The reference is the model's own logits on each sequence alone, unpadded: no batching, no cache.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from gradalign import GradAlignError, GRPOObjective, Rollouts
from gradalign.extractors import (
    FactorizedGradient,
    FullGradient,
    GradientExtractor,
    LoRAGradient,
    RandomProjectedGradient,
)
from gradalign.extractors._forward import response_logprobs
from tests.helpers import left_pad, make_rollouts

GROUPS = [3, 3, 3, 3, 9, 9, 9, 1, 1, 1, 1]
REWARDS = [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def _alone(model: nn.Module, ro: Rollouts) -> torch.Tensor:
    """(S, T) log-probs of the response tokens, each sequence run alone without padding."""
    out = torch.zeros(ro.input_ids.shape)
    for i in range(len(ro)):
        cols = ro.attention_mask[i].nonzero().flatten()
        ids = ro.input_ids[i, cols][None]  # (1, n)
        logits = model(input_ids=ids).logits[0].float()  # (n, V)
        lp = torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        resp = ro.response_mask[i, cols][1:]
        out[i, cols[1:][resp]] = lp[resp]
    return out


@pytest.mark.parametrize("layout", ["right", "left", "left+3"])
@pytest.mark.parametrize("share", [False, True])
def test_logprobs_match_each_sequence_alone(qwen: nn.Module, layout: str, share: bool) -> None:
    ro = make_rollouts(
        vocab=qwen.config.vocab_size, groups=GROUPS, rewards=REWARDS, group_prompts=True
    )
    if layout != "right":
        ro = left_pad(ro, extra=3 if layout == "left+3" else 0)
    keys = ro.group_index if share else None
    with torch.no_grad():
        got = response_logprobs(
            qwen, ro.input_ids, ro.attention_mask, ro.response_mask, share_keys=keys
        )
    torch.testing.assert_close(got, _alone(qwen, ro), rtol=1e-5, atol=1e-5)


def test_shared_prompt_gradients_match_plain(llama_tied: nn.Module) -> None:
    model = llama_tied
    ro = make_rollouts(
        vocab=model.config.vocab_size, groups=GROUPS, rewards=REWARDS, group_prompts=True, seed=2
    )
    w = torch.randn(ro.input_ids.shape, generator=torch.Generator().manual_seed(0))
    params = list(model.parameters())

    def grads(keys: torch.Tensor | None) -> list[torch.Tensor]:
        lp = response_logprobs(
            model, ro.input_ids, ro.attention_mask, ro.response_mask, share_keys=keys
        )
        return list(torch.autograd.grad((w * lp).sum(), params))

    for a, b in zip(grads(None), grads(ro.group_index), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_shared_prompts_separate_keys(qwen: nn.Module) -> None:
    """Rows with one prompt but different keys (groups) never share a cache row."""
    ro = make_rollouts(
        vocab=qwen.config.vocab_size, groups=[0] * 6, rewards=[1.0, 0.0] * 3, group_prompts=True
    )
    seen: list[int] = []

    def on_forward(rows: torch.Tensor, width: int, head: torch.Tensor) -> None:
        seen.append(len(rows))

    keys = torch.tensor([0, 0, 0, 1, 1, 2])
    with torch.no_grad():
        got = response_logprobs(
            qwen,
            ro.input_ids,
            ro.attention_mask,
            ro.response_mask,
            share_keys=keys,
            on_forward=on_forward,
        )
    assert seen[0] == 3  # one prompt row per key, then one row per sequence
    assert seen[1] == 6
    torch.testing.assert_close(got, _alone(qwen, ro), rtol=1e-5, atol=1e-5)


def test_single_token_prompts_are_shared_too(qwen: nn.Module) -> None:
    ro = make_rollouts(
        vocab=qwen.config.vocab_size,
        groups=[0] * 4,
        rewards=[1.0, 0.0] * 2,
        max_prompt=1,
        group_prompts=True,
    )
    widths: list[int] = []
    with torch.no_grad():
        got = response_logprobs(
            qwen,
            ro.input_ids,
            ro.attention_mask,
            ro.response_mask,
            share_keys=torch.zeros(4, dtype=torch.long),
            on_forward=lambda rows, width, head: widths.append(width),
        )
    assert widths[0] == 1  # the one-token prompt, then the responses
    torch.testing.assert_close(got, _alone(qwen, ro), rtol=1e-5, atol=1e-5)


def test_nothing_shared_runs_one_plain_forward(qwen: nn.Module) -> None:
    ro = make_rollouts(vocab=qwen.config.vocab_size, groups=[0, 1, 2], rewards=[1.0, 0.0, 1.0])
    calls: list[int] = []
    with torch.no_grad():
        response_logprobs(
            qwen,
            ro.input_ids,
            ro.attention_mask,
            ro.response_mask,
            share_keys=ro.group_index,
            on_forward=lambda rows, width, head: calls.append(len(rows)),
        )
    assert calls == [3]


def _lora(model: nn.Module) -> nn.Module:
    import copy
    import warnings

    config = LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(copy.deepcopy(model), config)


EXTRACTORS: dict[str, GradientExtractor] = {
    "full": FullGradient(),
    "random-projected": RandomProjectedGradient(dim=64, kind="sjlt"),
    "factorized-exact": FactorizedGradient(None, None),
    "factorized": FactorizedGradient(4, 8),
    "lora": LoRAGradient(),
}


@pytest.mark.parametrize("name", list(EXTRACTORS))
def test_padding_side_batch_size_and_sharing_never_change_gradients(
    qwen: nn.Module, name: str
) -> None:
    model = _lora(qwen) if name == "lora" else qwen
    ro = make_rollouts(
        vocab=qwen.config.vocab_size, groups=GROUPS, rewards=REWARDS, group_prompts=True, seed=4
    )
    base = EXTRACTORS[name]
    ref = dataclasses.replace(base, batch_size=16).per_group(model, ro).grads
    assert ref.abs().sum() > 0
    for rollouts in (ro, left_pad(ro), left_pad(ro, extra=2)):
        for batch_size in (1, 3, 16):
            for share in (False, True):
                ext = dataclasses.replace(base, batch_size=batch_size, share_prompts=share)
                got = ext.per_group(model, rollouts).grads
                torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)


def test_objective_weights_follow_left_padding() -> None:
    """Left padding moves the weights with the tokens: same weights at the same tokens."""
    ro = make_rollouts(vocab=50, groups=GROUPS, rewards=REWARDS)
    lp = left_pad(ro, extra=1)
    w, w_left = GRPOObjective().token_weights(ro), GRPOObjective().token_weights(lp)
    for i in range(len(ro)):
        torch.testing.assert_close(
            w[i][ro.attention_mask[i].bool()], w_left[i][lp.attention_mask[i].bool()]
        )


def test_rollouts_reject_a_response_token_without_a_predecessor() -> None:
    with pytest.raises(GradAlignError, match="first attended token"):
        Rollouts(
            input_ids=torch.tensor([[0, 0, 5, 6]]),
            attention_mask=torch.tensor([[0, 0, 1, 1]]),
            response_mask=torch.tensor([[0, 0, 1, 1]]).bool(),
            rewards=torch.tensor([1.0]),
            group_ids=torch.tensor([0]),
        )


def test_rollouts_reject_holes_in_the_attention_mask() -> None:
    with pytest.raises(GradAlignError, match="one contiguous run"):
        Rollouts(
            input_ids=torch.tensor([[4, 0, 5, 6]]),
            attention_mask=torch.tensor([[1, 0, 1, 1]]),
            response_mask=torch.tensor([[0, 0, 0, 1]]).bool(),
            rewards=torch.tensor([1.0]),
            group_ids=torch.tensor([0]),
        )


def test_select_rows_keeps_left_padded_responses() -> None:
    ro = left_pad(make_rollouts(vocab=50, groups=GROUPS, rewards=REWARDS), extra=2)
    sub = ro.select_groups([9])
    assert int(sub.response_mask.sum()) == int(ro.response_mask[ro.group_ids == 9].sum())


def test_target_logprob_matches_log_softmax_values_and_gradients() -> None:
    """The one-pass log-prob of the target token against log_softmax + gather, values and
    gradients, with very negative and -inf logits; and a float64 gradcheck."""
    from gradalign.extractors._forward import _TargetLogProb

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 50, generator=g, dtype=torch.float64) * 8
    logits[2, 5:] = float("-inf")  # a masked vocabulary: those entries have probability 0
    logits[3, 0] = -1e4
    targets = torch.tensor([0, 49, 3, 0, 17, 17, 8])
    weights = torch.randn(7, generator=g, dtype=torch.float64)

    def run(fn: object) -> tuple[torch.Tensor, torch.Tensor]:
        x = logits.clone().requires_grad_()
        out = fn(x)  # type: ignore[operator]
        (out * weights).sum().backward()
        assert x.grad is not None
        return out.detach(), x.grad

    ours = run(lambda x: _TargetLogProb.apply(x, targets))
    ref = run(lambda x: torch.log_softmax(x, -1).gather(-1, targets[:, None]).squeeze(-1))
    torch.testing.assert_close(ours[0], ref[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(ours[1], ref[1], rtol=0, atol=1e-12)
    finite = logits.clone()
    finite[2, 5:] = -50.0
    x = finite.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: _TargetLogProb.apply(t, targets), (x,))


@pytest.mark.parametrize("elements", [10**9, 7])
def test_chunked_head_gradient_matches_autograd_through_log_softmax(
    qwen: nn.Module, elements: int
) -> None:
    """Gradients of the summed response log-probs w.r.t. every parameter, with the output head in
    one chunk or in checkpointed one-row chunks, equal autograd through the model's own logits
    and log_softmax."""
    ro = make_rollouts(vocab=qwen.config.vocab_size, groups=GROUPS, rewards=REWARDS, seed=3)
    params = [p for p in qwen.parameters() if p.requires_grad]
    lp = response_logprobs(
        qwen, ro.input_ids, ro.attention_mask, ro.response_mask, max_logits_elements=elements
    )
    ours = torch.autograd.grad(lp.sum(), params)
    ref = torch.autograd.grad(_alone(qwen, ro).sum(), params)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
