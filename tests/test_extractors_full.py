"""FullGradient and RandomProjectedGradient against independent computations."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call, grad, vmap

from gradalign import GradAlignError, GRPOObjective, Rollouts
from gradalign.extractors import FullGradient, RandomProjectedGradient
from gradalign.projection import project
from tests.helpers import make_rollouts

GROUPS = [3, 3, 3, 9, 9, 1, 1, 1]
REWARDS = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0]


def _hand_token_mean_weights(ro: Rollouts) -> torch.Tensor:
    """GRPO group-std advantages / group response tokens, written out with Python loops."""
    w = torch.zeros(ro.input_ids.shape)
    for g in set(ro.group_ids.tolist()):
        rows = [i for i in range(len(ro)) if int(ro.group_ids[i]) == g]
        r = [float(ro.rewards[i]) for i in rows]
        mean = sum(r) / len(r)
        std = (sum((x - mean) ** 2 for x in r) / max(1, len(r) - 1)) ** 0.5
        n_tok = sum(int(ro.response_mask[i].sum()) for i in rows)
        for i, x in zip(rows, r, strict=True):
            w[i][ro.response_mask[i]] = (x - mean) / (std + 1e-4) / n_tok
    return w


def _full_logprobs(model: torch.nn.Module, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=attn).logits.float()  # (S, T, V)
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return torch.cat([torch.zeros(ids.shape[0], 1), lp], dim=1)  # (S, T)


def _loop_reference(model: torch.nn.Module, ro: Rollouts, w: torch.Tensor) -> torch.Tensor:
    """One plain backward per group over the model's own (unchunked) logits."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows_out = []
    for g in ro.unique_groups.tolist():
        rows = (ro.group_ids == g).nonzero().flatten()
        lp = _full_logprobs(model, ro.input_ids[rows], ro.attention_mask[rows])
        loss = -(w[rows] * lp).sum()
        grads = torch.autograd.grad(loss, params)
        rows_out.append(torch.cat([x.flatten() for x in grads]))
    return torch.stack(rows_out)


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_full_gradient_matches_per_group_backward(qwen: torch.nn.Module, batch_size: int) -> None:
    ro = make_rollouts(vocab=qwen.config.vocab_size, groups=GROUPS, rewards=REWARDS)
    out = FullGradient(batch_size=batch_size, max_logits_elements=300).per_group(qwen, ro)
    ref = _loop_reference(qwen, ro, _hand_token_mean_weights(ro))
    assert out.group_ids.tolist() == [1, 3, 9]
    assert out.grads.dtype == torch.float32
    torch.testing.assert_close(out.grads, ref, rtol=1e-4, atol=1e-6)
    assert out.num_sequences.tolist() == [3, 3, 2]
    assert sum(s.stop - s.start for s in out.segments) == out.dim


def test_full_gradient_matches_torch_func_per_sample(llama_tied: torch.nn.Module) -> None:
    model = llama_tied
    ro = make_rollouts(vocab=model.config.vocab_size, groups=GROUPS, rewards=REWARDS, seed=3)
    obj = GRPOObjective(scale_rewards="none", loss_agg="seq-mean-token-sum")
    w = obj.token_weights(ro)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def seq_loss(
        p: dict[str, torch.Tensor], ids: torch.Tensor, attn: torch.Tensor, wt: torch.Tensor
    ) -> torch.Tensor:
        logits = functional_call(model, p, (ids[None],), {"attention_mask": attn[None]}).logits
        lp = torch.log_softmax(logits[0, :-1].float(), -1).gather(-1, ids[1:, None]).squeeze(-1)
        return -(wt[1:] * lp).sum()

    per_seq = vmap(grad(seq_loss), in_dims=(None, 0, 0, 0))(
        params, ro.input_ids, ro.attention_mask, w
    )
    flat = torch.cat([per_seq[k].flatten(1) for k in params], dim=1)  # (S, D)
    ref = torch.zeros(ro.num_groups, flat.shape[1]).index_add_(0, ro.group_index, flat)
    out = FullGradient(batch_size=3).per_group(model, ro, obj)
    torch.testing.assert_close(out.grads, ref, rtol=1e-4, atol=1e-6)


def test_ppo_and_kl_variant_matches_reference(qwen: torch.nn.Module) -> None:
    ro = make_rollouts(
        vocab=qwen.config.vocab_size,
        groups=GROUPS,
        rewards=REWARDS,
        seed=5,
        old_logprobs=True,
        ref_logprobs=True,
    )
    obj = GRPOObjective(kl_coef=0.05, clip_low=0.2, clip_high=0.28)
    params = [p for p in qwen.parameters()]
    rows_out = []
    for g in ro.unique_groups.tolist():
        rows = (ro.group_ids == g).nonzero().flatten()
        lp = _full_logprobs(qwen, ro.input_ids[rows], ro.attention_mask[rows])
        ratio = torch.exp(lp - ro.old_logprobs[rows])
        adv = obj.advantages(ro)[rows][:, None]
        surrogate = torch.min(ratio * adv, ratio.clamp(0.8, 1.28) * adv)
        delta = ro.ref_logprobs[rows] - lp
        k3 = torch.exp(delta) - delta - 1
        agg = obj.aggregation(ro)[rows]
        loss = ((-surrogate + 0.05 * k3) * agg).sum()
        rows_out.append(torch.cat([x.flatten() for x in torch.autograd.grad(loss, params)]))
    out = FullGradient(batch_size=2).per_group(qwen, ro, obj)
    torch.testing.assert_close(out.grads, torch.stack(rows_out), rtol=1e-4, atol=1e-6)


def test_target_modules_subset_and_zero_spread(qwen: torch.nn.Module) -> None:
    rewards = [1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0]  # group 3 has no spread
    ro = make_rollouts(vocab=qwen.config.vocab_size, groups=GROUPS, rewards=rewards)
    full = FullGradient().per_group(qwen, ro)
    sub = FullGradient(target_modules=["q_proj", "lm_head"]).per_group(qwen, ro)
    names = [s.name for s in sub.segments]
    assert names == [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.q_proj.bias",
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.self_attn.q_proj.bias",
        "lm_head.weight",
    ]
    for name in names:
        torch.testing.assert_close(sub.segment(name), full.segment(name))
    assert full.zero_spread.tolist() == [False, True, False]
    assert not full.grads[1].any()
    with pytest.raises(
        GradAlignError, match=r"matches no module; modules with parameters: .*q_proj"
    ):
        FullGradient(target_modules=["nope"]).per_group(qwen, ro)


def test_model_left_as_found_also_after_exception(qwen: torch.nn.Module) -> None:
    model = copy.deepcopy(qwen)
    model.train()
    model.model.embed_tokens.weight.requires_grad_(False)
    marker = torch.ones_like(model.lm_head.weight)
    model.lm_head.weight.grad = marker.clone()
    ro = make_rollouts(vocab=model.config.vocab_size, groups=GROUPS, rewards=REWARDS)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    out = FullGradient(target_modules=["embed_tokens"]).per_group(model, ro)
    assert out.grads.any()
    calls = {"n": 0}

    def boom(*_: object) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")

    handle = model.model.layers[1].register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        FullGradient(batch_size=2).per_group(model, ro)
    handle.remove()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(m.training for m in model.modules())
    torch.testing.assert_close(model.lm_head.weight.grad, marker)
    assert all(p.grad is None for n, p in model.named_parameters() if n != "lm_head.weight")


def test_bf16_model_accumulates_in_float32(qwen: torch.nn.Module) -> None:
    ro = make_rollouts(vocab=qwen.config.vocab_size, groups=GROUPS, rewards=REWARDS)
    ref = FullGradient().per_group(qwen, ro).grads
    low = FullGradient().per_group(copy.deepcopy(qwen).to(torch.bfloat16), ro).grads
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    cos = torch.nn.functional.cosine_similarity(low, ref, dim=1)
    assert (cos > 0.98).all()


def test_random_projection_equals_projecting_full_gradient(qwen: torch.nn.Module) -> None:
    ro = make_rollouts(vocab=qwen.config.vocab_size, groups=GROUPS, rewards=REWARDS)
    full = FullGradient().per_group(qwen, ro)
    for kind in ("rademacher", "gaussian", "sjlt"):
        ext = RandomProjectedGradient(dim=64, kind=kind, seed=7)
        a = ext.per_group(qwen, ro)
        b = RandomProjectedGradient(
            dim=64, kind=kind, seed=7, batch_size=1, group_chunk=1
        ).per_group(qwen, ro)
        torch.testing.assert_close(a.grads, b.grads, rtol=1e-4, atol=1e-6)
        expected = sum(
            project(full.segment(s.name), kind=kind, dim=64, seed=7, name=s.name)
            for s in full.segments
        )
        torch.testing.assert_close(a.grads, expected, rtol=1e-4, atol=1e-6)
    other = RandomProjectedGradient(dim=64, seed=8).per_group(qwen, ro)
    assert not torch.allclose(
        other.grads, RandomProjectedGradient(dim=64, seed=7).per_group(qwen, ro).grads
    )


def test_bad_settings_raise() -> None:
    with pytest.raises(GradAlignError, match="batch_size must be an int >= 1, got 0"):
        FullGradient(batch_size=0)
    with pytest.raises(GradAlignError, match="kind must be one of"):
        RandomProjectedGradient(dim=8, kind="dense")
    with pytest.raises(GradAlignError, match="dim must be an int >= 1"):
        RandomProjectedGradient(dim=0)
    with pytest.raises(GradAlignError, match=r"rollouts must be a gradalign\.Rollouts"):
        FullGradient().per_group(torch.nn.Linear(2, 2), "rollouts")  # type: ignore[arg-type]


def test_projection_is_composed_not_subclassed(qwen: torch.nn.Module) -> None:
    from gradalign.projection import DEFAULT_KIND, Projector

    ro = make_rollouts(vocab=qwen.config.vocab_size, groups=GROUPS, rewards=REWARDS)
    proj = Projector(dim=64, kind="rademacher", seed=7)
    composed = FullGradient(projection=proj).per_group(qwen, ro).grads
    alias = RandomProjectedGradient(dim=64, kind="rademacher", seed=7)
    assert (alias.dim, alias.kind, alias.seed) == (64, "rademacher", 7)
    assert alias.projection == proj
    torch.testing.assert_close(alias.per_group(qwen, ro).grads, composed)
    assert RandomProjectedGradient().kind == DEFAULT_KIND == Projector(dim=2).kind
    with pytest.raises(
        GradAlignError, match=r"projection must be a gradalign\.projection\.Projector"
    ):
        FullGradient(projection=64)  # type: ignore[arg-type]
