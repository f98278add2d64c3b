"""Defects found by fault injection: each bad input is a GradAlignError, never a quiet number.

NaN or inf gradients (a NaN weight, float16 logits that overflow, huge unscaled rewards) must not
become scores; float64 scores must survive tiny and huge magnitudes; extraction must work inside
``torch.inference_mode()``; None or odd config values must not leak raw Python errors.
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from torch import nn

import gradalign as ga
from gradalign import GradAlignError
from gradalign.extractors import GradientExtractor, GroupGradients
from gradalign.integrations.trl_config import objective_from_config
from gradalign.scoring import inner_product, row_norms
from gradalign.testing import tiny_model, tiny_tokenizer

# Candidate groups 3 and 9; each name -> (extractor, whether it needs a peft model).
EXTRACTORS: dict[str, tuple[Callable[[], GradientExtractor], bool]] = {
    "full": (ga.FullGradient, False),
    "projected-sjlt": (lambda: ga.RandomProjectedGradient(dim=32, seed=0), False),
    "projected-gaussian": (
        lambda: ga.RandomProjectedGradient(dim=32, kind="gaussian", seed=0),
        False,
    ),
    "factorized": (lambda: ga.FactorizedGradient(dim_in=4, dim_out=4, seed=0), False),
    "lora": (ga.LoRAGradient, True),
}


def _rollouts(rewards: list[float], group_ids: list[int]) -> ga.Rollouts:
    """Two rollouts per group of the tiny tokenizer's text, one prompt per group."""
    prompts = [f"{g}+{g}=" for g in group_ids]
    completions = ["12", "7", "3", "40", "5", "66"][: len(group_ids)]
    return ga.Rollouts.from_texts(tiny_tokenizer(), prompts, completions, rewards, group_ids)


def _candidates() -> ga.Rollouts:
    return _rollouts([1.0, 0.0, 0.0, 1.0], [3, 3, 9, 9])


def _validation() -> ga.Rollouts:
    return _rollouts([1.0, 0.0], [100, 100])


def _model(base: nn.Module, peft: bool) -> nn.Module:
    """A private copy of ``base`` (tests mutate it), wrapped in LoRA when ``peft``."""
    model = copy.deepcopy(base)
    if not peft:
        return model
    config = LoraConfig(r=2, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    with warnings.catch_warnings():  # transformers deprecations raised inside peft
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, config)


def _extractor(name: str, base: nn.Module) -> tuple[GradientExtractor, nn.Module]:
    make, peft = EXTRACTORS[name]
    return make(), _model(base, peft)


def _nonfinite(call: str, ids: list[int]) -> str:
    """The message of the one finiteness check, for ``call`` and the groups ``ids``."""
    head = rf"{re.escape(call)}: group gradients must be finite, got NaN or inf in "
    return head + rf".*ids {re.escape(str(ids))}"


# 1. NaN and inf gradients --------------------------------------------------------------------


@pytest.mark.parametrize("name", list(EXTRACTORS))
def test_nan_weight_raises_naming_every_group(name: str, qwen: nn.Module) -> None:
    ext, model = _extractor(name, qwen)
    with torch.no_grad():
        dict(model.named_parameters())[_head_weight(model)][5, 0] = float("nan")
    flags = [p.requires_grad for p in model.parameters()]
    call = f"{type(ext).__name__}.per_group"
    with pytest.raises(GradAlignError, match=_nonfinite(call, [3, 9])) as err:
        ext.per_group(model, _candidates())
    assert "NaN or inf weight in the model" in str(err.value)  # the likely cause
    assert [p.requires_grad for p in model.parameters()] == flags  # the model is left as found


def _head_weight(model: nn.Module) -> str:
    """Name of the output head's (base) weight: every extractor differentiates through it."""
    return next(n for n, _ in model.named_parameters() if "lm_head" in n and "lora" not in n)


@pytest.mark.parametrize("name", list(EXTRACTORS))
def test_huge_unscaled_rewards_name_only_the_group_that_overflows(
    name: str, qwen: nn.Module
) -> None:
    ext, model = _extractor(name, qwen)
    ro = _rollouts([1e38, 0.0, 0.0, 1.0], [3, 3, 9, 9])  # group 3's advantages are +-5e37
    objective = ga.GRPOObjective(scale_rewards="none")
    with pytest.raises(GradAlignError, match=_nonfinite(f"{type(ext).__name__}.per_group", [3])):
        ext.per_group(model, ro, objective)
    with pytest.raises(GradAlignError, match=r"1 of 2 groups, ids \[3\]"):
        list(ext.iter_groups(model, ro, objective))  # the stream GradAlign.select reads


@pytest.mark.parametrize("name", ["full", "factorized"])
def test_float16_logits_that_overflow_raise(name: str, qwen: nn.Module) -> None:
    ext, model = _extractor(name, qwen)
    model = model.half()
    with torch.no_grad():
        model.model.norm.weight.fill_(3e4)  # hidden states of 3e4: logits beyond float16's 65504
    with pytest.raises(GradAlignError, match=r"float16 logits or activations that overflow"):
        ext.per_group(model, _candidates())


def test_select_raises_for_nonfinite_candidates_and_validation(qwen: nn.Module) -> None:
    """Both streams of GradAlign.select: candidate chunks and the validation target."""
    selector = ga.GradAlign(ga.FullGradient(), objective=ga.GRPOObjective(scale_rewards="none"))
    huge = _rollouts([1e38, 0.0, 0.0, 1.0], [3, 3, 9, 9])
    source = r".*\(from FullGradient\.per_group\)"
    with pytest.raises(GradAlignError, match=_nonfinite("GradAlign.select", [3]) + source):
        selector.select(qwen, huge, _validation())
    val = _rollouts([1e38, 0.0], [100, 100])
    with pytest.raises(GradAlignError, match=_nonfinite("GradAlign.select", [100])):
        selector.select(qwen, _candidates(), val)
    targets = selector.targets(qwen, _validation())
    with pytest.raises(GradAlignError, match=_nonfinite("GradAlign.select", [3])):
        selector.select(qwen, huge, targets)


_VALUES = st.sampled_from([float("nan"), float("inf"), -float("inf")])


@given(
    bad=st.lists(st.booleans(), min_size=1, max_size=12),
    value=_VALUES,
    column=st.integers(0, 6),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
)
def test_group_gradients_name_exactly_the_nonfinite_rows(
    bad: list[bool], value: float, column: int, dtype: torch.dtype
) -> None:
    g = len(bad)
    ids = torch.arange(g) * 7 + 2
    grads = torch.randn(g, 7, generator=torch.Generator().manual_seed(g)).to(dtype)
    grads[torch.tensor(bad), column] = value

    def build() -> GroupGradients:
        return GroupGradients(
            group_ids=ids,
            grads=grads,
            num_sequences=torch.ones(g, dtype=torch.long),
            num_tokens=torch.ones(g, dtype=torch.long),
            zero_spread=torch.zeros(g, dtype=torch.bool),
            call="MyExtractor.per_group",
        )

    if not any(bad):
        assert len(build()) == g
        return
    expected = ids[torch.tensor(bad)].tolist()
    with pytest.raises(GradAlignError, match=_nonfinite("MyExtractor.per_group", expected[:10])):
        build()


# 2. float64 cosine ------------------------------------------------------------------------------


def _hand_cosine(a: list[float], b: list[float]) -> float:
    """Cosine of two order-1 float64 vectors, by hand."""
    dot = math.fsum(x * y for x, y in zip(a, b, strict=True))
    na, nb = math.sqrt(math.fsum(x * x for x in a)), math.sqrt(math.fsum(y * y for y in b))
    return 0.0 if na == 0 or nb == 0 else dot / (na * nb)


_ENTRY = st.floats(-4.0, 4.0, allow_nan=False).filter(lambda x: x == 0 or abs(x) > 1e-3)


@given(
    rows=st.lists(st.lists(_ENTRY, min_size=5, max_size=5), min_size=1, max_size=4),
    target=st.lists(_ENTRY, min_size=5, max_size=5),
    grad_exp=st.integers(-300, 300),
    target_exp=st.integers(-300, 300),
)
def test_float64_cosine_survives_tiny_and_huge_inputs(
    rows: list[list[float]], target: list[float], grad_exp: int, target_exp: int
) -> None:
    """The scale of each side cancels in a cosine: 1e-200 inputs score like order-1 inputs."""
    grads = torch.tensor(rows, dtype=torch.float64) * 10.0**grad_exp  # (G, D)
    t = torch.tensor(target, dtype=torch.float64) * 10.0**target_exp  # (D,)
    want = torch.tensor([_hand_cosine(r, target) for r in rows])
    torch.testing.assert_close(ga.cosine(grads, t), want, rtol=1e-5, atol=1e-6)
    norms = torch.tensor(
        [math.sqrt(math.fsum(x * x for x in r)) for r in rows], dtype=torch.float64
    )
    torch.testing.assert_close(row_norms(grads), norms * 10.0**grad_exp, rtol=1e-6, atol=0.0)


def test_float64_inner_product_with_a_tiny_target() -> None:
    """<g, t / |t|> never multiplies the target's scale in: 1e-300 cancels exactly."""
    grads = torch.tensor([[1.0, 2.0, -2.0]], dtype=torch.float64) * 1e-30
    target = torch.tensor([3.0, 0.0, 4.0], dtype=torch.float64) * 1e-300
    out = inner_product(grads, target, normalize_target=True)
    torch.testing.assert_close(out, torch.tensor([(3.0 - 8.0) / 5.0 * 1e-30]), rtol=1e-6, atol=0)


# 3. torch.inference_mode() ----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(EXTRACTORS))
def test_extractors_work_inside_inference_mode(name: str, qwen: nn.Module) -> None:
    ext, model = _extractor(name, qwen)
    want = ext.per_group(model, _candidates()).grads
    with torch.inference_mode():
        inside = ext.per_group(model, _candidates()).grads
        made_inside = _candidates()  # rollouts of inference tensors, e.g. from generation
    assert made_inside.input_ids.is_inference()
    torch.testing.assert_close(inside, want, rtol=0, atol=0)
    outside = ext.per_group(model, made_inside).grads
    torch.testing.assert_close(outside, want, rtol=0, atol=0)


def test_select_inside_inference_mode_matches(qwen: nn.Module) -> None:
    selector = ga.GradAlign(ga.FullGradient(), policy=ga.policies.TopK(1))
    want = selector.select(qwen, _candidates(), _validation())
    with torch.inference_mode():
        got = selector.select(qwen, _candidates(), _validation())
    assert torch.equal(got.ids, want.ids)
    assert got.scores is not None and want.scores is not None
    torch.testing.assert_close(got.scores, want.scores, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["full", "factorized"])
def test_model_made_under_inference_mode_is_a_clear_error(name: str) -> None:
    with torch.inference_mode():
        model = tiny_model()
    ext = EXTRACTORS[name][0]()
    call = re.escape(f"{type(ext).__name__}.per_group")
    with pytest.raises(GradAlignError, match=rf"{call}: the model's parameters must be normal"):
        ext.per_group(model, _candidates())


# 4. raw errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["select", "score", "alignment"])
def test_candidates_none_in_one_process(method: str, qwen: nn.Module) -> None:
    fn = getattr(ga.GradAlign(), method)
    with pytest.raises(
        GradAlignError,
        match=rf"GradAlign\.{method}: candidates must be a gradalign\.Rollouts, got None",
    ):
        fn(qwen, None, _validation())
    with pytest.raises(
        GradAlignError, match=rf"GradAlign\.{method}: validation must be .* got None"
    ):
        fn(qwen, _candidates(), None)


@pytest.mark.parametrize(
    ("field", "value", "include_kl"),
    [
        ("epsilon", None, False),
        ("epsilon", "0.2", False),
        ("epsilon_high", True, False),
        ("beta", None, True),
    ],
)
def test_objective_from_config_rejects_non_numbers(
    field: str, value: object, include_kl: bool
) -> None:
    cfg = SimpleNamespace(
        loss_type="grpo", scale_rewards=True, epsilon=0.2, epsilon_high=None, beta=0.0
    )
    setattr(cfg, field, value)
    with pytest.raises(
        GradAlignError,
        match=rf"objective_from_config: {field} must be a real number, got {type(value).__name__}",
    ):
        objective_from_config(cfg, include_kl=include_kl)
