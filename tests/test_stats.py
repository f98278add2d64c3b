"""gradalign.stats: per-group statistics against a plain Python loop, and the one zero-spread rule
used by every stage (objective, extractors, candidates, policies, rounds)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gradalign as ga
from gradalign.stats import group_stats, zero_spread


def _reference(groups: list[int], rewards: list[float]) -> dict[int, tuple[float, float, float]]:
    """(mean, population std, spread) per group, by hand in Python floats."""
    out = {}
    for g in sorted(set(groups)):
        rs = [r for gg, r in zip(groups, rewards, strict=True) if gg == g]
        out[g] = (statistics.fmean(rs), statistics.pstdev(rs), max(rs) - min(rs))
    return out


@given(
    st.lists(
        st.tuples(st.integers(-3, 3), st.floats(-1e6, 1e6, allow_nan=False)),
        min_size=1,
        max_size=30,
    )
)
def test_group_stats_match_a_python_loop(rows: list[tuple[int, float]]) -> None:
    groups, rewards = [g for g, _ in rows], [r for _, r in rows]
    got = group_stats(torch.tensor(groups), torch.tensor(rewards, dtype=torch.float64))
    ref = _reference(groups, rewards)
    assert got.ids.tolist() == sorted(ref)
    for i, g in enumerate(got.ids.tolist()):
        mean, std, spread = ref[g]
        assert math.isclose(float(got.mean[i]), mean, rel_tol=1e-9, abs_tol=1e-6)
        assert math.isclose(float(got.std[i]), std, rel_tol=1e-7, abs_tol=1e-6)
        assert float(got.spread[i]) == spread
        assert bool(got.zero_spread()[i]) == (spread == 0)
        assert (float(got.std[i]) == 0) == (spread == 0)  # constant groups: exactly 0


def test_no_overflow_for_huge_rewards() -> None:
    # float32 squares overflow near 2e19; the statistics stay finite and exact in scale.
    st_ = group_stats(
        torch.tensor([0, 0, 1, 1]), torch.tensor([2e19, -2e19, 1e200, -1e200], dtype=torch.float64)
    )
    assert st_.std.tolist() == [2e19, 1e200]
    assert bool(torch.isfinite(st_.unbiased_std()).all())
    ro = ga.Rollouts.from_token_ids(
        [[5]] * 4, [[7], [8], [7], [8]], [3e19, -3e19, 1.0, 0.0], [0, 0, 1, 1]
    )
    adv = ga.GRPOObjective(eps=0.0).advantages(ro)
    # (r - mean) / unbiased std: +-1/sqrt(2) in both groups, whatever the reward scale.
    assert torch.allclose(adv, torch.tensor([1, -1, 1, -1]) / math.sqrt(2), atol=1e-6)


def test_unbiased_std() -> None:
    st_ = group_stats(torch.tensor([0, 0, 0, 1]), torch.tensor([1.0, 0.0, 0.0, 5.0]))
    assert math.isclose(float(st_.unbiased_std()[0]), statistics.stdev([1.0, 0.0, 0.0]))
    assert float(st_.unbiased_std()[1]) == 0.0  # one rollout: no spread


def test_zero_spread_rule_and_its_checks() -> None:
    assert zero_spread(torch.tensor([0.0, 0.5, 0.1]), tol=0.1).tolist() == [True, False, True]
    for bad in (-1.0, float("nan"), "0", True):
        with pytest.raises(ga.GradAlignError, match="zero_spread: tol"):
            zero_spread(torch.tensor([0.0]), tol=bad)  # type: ignore[arg-type]


def _spread_rollouts() -> ga.Rollouts:
    # group 0: no spread; group 1: spread 1e-3 (below the tolerance); group 2: spread 1.
    rewards = [1.0, 1.0, 0.5, 0.501, 1.0, 0.0]
    return ga.Rollouts.from_token_ids(
        [[5, 6]] * 6, [[7, 1], [8, 1]] * 3, rewards, [0, 0, 1, 1, 2, 2]
    )


@pytest.mark.parametrize("tol", [0.0, 0.01])
def test_every_stage_applies_the_same_rule(qwen: torch.nn.Module, tol: float) -> None:
    ro = _spread_rollouts()
    obj = ga.GRPOObjective(zero_spread_tol=tol)
    expected = ro.zero_spread(tol)
    assert expected.tolist() == [True, tol > 0, False]
    assert obj.zero_spread(ro).tolist() == expected.tolist()
    assert obj.prepare(ro).zero_spread(ro).tolist() == expected.tolist()
    # The objective zeroes the advantages of every flagged group: their gradient is zero.
    adv = obj.advantages(ro).view(3, 2)
    assert (adv[expected] == 0).all() and (adv[~expected] != 0).all()
    out = ga.FactorizedGradient(4, 4).per_group(qwen, ro, obj)
    assert out.zero_spread.tolist() == expected.tolist()
    assert ((out.grads.norm(dim=1) == 0) == expected).all()
    table = ga.Candidates.from_rollouts(ro, zero_spread_tol=tol)
    assert table.zero_spread.tolist() == expected.tolist()
    assert ga.policies.DropZeroVariance()(table).tolist() == ro.unique_groups[~expected].tolist()
    assert ga.Informative()(table).tolist() == ro.unique_groups[~expected].tolist()
    val = ga.Rollouts.from_token_ids([[5, 6]] * 2, [[7, 1], [9, 1]], [1.0, 0.0], [50, 50])
    scored = ga.GradAlign(ga.FactorizedGradient(4, 4), obj).score(qwen, ro, val)
    assert scored.zero_spread.tolist() == expected.tolist()
    assert ga.policies.DropZeroVariance()(scored).tolist() == ro.unique_groups[~expected].tolist()
