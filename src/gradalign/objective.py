"""The objective as per-token weights on log-probabilities: a stage of its own.

Every GRPO variant (reward scaling, token aggregation, PPO clipping, k3 KL penalty) has a loss whose
gradient is ``-sum_{s,t} w[s, t] * grad log pi(y[s, t])``. An objective's [`prepare`][gradalign.objective.Objective.prepare]
turns a batch of rollouts into [`TokenWeights`][gradalign.token_weights.TokenWeights] once, with every batch statistic it needs
(group means and spreads, the batch reward std, the longest response); the extractors only slice
rows of it. Statistics of a batch split over processes come in as [`BatchStats`][gradalign.token_weights.BatchStats], summed over
the ranks, so a shard gets exactly the weights of the whole batch.

Implementations: [`Objective`][gradalign.objective.Objective] (the base: ``prepare``), [`GRPOObjective`][gradalign.objective.GRPOObjective] (the GRPO
family), [`TokenWeightObjective`][gradalign.objective.TokenWeightObjective] (weights you give, e.g. a per-example SFT loss),
[`TokenWeights`][gradalign.token_weights.TokenWeights] (the prepared weights) and [`BatchStats`][gradalign.token_weights.BatchStats].

Shape glossary: S sequences, T tokens, G groups.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import torch

from gradalign._options import check_options, choice, choices, integer, option, real
from gradalign.errors import GradAlignError
from gradalign.rollouts import Rollouts
from gradalign.stats import group_stats
from gradalign.token_weights import BatchStats, TokenWeights

__all__ = [
    "LOSS_AGGREGATIONS",
    "REWARD_SCALINGS",
    "BatchStats",
    "GRPOObjective",
    "LossAgg",
    "Objective",
    "ScaleRewards",
    "TokenWeightObjective",
    "TokenWeights",
    "prepare_weights",
]

ScaleRewards = Literal["group", "none", "batch"]
"""How advantages are scaled (``GRPOObjective.scale_rewards``)."""
LossAgg = Literal[
    "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"
]
"""How token terms are aggregated inside a group (``GRPOObjective.loss_agg``)."""
REWARD_SCALINGS: tuple[str, ...] = choices(ScaleRewards)
LOSS_AGGREGATIONS: tuple[str, ...] = choices(LossAgg)


def _divide(centred: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``centred / scale``, exactly 0 where the scale is 0 (then ``centred`` is 0 too: no spread).

    With ``eps=0`` a zero-spread group would otherwise give 0 / 0 = NaN.
    """
    return torch.where(scale > 0, centred / torch.where(scale > 0, scale, 1.0), 0.0)


class Objective(ABC):
    """An objective: `prepare` turns rollouts into the [`TokenWeights`][gradalign.token_weights.TokenWeights] to differentiate.

    Subclass it for another loss; the extractors, the selector and the store accept any subclass.

    Examples:
        >>> import torch, gradalign as ga
        >>> ro = ga.Rollouts.from_token_ids([[5, 6], [5, 6], [7, 8], [7, 8]],
        ...     [[9, 1], [10, 1], [11, 1], [12, 1]], [1.0, 0.0, 1.0, 1.0], [0, 0, 1, 1])
        >>> from gradalign.objective import Objective
        >>> from gradalign.token_weights import TokenWeights
        >>> class NegatedGRPO(Objective):  # a loss of your own: prepare() gives its token weights
        ...     def prepare(self, rollouts, stats=None):
        ...         tw = ga.GRPOObjective().prepare(rollouts, stats)
        ...         return TokenWeights(-tw.advantages, tw.aggregation, tw.response_mask,
        ...                             tw.row_zero_spread)
        >>> NegatedGRPO().prepare(ro).advantages[:2]
        tensor([-0.7070,  0.7070])
    """

    @abstractmethod
    def prepare(self, rollouts: Rollouts, stats: BatchStats | None = None) -> TokenWeights:
        """The weights of ``rollouts``; ``stats`` are those of the whole batch when ``rollouts``
        is one shard of it (None: ``rollouts`` is the whole batch)."""

    def batch_group_weights(
        self, num_tokens: torch.Tensor, num_sequences: torch.Tensor
    ) -> torch.Tensor:
        """(G,) float32 weights w with ``batch loss = sum_g w_g * loss_g / sum_g w_g``
        (used by ``GradAlign(target="batch")``); by default a group counts by its sequences."""
        del num_tokens
        return num_sequences.float()


@dataclass(frozen=True, eq=False)
class TokenWeightObjective(Objective):
    """A loss whose per-token weights you give: ``loss = -sum_{s,t} weights[s, t] log pi``.

    No group centring and no reward: e.g. a per-example SFT loss is one row per example with
    ``weights = response_mask / response_length`` (its gradient per example is then the gradient of
    the mean token negative log-likelihood). Groups are the rollouts' ``group_ids`` as always.

    Args:
        weights: (S, T) weights of the rollouts this objective will be prepared for (0 outside
            the response is enforced).

    Examples:
        >>> import torch
        >>> obj = TokenWeightObjective(torch.tensor([[0.0, 1.0, 1.0]]))
    """

    weights: torch.Tensor

    def prepare(self, rollouts: Rollouts, stats: BatchStats | None = None) -> TokenWeights:
        del stats
        w = torch.as_tensor(self.weights)
        if tuple(w.shape) != tuple(rollouts.input_ids.shape) or not bool(torch.isfinite(w).all()):
            raise GradAlignError(
                "TokenWeightObjective.prepare: weights must be finite with the shape of input_ids "
                f"{tuple(rollouts.input_ids.shape)}, got {tuple(w.shape)}"
            )
        w = torch.where(rollouts.response_mask, w.float(), 0.0)
        return TokenWeights(
            advantages=torch.ones(len(rollouts), device=w.device),
            aggregation=w,
            response_mask=rollouts.response_mask,
            row_zero_spread=~w.ne(0).any(1),
        )


@dataclass(frozen=True)
class GRPOObjective(Objective):
    """Settings of the GRPO loss whose per-group gradient GradAlign compares.

    Args:
        scale_rewards: "group" divides each advantage by its group's reward std + ``eps`` (GRPO,
            default); "none" only centres rewards on the group mean (Dr. GRPO; with binary rewards
            this makes the gradient an unbiased estimate of the gradient of expected accuracy);
            "batch" divides by the std of all rewards in the rollouts.
        loss_agg: token aggregation inside a group: "token-mean" (over the group's response tokens,
            default), "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm" (token
            sums divided by a constant length, then averaged over sequences).
        eps: added to the std before dividing.
        clip_low: PPO clip range below 1 (used only when rollouts carry ``old_logprobs``).
        clip_high: PPO clip range above 1; None uses ``clip_low``.
        kl_coef: coefficient of the k3 KL estimator against ``ref_logprobs`` (0 disables it).
        max_response_length: the constant length of "seq-mean-token-sum-norm"; None uses the longest
            response in the rollouts.
        zero_spread_tol: a group whose rewards span at most this much counts as zero-spread
            (the rule of [`gradalign.stats.zero_spread`][gradalign.stats.zero_spread]): its advantages are set to 0, so
            its gradient is zero and every stage flags it the same way.

    Examples:
        >>> obj = GRPOObjective(scale_rewards="none", loss_agg="seq-mean-token-sum")
    """

    scale_rewards: ScaleRewards = option("group", choice(ScaleRewards))
    loss_agg: LossAgg = option("token-mean", choice(LossAgg))
    eps: float = option(1e-4, real(0))
    clip_low: float = option(0.2, real(0))
    clip_high: float | None = option(None, real(0, none=True))
    kl_coef: float = option(0.0, real(0))
    max_response_length: int | None = option(None, integer(1, none=True))
    zero_spread_tol: float = option(0.0, real(0))

    def __post_init__(self) -> None:
        check_options(self)

    def needs_logprobs(self, rollouts: Rollouts) -> bool:
        """Whether the weights depend on the current log-probs (PPO ratio or KL term)."""
        return rollouts.old_logprobs is not None or self.kl_coef > 0

    def advantages(self, rollouts: Rollouts, stats: BatchStats | None = None) -> torch.Tensor:
        """(S,) group-relative advantages ``(r - mean_group(r)) / scale``.

        With ``scale_rewards="batch"``, the scale is the reward std of ``stats`` (the whole
        batch) when given, else of ``rollouts``.
        """
        st = group_stats(rollouts.group_ids, rollouts.rewards)  # float64, overflow-free
        centred = rollouts.rewards.double() - st.mean[st.index]  # (S,)
        # The one zero-spread rule: a group it flags gets exactly zero advantages (with a tolerance
        # too), so its gradient is zero wherever it is flagged.
        centred = torch.where(st.zero_spread(self.zero_spread_tol)[st.index], 0.0, centred)
        if self.scale_rewards == "none":
            return centred.float()
        if self.scale_rewards == "batch":
            std = (stats or BatchStats.of(rollouts)).reward_std
            return _divide(centred, torch.full_like(centred, std + self.eps)).float()
        # Unbiased std like the common trainers; a single-rollout group has no spread.
        return _divide(centred, st.unbiased_std()[st.index] + self.eps).float()

    def zero_spread(self, rollouts: Rollouts) -> torch.Tensor:
        """(G,) bool, True for groups without reward spread (their GRPO gradient is zero): the
        rule of [`gradalign.stats.zero_spread`][gradalign.stats.zero_spread] with ``zero_spread_tol``."""
        return rollouts.zero_spread(self.zero_spread_tol)

    def aggregation(self, rollouts: Rollouts, stats: BatchStats | None = None) -> torch.Tensor:
        """(S, T) token aggregation factors: each group's loss is ``sum_{s,t} agg * loss[s, t]``.

        ``"seq-mean-token-sum-norm"`` without ``max_response_length`` divides by the longest
        response of ``stats`` (the whole batch) when given, else of ``rollouts``.
        """
        mask = rollouts.response_mask.float()  # (S, T)
        idx = rollouts.group_index
        lengths = mask.sum(1)  # (S,)
        if self.loss_agg == "token-mean":
            per_seq = 1.0 / rollouts.group_token_counts().float()[idx]
        else:
            n_seq = rollouts.group_sizes().float()[idx]  # (S,)
            if self.loss_agg == "seq-mean-token-mean":
                per_seq = 1.0 / (n_seq * lengths)
            elif self.loss_agg == "seq-mean-token-sum":
                per_seq = 1.0 / n_seq
            else:
                longest = (stats or BatchStats.of(rollouts)).max_response_length
                norm = self.max_response_length or longest
                per_seq = 1.0 / (n_seq * norm)
        return mask * per_seq[:, None]

    def batch_group_weights(
        self, num_tokens: torch.Tensor, num_sequences: torch.Tensor
    ) -> torch.Tensor:
        """(G,) float32 weights w with ``batch loss = sum_g w_g * loss_g / sum_g w_g``.

        A loss over all groups at once aggregates over all their tokens ("token-mean") or all their
        sequences (the seq-mean variants), so a group counts by its token or sequence count.
        """
        counts = num_tokens if self.loss_agg == "token-mean" else num_sequences
        return counts.float()

    def prepare(self, rollouts: Rollouts, stats: BatchStats | None = None) -> TokenWeights:
        """Advantages, aggregation and zero-spread flags of ``rollouts``, computed once.

        Args:
            rollouts: the batch (or, with ``stats``, one shard of it).
            stats: the whole batch's statistics when ``rollouts`` is a shard; makes
                ``scale_rewards="batch"`` and the default length of ``"seq-mean-token-sum-norm"``
                those of the whole batch.

        Raises:
            GradAlignError: If ``kl_coef > 0`` and the rollouts carry no ``ref_logprobs``.
        """
        if self.kl_coef > 0 and rollouts.ref_logprobs is None:
            raise GradAlignError(
                f"GRPOObjective.prepare: kl_coef={self.kl_coef} needs rollouts.ref_logprobs, got None"
            )
        return TokenWeights(
            advantages=self.advantages(rollouts, stats),
            aggregation=self.aggregation(rollouts, stats),
            response_mask=rollouts.response_mask,
            row_zero_spread=self.zero_spread(rollouts)[rollouts.group_index],
            old_logprobs=rollouts.old_logprobs,
            ref_logprobs=rollouts.ref_logprobs,
            clip_low=self.clip_low,
            clip_high=self.clip_low if self.clip_high is None else self.clip_high,
            kl_coef=self.kl_coef,
        )

    def token_weights(
        self,
        rollouts: Rollouts,
        logprobs: torch.Tensor | None = None,
        *,
        rows: torch.Tensor | None = None,
        width: int | None = None,
    ) -> torch.Tensor:
        """(S', width) float32 weights ``w`` such that the loss gradient is ``-sum w * grad log pi``.

        Shorthand for ``self.prepare(rollouts).token_weights(logprobs, rows=rows, width=width)``;
        prepare once and slice when calling it for many micro-batches.

        Args:
            rollouts: the rollouts.
            logprobs: current log-probs of the tokens (detached), shaped like the output; needed
                when the rollouts carry ``old_logprobs`` (PPO ratio) or ``kl_coef > 0``. Without
                them the ratio is 1 (on-policy), as in GradAlign's scoring.
            rows: (S',) row indices to return (default: all rows).
            width: number of leading token columns to return (default: all T).
        """
        return self.prepare(rollouts).token_weights(logprobs, rows=rows, width=width)


def prepare_weights(
    call: str, objective: Objective | TokenWeights | None, rollouts: Rollouts
) -> TokenWeights:
    """``objective`` prepared for ``rollouts``: an [`Objective`][gradalign.objective.Objective] (None: ``GRPOObjective()``),
    or [`TokenWeights`][gradalign.token_weights.TokenWeights] already prepared for them."""
    if objective is None:
        objective = GRPOObjective()
    if isinstance(objective, TokenWeights):
        if tuple(objective.aggregation.shape) != tuple(rollouts.input_ids.shape):
            raise GradAlignError(
                f"{call}: the prepared TokenWeights are {tuple(objective.aggregation.shape)} but "
                f"the rollouts are {tuple(rollouts.input_ids.shape)}; prepare them for these rollouts"
            )
        return objective
    if not isinstance(objective, Objective):
        raise GradAlignError(
            f"{call}: objective must be a gradalign Objective (e.g. GRPOObjective) or "
            f"TokenWeights, got {type(objective).__name__}"
        )
    return objective.prepare(rollouts)
