"""Sampling GRPO groups from a Hugging Face causal LM: k completions of each prompt, as token ids.

Each prompt runs once: its key/value cache is repeated for its k rollouts, which then decode
together, the way inference engines share a GRPO group's prompt. Completions stay token ids end to
end (cut after the first stop token, padding dropped), so the gradient pass sees exactly the tokens
the policy sampled: no decode/re-tokenize round trip that could move the prompt/response boundary.

``model.generate(num_return_sequences=k)`` runs each prompt k times; here it runs once, which is
about k times cheaper in the prompt and gives the same distribution (plain sampling).

Implementations: [`render_prompts`][gradalign.sampling.render_prompts] (chat prompts), [`stop_tokens`][gradalign.sampling.stop_tokens] (token ids that end a
completion), [`trim_completion`][gradalign.sampling.trim_completion], [`sample_completions`][gradalign.sampling.sample_completions] (token ids) and
[`sample_rollouts`][gradalign.sampling.sample_rollouts] (scored [`Rollouts`][gradalign.rollouts.Rollouts], one group per prompt).

Shape glossary: B prompts in a batch, k rollouts per prompt, L prompt width, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
from torch import nn

from gradalign.errors import GradAlignError
from gradalign.extractors._forward import cache_argument
from gradalign.rollouts import Rollouts

__all__ = [
    "render_prompts",
    "sample_completions",
    "sample_rollouts",
    "stop_tokens",
    "trim_completion",
]


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
            [`stop_tokens`][gradalign.sampling.stop_tokens].
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
    if progress:  # tqdm only when asked: importing tqdm.auto warns in notebooks without widgets
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, leave=False)
    for start in starts:
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


def sample_rollouts(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    k: int,
    reward: Callable[[int, list[int]], float],
    *,
    group_ids: Sequence[int] | None = None,
    stop_token_ids: Collection[int],
    pad_token_id: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = False,
) -> Rollouts:
    """``k`` sampled completions of each prompt, rewarded, as [`Rollouts`][gradalign.rollouts.Rollouts]: one group per prompt.

    Each prompt runs once and its k completions decode together (see
    [`sample_completions`][gradalign.sampling.sample_completions]); the completions stay token ids,
    so the gradient pass sees exactly the sampled tokens.

    Args:
        model: A Hugging Face causal LM that accepts ``position_ids`` and returns a cache.
        prompt_ids: (P,) prompt token ids (e.g. from [`render_prompts`][gradalign.sampling.render_prompts]).
        k: Rollouts per prompt (the GRPO group size).
        reward: ``(prompt_index, completion_ids) -> float``: the verifier; decode the ids with
            your tokenizer and score the answer.
        group_ids: (P,) problem id of each prompt; default ``0 .. P-1``.
        stop_token_ids: Ids that end a completion (kept as its last token).
        pad_token_id: Padding of the prompts and of the Rollouts.
        max_new_tokens: Length cap of a completion.
        temperature: Softmax temperature (plain sampling).
        seed: Seed of the private generator (the global RNG is untouched).
        batch_size: Rollouts decoded together.
        progress: Show a progress bar over batches.

    Returns:
        Rollouts with ``P * k`` rows, prompt-major, ``group_ids`` repeated k times.

    Raises:
        GradAlignError: bad sampling settings, ``group_ids`` of another length than the
            prompts, or a reward that is not a finite number.

    Examples:
        >>> from gradalign.testing import tiny_model
        >>> ro = sample_rollouts(tiny_model(), [[5, 6, 7], [8, 9]], 4,
        ...                      lambda i, ids: float(len(ids) > 2), group_ids=[10, 11],
        ...                      stop_token_ids={1}, pad_token_id=0, max_new_tokens=5)
        >>> len(ro), ro.unique_groups.tolist()
        (8, [10, 11])
    """
    gids = list(range(len(prompt_ids))) if group_ids is None else [int(g) for g in group_ids]
    if len(gids) != len(prompt_ids):
        raise GradAlignError(
            f"sample_rollouts: group_ids must have one id per prompt ({len(prompt_ids)}), "
            f"got {len(gids)}"
        )
    completions = sample_completions(
        model,
        prompt_ids,
        k,
        stop_token_ids=stop_token_ids,
        pad_token_id=pad_token_id,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
    )
    rewards = []
    for row, ids in enumerate(completions):
        value = reward(row // k, ids)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise GradAlignError(
                f"sample_rollouts: reward must return a finite float, got {value!r} for prompt "
                f"{row // k} (completion {ids[:10]})"
            )
        rewards.append(float(value))
    return Rollouts.from_token_ids(
        [list(prompt_ids[row // k]) for row in range(len(completions))],
        completions,
        rewards,
        [gids[row // k] for row in range(len(completions))],
        pad_token_id=pad_token_id,
    )
