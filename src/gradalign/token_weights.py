"""Token weights: an objective prepared for one batch of rollouts, and the batch's statistics.

Implementations: [`TokenWeights`][gradalign.token_weights.TokenWeights] (what the extractors differentiate: rows sliced per
micro-batch) and [`BatchStats`][gradalign.token_weights.BatchStats] (statistics of a whole batch, combinable across shards).

Shape glossary: S sequences, T tokens, G groups.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from gradalign.errors import GradAlignError
from gradalign.rollouts import Rollouts

__all__ = ["BatchStats", "TokenWeights"]


@dataclass(frozen=True)
class BatchStats:
    """Statistics of a whole batch of rollouts that batch-level settings need.

    Every field combines across shards by summing (``max_response_length`` by max), so the
    statistics of a batch split over processes are those of the whole batch.

    Attributes:
        count: rollouts.
        reward_sum: sum of the rewards.
        reward_sq_sum: sum of the squared rewards.
        max_response_length: the longest response, in tokens.

    Examples:
        >>> import torch, gradalign as ga
        >>> ro = ga.Rollouts.from_token_ids([[5, 6], [5, 6], [7, 8], [7, 8]],
        ...     [[9, 1], [10, 1], [11, 1], [12, 1]], [1.0, 0.0, 1.0, 1.0], [0, 0, 1, 1])
        >>> from gradalign.token_weights import BatchStats
        >>> BatchStats.of(ro)  # combine shards' stats with .combine
        BatchStats(count=4.0, reward_sum=3.0, reward_sq_sum=3.0, max_response_length=2)
    """

    count: float
    reward_sum: float
    reward_sq_sum: float
    max_response_length: int

    @classmethod
    def of(cls, rollouts: Rollouts) -> BatchStats:
        """The statistics of ``rollouts``."""
        r = rollouts.rewards.double()
        return cls(
            count=float(r.numel()),
            reward_sum=float(r.sum()),
            reward_sq_sum=float((r * r).sum()),
            max_response_length=int(rollouts.response_mask.sum(1).max()),
        )

    def combine(self, other: BatchStats) -> BatchStats:
        """The statistics of both batches together."""
        return BatchStats(
            self.count + other.count,
            self.reward_sum + other.reward_sum,
            self.reward_sq_sum + other.reward_sq_sum,
            max(self.max_response_length, other.max_response_length),
        )

    @property
    def reward_std(self) -> float:
        """Unbiased std of the rewards (0 for fewer than two rollouts)."""
        if self.count < 2:
            return 0.0
        mean = self.reward_sum / self.count
        var = (self.reward_sq_sum - self.count * mean * mean) / (self.count - 1)
        return math.sqrt(max(var, 0.0))


@dataclass(frozen=True, eq=False)
class TokenWeights:
    """An objective prepared for one batch of rollouts: what the extractors differentiate.

    The weights of rows ``rows`` are ``advantages[rows, None] * aggregation[rows]`` on response
    tokens; with ``old_logprobs`` the clipped PPO ratio multiplies the advantage, and with
    ``kl_coef > 0`` the k3 KL term is added; both need the current log-probs.

    Attributes:
        advantages: (S,) per-row advantage.
        aggregation: (S, T) token aggregation factors (0 outside the response).
        response_mask: (S, T) response tokens.
        row_zero_spread: (S,) True for rows of groups without reward spread.
        old_logprobs: optional (S, T) log-probs under the sampling policy.
        ref_logprobs: optional (S, T) log-probs under the reference policy.
        clip_low: PPO clip below 1.
        clip_high: PPO clip above 1.
        kl_coef: coefficient of the k3 KL term.

    Examples:
        >>> import torch, gradalign as ga
        >>> ro = ga.Rollouts.from_token_ids([[5, 6], [5, 6], [7, 8], [7, 8]],
        ...     [[9, 1], [10, 1], [11, 1], [12, 1]], [1.0, 0.0, 1.0, 1.0], [0, 0, 1, 1])
        >>> tw = ga.GRPOObjective().prepare(ro)  # once per batch
        >>> tw.advantages, tw.zero_spread(ro)  # group 1: both rollouts right, no signal
        (tensor([ 0.7070, -0.7070,  0.0000,  0.0000]), tensor([False,  True]))
        >>> tw.token_weights(rows=torch.tensor([0]), width=4).round(decimals=3)  # a micro-batch's rows
        tensor([[0.0000, 0.0000, 0.1770, 0.1770]])
    """

    advantages: torch.Tensor
    aggregation: torch.Tensor
    response_mask: torch.Tensor
    row_zero_spread: torch.Tensor
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0

    def __post_init__(self) -> None:
        if self.kl_coef > 0 and self.ref_logprobs is None:
            raise GradAlignError(
                f"TokenWeights: kl_coef={self.kl_coef} needs rollouts.ref_logprobs, got None"
            )

    def __len__(self) -> int:
        return int(self.advantages.shape[0])

    @property
    def needs_logprobs(self) -> bool:
        """Whether the weights depend on the current log-probs (PPO ratio or KL term)."""
        return self.old_logprobs is not None or self.kl_coef > 0

    def zero_spread(self, rollouts: Rollouts) -> torch.Tensor:
        """(G,) zero-spread flags of the groups of ``rollouts`` (the rollouts prepared)."""
        out = torch.zeros(rollouts.num_groups, dtype=torch.bool, device=self.advantages.device)
        return out.index_put_((rollouts.group_index,), self.row_zero_spread)

    def select(self, rows: torch.Tensor, width: int | None = None) -> TokenWeights:
        """The weights of rows ``rows`` (first ``width`` columns): a sub-batch keeps the batch's."""
        width = self.aggregation.shape[1] if width is None else width

        def cut(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[rows, :width]

        return dataclasses.replace(
            self,
            advantages=self.advantages[rows],
            aggregation=self.aggregation[rows, :width],
            response_mask=self.response_mask[rows, :width],
            row_zero_spread=self.row_zero_spread[rows],
            old_logprobs=cut(self.old_logprobs),
            ref_logprobs=cut(self.ref_logprobs),
        )

    def token_weights(
        self,
        logprobs: torch.Tensor | None = None,
        *,
        rows: torch.Tensor | None = None,
        width: int | None = None,
    ) -> torch.Tensor:
        """(S', W) float32 weights ``w`` such that the loss gradient is ``-sum w * grad log pi``.

        Args:
            logprobs: (S', W) current log-probs of the tokens (detached); needed when
                `needs_logprobs`.
            rows: (S',) rows to return (default: all).
            width: leading columns to return (default: all T).
        """
        call = "TokenWeights.token_weights"
        rows = torch.arange(len(self), device=self.advantages.device) if rows is None else rows
        width = self.aggregation.shape[1] if width is None else width
        shape = (int(rows.numel()), int(width))
        if logprobs is not None and tuple(logprobs.shape) != shape:
            raise GradAlignError(
                f"{call}: logprobs must have shape {shape}, got {tuple(logprobs.shape)}"
            )
        if self.needs_logprobs and logprobs is None:
            what = "old_logprobs (PPO ratio)" if self.old_logprobs is not None else "a KL term"
            raise GradAlignError(
                f"{call}: the rollouts carry {what}, so the current logprobs are needed"
            )
        w = self.advantages[rows][:, None].expand(shape)  # (S', W)
        if self.old_logprobs is not None and logprobs is not None:
            old = self.old_logprobs[rows, :width]  # (S', W)
            w = w * _ratio_factor(logprobs.float(), old, w, self.clip_low, self.clip_high)
        if self.kl_coef > 0 and self.ref_logprobs is not None and logprobs is not None:
            # d/dlogp of k3 = exp(ref - logp) - (ref - logp) - 1 is 1 - exp(ref - logp).
            delta = (self.ref_logprobs[rows, :width] - logprobs.float()).clamp(max=20.0)
            w = w - self.kl_coef * (1.0 - torch.exp(delta))
        weights = (w * self.aggregation[rows, :width]).float()
        mask = self.response_mask[rows, :width]
        return torch.where(mask, weights, torch.zeros_like(weights))


def _ratio_factor(
    logprobs: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, low: float, high: float
) -> torch.Tensor:
    """d(min(ratio*A, clip(ratio)*A))/dlogp divided by A: ratio where unclipped, else 0."""
    ratio = torch.exp((logprobs - old).clamp(max=20.0))  # (S, T)
    clipped = ratio.clamp(1.0 - low, 1.0 + high)
    active = ratio * adv <= clipped * adv
    return torch.where(active, ratio, torch.zeros_like(ratio))
