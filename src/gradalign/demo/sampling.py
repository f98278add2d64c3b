"""Rollout sampling for the demo: k completions of each prompt, as token ids.

Each prompt runs once: its key/value cache is repeated for its k rollouts, which then decode
together, the way inference engines share a GRPO group's prompt. Completions stay token ids end to
end (cut after the first stop token, padding dropped), so the gradient pass sees exactly the tokens
the policy sampled: no decode/re-tokenize round trip that could move the prompt/response boundary.

Implementations: [`render_prompts`][gradalign.demo.sampling.render_prompts] (chat prompts), [`stop_tokens`][gradalign.demo.sampling.stop_tokens] (token ids that end a
completion), [`trim_completion`][gradalign.demo.sampling.trim_completion] and [`sample_completions`][gradalign.demo.sampling.sample_completions].

Shape glossary: B prompts in a batch, k rollouts per prompt, L prompt width, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import torch
from torch import nn

from gradalign._forward import cache_argument
from gradalign.errors import GradAlignError

__all__ = ["render_prompts", "sample_completions", "stop_tokens", "trim_completion"]


def render_prompts(tokenizer: Any, questions: Sequence[str]) -> list[list[int]]:
    """Token ids of each question as one user turn, with the assistant generation prompt.

    Args:
        tokenizer: A Hugging Face tokenizer with a chat template.
        questions: (P,) question texts.

    Returns:
        (P,) lists of prompt token ids.
    """
    prompts = []
    for q in questions:
        out = tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True
        )
        # transformers 5 returns a BatchEncoding here; 4.x returns the list itself.
        ids = out["input_ids"] if hasattr(out, "keys") else out
        prompts.append([int(t) for t in ids])
    return prompts


def stop_tokens(tokenizer: Any, text: str = "\n") -> set[int]:
    """Ids of every token whose text contains ``text`` (a line break ends a one-line answer).

    Examples:
        >>> from gradalign.testing import tiny_tokenizer
        >>> tok = tiny_tokenizer()
        >>> stop_tokens(tok) == {tok.convert_tokens_to_ids("\\n")}
        True
    """
    return {i for i in range(len(tokenizer)) if text in tokenizer.decode([i])}


def trim_completion(tokens: Sequence[int], stop: Collection[int]) -> list[int]:
    """Cut generated ids after the first stop token (kept: its log-prob is trained too).

    Examples:
        >>> trim_completion([5, 6, 2, 0, 0], stop={2})
        [5, 6, 2]
    """
    out = [int(t) for t in tokens]
    for i, t in enumerate(out):
        if t in stop:
            return out[: i + 1]
    return out


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, L)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, L)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(list(r), dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask


def _logits(out: Any) -> torch.Tensor:
    return out.logits[:, -1].float()  # (B, V)


@torch.no_grad()
def _sample_batch(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    k: int,
    *,
    stop: set[int],
    pad_token_id: int,
    max_new_tokens: int,
    temperature: float,
    generator: torch.Generator,
) -> list[list[int]]:
    """(B * k,) completions of B prompts, prompt-major."""
    ids, mask = _left_pad(prompts, pad_token_id)  # (B, L), (B, L)
    pos = (mask.cumsum(1) - 1).clamp_min(0)  # (B, L)
    name = cache_argument(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    cache = getattr(out, name)
    expand = torch.arange(len(prompts)).repeat_interleave(k)  # (B * k,)
    cache.reorder_cache(expand)
    logits, mask, pos = _logits(out)[expand], mask[expand], pos[expand, -1:]  # (B*k, V), ...
    stop_ids = torch.tensor(sorted(stop), dtype=torch.long)
    tokens, done = [], torch.zeros(len(expand), dtype=torch.bool)
    for step in range(max_new_tokens):
        probs = torch.softmax(logits / temperature, dim=-1)  # (B*k, V)
        nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B*k,)
        nxt = torch.where(done, pad_token_id, nxt)
        tokens.append(nxt)
        done = done | torch.isin(nxt, stop_ids)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (B*k, L + step + 1)
        pos = pos + 1  # (B*k, 1)
        kwargs = {name: cache}
        out = model(
            input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, use_cache=True, **kwargs
        )
        cache = getattr(out, name)
        logits = _logits(out)
    new = torch.stack(tokens, dim=1).tolist()  # (B*k, N)
    return [trim_completion(row, stop) for row in new]


def sample_completions(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    k: int,
    *,
    stop_token_ids: Collection[int],
    pad_token_id: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    batch_size: int = 256,
    progress: bool = False,
    desc: str = "generate",
) -> list[list[int]]:
    """Sample ``k`` completions of each prompt (plain sampling: no top-k/top-p truncation).

    Sampling draws from a private ``torch.Generator`` seeded with ``seed``: the same call gives the
    same completions and the global RNG state is untouched.

    Args:
        model: A Hugging Face causal LM that accepts ``position_ids`` and returns a cache.
        prompt_ids: (P,) prompt token ids.
        k: Rollouts per prompt.
        stop_token_ids: Ids that end a completion (kept as its last token), e.g. the EOS id or
            [`stop_tokens`][gradalign.demo.sampling.stop_tokens].
        pad_token_id: Left padding of the prompts.
        max_new_tokens: Length cap of a completion.
        temperature: Softmax temperature.
        seed: Seed of the sampling.
        batch_size: Rollouts decoded together (a multiple of ``k`` is used).
        progress: Show a tqdm bar over batches.
        desc: Label of the bar.

    Returns:
        (P * k,) completion token ids, prompt-major, each ending at its first stop token or at
        ``max_new_tokens``.

    Raises:
        GradAlignError: If ``k``, ``max_new_tokens`` or ``temperature`` is not positive.
    """
    from tqdm.auto import tqdm

    if k < 1 or max_new_tokens < 1 or not temperature > 0:
        raise GradAlignError(
            "sample_completions: k and max_new_tokens must be >= 1 and temperature > 0, got "
            f"k={k}, max_new_tokens={max_new_tokens}, temperature={temperature}"
        )
    per = max(1, batch_size // k)  # prompts per batch
    gen = torch.Generator().manual_seed(seed)
    stop = {int(t) for t in stop_token_ids}
    out: list[list[int]] = []
    starts = range(0, len(prompt_ids), per)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        out += _sample_batch(
            model,
            prompt_ids[start : start + per],
            k,
            stop=stop,
            pad_token_id=pad_token_id,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            generator=gen,
        )
    return out
