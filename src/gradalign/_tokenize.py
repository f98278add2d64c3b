"""Private helpers that turn prompt/completion pairs into padded token matrices."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gradalign.errors import GradAlignError


def pack_token_ids(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    max_length: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad ``prompt + completion`` rows -> input_ids, attention_mask, response_mask (S, T)."""
    call = "Rollouts.from_token_ids"
    if len(prompt_ids) != len(completion_ids):
        raise GradAlignError(
            f"{call}: got {len(prompt_ids)} prompts but {len(completion_ids)} completions"
        )
    if not prompt_ids:
        raise GradAlignError(f"{call}: needs at least one sequence, got none")
    if max_length is not None and max_length < 2:
        raise GradAlignError(f"{call}: max_length must be >= 2, got {max_length}")
    rows: list[tuple[list[int], int]] = []
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        p, c = [int(x) for x in p], [int(x) for x in c]
        if not p:
            raise GradAlignError(f"{call}: prompt {i} is empty; a response needs a preceding token")
        if max_length is not None:
            if len(p) >= max_length:
                raise GradAlignError(
                    f"{call}: prompt {i} has {len(p)} tokens, leaving no room for a response "
                    f"within max_length={max_length}"
                )
            c = c[: max_length - len(p)]
        if not c:
            raise GradAlignError(f"{call}: completion {i} is empty; every row needs a response")
        rows.append((p + c, len(p)))
    width = max(len(r) for r, _ in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)  # (S, T)
    attn = torch.zeros((len(rows), width), dtype=torch.long)  # (S, T)
    resp = torch.zeros((len(rows), width), dtype=torch.bool)  # (S, T)
    for i, (r, n_prompt) in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        attn[i, : len(r)] = 1
        resp[i, n_prompt : len(r)] = True
    return ids, attn, resp


def _render_prompt(tokenizer: Any, prompt: Any, chat_template: bool) -> list[int]:
    if chat_template:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "input_ids"):
            out = out["input_ids"]
        return [int(x) for x in out]
    if not isinstance(prompt, str):
        raise GradAlignError(
            "Rollouts.from_texts: prompts must be strings unless chat_template=True, "
            f"got {type(prompt).__name__}"
        )
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def tokenize_pairs(
    tokenizer: Any,
    prompts: Sequence[Any],
    completions: Sequence[str],
    *,
    chat_template: bool,
    add_eos: bool,
) -> tuple[list[list[int]], list[list[int]], int]:
    """Tokenize prompts and completions separately; returns their ids and the pad token id."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if add_eos and eos is None:
        raise GradAlignError(
            "Rollouts.from_texts: add_eos=True but the tokenizer has no eos_token_id"
        )
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = eos if pad is None else pad
    prompt_ids = [_render_prompt(tokenizer, p, chat_template) for p in prompts]
    completion_ids = []
    for c in completions:
        ids = list(tokenizer(c, add_special_tokens=False)["input_ids"])
        completion_ids.append([*ids, eos] if add_eos else ids)
    return prompt_ids, completion_ids, int(pad if pad is not None else 0)


def split_generate_output(
    prompt_ids: torch.Tensor,
    sequences: torch.Tensor,
    *,
    prompt_mask: torch.Tensor | None,
    pad_token_id: int,
    eos_token_id: int | Sequence[int] | None,
) -> tuple[list[list[int]], list[list[int]]]:
    """``generate``'s (B * k, L + N) output -> per-row prompt ids (padding dropped) and completions.

    A completion ends after its first EOS (kept: trainers train it); what follows is padding. Without
    an EOS it runs to the end, trailing ``pad_token_id`` removed.
    """
    call = "Rollouts.from_generate"
    prompts, seqs = torch.as_tensor(prompt_ids), torch.as_tensor(sequences)
    if prompts.dim() != 2 or seqs.dim() != 2:
        raise GradAlignError(
            f"{call}: prompt_ids and sequences must be 2-D, got shapes {tuple(prompts.shape)} "
            f"and {tuple(seqs.shape)}"
        )
    b, width = prompts.shape
    if seqs.shape[0] % b or seqs.shape[1] <= width:
        raise GradAlignError(
            f"{call}: sequences must have a multiple of {b} rows (k rollouts per prompt) and more "
            f"than {width} columns (prompt + completion), got shape {tuple(seqs.shape)}"
        )
    k = seqs.shape[0] // b
    if not torch.equal(seqs[:, :width].cpu(), prompts.cpu().repeat_interleave(k, dim=0)):
        raise GradAlignError(
            f"{call}: sequences[:, :{width}] must repeat prompt_ids {k} times each (generate's "
            "num_return_sequences layout); pass the input_ids given to generate"
        )
    mask = prompts != pad_token_id if prompt_mask is None else torch.as_tensor(prompt_mask).bool()
    if tuple(mask.shape) != (b, width):
        raise GradAlignError(
            f"{call}: prompt_mask must have the shape of prompt_ids {(b, width)}, got "
            f"{tuple(mask.shape)}"
        )
    stops = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    prompt_rows = [prompts[i][mask[i].cpu()].tolist() for i in range(b)]
    out_prompts, completions = [], []
    for row, tokens in enumerate(seqs[:, width:].tolist()):
        cut = next((i + 1 for i, t in enumerate(tokens) if t in stops), None)
        if cut is None:
            while tokens and tokens[-1] == pad_token_id:
                tokens.pop()
            cut = len(tokens)
        out_prompts.append(prompt_rows[row // k])
        completions.append(tokens[:cut])
    return out_prompts, completions
