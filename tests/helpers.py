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
) -> Rollouts:
    """Random right-padded rollouts with varied prompt and response lengths."""
    g = torch.Generator().manual_seed(seed)
    s = len(groups)
    prompt_len = torch.randint(1, max_prompt + 1, (s,), generator=g)
    resp_len = torch.randint(1, max_response + 1, (s,), generator=g)
    t = int((prompt_len + resp_len).max())
    ids = torch.zeros(s, t, dtype=torch.long)
    attn = torch.zeros(s, t, dtype=torch.long)
    resp = torch.zeros(s, t, dtype=torch.bool)
    for i in range(s):
        n = int(prompt_len[i] + resp_len[i])
        ids[i, :n] = torch.randint(2, vocab, (n,), generator=g)
        attn[i, :n] = 1
        resp[i, int(prompt_len[i]) : n] = True
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
