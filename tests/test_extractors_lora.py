"""LoRAGradient against per-group backwards on a peft model."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from gradalign import GradAlignError, GRPOObjective, Rollouts
from gradalign.extractors import FullGradient, LoRAGradient
from gradalign.projection import project
from tests.helpers import make_rollouts

GROUPS = [3, 3, 3, 9, 9, 1, 1, 1]
REWARDS = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
TARGETS = ["q_proj", "v_proj", "down_proj", "lm_head"]


def _peft(model: nn.Module, **kw: object) -> nn.Module:
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS, init_lora_weights=False, **kw
    )
    with warnings.catch_warnings():  # transformers deprecations raised inside peft
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(copy.deepcopy(model), config)


@pytest.fixture(scope="module")
def peft_qwen(qwen: nn.Module) -> nn.Module:
    return _peft(qwen)


def _hand_per_group(model: nn.Module, ro: Rollouts) -> tuple[list[str], torch.Tensor]:
    """Exact LoRA gradients: one backward per group through the model's own logits."""
    named = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    w = GRPOObjective().token_weights(ro)  # (S, T)
    rows_out = []
    model.eval()
    for g in ro.unique_groups.tolist():
        rows = (ro.group_ids == g).nonzero().flatten()
        ids = ro.input_ids[rows]
        logits = model(input_ids=ids, attention_mask=ro.attention_mask[rows]).logits.float()
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        grads = torch.autograd.grad(-(w[rows, 1:] * lp).sum(), [p for _, p in named])
        rows_out.append(torch.cat([x.flatten() for x in grads]))
    return [n for n, _ in named], torch.stack(rows_out)


def test_exact_lora_gradients_match_per_group_backward(peft_qwen: nn.Module) -> None:
    ro = make_rollouts(vocab=peft_qwen.config.vocab_size, groups=GROUPS, rewards=REWARDS)
    peft_qwen.train()  # dropout on: extraction must switch it off and restore the mode
    out = LoRAGradient(batch_size=3).per_group(peft_qwen, ro)
    assert all(m.training for m in peft_qwen.modules())
    names, ref = _hand_per_group(peft_qwen, ro)
    assert [s.name for s in out.segments] == names
    assert any(".lm_head.lora_A." in n for n in names)
    torch.testing.assert_close(out.grads, ref, rtol=1e-4, atol=1e-6)
    full = FullGradient().per_group(peft_qwen, ro)  # trainable params = the adapters
    torch.testing.assert_close(out.grads, full.grads, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in peft_qwen.parameters())


def test_projected_lora_gradients(peft_qwen: nn.Module) -> None:
    ro = make_rollouts(vocab=peft_qwen.config.vocab_size, groups=GROUPS, rewards=REWARDS, seed=1)
    exact = LoRAGradient().per_group(peft_qwen, ro)
    out = LoRAGradient(dim=32, kind="sjlt", seed=3).per_group(peft_qwen, ro)
    expected = sum(
        project(exact.segment(s.name), kind="sjlt", dim=32, seed=3, name=s.name)
        for s in exact.segments
    )
    torch.testing.assert_close(out.grads, expected, rtol=1e-4, atol=1e-6)
    assert out.segments == ()


def test_adapter_selection(qwen: nn.Module) -> None:
    model = _peft(qwen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.add_adapter("other", LoraConfig(r=2, target_modules=["k_proj"]))
    ro = make_rollouts(vocab=model.config.vocab_size, groups=GROUPS, rewards=REWARDS)
    out = LoRAGradient().per_group(model, ro)
    assert all(".default." in s.name for s in out.segments)
    with pytest.raises(GradAlignError, match="adapter_name='other' is not an active adapter"):
        LoRAGradient(adapter_name="other").per_group(model, ro)
    model.set_adapter("other")
    other = LoRAGradient(adapter_name="other").per_group(model, ro)
    assert {s.name.split(".")[-4] for s in other.segments} == {"k_proj"}


def test_clear_errors(qwen: nn.Module) -> None:
    ro = make_rollouts(vocab=qwen.config.vocab_size, groups=GROUPS, rewards=REWARDS)
    with pytest.raises(GradAlignError, match=r"has no LoRA adapters .* peft\.get_peft_model"):
        LoRAGradient().per_group(qwen, ro)
    dora = _peft(qwen, use_dora=True)
    with pytest.raises(GradAlignError, match=r"only linear LoRA .*lora_magnitude_vector"):
        LoRAGradient().per_group(dora, ro)
    merged = _peft(qwen)
    merged.merge_adapter()
    with pytest.raises(GradAlignError, match="merged; unmerge them first"):
        LoRAGradient().per_group(merged, ro)
    with pytest.raises(GradAlignError, match="dim must be an int >= 1 or None, got 0"):
        LoRAGradient(dim=0)


def test_lora_projection_is_the_same_projector(peft_qwen: nn.Module) -> None:
    from gradalign.projection import Projector

    ro = make_rollouts(vocab=peft_qwen.config.vocab_size, groups=GROUPS, rewards=REWARDS)
    by_dim = LoRAGradient(dim=32, kind="gaussian", seed=3).per_group(peft_qwen, ro).grads
    proj = Projector(dim=32, kind="gaussian", seed=3)
    torch.testing.assert_close(LoRAGradient(projection=proj).per_group(peft_qwen, ro).grads, by_dim)
    with pytest.raises(GradAlignError, match="give projection or dim, not both"):
        LoRAGradient(dim=4, projection=proj)
