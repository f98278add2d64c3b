"""Every user mistake is a GradAlignError that names the call, the rule and the value received.

One case per mistake found by fault injection; each raised another exception type, or was
accepted and gave a wrong result, before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import gradalign as ga
from gradalign.testing import tiny_tokenizer
from tests.helpers import make_rollouts

GROUPS, REWARDS = [0, 0, 1, 1], [1.0, 0.0, 0.0, 1.0]


@pytest.fixture(scope="module")
def ro(qwen: nn.Module) -> ga.Rollouts:
    return make_rollouts(vocab=qwen.config.vocab_size, groups=GROUPS, rewards=REWARDS)


@pytest.fixture(scope="module")
def val(qwen: nn.Module) -> ga.Rollouts:
    return make_rollouts(vocab=qwen.config.vocab_size, groups=[5, 5, 6, 6], rewards=REWARDS, seed=1)


def _replace(ro: ga.Rollouts, **kw: Any) -> ga.Rollouts:
    fields = {
        "input_ids": ro.input_ids,
        "attention_mask": ro.attention_mask,
        "response_mask": ro.response_mask,
        "rewards": ro.rewards,
        "group_ids": ro.group_ids,
    }
    return ga.Rollouts(**{**fields, **kw})


Case = Callable[[nn.Module, ga.Rollouts, ga.Rollouts], object]
CASES: dict[str, tuple[Case, str]] = {
    "attention mask value 2": (
        lambda m, r, v: _replace(r, attention_mask=r.attention_mask * 2),
        r"Rollouts: attention_mask must be 0/1 or bool, got values \[0, 2\]",
    ),
    "response mask value 2": (
        lambda m, r, v: _replace(r, response_mask=r.response_mask.long() * 2),
        r"Rollouts: response_mask must be 0/1 or bool",
    ),
    "complex rewards": (
        lambda m, r, v: _replace(r, rewards=torch.tensor([1 + 1j, 0, 0, 1])),
        r"Rollouts: rewards must be real, got complex",
    ),
    "NaN old_logprobs": (
        lambda m, r, v: _replace(r, old_logprobs=torch.full(r.input_ids.shape, float("nan"))),
        r"Rollouts: old_logprobs must be finite at response tokens, got nan at row 0",
    ),
    "-inf ref_logprobs": (
        lambda m, r, v: _replace(r, ref_logprobs=torch.full(r.input_ids.shape, -float("inf"))),
        r"Rollouts: ref_logprobs must be finite at response tokens, got -inf",
    ),
    "negative token id": (
        lambda m, r, v: _replace(r, input_ids=r.input_ids - 50),
        r"Rollouts: input_ids must be token ids >= 0, got -\d+ in row 0",
    ),
    "token id beyond the vocabulary": (
        lambda m, r, v: ga.FullGradient().per_group(m, _replace(r, input_ids=r.input_ids + 500)),
        r"FullGradient.per_group: input_ids hold token id \d+ \(row 0\) but the model's vocabulary "
        r"has 104 entries",
    ),
    "token id beyond the vocabulary, factorized": (
        lambda m, r, v: ga.FactorizedGradient().per_group(
            m, _replace(r, input_ids=r.input_ids + 500)
        ),
        r"FactorizedGradient.per_group: input_ids hold token id",
    ),
    "float ids in select_groups": (
        lambda m, r, v: r.select_groups(torch.tensor([0.7])),
        r"Rollouts.select_groups: ids must be integers, got torch.float32",
    ),
    "a string as prompts": (
        lambda m, r, v: ga.Rollouts.from_texts(
            tiny_tokenizer(), "ab", ["x", "y"], [1.0, 0.0], [0, 0]
        ),
        r"Rollouts.from_texts: prompts must be a sequence with one entry per rollout, got str 'ab'",
    ),
    "a non-string completion": (
        lambda m, r, v: ga.Rollouts.from_texts(
            tiny_tokenizer(), ["a", "b"], ["x", 5], [1.0, 0.0], [0, 0]
        ),
        r"Rollouts.from_texts: completions must be strings, got int at index 1",
    ),
    "eps as a string": (
        lambda m, r, v: ga.GRPOObjective(eps="1"),  # type: ignore[arg-type]
        r"GRPOObjective: eps must be a real number, got str '1'",
    ),
    "target_modules=5": (
        lambda m, r, v: ga.FullGradient(target_modules=5),  # type: ignore[arg-type]
        r"FullGradient: target_modules must be None, a string or a non-empty list of strings, got 5",
    ),
    "dim=True": (
        lambda m, r, v: ga.RandomProjectedGradient(dim=True),
        r"RandomProjectedGradient: dim must be an int >= 1, got True",
    ),
    "dim_in=True": (
        lambda m, r, v: ga.FactorizedGradient(dim_in=True),
        r"FactorizedGradient: dim_in must be an int >= 1 or None, got True",
    ),
    "seed beyond 64 bits": (
        lambda m, r, v: ga.policies.Random(2, seed=2**70),
        r"Random: seed must be an int from 0 to 18446744073709551615, got 1180591620717411303424",
    ),
    "a policy called with a list": (
        lambda m, r, v: ga.policies.TopK(1)([1, 2]),  # type: ignore[arg-type]
        r"TopK: candidates must be a gradalign.Candidates .* got list",
    ),
    "AccGreedy without k": (
        lambda m, r, v: ga.policies.AccGreedy(),
        r"AccGreedy: k \(how many candidates to select\) is required",
    ),
    "tasks as a list": (
        lambda m, r, v: ga.GradAlign().select(m, r, v, tasks=[1, 2]),  # type: ignore[arg-type]
        r"GradAlign.targets: tasks must map each validation group id to a task label \(a dict\), "
        r"got list",
    ),
    "a task label without validation groups": (
        lambda m, r, v: ga.GradAlign().select(m, r, v, tasks={5: "a", 6: "a", 9: "b"}),
        r"GradAlign.targets: tasks labels \['b'\] have no validation group",
    ),
    "a policy returning None": (
        lambda m, r, v: ga.GradAlign(policy=lambda c: None).select(m, r, v),  # type: ignore[arg-type,return-value]
        r"GradAlign.apply_policy: the policy <lambda> must return a 1-D sequence of integer "
        r"candidate ids, got NoneType",
    ),
    "a policy returning float ids": (
        lambda m, r, v: ga.GradAlign(policy=lambda c: torch.tensor([0.5])).select(m, r, v),
        r"must return a 1-D sequence of integer candidate ids, got Tensor torch.float32",
    ),
    "a policy returning unknown ids": (
        lambda m, r, v: ga.GradAlign(policy=lambda c: torch.tensor([0, 7])).select(m, r, v),
        r"returned ids that are not candidates: \[7\]",
    ),
    "a policy returning an id twice": (
        lambda m, r, v: ga.GradAlign(policy=lambda c: torch.tensor([1, 1])).select(m, r, v),
        r"returned an id twice: \[1, 1\]",
    ),
    "records=5 in a curriculum state": (
        lambda m, r, v: ga.Curriculum(pool_size=4, chunk_size=2).load_state_dict(
            {**ga.Curriculum(pool_size=4, chunk_size=2).state_dict(), "records": 5}
        ),
        r"Curriculum.load_state_dict: records must be a list of round records, got int",
    ),
    "inf scores": (
        lambda m, r, v: ga.Candidates(
            ids=torch.tensor([0, 1]), scores=torch.tensor([float("inf"), 0.0])
        ),
        r"Candidates: scores must be finite, got inf",
    ),
    "accuracy above 1": (
        lambda m, r, v: ga.Candidates(ids=torch.tensor([0, 1]), accuracy=torch.tensor([1.5, 0.0])),
        r"Candidates: accuracy must lie in \[0, 1\], got \[1.5\]",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_mistake_is_a_clear_error(
    qwen: nn.Module, ro: ga.Rollouts, val: ga.Rollouts, name: str
) -> None:
    make, match = CASES[name]
    with pytest.raises(ga.GradAlignError, match=match):
        make(qwen, ro, val)


def test_shared_candidate_and_validation_ids_warn(qwen: nn.Module, ro: ga.Rollouts) -> None:
    with pytest.warns(UserWarning, match=r"group ids \[0, 1\] are both candidates and validation"):
        ga.GradAlign().select(qwen, ro, ro)


def test_rewards_outside_unit_interval_leave_accuracy_unset(ro: ga.Rollouts) -> None:
    """A reward model's scores are not a pass rate: accuracy stays None, spreads stay."""
    table = ga.Candidates.from_rollouts(_replace(ro, rewards=ro.rewards * 4.0 - 1.0))
    assert table.accuracy is None
    assert table.reward_std is not None and table.reward_std.tolist() == [2.0, 2.0]
    with pytest.raises(ga.GradAlignError, match=r"AccGreedy: candidates.accuracy is None"):
        ga.policies.AccGreedy(1)(table)
    shifted = _replace(ro, rewards=ro.rewards * 4.0 - 1.0)
    named = ga.Candidates.from_rollouts(shifted, pass_threshold=3.0)
    assert named.accuracy is None and named.pass_rate is not None
    assert ga.policies.AccGreedy(1)(named).numel() == 1
