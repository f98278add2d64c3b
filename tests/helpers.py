"""Test helpers: hand-made random rollouts."""

from __future__ import annotations

import torch

from gradalign import Rollouts


def make_rollouts(
    *,
    vocab: int,
    groups: list[int],
    rewards: list[float],
    seed: int = 0,
    max_prompt: int = 5,
    max_response: int = 6,
    old_logprobs: bool = False,
    ref_logprobs: bool = False,
    group_prompts: bool = False,
) -> Rollouts:
    """Random right-padded rollouts with varied prompt and response lengths.

    With ``group_prompts``, the rows of a group share one prompt (as GRPO rollouts do).
    """
    g = torch.Generator().manual_seed(seed)
    s = len(groups)
    prompt_len = torch.randint(1, max_prompt + 1, (s,), generator=g)
    resp_len = torch.randint(1, max_response + 1, (s,), generator=g)
    prompts = {gid: torch.randint(2, vocab, (max_prompt,), generator=g) for gid in set(groups)}
    if group_prompts:
        lengths = {gid: int(torch.randint(1, max_prompt + 1, (1,), generator=g)) for gid in prompts}
        prompt_len = torch.tensor([lengths[gid] for gid in groups])
    t = int((prompt_len + resp_len).max())
    ids = torch.zeros(s, t, dtype=torch.long)
    attn = torch.zeros(s, t, dtype=torch.long)
    resp = torch.zeros(s, t, dtype=torch.bool)
    for i in range(s):
        n, p = int(prompt_len[i] + resp_len[i]), int(prompt_len[i])
        ids[i, :n] = torch.randint(2, vocab, (n,), generator=g)
        if group_prompts:
            ids[i, :p] = prompts[groups[i]][:p]
        attn[i, :n] = 1
        resp[i, p:n] = True
    extra = {}
    if old_logprobs:
        extra["old_logprobs"] = -torch.rand(s, t, generator=g) * 3
    if ref_logprobs:
        extra["ref_logprobs"] = -torch.rand(s, t, generator=g) * 3
    return Rollouts(
        input_ids=ids,
        attention_mask=attn,
        response_mask=resp,
        rewards=torch.tensor(rewards),
        group_ids=torch.tensor(groups),
        **extra,
    )


def left_pad(ro: Rollouts, extra: int = 0) -> Rollouts:
    """The same rollouts left-padded (``extra`` more padding columns), as ``generate`` returns."""
    s, t = ro.input_ids.shape
    width = t + extra

    def move(x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((s, width), dtype=x.dtype)
        for i in range(s):
            n = int(ro.attention_mask[i].sum())
            out[i, width - n :] = x[i, :n]
        return out

    def move_opt(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else move(x)

    return Rollouts(
        input_ids=move(ro.input_ids),
        attention_mask=move(ro.attention_mask),
        response_mask=move(ro.response_mask),
        rewards=ro.rewards,
        group_ids=ro.group_ids,
        old_logprobs=move_opt(ro.old_logprobs),
        ref_logprobs=move_opt(ro.ref_logprobs),
    )
