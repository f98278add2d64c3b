"""Test helpers: hand-made random rollouts, and selections compared across processes."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from gradalign import Candidates, Rollouts

# Scores computed in another process, at another thread count or with other batch shapes agree with
# the reference to float rounding only (different kernels sum in different orders); bit-identity is
# promised only within one process with the same shapes and threads.
SCORE_TOL = 1e-5


def assert_selection_stable(
    policy: Callable[[Candidates], Any],
    table: Candidates,
    expected: Sequence[int],
    tol: float = SCORE_TOL,
    draws: int = 64,
) -> None:
    """``policy`` selects ``expected`` from ``table`` under every tested perturbation of the scores
    within +-tol (each score moved alone both ways, and random joint moves): so a selection made
    from scores within ``tol`` of these, in another process, must be the same. Asserts this
    before a test compares selections across processes; if it fails, the test data puts two
    candidates within rounding of the cut, and the comparison would be meaningless."""
    assert table.scores is not None
    base = table.scores.double()
    moves = [torch.zeros_like(base)]
    for i in range(len(base)):
        for sign in (-1.0, 1.0):
            one = torch.zeros_like(base)
            one[i] = sign * tol
            moves.append(one)
    gen = torch.Generator().manual_seed(0)
    moves += [
        (torch.rand(len(base), generator=gen, dtype=torch.float64) * 2 - 1) * tol
        for _ in range(draws)
    ]
    for move in moves:
        moved = dataclasses.replace(table, scores=(base + move).float())
        got = [int(i) for i in policy(moved)]
        assert got == list(expected), (
            f"the selection is within {tol} of a tie: {got} vs {list(expected)}; the test data "
            "cannot compare selections across processes"
        )


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
