"""Tests for gradalign.testing: the tiny tokenizer and models used across the test suite."""

from __future__ import annotations

import pytest
import torch

from gradalign.errors import GradAlignError
from gradalign.testing import tiny_model, tiny_tokenizer


def test_tokenizer_round_trips_ascii_text() -> None:
    tok = tiny_tokenizer()
    text = "Tom has 3 apples.\nHe buys 12 more: 3 + 12 = 15!"
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text)
    assert tok.decode(ids) == text


def test_tokenizer_special_tokens_are_distinct() -> None:
    tok = tiny_tokenizer()
    assert tok.pad_token == "<pad>"
    assert tok.eos_token == "<eos>"
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "right"
    ids = [tok.convert_tokens_to_ids("a"), tok.eos_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "a"


def test_tokenizer_is_fresh_per_call() -> None:
    a, b = tiny_tokenizer(), tiny_tokenizer()
    a.padding_side = "left"
    assert a is not b
    assert b.padding_side == "right"


def test_chat_template_generation_prompt() -> None:
    tok = tiny_tokenizer()
    messages = [{"role": "user", "content": "What is 2+2?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>\nWhat is 2+2?\n<|assistant|>\n"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text


def test_padding_right() -> None:
    tok = tiny_tokenizer()
    batch = tok(["ab", "abcd"], padding=True, return_tensors="pt")
    assert batch.input_ids.shape == (2, 4)
    assert batch.input_ids[0, 2:].tolist() == [tok.pad_token_id] * 2
    assert batch.attention_mask[0].tolist() == [1, 1, 0, 0]


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_tiny_model_matches_tokenizer(arch: str) -> None:
    tok = tiny_tokenizer()
    model = tiny_model(arch)  # type: ignore[arg-type]
    assert model.config.vocab_size >= len(tok)
    assert model.config.vocab_size % 8 == 0
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.config.eos_token_id == tok.eos_token_id
    assert not model.training
    ids = tok(["1+1=2", "7*6=42"], padding=True, return_tensors="pt")
    logits = model(**ids).logits
    assert logits.shape == (2, 6, model.config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_tiny_model_deterministic_and_leaves_global_rng(arch: str) -> None:
    state = torch.get_rng_state()
    a = tiny_model(arch, seed=3)  # type: ignore[arg-type]
    b = tiny_model(arch, seed=3)  # type: ignore[arg-type]
    c = tiny_model(arch, seed=4)  # type: ignore[arg-type]
    assert torch.equal(torch.get_rng_state(), state)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_tiny_model_options() -> None:
    model = tiny_model("llama", hidden_size=32, num_layers=1, tie_word_embeddings=True)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert model.config.num_hidden_layers == 1
    assert tiny_model(dtype=torch.float64).lm_head.weight.dtype == torch.float64
    assert tiny_model(vocab_size=200).config.vocab_size == 200


def test_tiny_model_double_backward() -> None:
    # Extractors may differentiate through gradients; the attention kernel must support it.
    model = tiny_model()
    ids = tiny_tokenizer()("12+3=15", return_tensors="pt").input_ids
    loss = model(ids).logits.logsumexp(-1).mean()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, create_graph=True)
    second = torch.autograd.grad(sum(g.square().sum() for g in grads), params[-1])[0]
    assert torch.isfinite(second).all()


def test_tiny_model_rejects_bad_input() -> None:
    with pytest.raises(GradAlignError, match="tiny_model: arch"):
        tiny_model("gpt2")  # type: ignore[arg-type]
    with pytest.raises(GradAlignError, match="tiny_model: vocab_size"):
        tiny_model(vocab_size=10)
