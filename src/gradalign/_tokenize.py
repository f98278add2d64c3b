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
    check_token_id(call, "pad_token_id", pad_token_id)
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


def check_token_id(call: str, name: str, value: Any) -> int:
    """A token id: an int >= 0 (not a bool, not None)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise GradAlignError(
        f"{call}: {name} must be a token id (an int >= 0), got {value!r}; pass "
        "tokenizer.pad_token_id (tokenizer.eos_token_id when the tokenizer has no pad token)"
    )


def _stop_ids(call: str, eos_token_id: Any) -> set[int]:
    """The ids that end a completion: ``eos_token_id`` as a set (None: none)."""
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, torch.Tensor):
        eos_token_id = eos_token_id.flatten().tolist()
    values = [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
    ok = isinstance(values, (list, tuple, set)) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values
    )
    if not ok:
        raise GradAlignError(
            f"{call}: eos_token_id must be a token id, a list of them or None, got "
            f"{eos_token_id!r}; pass generation_config.eos_token_id"
        )
    return set(values)


def _one_run_per_row(mask: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the row's 1s form one contiguous run that touches the first or last column."""
    m = mask.long()  # (B, L)
    runs = (m[:, 1:] > m[:, :-1]).sum(1) + m[:, 0]  # (B,) starts of runs of 1s
    return (runs == 1) & ((m[:, 0] == 1) | (m[:, -1] == 1))


def _derived_prompt_mask(
    call: str, prompts: torch.Tensor, pad: int, stops: set[int]
) -> torch.Tensor:
    """(B, L) bool: ``prompt_ids != pad``, where that is unambiguous."""
    fix = "pass prompt_mask=batch.attention_mask (the attention_mask given to generate)"
    if pad in stops:
        # A prompt may hold EOS tokens (chat templates end turns with them); they would be dropped.
        raise GradAlignError(
            f"{call}: pad_token_id={pad} is also an eos_token_id, so padding cannot be told from "
            f"EOS tokens inside the prompts; {fix}"
        )
    mask = prompts != pad  # (B, L)
    bad = (~_one_run_per_row(mask)).nonzero().flatten()
    if bad.numel():
        row = int(bad[0])
        raise GradAlignError(
            f"{call}: prompt row {row} holds pad_token_id={pad} between its tokens or has no "
            f"token other than it, so its padding is ambiguous: {prompts[row, :32].tolist()}; {fix}"
        )
    return mask


def _given_prompt_mask(call: str, prompt_mask: Any, shape: tuple[int, int]) -> torch.Tensor:
    """(B, L) bool: the attention mask given to generate, one run of 1s per row."""
    mask = torch.as_tensor(prompt_mask).detach().cpu()
    if tuple(mask.shape) != shape:
        raise GradAlignError(
            f"{call}: prompt_mask must have the shape of prompt_ids {shape}, got {tuple(mask.shape)}"
        )
    values = torch.unique(mask)
    if mask.dtype.is_complex or not bool(((values == 0) | (values == 1)).all()):
        raise GradAlignError(
            f"{call}: prompt_mask must be 0/1 or bool, got values {values[:5].tolist()}"
        )
    bad = (~_one_run_per_row(mask.bool())).nonzero().flatten()
    if bad.numel():
        row = int(bad[0])
        raise GradAlignError(
            f"{call}: prompt_mask must be one contiguous run of 1s per row, padded on one side "
            f"(left or right, as a tokenizer pads), got {mask[row, :32].long().tolist()} in row "
            f"{row}; pass the attention_mask given to generate"
        )
    return mask.bool()


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
    pad = check_token_id(call, "pad_token_id", pad_token_id)
    stops = _stop_ids(call, eos_token_id)
    prompts, seqs = _generate_tensors(call, prompt_ids, sequences)
    b, width = prompts.shape
    k = seqs.shape[0] // b
    if prompt_mask is None:
        mask = _derived_prompt_mask(call, prompts, pad, stops)
    else:
        mask = _given_prompt_mask(call, prompt_mask, (b, width))
    prompt_rows = [prompts[i][mask[i]].tolist() for i in range(b)]
    out_prompts, completions = [], []
    for row, tokens in enumerate(seqs[:, width:].tolist()):
        out_prompts.append(prompt_rows[row // k])
        completions.append(_completion(tokens, pad, stops))
    return out_prompts, completions


def _generate_tensors(
    call: str, prompt_ids: Any, sequences: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) prompts and (B * k, L + N) sequences on CPU, checked against each other."""
    prompts = torch.as_tensor(prompt_ids).detach().cpu()
    seqs = torch.as_tensor(sequences).detach().cpu()
    if prompts.dim() != 2 or seqs.dim() != 2 or 0 in prompts.shape:
        raise GradAlignError(
            f"{call}: prompt_ids and sequences must be 2-D with at least one prompt token, got "
            f"shapes {tuple(prompts.shape)} and {tuple(seqs.shape)}"
        )
    b, width = prompts.shape
    if seqs.shape[0] % b or seqs.shape[1] <= width:
        raise GradAlignError(
            f"{call}: sequences must have a multiple of {b} rows (k rollouts per prompt) and more "
            f"than {width} columns (prompt + completion), got shape {tuple(seqs.shape)}"
        )
    k = seqs.shape[0] // b
    if not torch.equal(seqs[:, :width], prompts.repeat_interleave(k, dim=0)):
        raise GradAlignError(
            f"{call}: sequences[:, :{width}] must repeat prompt_ids {k} times each (generate's "
            "num_return_sequences layout); pass the input_ids given to generate"
        )
    return prompts, seqs


def _completion(tokens: list[int], pad: int, stops: set[int]) -> list[int]:
    """The generated tokens up to and including the first EOS, else without trailing padding."""
    cut = next((i + 1 for i, t in enumerate(tokens) if t in stops), None)
    if cut is not None:
        return tokens[:cut]
    while tokens and tokens[-1] == pad:
        tokens.pop()
    return tokens
