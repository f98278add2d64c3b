"""FullGradient and RandomProjectedGradient against independent computations."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.func import functional_call, grad, vmap

from gradalign import GradAlignError, GRPOObjective, Rollouts
from gradalign.extractors import FullGradient, RandomProjectedGradient
from gradalign.projection import project, projection_block
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
    ref = _func_reference(model, ro, obj)
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


def _dense_projection(model: torch.nn.Module, kind: str, dim: int, seed: int) -> torch.Tensor:
    """The (D, K) matrix of a projection over every parameter, stacked from dense blocks."""
    blocks = [
        projection_block(kind=kind, dim=dim, seed=seed, name=n, start=0, stop=p.numel())
        for n, p in model.named_parameters()
    ]
    return torch.cat(blocks).double()  # (D, K)


@pytest.mark.parametrize("kind", ["sjlt", "rademacher", "gaussian"])
@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_random_projection_equals_dense_matrix_times_group_gradient(
    qwen: torch.nn.Module, kind: str, batch_size: int
) -> None:
    """Rows = P @ (hand-written per-group backward), P built densely from projection blocks.

    batch_size 1 and 2 split groups over micro-batches (each projected or streamed as it comes),
    16 runs every group in one backward.
    """
    ro = make_rollouts(vocab=qwen.config.vocab_size, groups=GROUPS, rewards=REWARDS)
    ref = _loop_reference(qwen, ro, _hand_token_mean_weights(ro)).double()  # (G, D)
    dense = _dense_projection(qwen, kind, 48, 11)  # (D, K)
    ext = RandomProjectedGradient(dim=48, kind=kind, seed=11, batch_size=batch_size)
    out = ext.per_group(qwen, ro)
    assert out.grads.shape == (3, 48) and out.segments == ()
    torch.testing.assert_close(out.grads.double(), ref @ dense, rtol=1e-4, atol=1e-5)
    again = torch.cat(
        [c.grads for c in dataclasses.replace(ext, group_chunk=1).iter_groups(qwen, ro)]
    )
    assert torch.equal(again, out.grads)  # deterministic across calls and chunkings


def test_random_projection_of_tied_model_with_preconditioner(llama_tied: torch.nn.Module) -> None:
    """Tied weights (one parameter, two uses) and a preconditioner, against torch.func."""
    model = llama_tied
    ro = make_rollouts(vocab=model.config.vocab_size, groups=GROUPS, rewards=REWARDS, seed=3)
    obj = GRPOObjective(scale_rewards="none", loss_agg="seq-mean-token-sum")
    ref = _func_reference(model, ro, obj)  # (G, D)
    names = [n for n, _ in model.named_parameters()]
    scales = {names[0]: torch.rand(model.get_parameter(names[0]).shape) + 0.5,
              names[-1]: torch.tensor(3.0)}  # fmt: skip
    col = 0
    for n, p in model.named_parameters():
        if n in scales:
            ref[:, col : col + p.numel()] *= scales[n].flatten()
        col += p.numel()
    dense = _dense_projection(model, "sjlt", 64, 0)
    out = RandomProjectedGradient(dim=64, batch_size=3, preconditioner=scales).per_group(
        model, ro, obj
    )
    torch.testing.assert_close(out.grads.double(), ref.double() @ dense, rtol=1e-4, atol=1e-5)


def _func_reference(model: torch.nn.Module, ro: Rollouts, obj: GRPOObjective) -> torch.Tensor:
    """(G, D) per-group gradients summed from torch.func per-sequence gradients."""
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
    return torch.zeros(ro.num_groups, flat.shape[1]).index_add_(0, ro.group_index, flat)


def test_full_gradient_rows_written_in_place_equal_torch_func(qwen: torch.nn.Module) -> None:
    """per_group (one preallocated buffer) and every chunking of iter_groups give the torch.func
    rows; the extraction leaves no hook behind and never touches .grad."""
    ro = make_rollouts(vocab=qwen.config.vocab_size, groups=GROUPS, rewards=REWARDS, seed=4)
    obj = GRPOObjective()
    ref = _func_reference(qwen, ro, obj)
    ext = FullGradient(batch_size=2)
    out = ext.per_group(qwen, ro, obj)
    torch.testing.assert_close(out.grads, ref, rtol=1e-4, atol=1e-6)
    for chunk in (1, 2):
        parts = list(dataclasses.replace(ext, group_chunk=chunk).iter_groups(qwen, ro, obj))
        assert [len(p) for p in parts] == ([1, 1, 1] if chunk == 1 else [2, 1])
        assert torch.equal(torch.cat([p.grads for p in parts]), out.grads)
    assert all(not p._backward_hooks for p in qwen.parameters())
    assert all(p.grad is None for p in qwen.parameters())


MEMORY_SCRIPT = r"""
import json, resource, sys, torch
from transformers import AutoModelForCausalLM, Qwen2Config
from gradalign import FullGradient, Rollouts
torch.set_num_threads(1)
torch.manual_seed(0)
config = Qwen2Config(vocab_size=32000, hidden_size=128, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, intermediate_size=256, tie_word_embeddings=False)
model = AutoModelForCausalLM.from_config(config)
G, S = 8, 2
ids = torch.randint(3, 32000, (G * S, 12))
ro = Rollouts(input_ids=ids, attention_mask=torch.ones_like(ids),
              response_mask=torch.arange(12).expand(G * S, 12) >= 4,
              rewards=(torch.arange(G * S) % 2).float(), group_ids=torch.arange(G * S) // S)
ext = FullGradient(batch_size=S, target_modules=["embed_tokens", "lm_head"])
ext.per_group(model, ro)  # warm up
"""


def test_full_gradient_peak_memory_is_result_plus_two_rows(tmp_path: Path) -> None:
    """Peak RSS growth of per_group, in a fresh process: about (G + 2) * D * 4 bytes, not the
    3 G * D of concatenating chunks and re-indexing them."""
    script = MEMORY_SCRIPT + (
        "def status(key):\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith(key): return int(line.split()[1]) * 1024\n"
        "import gc; gc.collect()\n"
        "import ctypes; ctypes.CDLL('libc.so.6').malloc_trim(0)\n"
        "before = status('VmRSS:')\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "out = ext.per_group(model, ro)\n"
        "D = out.grads.shape[1]\n"
        "print(json.dumps({'growth': status('VmHWM:') - before, 'D': D, 'G': G}))\n"
    )
    path = tmp_path / "peak.py"
    path.write_text(script)
    run = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=300)
    if run.returncode != 0 and "clear_refs" in run.stderr:
        pytest.skip("no /proc/self/clear_refs: the peak cannot be reset")
    assert run.returncode == 0, run.stderr[-2000:]
    res = json.loads(run.stdout.strip().splitlines()[-1])
    row = res["D"] * 4
    assert res["D"] > 8_000_000  # rows of 32 MiB: allocator noise is small beside them
    assert res["growth"] <= (res["G"] + 2) * row, res["growth"] / row
