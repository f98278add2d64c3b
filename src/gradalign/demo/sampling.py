"""Rollout sampling for the demo: chat prompts -> sampled completions as token ids.

Completions stay token ids end to end (cut after the first EOS, padding dropped), so the gradient
pass sees exactly the tokens the policy sampled: no decode/re-tokenize round trip that could move
the prompt/response boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["render_prompts", "sample_completions", "trim_completion"]


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


def trim_completion(tokens: Sequence[int], eos_token_id: int) -> list[int]:
    """Cut generated ids after the first EOS (kept: its log-prob is trained too).

    ``generate`` pads finished rows (often with the EOS id itself), so everything after the first
    EOS is padding. A row without EOS hit ``max_new_tokens`` and has no padding.

    Example:
        >>> trim_completion([5, 6, 2, 2, 2], eos_token_id=2)
        [5, 6, 2]
    """
    out = [int(t) for t in tokens]
    return out[: out.index(eos_token_id) + 1] if eos_token_id in out else out


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, L)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, L)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(list(r), dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask


@torch.no_grad()
def sample_completions(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    *,
    eos_token_id: int,
    pad_token_id: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    batch_size: int = 32,
    progress: bool = False,
    desc: str = "generate",
) -> list[list[int]]:
    """Sample one completion per prompt row with batched, left-padded ``model.generate``.

    Sampling runs under ``torch.random.fork_rng`` seeded with ``seed``: the same call gives the same
    completions and the caller's global RNG state is untouched.

    Args:
        model: A Hugging Face causal LM.
        prompt_ids: (S,) prompt token ids; repeat a prompt k times for k rollouts.
        eos_token_id: Stops a row; kept as the last completion token.
        pad_token_id: Left padding of the prompts.
        max_new_tokens: Length cap of a completion.
        temperature: Softmax temperature (plain sampling: no top-k/top-p truncation).
        seed: Seed of the sampling.
        batch_size: Rows per ``generate`` call.
        progress: Show a tqdm bar over batches.
        desc: Label of the bar.

    Returns:
        (S,) completion token ids, each ending at its first EOS or at ``max_new_tokens``.
    """
    from tqdm.auto import tqdm

    starts = range(0, len(prompt_ids), batch_size)
    completions: list[list[int]] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
            ids, mask = _left_pad(prompt_ids[start : start + batch_size], pad_token_id)
            out = model.generate(  # type: ignore[operator]
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos_token_id,
                pad_token_id=pad_token_id,
            )
            new = out[:, ids.shape[1] :]  # (B, N)
            completions.extend(trim_completion(row, eos_token_id) for row in new.tolist())
    return completions
