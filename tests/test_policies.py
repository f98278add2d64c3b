"""Tests for gradalign.policies: expected ids derived by hand on small tables."""

from __future__ import annotations

import math
import types
from collections import Counter

import numpy as np
import pytest
import torch

from gradalign.errors import GradAlignError
from gradalign.policies import (
    AccGreedy,
    AccuracyBand,
    BottomK,
    Candidates,
    Chain,
    DiverseTopK,
    DropZeroVariance,
    EpsilonMix,
    Learnability,
    LearnAlign,
    Random,
    SimAcc,
    Softmax,
    TaskQuota,
    Threshold,
    TopFraction,
    TopK,
)

# The hand table. Accuracies are multiples of 1/8 so every key below is exact in float32.
#   id    score  acc    |p-.5|  p(1-p)    score*4p(1-p)  std
#   40     0.3   0.5    0       0.25      0.3            0.5
#    7     0.9   0.25   0.25    0.1875    0.675          0.4
#   23    -0.2   0.75   0.25    0.1875   -0.15           0.4
#    5     0.9   1.0    0.5     0         0              0
#   99     0.0   0.0    0.5     0         0              0
#   12     0.5   0.625  0.125   0.234375  0.46875        0.5
IDS = [40, 7, 23, 5, 99, 12]


def table(**drop: bool) -> Candidates:
    """The hand table with every field; ``drop`` names fields to leave out."""
    gen = torch.Generator().manual_seed(0)
    fields = {
        "ids": torch.tensor(IDS),
        "scores": torch.tensor([0.3, 0.9, -0.2, 0.9, 0.0, 0.5]),
        "accuracy": torch.tensor([0.5, 0.25, 0.75, 1.0, 0.0, 0.625]),
        "reward_std": torch.tensor([0.5, 0.4, 0.4, 0.0, 0.0, 0.5]),
        "zero_gradient": torch.tensor([False, False, False, True, True, False]),
        "task_scores": torch.randn(6, 2, generator=gen),
        "grads": torch.randn(6, 4, generator=gen),
    }
    return Candidates(**{k: v for k, v in fields.items() if not drop.get(k)})


def empty() -> Candidates:
    return Candidates(
        ids=torch.empty(0, dtype=torch.long),
        scores=torch.empty(0),
        accuracy=torch.empty(0),
        reward_std=torch.empty(0),
        task_scores=torch.empty(0, 2),
        grads=torch.empty(0, 4),
    )


def big(g: int = 50) -> Candidates:
    gen = torch.Generator().manual_seed(1)
    return Candidates(
        ids=torch.arange(100, 100 + g),
        scores=torch.randn(g, generator=gen),
        accuracy=torch.randint(0, 9, (g,), generator=gen) / 8,
    )


def ids(t: torch.Tensor) -> list[int]:
    assert t.dtype == torch.int64 and t.dim() == 1
    return t.tolist()


# ------------------------------------------------------------------------------------------------
# Hand-computed rankings


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (TopK(3), [7, 5, 12]),  # 0.9 (7) and 0.9 (5) tie: candidate order
        (TopK(6), [7, 5, 12, 40, 99, 23]),
        (BottomK(2), [23, 99]),
        (Threshold(0.3), [7, 5, 12, 40]),  # 0.3 itself is kept (>=)
        (Threshold(0.95), []),
        (Threshold(-math.inf), [7, 5, 12, 40, 99, 23]),
        (TopFraction(0.5), [7, 5, 12]),  # round(3.0) = 3
        (TopFraction(0.25), [7, 5]),  # round(1.5) = 2 (half to even)
        (TopFraction(0.05), [7]),  # round(0.3) = 0 -> at least 1
        (TopFraction(1.0), [7, 5, 12, 40, 99, 23]),
        (AccGreedy(4), [40, 12, 7, 23]),  # |p-.5| = 0, .125, .25, .25 (tie: 7 before 23)
        (Learnability(3), [40, 12, 7]),  # .25, .234375, .1875
        (SimAcc(6), [7, 12, 40, 5, 99, 23]),  # .675, .46875, .3, 0, 0 (tie), -.15
        (DropZeroVariance(), [40, 7, 23, 12]),
        (DiverseTopK(6, redundancy=0.0), [7, 5, 12, 40, 99, 23]),  # lambda = 0 is TopK
        (Chain(DropZeroVariance(), TopK(2)), [7, 12]),
        (Chain(TopK(4), AccGreedy(2)), [40, 12]),  # among 7, 5, 12, 40: |p-.5| = .25 .5 .125 0
        (Chain(TopK(4), DropZeroVariance()), [7, 12, 40]),  # keeps TopK's order
        (EpsilonMix(TopK(3), epsilon=0.0, seed=5), [7, 5, 12]),
    ],
    ids=repr,
)
def test_hand_rankings(policy, expected):
    assert ids(policy(table())) == expected


def test_ties_keep_candidate_order():
    c = Candidates(ids=torch.tensor([9, 3, 7, 1]), scores=torch.zeros(4), accuracy=torch.zeros(4))
    assert ids(TopK(4)(c)) == [9, 3, 7, 1]
    assert ids(BottomK(4)(c)) == [9, 3, 7, 1]
    assert ids(AccGreedy(4)(c)) == [9, 3, 7, 1]


def test_drop_zero_variance_prefers_reward_std():
    # Real-valued rewards 0.5, 0.5: accuracy 0.5 but no spread.
    c = Candidates(ids=torch.tensor([1, 2]), accuracy=torch.tensor([0.5, 1.0]))
    assert ids(DropZeroVariance()(c)) == [1]
    c = Candidates(ids=c.ids, accuracy=c.accuracy, reward_std=torch.tensor([0.0, 0.0]))
    assert ids(DropZeroVariance()(c)) == []


def test_accuracy_band_members():
    c = table()
    assert sorted(ids(AccuracyBand()(c))) == [7, 12, 23, 40]
    assert sorted(ids(AccuracyBand(0.25, 0.75)(c))) == [7, 12, 23, 40]  # inclusive bounds
    assert sorted(ids(AccuracyBand(0.3, 0.7)(c))) == [12, 40]
    two = ids(AccuracyBand(k=2, seed=3)(c))
    assert len(two) == 2 and set(two) <= {7, 12, 23, 40}
    edges = Candidates(ids=torch.tensor([1, 2, 3]), accuracy=torch.tensor([0.2, 0.8, 0.19]))
    assert sorted(ids(AccuracyBand(0.2, 0.8)(edges))) == [1, 2]


def test_diverse_topk_avoids_duplicated_gradient():
    # g1 == g2: once 1 is chosen, 2 gains 0.9 - 1 * 1 = -0.1 against 3's 0.5 - 0 = 0.5.
    c = Candidates(
        ids=torch.tensor([1, 2, 3]),
        scores=torch.tensor([1.0, 0.9, 0.5]),
        grads=torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]),
    )
    assert ids(DiverseTopK(2, redundancy=0.0)(c)) == [1, 2]
    assert ids(DiverseTopK(2, redundancy=1.0)(c)) == [1, 3]
    assert ids(DiverseTopK(3, redundancy=1.0)(c)) == [1, 3, 2]


def test_diverse_topk_zero_norm_and_negative_cosine():
    # Zero gradient (id 2) has cosine 0: 0.6 - 0 beats id 3's 0.5 - 0.8.
    c = Candidates(
        ids=torch.tensor([1, 2, 3]),
        scores=torch.tensor([1.0, 0.6, 0.5]),
        grads=torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.8, 0.6]]),
    )
    assert ids(DiverseTopK(2, redundancy=1.0)(c)) == [1, 2]
    # Anti-aligned (cos -1) earns a bonus: 0.45 + 0.1 beats 0.5 - 0.
    c = Candidates(
        ids=torch.tensor([1, 2, 3]),
        scores=torch.tensor([1.0, 0.5, 0.45]),
        grads=torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]),
    )
    assert ids(DiverseTopK(2, redundancy=0.1)(c)) == [1, 3]


def test_learnalign_by_hand():
    # mean g = (2/3, 1/3): cos = 2/sqrt5, 2/sqrt5, 1/sqrt5; p(1-p) = .109375, .25, .25
    # keys = .0978, .2236, .1118 -> ids 2, 3, 1
    c = Candidates(
        ids=torch.tensor([1, 2, 3]),
        accuracy=torch.tensor([0.125, 0.5, 0.5]),
        grads=torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]),
    )
    assert ids(LearnAlign(3)(c)) == [2, 3, 1]


def test_learnalign_matches_numpy():
    rng = np.random.default_rng(0)
    grads = rng.normal(size=(9, 5)).astype(np.float32)
    grads[4] = 0.0  # zero-norm row: cosine 0
    acc = rng.integers(1, 8, size=9) / 8
    mean = grads.mean(0)
    norms = np.linalg.norm(grads, axis=1)
    cos = np.where(norms > 0, grads @ mean / (np.maximum(norms, 1e-30) * np.linalg.norm(mean)), 0)
    key = cos * acc * (1 - acc)
    order = np.argsort(-key, kind="stable")
    c = Candidates(
        ids=torch.arange(9) * 3, grads=torch.from_numpy(grads), accuracy=torch.tensor(acc)
    )
    assert ids(LearnAlign(5)(c)) == (order[:5] * 3).tolist()


def test_task_quota_round_robin():
    # rank task 0: 10 20 50 40 30;  rank task 1: 10 30 40 50 20
    c = Candidates(
        ids=torch.tensor([10, 20, 30, 40, 50]),
        task_scores=torch.tensor([[0.9, 0.9], [0.8, 0.1], [0.1, 0.8], [0.2, 0.7], [0.3, 0.2]]),
    )
    assert ids(TaskQuota([2, 2])(c)) == [10, 30, 20, 40]
    assert ids(TaskQuota([1, 3])(c)) == [10, 30, 40, 50]
    assert ids(TaskQuota([0, 2])(c)) == [10, 30]
    with pytest.warns(UserWarning, match="larger than"):
        assert ids(TaskQuota([3, 3])(c)) == [10, 30, 20, 40, 50]
    with pytest.raises(GradAlignError, match="3 quotas but task_scores has 2 columns"):
        TaskQuota([1, 1, 1])(c)


# ------------------------------------------------------------------------------------------------
# Randomness


SEEDED = [
    lambda s: Random(10, seed=s),
    lambda s: Softmax(10, seed=s),
    lambda s: AccuracyBand(0.0, 1.0, k=10, seed=s),
    lambda s: EpsilonMix(TopK(10), epsilon=0.5, seed=s),
]


@pytest.mark.parametrize("make", SEEDED)
def test_seeded_determinism_and_sensitivity(make):
    c = big()
    state = torch.get_rng_state()
    first = ids(make(0)(c))
    assert torch.equal(state, torch.get_rng_state())  # global RNG untouched
    assert first == ids(make(0)(c))
    assert len(first) == len(set(first)) == 10 and set(first) <= set(c.ids.tolist())
    assert first != ids(make(1)(c))


def test_softmax_low_temperature_is_topk():
    c = big()
    for seed in range(5):
        assert ids(Softmax(20, temperature=1e-4, seed=seed)(c)) == ids(TopK(20)(c))


def test_softmax_frequencies():
    c = Candidates(ids=torch.tensor([1, 2, 3, 4]), scores=torch.tensor([0.1, 0.2, 0.3, 0.4]).log())
    n = 4000
    hot = Counter(Softmax(1, temperature=1e6, seed=s)(c).item() for s in range(n))
    assert all(abs(hot[i] / n - 0.25) < 0.04 for i in (1, 2, 3, 4))  # ~uniform
    warm = Counter(Softmax(1, temperature=1.0, seed=s)(c).item() for s in range(n))
    assert all(abs(warm[i] / n - i / 10) < 0.03 for i in (1, 2, 3, 4))  # p ∝ exp(log q) = q


def test_epsilon_one_is_uniform_random_subset():
    c = table()
    n = 3000
    picks = [ids(EpsilonMix(TopK(2), epsilon=1.0, seed=s)(c)) for s in range(n)]
    assert all(len(p) == 2 and p[0] != p[1] and set(p) <= set(IDS) for p in picks)
    first = Counter(p[0] for p in picks)
    assert all(abs(first[i] / n - 1 / 6) < 0.04 for i in IDS)
    assert any(p != [7, 5] for p in picks)


def test_epsilon_mix_accepts_plain_callable():
    assert ids(EpsilonMix(lambda c: c.ids[:2], epsilon=0.0)(table())) == [40, 7]


# ------------------------------------------------------------------------------------------------
# Edge cases and errors


K_POLICIES = [
    TopK(10),
    BottomK(10),
    AccGreedy(10),
    Learnability(10),
    SimAcc(10),
    LearnAlign(10),
    Random(10),
    Softmax(10),
    DiverseTopK(10),
    AccuracyBand(0.0, 1.0, k=10),
    TaskQuota([5, 5]),
    EpsilonMix(TopK(10), epsilon=0.5),
]


@pytest.mark.parametrize("policy", K_POLICIES, ids=repr)
def test_k_larger_than_pool_warns_and_selects_all(policy):
    with pytest.warns(UserWarning, match="larger than"):
        out = ids(policy(table()))
    assert sorted(out) == sorted(IDS)


def test_accuracy_band_k_larger_than_eligible_warns():
    with pytest.warns(UserWarning, match="4 candidates with 0.2 <= accuracy <= 0.8"):
        assert sorted(ids(AccuracyBand(k=5)(table()))) == [7, 12, 23, 40]


ALL_POLICIES = [
    *K_POLICIES,
    TopFraction(0.5),
    Threshold(0.0),
    DropZeroVariance(),
    AccuracyBand(),
    Chain(DropZeroVariance(), TopK(3)),
]


@pytest.mark.parametrize("policy", ALL_POLICIES, ids=repr)
def test_empty_pool(policy):
    out = policy(empty())  # no warning either: warnings are errors here
    assert out.dtype == torch.int64 and out.shape == (0,)


def test_chain_empty_intermediate():
    assert ids(Chain(Threshold(0.95), TopK(2))(table())) == []


@pytest.mark.parametrize(
    ("policy", "missing"),
    [
        (TopK(1), "scores"),
        (BottomK(1), "scores"),
        (TopFraction(0.5), "scores"),
        (Threshold(0.0), "scores"),
        (Softmax(1), "scores"),
        (SimAcc(1), "scores"),
        (DiverseTopK(1), "scores"),
        (AccGreedy(1), "accuracy"),
        (Learnability(1), "accuracy"),
        (SimAcc(1), "accuracy"),
        (AccuracyBand(), "accuracy"),
        (LearnAlign(1), "accuracy"),
        (LearnAlign(1), "grads"),
        (DiverseTopK(1), "grads"),
        (TaskQuota([1]), "task_scores"),
    ],
    ids=repr,
)
def test_missing_signal(policy, missing):
    with pytest.raises(GradAlignError) as err:
        policy(table(**{missing: True}))
    msg = str(err.value)
    assert msg.startswith(f"{type(policy).__name__}: candidates.{missing} is None; ")
    assert f"{missing}=" in msg  # says how to provide it


def test_missing_signal_messages():
    with pytest.raises(GradAlignError) as err:
        AccGreedy(1)(table(accuracy=True))
    assert str(err.value) == (
        "AccGreedy: candidates.accuracy is None; build candidates with "
        "Candidates.from_rollouts(rollouts) (rewards outside [0, 1]: name a pass_threshold) or "
        "pass pass_rate=... or accuracy=..."
    )
    with pytest.raises(GradAlignError, match=r"^AccGreedy: candidates\.accuracy is None"):
        Chain(TopK(3), AccGreedy(1))(table(accuracy=True))


def test_drop_zero_variance_missing_both():
    c = table(reward_std=True, accuracy=True)
    with pytest.raises(
        GradAlignError, match=r"candidates\.zero_spread, reward_std and accuracy are all None"
    ):
        DropZeroVariance()(c)


@pytest.mark.parametrize(
    ("make", "text"),
    [
        (lambda: TopK(0), "TopK: k must be an int >= 1, got 0"),
        (lambda: TopK(2.0), "TopK: k must be an int >= 1, got 2.0"),
        (lambda: BottomK(True), "BottomK: k must be an int >= 1, got True"),
        (lambda: TopFraction(0.0), "TopFraction: fraction must be in (0, 1], got 0.0"),
        (lambda: TopFraction(1.5), "TopFraction: fraction must be in (0, 1], got 1.5"),
        (lambda: Threshold(math.nan), "Threshold: min_score must be a real number, not NaN"),
        (lambda: AccuracyBand(0.8, 0.2), "AccuracyBand: high must be >= low=0.8, got 0.2"),
        (lambda: AccuracyBand(k=0), "AccuracyBand: k must be an int >= 1 or None, got 0"),
        (
            lambda: Random(3, seed=-1),
            "Random: seed must be an int from 0 to 18446744073709551615, got -1",
        ),
        (lambda: Random(2, seed=2**70), "Random: seed must be an int from 0 to"),
        (lambda: Softmax(2, temperature=0), "Softmax: temperature must be finite and > 0, got 0"),
        (lambda: Softmax(2, temperature=math.inf), "Softmax: temperature must be finite and > 0"),
        (lambda: DiverseTopK(2, redundancy=-1), "DiverseTopK: redundancy must be finite and >= 0"),
        (lambda: EpsilonMix(TopK(1), 1.5), "EpsilonMix: epsilon must be in [0, 1], got 1.5"),
        (lambda: EpsilonMix("top", 0.1), "EpsilonMix: policy must be callable, got 'top'"),
        (lambda: Chain(), "Chain: needs one or more callable policies"),
        (lambda: TaskQuota([]), "TaskQuota: quotas must be ints >= 0 with sum > 0, got []"),
        (lambda: TaskQuota([-1, 2]), "TaskQuota: quotas must be ints >= 0 with sum > 0"),
        (lambda: TaskQuota([0, 0]), "TaskQuota: quotas must be ints >= 0 with sum > 0"),
        (lambda: TaskQuota([1.5]), "TaskQuota: quotas must be ints >= 0 with sum > 0"),
    ],
)
def test_bad_settings(make, text):
    with pytest.raises(GradAlignError) as err:
        make()
    assert str(err.value).startswith(text)


def test_repr_shows_settings():
    assert repr(TopK(3)) == "TopK(k=3)"
    assert repr(DropZeroVariance()) == "DropZeroVariance()"
    assert repr(Chain(TopK(3), Random(2, seed=1))) == "Chain(TopK(k=3), Random(k=2, seed=1))"
    assert repr(Softmax(2)) == "Softmax(k=2, temperature=1.0, seed=0)"


# ------------------------------------------------------------------------------------------------
# Candidates


def test_from_rollouts_non_contiguous_ids():
    ro = types.SimpleNamespace(
        group_ids=torch.tensor([7, 7, 3, 3, 10, 4, 4, 4]),
        rewards=torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5, 0.3, 0.3, 0.3]),
    )
    c = Candidates.from_rollouts(ro, scores=torch.tensor([0.1, 0.2, 0.3, 0.4]))
    assert ids(c.ids) == [3, 4, 7, 10]
    assert c.accuracy.tolist() == pytest.approx([1.0, 0.3, 0.5, 0.5])
    assert c.reward_std.tolist() == [0.0, 0.0, 0.5, 0.0]  # exact zeros: constant and single groups
    assert c.scores.tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert ids(DropZeroVariance()(c)) == [7]


def test_from_rollouts_rejects_bad_rewards():
    nan = torch.tensor([1.0, math.nan])
    ro = types.SimpleNamespace(group_ids=torch.tensor([1, 1]), rewards=nan)
    with pytest.raises(GradAlignError, match="from_rollouts: rewards must be NaN-free"):
        Candidates.from_rollouts(ro)
    ro = types.SimpleNamespace(group_ids=torch.tensor([1, 1]), rewards=torch.tensor([1.0]))
    with pytest.raises(GradAlignError, match="from_rollouts"):
        Candidates.from_rollouts(ro)


def test_candidates_dtypes_and_device():
    c = Candidates(
        ids=torch.tensor([3, 1], dtype=torch.int32),
        scores=torch.tensor([0.5, 1.0], dtype=torch.float64),
        accuracy=torch.tensor([1, 0]),
        zero_gradient=torch.tensor([True, False]),
        grads=torch.ones(2, 3, dtype=torch.bfloat16),
    )
    assert c.ids.dtype == torch.int64 and c.scores.dtype == torch.float32
    assert c.accuracy.dtype == torch.float32 and c.grads.dtype == torch.float32
    assert c.zero_gradient.dtype == torch.bool and len(c) == 2
    assert set(c.to_dict()) == {"ids", "scores", "accuracy", "zero_gradient", "grads"}


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        ({"ids": [1, 2]}, "ids must be a torch.Tensor"),
        ({"ids": torch.tensor([[1, 2]])}, "ids must be a 1-D integer tensor"),
        ({"ids": torch.tensor([1.0, 2.0])}, "ids must be a 1-D integer tensor"),
        ({"ids": torch.tensor([1, 2, 1])}, "ids must be unique, got [1]"),
        ({"scores": torch.zeros(3)}, "scores must have shape (G,) with G=2, got (3,)"),
        ({"scores": [0.1, 0.2]}, "scores must be a torch.Tensor"),
        ({"scores": torch.tensor([0.1, math.nan])}, "scores contains NaN in rows [1]"),
        ({"accuracy": torch.tensor([math.nan, 0.5])}, "accuracy contains NaN in rows [0]"),
        ({"scores": torch.tensor([True, False])}, "scores must be a real-valued tensor"),
        ({"zero_gradient": torch.tensor([0, 1])}, "zero_gradient must be a bool tensor"),
        ({"reward_std": torch.tensor([-0.1, 0.0])}, "reward_std must be >= 0"),
        ({"task_scores": torch.zeros(2)}, "task_scores must have shape (G, ...) 2-D"),
        ({"grads": torch.tensor([[math.inf], [0.0]])}, "grads must be finite"),
    ],
)
def test_candidates_validation(kwargs, text):
    with pytest.raises(GradAlignError) as err:
        Candidates(**{"ids": torch.tensor([1, 2]), **kwargs})
    assert str(err.value).startswith("Candidates: ") and text in str(err.value)


def test_subset_and_positions():
    c = table()
    sub = c.subset(torch.tensor([12, 40]))
    assert ids(sub.ids) == [12, 40]
    assert sub.scores.tolist() == pytest.approx([0.5, 0.3])
    assert torch.equal(sub.grads, c.grads[[5, 0]])
    assert ids(c.positions([5, 7])) == [3, 1]
    with pytest.raises(GradAlignError, match=r"ids \[8\] are not candidates"):
        c.subset([40, 8])
    assert len(empty().subset(torch.empty(0, dtype=torch.long))) == 0
    assert len(c.subset([])) == 0


def test_table_and_repr():
    c = big()
    text = c.table(max_rows=3)
    assert text.startswith("Candidates(G=50)") and text.endswith("... (47 more rows)")
    assert len(text.splitlines()) == 1 + 1 + 3 + 1
    assert repr(table()).startswith("Candidates(G=6, task_scores (6, 2), grads (6, 4))")


def test_pass_rate_counts_full_credit_and_pass_rate_policies_read_it() -> None:
    """Partial credit: group 0 gets 0.5 on every rollout (mean 0.5, never solved), group 1 solves
    half its rollouts (mean 0.5, pass rate 0.5). Their mean rewards tie; only the pass rate tells
    AccGreedy that group 1 sits at 0.5 and group 0 at 0."""
    from gradalign import Candidates, Rollouts
    from gradalign.policies import AccGreedy

    ro = Rollouts.from_token_ids(
        [[5]] * 4, [[9, 1]] * 4, [0.5, 0.5, 1.0, 0.0], [0, 0, 1, 1]
    )  # fmt: skip
    table = Candidates.from_rollouts(ro)
    assert table.accuracy.tolist() == [0.5, 0.5]
    assert table.pass_rate.tolist() == [0.0, 0.5]  # by hand: 0 of 2, 1 of 2 reach 1.0
    assert AccGreedy(1)(table).tolist() == [1]
    assert Candidates.from_rollouts(ro, pass_threshold=0.5).pass_rate.tolist() == [1.0, 0.5]
    # A table without pass_rate falls back to accuracy (the same for 0/1 rewards).
    assert AccGreedy(2)(Candidates(ids=table.ids, accuracy=table.accuracy)).tolist() == [0, 1]
    with pytest.raises(GradAlignError, match="pass_threshold must be a finite number or None"):
        Candidates.from_rollouts(ro, pass_threshold=float("nan"))
