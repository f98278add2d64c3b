"""FactorizedGradient against exact per-group gradients computed independently."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, GPT2Config

from gradalign import GradAlignError, GRPOObjective, Rollouts
from gradalign._modules import match_modules
from gradalign.extractors import FactorizedGradient, FullGradient
from gradalign.projection import projection_block
from tests.helpers import make_rollouts

GROUPS = [3, 3, 3, 9, 9, 1, 1, 1, 4, 4]
REWARDS = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0]  # group 4 has no spread


def _rollouts(vocab: int, seed: int = 0, **kw: bool) -> Rollouts:
    return make_rollouts(vocab=vocab, groups=GROUPS, rewards=REWARDS, seed=seed, **kw)


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, _ in match_modules(model, None, call="test", linear_only=True)]


def _hand_per_group(model: nn.Module, ro: Rollouts, names: list[str]) -> dict[str, torch.Tensor]:
    """Exact (G, *param shape) gradients of the modules' parameters: one backward per group."""
    obj, mods = GRPOObjective(), dict(model.named_modules())
    params = {f"{n}.{k}": p for n in names for k, p in mods[n].named_parameters()}
    w = obj.token_weights(ro)  # (S, T)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in params}
    for g in ro.unique_groups.tolist():
        rows = (ro.group_ids == g).nonzero().flatten()
        ids = ro.input_ids[rows]
        logits = model(input_ids=ids, attention_mask=ro.attention_mask[rows]).logits.float()
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        loss = -(w[rows, 1:] * lp).sum()
        grads = torch.autograd.grad(loss, list(params.values()))
        for k, gr in zip(params, grads, strict=True):
            out[k].append(gr)
    return {k: torch.stack(v) for k, v in out.items()}


def _expected(
    exact: dict[str, torch.Tensor], model: nn.Module, name: str, dims: tuple, kind: str, seed: int
) -> torch.Tensor:
    """(G, size) projected row of one module: P_out W P_in^T then P_out b, from exact gradients."""
    module = dict(model.named_modules())[name]
    conv = not isinstance(module, nn.Linear)
    w = exact[f"{name}.weight"]  # (G, d_out, d_in), or (G, d_in, d_out) for Conv1D
    w = w.transpose(1, 2) if conv else w  # (G, d_out, d_in)
    mats = []
    for side, k, d in (("in", dims[0], w.shape[2]), ("out", dims[1], w.shape[1])):
        mats.append(
            torch.eye(d)
            if k is None
            else projection_block(
                kind=kind, dim=k, seed=seed, name=name, start=0, stop=d, side=side
            )
        )
    r_in, r_out = mats
    proj = r_out.T @ w @ r_in  # (G, K_out, K_in)
    proj = proj.transpose(1, 2) if conv else proj
    parts = [proj.flatten(1)]
    if f"{name}.bias" in exact:
        parts.append(exact[f"{name}.bias"] @ r_out)  # (G, K_out)
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("batch_size", [1, 4, 32])
def test_unprojected_equals_exact_gradients(qwen: nn.Module, batch_size: int) -> None:
    ro = _rollouts(qwen.config.vocab_size)
    names = _linear_names(qwen)
    out = FactorizedGradient(dim_in=None, dim_out=None, batch_size=batch_size).per_group(qwen, ro)
    full = FullGradient(target_modules=names).per_group(qwen, ro)
    hand = _hand_per_group(qwen, ro, names)
    assert [s.name for s in out.segments] == names and names[-1] == "lm_head"
    assert out.grads.shape == full.grads.shape and out.group_ids.tolist() == [1, 3, 4, 9]
    for seg in out.segments:
        keys = [k for k in (f"{seg.name}.weight", f"{seg.name}.bias") if k in hand]
        ref_full = torch.cat([full.segment(k) for k in keys], dim=1)
        ref_hand = torch.cat([hand[k].flatten(1) for k in keys], dim=1)
        torch.testing.assert_close(out.segment(seg.name), ref_full, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(out.segment(seg.name), ref_hand, rtol=1e-4, atol=1e-7)
    assert out.zero_spread.tolist() == [False, False, True, False] and not out.grads[2].any()


@pytest.mark.parametrize(
    ("kind", "dims"), [("gaussian", (8, 6)), ("rademacher", (None, 4)), ("sjlt", (5, None))]
)
def test_projected_equals_projecting_exact_gradient(
    qwen: nn.Module, kind: str, dims: tuple
) -> None:
    ro = _rollouts(qwen.config.vocab_size, seed=1)
    names = _linear_names(qwen)
    ext = FactorizedGradient(dim_in=dims[0], dim_out=dims[1], kind=kind, seed=5)
    out = ext.per_group(qwen, ro)
    hand = _hand_per_group(qwen, ro, names)
    for name in names:
        expected = _expected(hand, qwen, name, dims, kind, 5)
        torch.testing.assert_close(out.segment(name), expected, rtol=1e-4, atol=1e-6)
    again = FactorizedGradient(
        dim_in=dims[0], dim_out=dims[1], kind=kind, seed=5, batch_size=3, group_chunk=1
    ).per_group(qwen, ro)
    torch.testing.assert_close(again.grads, out.grads, rtol=1e-5, atol=1e-7)
    other = FactorizedGradient(dim_in=dims[0], dim_out=dims[1], kind=kind, seed=6)
    assert not torch.allclose(other.per_group(qwen, ro).grads, out.grads)


def test_logprob_dependent_objective_matches_full(qwen: nn.Module) -> None:
    ro = _rollouts(qwen.config.vocab_size, seed=2, old_logprobs=True, ref_logprobs=True)
    obj = GRPOObjective(kl_coef=0.05, clip_low=0.2, scale_rewards="batch")
    names = ["q_proj", "down_proj", "lm_head"]
    out = FactorizedGradient(dim_in=None, dim_out=None, target_modules=names, batch_size=3)
    fac = out.per_group(qwen, ro, obj)
    full = FullGradient(target_modules=names).per_group(qwen, ro, obj)
    torch.testing.assert_close(fac.grads, full.grads, rtol=1e-4, atol=1e-7)
    assert fac.grads[2].any()  # the KL term gives the zero-spread group a gradient


def test_gpt2_conv1d() -> None:
    config = GPT2Config(
        vocab_size=128,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=64,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=1,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    ro = _rollouts(128, seed=3)
    names = _linear_names(model)
    assert "transformer.h.0.attn.c_attn" in names
    hand = _hand_per_group(model, ro, names)
    exact = FactorizedGradient(dim_in=None, dim_out=None).per_group(model, ro)
    full = FullGradient(target_modules=names).per_group(model, ro)
    torch.testing.assert_close(exact.grads, full.grads, rtol=1e-4, atol=1e-7)
    proj = FactorizedGradient(dim_in=6, dim_out=4, kind="gaussian", seed=2).per_group(model, ro)
    for name in names:
        expected = _expected(hand, model, name, (6, 4), "gaussian", 2)
        torch.testing.assert_close(proj.segment(name), expected, rtol=1e-4, atol=1e-6)


def _state(model: nn.Module) -> dict[str, object]:
    return {
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {
            n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        },
        "modes": {n: m.training for n, m in model.named_modules()},
        "hooks": {
            n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for n, m in model.named_modules()
        },
    }


def _same_state(a: dict, b: dict) -> None:
    assert a["flags"] == b["flags"] and a["modes"] == b["modes"] and a["hooks"] == b["hooks"]
    assert a["grads"].keys() == b["grads"].keys()
    for k, v in a["grads"].items():
        w = b["grads"][k]
        assert (v is None and w is None) or torch.equal(v, w)


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_model_left_as_found_also_after_exception(qwen: nn.Module, where: str) -> None:
    model = copy.deepcopy(qwen).train()
    model.model.embed_tokens.weight.requires_grad_(False)
    model.lm_head.weight.grad = torch.ones_like(model.lm_head.weight)
    ro = _rollouts(model.config.vocab_size)
    before = _state(model)
    FactorizedGradient(batch_size=4).per_group(model, ro)
    _same_state(before, _state(model))
    calls = {"n": 0}

    def boom(*_: object) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")

    layer = model.model.layers[1].mlp
    if where == "forward":
        handle = layer.register_forward_hook(boom)
    else:
        handle = layer.register_full_backward_hook(boom)
    before = _state(model)
    with pytest.raises(RuntimeError, match="boom"):
        FactorizedGradient(batch_size=2).per_group(model, ro)
    _same_state(before, _state(model))
    handle.remove()
    assert all(m.training for m in model.modules())


def test_bf16_accumulates_in_float32(qwen: nn.Module) -> None:
    ro = _rollouts(qwen.config.vocab_size)
    ext = FactorizedGradient(dim_in=16, dim_out=16)
    ref = ext.per_group(qwen, ro).grads
    low = ext.per_group(copy.deepcopy(qwen).to(torch.bfloat16), ro).grads
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    keep = ref.norm(dim=1) > 0
    cos = torch.nn.functional.cosine_similarity(low[keep], ref[keep], dim=1)
    assert (cos > 0.98).all()


@pytest.mark.parametrize("reentrant", [True, False])
def test_transformers_gradient_checkpointing(qwen: nn.Module, reentrant: bool) -> None:
    model = copy.deepcopy(qwen)
    ro = _rollouts(model.config.vocab_size)
    ref = FactorizedGradient(dim_in=8, dim_out=8).per_group(model, ro).grads
    model.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": reentrant}
    )
    model.train()
    out = FactorizedGradient(dim_in=8, dim_out=8).per_group(model, ro).grads
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-7)
    assert model.is_activation_checkpointing and model.training


class _CheckpointedLM(nn.Module):
    """A tiny causal LM whose blocks always run under activation checkpointing (any mode)."""

    def __init__(self, vocab: int, width: int, reentrant: bool | None) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 2 * width), nn.Tanh(), nn.Linear(2 * width, width))
            for _ in range(2)
        )
        self.head = nn.Linear(width, vocab)
        self.reentrant = reentrant

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)  # (S, T, H)
        for block in self.blocks:
            h = h.cumsum(1) / torch.arange(1, h.shape[1] + 1)[:, None]  # causal mixing
            if self.reentrant is None:
                h = h + block(h)
            else:
                h = h + checkpoint(block, h, use_reentrant=self.reentrant)
        return self.head(h)  # (S, T, V)


@pytest.mark.parametrize("reentrant", [True, False])
def test_hooks_under_activation_checkpointing(reentrant: bool) -> None:
    torch.manual_seed(0)
    model = _CheckpointedLM(vocab=40, width=12, reentrant=reentrant)
    ro = _rollouts(40, seed=4)
    names = _linear_names(model)
    exact = FactorizedGradient(dim_in=None, dim_out=None).per_group(model, ro)
    model.reentrant = None  # the reference runs without checkpointing
    full = FullGradient(target_modules=names).per_group(model, ro)
    torch.testing.assert_close(exact.grads, full.grads, rtol=1e-4, atol=1e-7)


def test_target_modules_and_bad_settings(qwen: nn.Module) -> None:
    ro = _rollouts(qwen.config.vocab_size)
    sub = FactorizedGradient(dim_in=4, dim_out=4, target_modules="all-linear").per_group(qwen, ro)
    assert "lm_head" not in [s.name for s in sub.segments]
    rx = FactorizedGradient(dim_in=4, dim_out=4, target_modules=r".*\.1\.mlp\..*_proj")
    assert len(rx.per_group(qwen, ro).segments) == 3
    with pytest.raises(GradAlignError, match="matches no linear module; modules with parameters"):
        FactorizedGradient(target_modules=["nope"]).per_group(qwen, ro)
    with pytest.raises(GradAlignError, match="dim_in must be an int >= 1 or None, got 0"):
        FactorizedGradient(dim_in=0)
    with pytest.raises(GradAlignError, match="kind must be one of"):
        FactorizedGradient(kind="dense")
    with pytest.raises(GradAlignError, match="batch_size must be an int >= 1"):
        FactorizedGradient(batch_size=0)


def test_projection_matrices_are_cached_without_changing_results(
    qwen: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gradalign.extractors import _hooks
    from gradalign.projection import Projector

    ro = _rollouts(qwen.config.vocab_size, seed=1)
    ext = FactorizedGradient(dim_in=8, dim_out=4, seed=11)
    monkeypatch.setattr(_hooks, "_MATRICES", _hooks._LRU(64 << 20))  # cold cache
    cold = ext.per_group(qwen, ro).grads
    assert len(_hooks._MATRICES.items) == 2 * len(_linear_names(qwen))

    def regenerate(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("a cached matrix was regenerated")

    monkeypatch.setattr(Projector, "block", regenerate)
    assert torch.equal(ext.per_group(qwen, ro).grads, cold)  # warm: nothing regenerated
    monkeypatch.undo()
    monkeypatch.setattr(_hooks, "_MATRICES", _hooks._LRU(0))  # a cache too small to hold any
    assert torch.equal(ext.per_group(qwen, ro).grads, cold)
