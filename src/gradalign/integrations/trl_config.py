"""The pure part of the TRL integration: a ``GRPOConfig``'s loss as a GRPOObjective.

Nothing here imports TRL: the mapping works on any object with ``GRPOConfig``'s fields, so it can be
used (and tested) without the framework. [`gradalign.integrations.trl`][gradalign.integrations.trl] holds the trainer.

Implementations: [`objective_from_config`][gradalign.integrations.trl_config.objective_from_config] and the table `LOSS_AGGREGATION_OF`.
"""

from __future__ import annotations

import numbers
from typing import Any, cast

from gradalign.errors import GradAlignError
from gradalign.objective import REWARD_SCALINGS, GRPOObjective, LossAgg, ScaleRewards

__all__ = ["LOSS_AGGREGATION_OF", "objective_from_config"]

# At ratio 1 (on-policy scoring) every TRL loss has the gradient -A * grad log pi per token (sapo's
# soft gate and vespo's gamma weight both equal 1 there, with slope 1); they differ only in how
# token terms are averaged, which is what loss_agg says.
LOSS_AGGREGATION_OF: dict[str, str] = {
    "grpo": "seq-mean-token-mean",
    "sapo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dapo": "token-mean",
    "cispo": "token-mean",
    "vespo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "luspo": "seq-mean-token-sum",
}
"""TRL ``loss_type`` -> `GRPOObjective.loss_agg`."""

# TRL normalises advantages with std + 1e-4 (std unbiased, as in GRPOObjective).
_TRL_STD_EPS = 1e-4


def objective_from_config(args: Any, *, include_kl: bool = False) -> GRPOObjective:
    """The GRPO objective that a ``trl.GRPOConfig`` trains with, for scoring problems.

    Mapping: ``loss_type`` -> ``loss_agg`` by `LOSS_AGGREGATION_OF` ("grpo" ->
    "seq-mean-token-mean", "dapo"/"bnpo" -> "token-mean", "dr_grpo" -> "seq-mean-token-sum-norm"
    with ``max_response_length=max_completion_length``, ...); ``scale_rewards`` True/"group" ->
    "group", False/"none" -> "none", "batch" -> "batch"; ``epsilon``/``epsilon_high`` ->
    ``clip_low``/``clip_high``; the std epsilon is TRL's 1e-4.

    GradAlign scores on-policy (ratio 1), so the clip ranges only act on rollouts that carry
    ``old_logprobs``, and ``importance_sampling_level`` changes nothing. The KL penalty
    (``beta``) is left out by default: its gradient does not depend on the rewards and vanishes
    while the policy equals the reference, and it needs reference log-probs for every candidate
    rollout. ``include_kl=True`` maps ``beta`` to ``kl_coef``; rollouts then need
    ``ref_logprobs``. Not mirrored: the entropy mask (``top_entropy_quantile``) and the masking of
    truncated completions.

    Args:
        args: a ``trl.GRPOConfig`` (or any object with its ``loss_type``, ``scale_rewards``,
            ``epsilon``, ``epsilon_high``, ``beta`` and ``max_completion_length``).
        include_kl: map ``beta`` to ``kl_coef`` (default: ``kl_coef=0``).

    Raises:
        GradAlignError: an unknown ``loss_type`` or ``scale_rewards``, "dr_grpo" without a
            ``max_completion_length``, or an ``epsilon``, ``epsilon_high`` (unless None) or
            ``beta`` (with ``include_kl``) that is not a real number.

    Examples:
        >>> from types import SimpleNamespace
        >>> cfg = SimpleNamespace(loss_type="dr_grpo", scale_rewards=False, epsilon=0.2,
        ...                       epsilon_high=0.28, beta=0.0, max_completion_length=256)
        >>> obj = objective_from_config(cfg)
        >>> obj.loss_agg, obj.scale_rewards, obj.max_response_length
        ('seq-mean-token-sum-norm', 'none', 256)
    """
    where = "objective_from_config"
    loss_type = getattr(args, "loss_type", None)
    if loss_type not in LOSS_AGGREGATION_OF:
        raise GradAlignError(
            f"{where}: loss_type must be one of {sorted(LOSS_AGGREGATION_OF)}, got {loss_type!r}"
        )
    scale = getattr(args, "scale_rewards", None)
    if isinstance(scale, bool):
        scale = "group" if scale else "none"
    if scale not in REWARD_SCALINGS:
        raise GradAlignError(
            f"{where}: scale_rewards must be True, False or one of {REWARD_SCALINGS}, got {scale!r}"
        )
    loss_agg = LOSS_AGGREGATION_OF[loss_type]
    max_length = None
    if loss_agg == "seq-mean-token-sum-norm":
        max_length = getattr(args, "max_completion_length", None)
        if max_length is None:
            raise GradAlignError(
                f"{where}: loss_type={loss_type!r} divides by max_completion_length, got None"
            )
    epsilon_high = getattr(args, "epsilon_high", None)
    return GRPOObjective(
        scale_rewards=cast(ScaleRewards, scale),  # checked by GRPOObjective
        loss_agg=cast(LossAgg, loss_agg),
        eps=_TRL_STD_EPS,
        clip_low=_real(args, "epsilon", 0.2),
        clip_high=None if epsilon_high is None else _real(args, "epsilon_high", None),
        kl_coef=_real(args, "beta", 0.0) if include_kl else 0.0,
        max_response_length=max_length,
    )


def _real(args: Any, name: str, default: float | None) -> float:
    """``args.<name>`` as a float; a GradAlignError for None, text or bool (``float()`` would
    raise a TypeError for None and quietly take "0.2" or True)."""
    value = getattr(args, name, default)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise GradAlignError(
            f"objective_from_config: {name} must be a real number, got "
            f"{type(value).__name__} {value!r}"
        )
    return float(value)
