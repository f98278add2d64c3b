"""Tiny offline models and a tokenizer for tests, examples and the ``--tiny`` demo.

Like ``numpy.testing``, this module is public but meant for test code. Nothing here reads files or
touches the network: the tokenizer is character-level and built in memory with the ``tokenizers``
library, and the models are randomly initialised from a ``transformers`` config under a local seed.

Implementations:

- [`tiny_tokenizer`][gradalign.testing.tiny_tokenizer]: a character-level ``PreTrainedTokenizerFast`` (printable ASCII + newline)
  with ``<pad>``, ``<eos>`` and a minimal chat template.
- [`tiny_model`][gradalign.testing.tiny_model]: a 2-layer Qwen2 or Llama causal LM whose vocabulary matches the tokenizer.

Examples:
    >>> from gradalign.testing import tiny_model, tiny_tokenizer
    >>> tok = tiny_tokenizer()
    >>> model = tiny_model("qwen2")
    >>> ids = tok("1+1=", return_tensors="pt").input_ids
    >>> model(ids).logits.shape[-1] == model.config.vocab_size
    True
"""

from __future__ import annotations

import string
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from gradalign.errors import GradAlignError

__all__ = ["CHAT_TEMPLATE", "tiny_model", "tiny_tokenizer"]

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""Jinja chat template of [`tiny_tokenizer`][gradalign.testing.tiny_tokenizer]: ``<|user|>\\n{content}\\n<|assistant|>\\n``."""


def _alphabet() -> list[str]:
    # string.printable also holds tab, CR, VT and FF; of the whitespace controls keep only newline.
    return [c for c in string.printable if c.isprintable()] + ["\n"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Build a character-level tokenizer over printable ASCII plus newline.

    Ids 0 and 1 are ``<pad>`` and ``<eos>``; every other id is one character. Characters outside
    the alphabet map to ``<pad>`` (the unknown token), so use ASCII text. A fresh object is built
    on every call (it takes about a millisecond), so callers may mutate it freely.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``pad_token="<pad>"``, ``eos_token="<eos>"``,
        ``padding_side="right"`` and `CHAT_TEMPLATE` as ``chat_template``.

    Examples:
        >>> tok = tiny_tokenizer()
        >>> tok.decode(tok("2+3=5").input_ids)
        '2+3=5'
    """
    vocab = {PAD_TOKEN: 0, EOS_TOKEN: 1}
    for char in _alphabet():
        vocab[char] = len(vocab)
    # WordLevel over a per-character split gives one id per character with no merges.
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=PAD_TOKEN,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def tiny_model(
    arch: Literal["qwen2", "llama"] = "qwen2",
    *,
    vocab_size: int | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """Build a small randomly initialised causal LM that matches [`tiny_tokenizer`][gradalign.testing.tiny_tokenizer].

    Weights are drawn under ``torch.random.fork_rng`` with ``seed``, so the same arguments give the
    same weights and the caller's global RNG state is left untouched.

    Args:
        arch: ``"qwen2"`` (biased q/k/v projections) or ``"llama"``.
        vocab_size: Vocabulary size; ``None`` uses ``len(tiny_tokenizer())`` rounded up to a
            multiple of 8.
        hidden_size: Model width.
        num_layers: Number of decoder layers.
        num_heads: Attention heads.
        num_kv_heads: Key/value heads (grouped-query attention when smaller than ``num_heads``).
        intermediate_size: MLP width.
        tie_word_embeddings: Share the input embedding with ``lm_head``.
        seed: Seed of the weight initialisation.
        dtype: Parameter dtype.

    Returns:
        The model in eval mode with ``attn_implementation="eager"``, ``pad_token_id=0`` and
        ``eos_token_id=1``.

    Raises:
        GradAlignError: If ``arch`` is unknown or ``vocab_size`` is smaller than the tokenizer's.

    Examples:
        >>> m = tiny_model("llama", seed=1)
        >>> m.config.num_hidden_layers
        2
    """
    n_tokens = len(tiny_tokenizer())
    if vocab_size is None:
        vocab_size = _round_up(n_tokens, 8)
    if vocab_size < n_tokens:
        raise GradAlignError(
            f"tiny_model: vocab_size must be at least len(tiny_tokenizer())={n_tokens}, "
            f"got {vocab_size}"
        )
    configs = {"qwen2": Qwen2Config, "llama": LlamaConfig}
    if arch not in configs:
        raise GradAlignError(f"tiny_model: arch must be 'qwen2' or 'llama', got {arch!r}")
    config = configs[arch](
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Eager attention: the CPU SDPA kernel has no double backward, which extractors may need.
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=dtype)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 1
    return model.eval()
