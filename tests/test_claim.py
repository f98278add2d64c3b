"""The method's claim, guarded on a tiny model: GradAlign keeps corrupted problems out.

A tiny Qwen2 is briefly trained to copy a digit (``"k7=" -> "7"``), so that its rollouts are right
about half the time and a clean group's GRPO gradient points towards "copy the digit". Half of the
pool's problems then get Bernoulli(0.5) rewards, independent of the rollout, as in the paper's
unreliable-reward regime. Averaged over seeds, GradAlign's top 25% must hold far fewer corrupted
problems than Random's and AccGreedy's, and its cosine score must separate clean from corrupted
problems (AUROC). The same harness with the advantages' sign flipped, the target flipped or the
scores shuffled must fail the claim: the tests below check that they do.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

import gradalign as ga
from gradalign.demo.report import auroc, corrupted_share
from gradalign.testing import tiny_model, tiny_tokenizer

SEEDS = (0, 1, 2, 3, 4)
POOL, VAL, K, TOP = 32, 8, 16, 8  # problems, validation problems, rollouts, selected (25%)
# The stated claim, averaged over the seeds. Shares are of the 8 selected problems: GradAlign must
# select at least 0.25 (two problems) fewer corrupted ones than each baseline and at most 0.20, and
# its AUROC must reach 0.70 (chance is 0.5). Measured when written: GradAlign 0.075, Random 0.625,
# AccGreedy 0.425, AUROC 0.75; with the advantages or the target flipped, AUROC 0.25.
MARGIN, AUROC_FLOOR, SHARE_CEILING = 0.25, 0.70, 0.20


@dataclass(frozen=True)
class Claim:
    """Mean over seeds of the corrupted share of each method's selection, and the cosine AUROC."""

    gradalign: float
    random: float
    accgreedy: float
    auroc: float

    def holds(self) -> bool:
        return (
            self.gradalign <= self.random - MARGIN
            and self.gradalign <= self.accgreedy - MARGIN
            and self.gradalign <= SHARE_CEILING
            and self.auroc >= AUROC_FLOOR
        )


@pytest.fixture(scope="module")
def copier() -> tuple[nn.Module, list[int]]:
    """The tiny model after 20 seeded Adam steps on the copy task, and the digits' token ids."""
    tok = tiny_tokenizer()
    model = tiny_model("qwen2", seed=0)
    digits = [tok.convert_tokens_to_ids(d) for d in string.digits]
    rng = random.Random(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(20):  # about 55% right: most groups mix right and wrong rollouts
        batch = [
            f"{rng.choice(string.ascii_lowercase)}{rng.choice(string.digits)}=" for _ in range(64)
        ]
        ids = torch.tensor([tok(p).input_ids for p in batch])  # (64, 3)
        target = torch.tensor([digits[int(p[1])] for p in batch])
        loss = nn.functional.cross_entropy(model(input_ids=ids).logits[:, -1], target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), digits


def _problems(n: int, rng: random.Random, exclude: set[str]) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    while len(out) < n:
        prompt = f"{rng.choice(string.ascii_lowercase)}{rng.choice(string.digits)}="
        if prompt not in exclude:
            exclude.add(prompt)
            out.append((prompt, int(prompt[1])))
    return out


def _rollouts(
    model: nn.Module, digits: list[int], problems: list[tuple[str, int]], seed: int, start: int
) -> ga.Rollouts:
    """K one-token rollouts per problem at temperature 1; reward 1 for the right digit."""
    tok = tiny_tokenizer()
    prompts = torch.tensor([tok(p).input_ids for p, _ in problems])  # (P, 3)
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=prompts).logits[:, -1].float(), -1)  # (P, V)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.multinomial(probs, K, replacement=True, generator=gen)  # (P, K)
    rewards = (tokens == torch.tensor([digits[a] for _, a in problems])[:, None]).float()
    return ga.Rollouts.from_token_ids(
        [p for p in prompts.tolist() for _ in range(K)],
        [[t] for t in tokens.flatten().tolist()],
        rewards.flatten(),
        [start + i for i in range(len(problems)) for _ in range(K)],
    )


@dataclass(frozen=True)
class _Round:
    candidates: ga.Rollouts  # corrupted rewards
    validation: ga.Rollouts
    clean: np.ndarray  # (POOL,) True for problems with verified rewards, by id


def _round(copier: tuple[nn.Module, list[int]], seed: int) -> _Round:
    model, digits = copier
    rng = random.Random(seed)
    seen: set[str] = set()
    pool, val = _problems(POOL, rng, seen), _problems(VAL, rng, seen)
    cands = _rollouts(model, digits, pool, seed=2 * seed, start=0)
    valid = _rollouts(model, digits, val, seed=2 * seed + 1, start=POOL)
    bad = set(rng.sample(range(POOL), POOL // 2))
    coin = torch.tensor([float(rng.random() < 0.5) for _ in range(len(cands))])
    corrupt = torch.tensor([g in bad for g in cands.group_ids.tolist()])
    cands = ga.Rollouts(
        input_ids=cands.input_ids,
        attention_mask=cands.attention_mask,
        response_mask=cands.response_mask,
        rewards=torch.where(corrupt, coin, cands.rewards),
        group_ids=cands.group_ids,
    )
    return _Round(cands, valid, np.array([i not in bad for i in range(POOL)]))


Sabotage = Callable[[_Round, torch.Tensor], torch.Tensor]


def _claim(
    copier: tuple[nn.Module, list[int]],
    *,
    flip_advantages: bool = False,
    sabotage: Sabotage | None = None,
) -> Claim:
    shares: dict[str, list[float]] = {"GradAlign": [], "Random": [], "AccGreedy": []}
    aurocs = []
    for seed in SEEDS:
        r = _round(copier, seed)
        cands = r.candidates
        if flip_advantages:  # 1 - r negates every group-centred advantage
            cands = ga.Rollouts(
                input_ids=cands.input_ids,
                attention_mask=cands.attention_mask,
                response_mask=cands.response_mask,
                rewards=1.0 - cands.rewards,
                group_ids=cands.group_ids,
            )
        al = ga.GradAlign(ga.FullGradient(batch_size=64)).alignment(copier[0], cands, r.validation)
        scores = al.cosine if sabotage is None else sabotage(r, al.cosine)
        table = ga.Candidates.from_rollouts(r.candidates, scores=scores)
        bad = {i for i in range(POOL) if not r.clean[i]}
        picks = {
            "GradAlign": ga.policies.TopK(TOP)(table),
            "Random": ga.policies.Random(TOP, seed=seed)(table),
            "AccGreedy": ga.policies.AccGreedy(TOP)(table),
        }
        for name, ids in picks.items():
            shares[name].append(corrupted_share(ids.tolist(), bad))
        aurocs.append(auroc(scores.numpy(), r.clean[al.ids.numpy()]))
    mean = {name: float(np.mean(v)) for name, v in shares.items()}
    return Claim(mean["GradAlign"], mean["Random"], mean["AccGreedy"], float(np.mean(aurocs)))


def test_copier_has_intermediate_accuracy(copier: tuple[nn.Module, list[int]]) -> None:
    """The claim needs clean groups with reward spread: pass rates well inside (0, 1)."""
    r = _round(copier, 0)
    acc = r.validation.rewards.mean().item()
    assert 0.2 < acc < 0.8
    spread = r.candidates.group_reward_spread()[torch.from_numpy(r.clean)]
    assert (spread > 0).float().mean() >= 0.75


def test_gradalign_beats_random_and_accgreedy(copier: tuple[nn.Module, list[int]]) -> None:
    claim = _claim(copier)
    assert claim.holds(), claim


def test_claim_fails_with_flipped_advantages(copier: tuple[nn.Module, list[int]]) -> None:
    claim = _claim(copier, flip_advantages=True)
    assert not claim.holds(), claim
    assert claim.auroc < 0.5


def test_claim_fails_with_flipped_target(copier: tuple[nn.Module, list[int]]) -> None:
    claim = _claim(copier, sabotage=lambda r, s: -s)
    assert not claim.holds(), claim
    assert claim.auroc < 0.5


def test_claim_fails_with_shuffled_scores(copier: tuple[nn.Module, list[int]]) -> None:
    gen = torch.Generator().manual_seed(0)
    claim = _claim(copier, sabotage=lambda r, s: s[torch.randperm(len(s), generator=gen)])
    assert not claim.holds(), claim
