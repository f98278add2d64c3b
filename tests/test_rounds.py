"""fill_round, Informative and Round; Curriculum.extra_chunk and its exact resume; Rollouts.concat,
Candidates.concat and scoring against reused Targets."""

from __future__ import annotations

import pytest
import torch

import gradalign as ga
from gradalign.alignment import Targets
from gradalign.policies import AccGreedy, Random, TopK


def _sampler(spread: set[int], log: list[list[int]] | None = None):  # type: ignore[no-untyped-def]
    """Two rollouts per problem; problems in ``spread`` get rewards (1, 0), the others (1, 1)."""

    def sample(ids: torch.Tensor) -> ga.Rollouts:
        ids_ = [int(i) for i in ids]
        if log is not None:
            log.append(ids_)
        rewards = [float(j == 0) if i in spread else 1.0 for i in ids_ for j in (0, 1)]
        return ga.Rollouts.from_token_ids(
            [[5, 6]] * (2 * len(ids_)),
            [[7, 1], [8, 1]] * len(ids_),
            rewards,
            [i for i in ids_ for _ in (0, 1)],
        )

    return sample


def test_draws_extra_chunks_until_k_are_informative() -> None:
    cur = ga.Curriculum(pool_size=20, chunk_size=4, seed=3)
    order = [c.tolist() for c in _chunks(20, 4, 3, 5)]
    # Exactly one informative problem in each of the first three chunks.
    spread = {order[0][0], order[1][1], order[2][2]}
    log: list[list[int]] = []
    rnd = ga.fill_round(
        cur,
        _sampler(spread, log),
        ga.Candidates.from_rollouts,
        AccGreedy(3),
        k=3,
        max_extra_chunks=5,
    )
    assert log == order[:3]  # stopped as soon as 3 passed
    assert sorted(rnd.ids.tolist()) == sorted(spread) and rnd.shortfall == 0
    assert rnd.num_chunks == 3 and rnd.num_rollouts == 24 and len(rnd.candidates) == 12
    assert sorted(rnd.informative.tolist()) == sorted(spread)
    assert cur.round == 0 and cur.chunks_per_round() == [3]
    assert [c.tolist() for c in cur.drawn_chunks(0)] == order[:3]
    train = rnd.training_rollouts()
    assert sorted(train.unique_groups.tolist()) == sorted(spread) and len(train) == 6
    # The next round continues after the extra chunks.
    assert cur.next_chunk().tolist() == order[3]


def _chunks(n: int, m: int, seed: int, count: int) -> list[torch.Tensor]:
    ref = ga.Curriculum(pool_size=n, chunk_size=m, seed=seed)
    return [ref.next_chunk() for _ in range(count)]


def test_the_limit_and_the_shortfall() -> None:
    cur = ga.Curriculum(pool_size=20, chunk_size=4, seed=0)
    order = [c.tolist() for c in _chunks(20, 4, 0, 3)]
    spread = {order[0][0]}
    rnd = ga.fill_round(
        cur,
        _sampler(spread),
        ga.Candidates.from_rollouts,
        Random(3, seed=1),
        k=3,
        max_extra_chunks=1,
    )
    assert rnd.num_chunks == 2 and rnd.shortfall == 2
    assert rnd.ids[0].item() == order[0][0]  # the informative one first, then the filled
    assert len(rnd.ids) == 3 and set(rnd.ids.tolist()) <= set(order[0] + order[1])
    # No extra chunk allowed: one chunk, filled from it.
    cur2 = ga.Curriculum(pool_size=20, chunk_size=4, seed=0)
    rnd2 = ga.fill_round(
        cur2,
        _sampler(set()),
        ga.Candidates.from_rollouts,
        Random(2, seed=1),
        k=2,
        max_extra_chunks=0,
    )
    assert rnd2.num_chunks == 1 and rnd2.shortfall == 2 and len(rnd2.informative) == 0


def test_a_wrapping_pool_never_samples_a_problem_twice_in_a_round() -> None:
    cur = ga.Curriculum(pool_size=5, chunk_size=3, seed=0)
    log: list[list[int]] = []
    rnd = ga.fill_round(
        cur,
        _sampler(set(), log),
        ga.Candidates.from_rollouts,
        AccGreedy(2),
        k=2,
        max_extra_chunks=4,
    )
    flat = [i for ids in log for i in ids]
    assert len(flat) == len(set(flat)) == 5  # the whole pool, each problem once
    assert len(rnd.candidates) == 5 and rnd.shortfall == 2


def test_curriculum_resumes_exactly_after_extra_chunks() -> None:
    cur = ga.Curriculum(pool_size=13, chunk_size=3, seed=7)
    for r in range(5):
        cur.next_chunk()
        for _ in range(r % 3):
            cur.extra_chunk()
        cur.record(cur.drawn_chunks(r)[0][:1])
    state = cur.state_dict()
    assert state["chunk_rounds"] == [0, 1, 1, 2, 2, 2, 3, 4, 4]
    twin = ga.Curriculum(pool_size=13, chunk_size=3, seed=7)
    twin.load_state_dict(state)
    assert [c.tolist() for c in twin.drawn_chunks()] == [c.tolist() for c in cur.drawn_chunks()]
    for _ in range(4):
        assert twin.next_chunk().tolist() == cur.next_chunk().tolist()
        assert twin.extra_chunk().tolist() == cur.extra_chunk().tolist()
    assert twin.state_dict() == cur.state_dict()


def test_extra_chunk_errors_and_format_1_states() -> None:
    cur = ga.Curriculum(pool_size=6, chunk_size=2)
    with pytest.raises(ga.GradAlignError, match="no round has started"):
        cur.extra_chunk()
    cur.next_chunk()
    cur.record([0])
    with pytest.raises(ga.GradAlignError, match="already recorded"):
        cur.extra_chunk()
    old = cur.state_dict()
    del old["chunk_rounds"]
    old["format"] = 1  # a state saved before extra chunks existed: one chunk per round
    twin = ga.Curriculum(pool_size=6, chunk_size=2)
    twin.load_state_dict(old)
    assert (
        twin.chunks_per_round() == [1] and twin.next_chunk().tolist() == cur.next_chunk().tolist()
    )
    bad = cur.state_dict() | {"chunk_rounds": [0, 0, 1]}  # one chunk more than the position drew
    with pytest.raises(ga.GradAlignError, match="do not fit"):
        ga.Curriculum(pool_size=6, chunk_size=2).load_state_dict(bad)
    with pytest.raises(ga.GradAlignError, match="chunk_rounds must list"):
        ga.Curriculum(pool_size=6, chunk_size=2).load_state_dict(
            cur.state_dict() | {"chunk_rounds": [1, 0]}
        )


def test_fill_round_checks_what_the_callables_return() -> None:
    def wrong_ids(ids: torch.Tensor) -> ga.Rollouts:
        return _sampler(set())(ids + 100)

    with pytest.raises(ga.GradAlignError, match="one group per requested problem"):
        ga.fill_round(
            ga.Curriculum(8, 2), wrong_ids, ga.Candidates.from_rollouts, AccGreedy(1), k=1
        )
    with pytest.raises(ga.GradAlignError, match="must return Candidates"):
        ga.fill_round(ga.Curriculum(8, 2), _sampler(set()), lambda ro: ro, AccGreedy(1), k=1)  # type: ignore[arg-type,return-value]
    with pytest.raises(ga.GradAlignError, match="distinct candidate ids"):
        ga.fill_round(
            ga.Curriculum(8, 2), _sampler(set()), ga.Candidates.from_rollouts, lambda c: [99], k=1
        )
    with pytest.raises(ga.GradAlignError, match="k must be an int >= 1"):
        ga.fill_round(
            ga.Curriculum(8, 2), _sampler(set()), ga.Candidates.from_rollouts, AccGreedy(1), k=0
        )
    with pytest.raises(
        ga.GradAlignError, match=r"Informative: min_score=0\.0 needs candidates\.scores"
    ):
        ga.fill_round(
            ga.Curriculum(8, 2),
            _sampler({0}),
            ga.Candidates.from_rollouts,
            AccGreedy(1),
            k=1,
            rule=ga.Informative(min_score=0.0),
        )
    with pytest.raises(ga.GradAlignError, match="min_score must be a number"):
        ga.Informative(min_score=float("nan"))


def test_gradalign_round_against_reused_targets(qwen: torch.nn.Module) -> None:
    """Chunks scored one by one against Targets computed once score exactly as the union at once."""
    val = ga.Rollouts.from_token_ids(
        [[5, 6]] * 4, [[7, 1], [9, 1], [8, 1], [8, 2]], [1.0, 0.0, 0.0, 1.0], [900, 900, 901, 901]
    )
    selector = ga.GradAlign(ga.FactorizedGradient(4, 4), policy=TopK(3))
    targets = selector.targets(qwen, val)
    assert isinstance(targets, Targets) and targets.directions.shape[0] == 1
    cur = ga.Curriculum(pool_size=12, chunk_size=4, seed=1)
    sample = _sampler(set(range(0, 12, 2)))
    rnd = ga.fill_round(
        cur,
        sample,
        lambda ro: selector.score(qwen, ro, targets),
        TopK(3),
        k=3,
        rule=ga.Informative(min_score=0.0),
        max_extra_chunks=2,
    )
    whole = selector.score(qwen, rnd.rollouts, val)  # one pass, targets recomputed
    table = rnd.candidates.subset(whole.ids)
    assert torch.allclose(table.scores, whole.scores, atol=1e-5)
    passing = whole.ids[(whole.scores > 0) & ~whole.zero_spread]
    assert sorted(rnd.informative.tolist()) == sorted(passing.tolist())
    assert rnd.selection.scores is not None and (rnd.selection.scores[: len(passing)] > 0).all()
    with pytest.raises(ga.GradAlignError, match="Targets has 1 directions but 2 labels"):
        selector.score(qwen, rnd.rollouts, Targets(targets.directions, (0, 1)))


def test_rollouts_concat() -> None:
    a = ga.Rollouts.from_token_ids([[5], [5]], [[7], [8, 9]], [1.0, 0.0], [0, 0])
    b = ga.Rollouts.from_token_ids([[6, 6, 6]], [[7, 7]], [0.5], [3])
    both = ga.Rollouts.concat([a, b])
    assert both.input_ids.shape == (3, 5) and both.group_ids.tolist() == [0, 0, 3]
    for part, rows in ((a, slice(0, 2)), (b, slice(2, 3))):
        w = part.input_ids.shape[1]
        assert torch.equal(both.input_ids[rows, :w], part.input_ids)
        assert torch.equal(both.response_mask[rows, :w], part.response_mask)
        assert not both.attention_mask[rows, w:].any()
    assert torch.equal(both.rewards, torch.tensor([1.0, 0.0, 0.5]))
    with pytest.raises(ga.GradAlignError, match="appear in part 1"):
        ga.Rollouts.concat([a, a])
    with pytest.raises(ga.GradAlignError, match="non-empty list"):
        ga.Rollouts.concat([])
    lp = ga.Rollouts(
        b.input_ids,
        b.attention_mask,
        b.response_mask,
        b.rewards,
        b.group_ids,
        old_logprobs=torch.zeros(b.input_ids.shape),
    )
    with pytest.raises(ga.GradAlignError, match="old_logprobs is set on parts"):
        ga.Rollouts.concat([a, lp])


def test_candidates_concat() -> None:
    a = ga.Candidates(
        ids=torch.tensor([1, 2]), scores=torch.tensor([0.1, 0.2]), grads=torch.ones(2, 3)
    )
    b = ga.Candidates(ids=torch.tensor([5]), scores=torch.tensor([0.3]))
    both = ga.Candidates.concat([a, b])
    assert both.ids.tolist() == [1, 2, 5] and both.grads is None
    assert torch.equal(both.scores, torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ga.GradAlignError, match="ids must be unique"):
        ga.Candidates.concat([a, a])
