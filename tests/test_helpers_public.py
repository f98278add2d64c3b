"""The helpers users used to copy out of the demo: shared-prompt sampling, selection metrics,
the alignment on a Selection."""

from __future__ import annotations

import pytest
import torch

import gradalign as ga
from gradalign.errors import GradAlignError
from gradalign.metrics import auroc, selected_share
from gradalign.sampling import sample_completions, sample_rollouts
from gradalign.testing import tiny_model


def test_sample_rollouts_are_the_sampled_tokens_with_their_rewards() -> None:
    model = tiny_model()
    prompts = [[5, 6, 7], [8, 9]]
    kw = dict(stop_token_ids={1}, pad_token_id=0, max_new_tokens=4, temperature=1.0, seed=3)
    seen: list[tuple[int, list[int]]] = []

    def reward(i: int, ids: list[int]) -> float:
        seen.append((i, ids))
        return float(sum(ids) % 2)

    ro = sample_rollouts(model, prompts, 3, reward, group_ids=[40, 41], **kw)  # type: ignore[arg-type]
    completions = sample_completions(model, prompts, 3, **kw)  # type: ignore[arg-type]
    assert [ids for _, ids in seen] == completions  # same seed, same tokens
    assert [i for i, _ in seen] == [0, 0, 0, 1, 1, 1]
    assert ro.group_ids.tolist() == [40, 40, 40, 41, 41, 41]
    assert ro.rewards.tolist() == [float(sum(c) % 2) for c in completions]
    for row, comp in enumerate(completions):  # response tokens are exactly the completion
        assert ro.input_ids[row][ro.response_mask[row]].tolist() == comp
        prompt = prompts[row // 3]
        assert ro.input_ids[row, : len(prompt)].tolist() == prompt


def test_sample_rollouts_refuses_bad_rewards_and_ids() -> None:
    model = tiny_model()
    kw = dict(stop_token_ids={1}, pad_token_id=0, max_new_tokens=2)
    with pytest.raises(GradAlignError, match="reward must return a finite float, got nan"):
        sample_rollouts(model, [[5, 6]], 2, lambda i, ids: float("nan"), **kw)  # type: ignore[arg-type]
    with pytest.raises(GradAlignError, match=r"one id per prompt \(1\), got 2"):
        sample_rollouts(model, [[5, 6]], 2, lambda i, ids: 1.0, group_ids=[1, 2], **kw)  # type: ignore[arg-type]


def test_metrics_by_hand() -> None:
    # Pairs (positive, negative): (0.9, 0.1) 1, (0.9, 0.5) 1, (0.5, 0.1) 1, (0.5, 0.5) 1/2 -> 3.5/4
    assert auroc([0.9, 0.1, 0.5, 0.5], [True, False, True, False]) == 0.875
    assert selected_share(torch.tensor([3, 7, 9, 12]), {7, 8}) == 0.25
    assert selected_share([], {1}) == 0.0
    with pytest.raises(GradAlignError, match="needs both classes"):
        auroc([0.1, 0.2], [True, True])


def test_selection_carries_its_alignment() -> None:
    model = tiny_model()
    ro = ga.Rollouts.from_token_ids([[5, 6]] * 6, [[9, 1], [10, 1], [11, 1], [12, 1], [13, 1], [14, 1]],
                                    [1.0, 0.0, 1.0, 0.0, 0.0, 1.0], [0, 0, 1, 1, 2, 2])  # fmt: skip
    val = ga.Rollouts.from_token_ids([[5, 6]] * 2, [[9, 1], [10, 1]], [1.0, 0.0], [100, 100])
    for scorer in ("cosine", "inner_product"):
        sel = ga.GradAlign(
            ga.FactorizedGradient(4, 4), scorer=scorer, policy=ga.policies.TopK(2)
        ).select(model, ro, val)
        assert sel.alignment is not None
        assert torch.equal(sel.alignment.ids, sel.candidates.ids)
        assert torch.equal(sel.alignment.scores(scorer), sel.candidates.scores)
    table = ga.GradAlign(ga.FactorizedGradient(4, 4)).score(model, ro, val)
    assert ga.GradAlign(policy=ga.policies.TopK(1)).apply_policy(table).alignment is None
