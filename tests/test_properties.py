"""Property-based tests: invariants that must hold for any sizes, seeds and layouts.

Each property is checked on inputs hypothesis draws, including the corner cases it shrinks to.
"""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import gradalign as ga
from gradalign.curriculum import SelectionSampler
from gradalign.projection import KINDS, project
from tests.helpers import left_pad, make_rollouts

FAST = settings(max_examples=40, deadline=None)
MODEL = settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


# --- gradients: padding side and micro-batch size ------------------------------------------------


@st.composite
def _rollout_specs(draw: st.DrawFn) -> tuple[list[int], list[float], int, bool]:
    sizes = draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
    groups = [g for g, n in enumerate(sizes) for _ in range(n)]
    rewards = [float(draw(st.integers(0, 1))) for _ in groups]
    return groups, rewards, draw(st.integers(0, 2**16)), draw(st.booleans())


@MODEL
@given(
    spec=_rollout_specs(),
    batch_size=st.integers(1, 8),
    extra=st.integers(0, 3),
    share=st.booleans(),
)
def test_padding_and_batch_size_never_change_a_gradient(
    qwen: nn.Module,
    spec: tuple[list[int], list[float], int, bool],
    batch_size: int,
    extra: int,
    share: bool,
) -> None:
    groups, rewards, seed, shared = spec
    ro = make_rollouts(
        vocab=qwen.config.vocab_size,
        groups=groups,
        rewards=rewards,
        seed=seed,
        group_prompts=shared,
    )
    ref = ga.FactorizedGradient(None, None, batch_size=64).per_group(qwen, ro).grads
    ext = ga.FactorizedGradient(None, None, batch_size=batch_size, share_prompts=share)
    got = ext.per_group(qwen, left_pad(ro, extra=extra)).grads
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    full = ga.FullGradient(target_modules=["lm_head"], batch_size=batch_size)
    torch.testing.assert_close(
        full.per_group(qwen, left_pad(ro, extra=extra)).grads,
        ga.FullGradient(target_modules=["lm_head"]).per_group(qwen, ro).grads,
        rtol=1e-4,
        atol=1e-6,
    )


# --- projections ---------------------------------------------------------------------------------


@FAST
@given(
    kind=st.sampled_from(KINDS),
    n=st.integers(1, 300),
    dim=st.integers(1, 40),
    seed=st.integers(0, 2**32),
    data=st.data(),
)
def test_projection_of_a_slice_is_the_same_slice_of_the_whole(
    kind: str, n: int, dim: int, seed: int, data: st.DataObject
) -> None:
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(seed))
    whole = project(x, kind=kind, dim=dim, seed=seed, name="w")
    cut = data.draw(st.integers(0, n))
    block = data.draw(st.integers(1, 64))
    parts = project(x[:, :cut], kind=kind, dim=dim, seed=seed, name="w", block_size=block)
    parts = parts + project(
        x[:, cut:], kind=kind, dim=dim, seed=seed, name="w", offset=cut, block_size=block
    )
    torch.testing.assert_close(parts, whole, rtol=1e-4, atol=1e-4)


# --- curriculum ----------------------------------------------------------------------------------


@FAST
@given(
    pool=st.integers(1, 40),
    chunk=st.integers(1, 15),
    seed=st.integers(0, 1000),
    passes=st.integers(1, 3),
)
def test_curriculum_covers_the_pool_once_per_pass(
    pool: int, chunk: int, seed: int, passes: int
) -> None:
    cur = ga.Curriculum(pool_size=pool, chunk_size=chunk, seed=seed)
    per_pass = math.ceil(pool / chunk)
    for _ in range(passes):
        seen = torch.cat([cur.next_chunk() for _ in range(per_pass)])
        assert sorted(seen.tolist()) == list(range(pool))


@FAST
@given(
    pool=st.integers(1, 30),
    chunk=st.integers(1, 10),
    seed=st.integers(0, 1000),
    rounds=st.integers(0, 12),
    more=st.integers(1, 8),
    data=st.data(),
)
def test_curriculum_resumes_exactly_from_any_state(
    pool: int, chunk: int, seed: int, rounds: int, more: int, data: st.DataObject
) -> None:
    cur = ga.Curriculum(pool_size=pool, chunk_size=chunk, seed=seed)
    for _ in range(rounds):
        ids = cur.next_chunk()
        keep = data.draw(st.integers(1, len(ids)))
        cur.record(ids[:keep])
    resumed = ga.Curriculum(pool_size=pool, chunk_size=chunk, seed=seed)
    resumed.load_state_dict(cur.state_dict())
    for _ in range(more):
        a, b = cur.next_chunk(), resumed.next_chunk()
        assert a.tolist() == b.tolist()
        cur.record(a[:1])
        resumed.record(b[:1])
    assert cur.state_dict() == resumed.state_dict()
    assert cur.times_selected().tolist() == resumed.times_selected().tolist()


@FAST
@given(
    k=st.integers(1, 20),
    generations=st.integers(1, 4),
    replicas=st.integers(1, 4),
    repeat=st.integers(1, 3),
    batch=st.one_of(st.none(), st.integers(1, 8)),
    shuffle=st.booleans(),
    seed=st.integers(0, 100),
)
def test_selection_sampler_layout(
    k: int,
    generations: int,
    replicas: int,
    repeat: int,
    batch: int | None,
    shuffle: bool,
    seed: int,
) -> None:
    cur = ga.Curriculum(pool_size=40, chunk_size=40, seed=seed)
    selected = cur.next_chunk()[:k]
    cur.record(selected)
    served: list[list[int]] = []
    for rank in range(replicas):
        sampler = SelectionSampler(
            cur,
            num_generations=generations,
            num_replicas=replicas,
            rank=rank,
            repeat_count=repeat,
            batch_size=batch,
            shuffle=shuffle,
            seed=seed,
        )
        out = list(sampler)
        assert len(out) == len(sampler)
        # each problem comes num_generations times in a row
        runs = [out[i : i + generations] for i in range(0, len(out), generations)]
        assert all(len(set(run)) == 1 and len(run) == generations for run in runs)
        served.append([run[0] for run in runs])
    per_rank = math.ceil(k / replicas)
    blocks = 1 if batch is None else math.ceil(per_rank / batch)
    block = per_rank if batch is None else batch
    assert all(len(s) == blocks * block * repeat for s in served)
    # every rank's problems are selected ones, and all ranks together cover the selection
    assert set().union(*map(set, served)) == set(selected.tolist())


# --- policies ------------------------------------------------------------------------------------


@st.composite
def _candidates(draw: st.DrawFn) -> ga.Candidates:
    g = draw(st.integers(0, 25))
    ids = draw(st.lists(st.integers(-50, 500), min_size=g, max_size=g, unique=True))
    real = st.floats(-5, 5, allow_nan=False)
    scores = torch.tensor(draw(st.lists(real, min_size=g, max_size=g)), dtype=torch.float32)
    acc = torch.tensor(draw(st.lists(st.floats(0, 1), min_size=g, max_size=g)))
    return ga.Candidates(
        ids=torch.tensor(ids, dtype=torch.long),
        scores=scores,
        accuracy=acc.float(),
        reward_std=(acc * (1 - acc)).sqrt().float(),
        grads=torch.randn(g, 3, generator=torch.Generator().manual_seed(g)),
    )


_POLICIES = [
    lambda k: ga.policies.TopK(k),
    lambda k: ga.policies.BottomK(k),
    lambda k: ga.policies.AccGreedy(k),
    lambda k: ga.policies.Learnability(k),
    lambda k: ga.policies.SimAcc(k),
    lambda k: ga.policies.LearnAlign(k),
    lambda k: ga.policies.Random(k, seed=k),
    lambda k: ga.policies.Softmax(k, temperature=0.5, seed=k),
    lambda k: ga.policies.AccuracyBand(0.2, 0.8, k, seed=k),
    lambda k: ga.policies.DiverseTopK(k, redundancy=0.5),
    lambda k: ga.policies.EpsilonMix(ga.policies.TopK(k), 0.3, seed=k),
    lambda k: ga.policies.Chain(ga.policies.DropZeroVariance(), ga.policies.TopK(k)),
]


@settings(max_examples=60, deadline=None)
@given(c=_candidates(), k=st.integers(1, 30), which=st.integers(0, len(_POLICIES) - 1))
def test_policies_return_unique_pool_ids_at_most_k(c: ga.Candidates, k: int, which: int) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # k larger than the pool is announced
        out = _POLICIES[which](k)(c)
    assert out.dtype == torch.long and out.dim() == 1
    assert len(out) <= k
    assert len(set(out.tolist())) == len(out)
    assert set(out.tolist()) <= set(c.ids.tolist())
