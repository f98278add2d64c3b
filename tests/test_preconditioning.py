"""Optimizer-aware targets: validation gradients divided by Adam's sqrt(v_hat) + eps."""

from __future__ import annotations

import copy

import pytest
import torch

from gradalign import GradAlignError
from gradalign.extractors import FullGradient, RandomProjectedGradient
from gradalign.preconditioning import AdamPreconditioner
from gradalign.selector import GradAlign
from tests.helpers import make_rollouts


def _stepped(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-6)
    for _ in range(2):
        opt.zero_grad()
        ids = torch.randint(
            2, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0)
        )
        model(input_ids=ids).logits.square().mean().backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def test_preconditioned_target_matches_hand_computation(qwen: torch.nn.Module) -> None:
    model, opt = _stepped(qwen)
    pre = AdamPreconditioner.from_optimizer(opt, model)
    v = model.config.vocab_size
    cands = make_rollouts(vocab=v, groups=[0, 0, 1, 1], rewards=[1.0, 0.0, 0.0, 1.0], seed=1)
    val = make_rollouts(vocab=v, groups=[5, 5, 6, 6], rewards=[1.0, 0.0, 1.0, 0.0], seed=2)
    al = GradAlign(FullGradient(), preconditioner=pre).alignment(model, cands, val)
    full = FullGradient().per_group(model, val)
    scale = []
    for p in model.parameters():
        state = opt.state[p]
        v_hat = state["exp_avg_sq"] / (1 - 0.95 ** float(state["step"]))
        scale.append((1.0 / (v_hat.sqrt() + 1e-6)).flatten())
    target = (full.grads * torch.cat(scale)).mean(0)
    g = FullGradient().per_group(model, cands).grads
    expected = torch.nn.functional.cosine_similarity(g, target[None], dim=1)
    torch.testing.assert_close(al.cosine, expected, rtol=1e-4, atol=1e-6)
    plain = GradAlign(FullGradient()).alignment(model, cands, val)
    assert not torch.allclose(plain.cosine, al.cosine)
    projected = GradAlign(RandomProjectedGradient(dim=2048, kind="sjlt"), preconditioner=pre)
    assert (projected.alignment(model, cands, val).cosine - expected).abs().max() < 0.15


def test_preconditioner_errors(qwen: torch.nn.Module) -> None:
    fresh = torch.optim.AdamW(qwen.parameters())
    with pytest.raises(GradAlignError, match="take at least one optimizer step"):
        AdamPreconditioner.from_optimizer(fresh, qwen)
    sgd = torch.optim.SGD(qwen.parameters(), lr=0.1)
    with pytest.raises(GradAlignError, match="no betas/eps"):
        AdamPreconditioner.from_optimizer(sgd, qwen)
    with pytest.raises(GradAlignError, match=r"must be a torch\.optim\.Optimizer"):
        AdamPreconditioner.from_optimizer("adam", qwen)  # type: ignore[arg-type]
