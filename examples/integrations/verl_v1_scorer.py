"""The scorer a verl 0.9 v1 trainer calls through GradAlignReplayBuffer.

Config (the v1 trainer, sync mode)::

    trainer.v1.sampler.custom_sampler.path=pkg://gradalign.integrations.verl_v1
    trainer.v1.sampler.custom_sampler.name=GradAlignReplayBuffer
    +trainer.v1.sampler.sampler_kwargs.scorer=examples.integrations.verl_v1_scorer:score_groups
    +trainer.v1.sampler.sampler_kwargs.select_fraction=0.5

The buffer runs on the driver, without the model: ``score_groups`` reads the finished groups'
token ids and rewards from TransferQueue and has them scored where the policy lives. Here the
policy is a module-level model (set ``POLICY`` and ``VALIDATION`` in your driver); in a real run
send the rollouts to an actor worker (a Ray actor method that runs ``GradAlign.score``) instead.
"""

from collections import defaultdict
from collections.abc import Mapping

import torch
import transfer_queue as tq

import gradalign as ga

POLICY: torch.nn.Module | None = None  # the current policy (or a handle to the worker holding it)
VALIDATION: ga.Rollouts | None = None  # trusted validation rollouts, group ids < 0
SELECTOR = ga.GradAlign(ga.FactorizedGradient(16, 16))


def score_groups(
    partition_id: str, uids: list[str], trajectories: Mapping[str, dict]
) -> dict[str, float]:
    """``{uid: GradAlign cosine}`` for the finished groups ``uids`` (keys ``{uid}_{session}_{i}``)."""
    keys = [key for key in trajectories if key.split("_")[0] in set(uids)]
    data = tq.kv_batch_get(
        keys=keys, partition_id=partition_id, select_fields=["prompts", "responses", "rm_scores"]
    )
    group_of = {uid: g for g, uid in enumerate(uids)}
    prompts, responses, rewards, groups = [], [], [], []
    for key, p, r, s in zip(
        keys, data["prompts"], data["responses"], data["rm_scores"], strict=True
    ):
        prompts.append([int(t) for t in p])
        responses.append([int(t) for t in r])
        rewards.append(float(s.sum()))
        groups.append(group_of[key.split("_")[0]])
    candidates = ga.Rollouts.from_token_ids(prompts, responses, rewards, groups)
    assert POLICY is not None and VALIDATION is not None, "set POLICY and VALIDATION in the driver"
    table = SELECTOR.score(POLICY, candidates, VALIDATION)
    scores = defaultdict(float, zip(table.ids.tolist(), table.scores.tolist(), strict=True))
    return {uid: scores[group_of[uid]] for uid in uids}
