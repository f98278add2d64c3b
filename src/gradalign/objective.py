"""The GRPO objective as per-token weights on log-probabilities.

Implementations: :class:`GRPOObjective`. Every GRPO variant (reward scaling, token aggregation, PPO
clipping, k3 KL penalty) has a loss whose gradient is ``-sum_{s,t} w[s, t] * grad log pi(y[s, t])``;
:meth:`GRPOObjective.token_weights` returns that ``w``, which is all the extractors need.

Shape glossary: S sequences, T tokens, G groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gradalign.errors import GradAlignError
from gradalign.rollouts import Rollouts

__all__ = ["LOSS_AGGREGATIONS", "REWARD_SCALINGS", "GRPOObjective"]

REWARD_SCALINGS = ("group", "none", "batch")
LOSS_AGGREGATIONS = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)


def _divide(centred: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``centred / scale``, exactly 0 where the scale is 0 (then ``centred`` is 0 too: no spread).

    With ``eps=0`` a zero-spread group would otherwise give 0 / 0 = NaN.
    """
    return torch.where(scale > 0, centred / torch.where(scale > 0, scale, 1.0), 0.0)


def _group_sum(values: torch.Tensor, index: torch.Tensor, num_groups: int) -> torch.Tensor:
    out = torch.zeros(num_groups, dtype=values.dtype, device=values.device)
    return out.index_add_(0, index, values)


@dataclass(frozen=True)
class GRPOObjective:
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
        zero_spread_tol: a group whose rewards span at most this much counts as zero-spread.

    Example:
        >>> obj = GRPOObjective(scale_rewards="none", loss_agg="seq-mean-token-sum")
    """

    scale_rewards: str = "group"
    loss_agg: str = "token-mean"
    eps: float = 1e-4
    clip_low: float = 0.2
    clip_high: float | None = None
    kl_coef: float = 0.0
    max_response_length: int | None = None
    zero_spread_tol: float = 0.0

    def __post_init__(self) -> None:
        name = "GRPOObjective"
        for field in ("eps", "clip_low", "clip_high", "kl_coef", "zero_spread_tol"):
            value = getattr(self, field)
            if value is None and field == "clip_high":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise GradAlignError(
                    f"{name}: {field} must be a real number, got {type(value).__name__} {value!r}"
                )
            if not math.isfinite(value):
                raise GradAlignError(f"{name}: {field} must be finite, got {value}")
        if self.max_response_length is not None and (
            isinstance(self.max_response_length, bool)
            or not isinstance(self.max_response_length, int)
        ):
            raise GradAlignError(
                f"{name}: max_response_length must be an int or None, got "
                f"{self.max_response_length!r}"
            )
        if self.scale_rewards not in REWARD_SCALINGS:
            raise GradAlignError(
                f"{name}: scale_rewards must be one of {REWARD_SCALINGS}, got {self.scale_rewards!r}"
            )
        if self.loss_agg not in LOSS_AGGREGATIONS:
            raise GradAlignError(
                f"{name}: loss_agg must be one of {LOSS_AGGREGATIONS}, got {self.loss_agg!r}"
            )
        for field, value in (("eps", self.eps), ("clip_low", self.clip_low)):
            if not value >= 0:
                raise GradAlignError(f"{name}: {field} must be >= 0, got {value}")
        if self.clip_high is not None and not self.clip_high >= 0:
            raise GradAlignError(f"{name}: clip_high must be >= 0 or None, got {self.clip_high}")
        if not self.kl_coef >= 0:
            raise GradAlignError(f"{name}: kl_coef must be >= 0, got {self.kl_coef}")
        if self.max_response_length is not None and self.max_response_length < 1:
            raise GradAlignError(
                f"{name}: max_response_length must be >= 1 or None, got {self.max_response_length}"
            )
        if not self.zero_spread_tol >= 0:
            raise GradAlignError(
                f"{name}: zero_spread_tol must be >= 0, got {self.zero_spread_tol}"
            )

    def needs_logprobs(self, rollouts: Rollouts) -> bool:
        """Whether the weights depend on the current log-probs (PPO ratio or KL term)."""
        return rollouts.old_logprobs is not None or self.kl_coef > 0

    def advantages(self, rollouts: Rollouts) -> torch.Tensor:
        """(S,) group-relative advantages ``(r - mean_group(r)) / scale``."""
        r, idx, g = rollouts.rewards.float(), rollouts.group_index, rollouts.num_groups
        count = rollouts.group_sizes().to(r.dtype)
        mean = rollouts.group_mean_rewards()  # (G,)
        centred = r - mean[idx]  # (S,)
        if self.scale_rewards == "none":
            return centred
        if self.scale_rewards == "batch":
            std = r.std() if r.numel() > 1 else r.new_zeros(())
            return _divide(centred, (std + self.eps).expand_as(centred))
        # Unbiased std like the common trainers; a single-rollout group has no spread.
        var = _group_sum(centred**2, idx, g) / (count - 1).clamp_min(1)  # (G,)
        return _divide(centred, var.sqrt()[idx] + self.eps)

    def zero_spread(self, rollouts: Rollouts) -> torch.Tensor:
        """(G,) bool, True for groups whose rewards have no spread (their GRPO gradient is zero)."""
        return rollouts.group_reward_spread() <= self.zero_spread_tol

    def aggregation(self, rollouts: Rollouts) -> torch.Tensor:
        """(S, T) token aggregation factors: each group's loss is ``sum_{s,t} agg * loss[s, t]``."""
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
                norm = self.max_response_length or int(lengths.max().item())
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

    def token_weights(
        self,
        rollouts: Rollouts,
        logprobs: torch.Tensor | None = None,
        *,
        rows: torch.Tensor | None = None,
        width: int | None = None,
    ) -> torch.Tensor:
        """(S, T) float32 weights ``w`` such that the loss gradient is ``-sum w * grad log pi``.

        Advantages and aggregation always use the whole rollouts (their groups); ``rows`` and
        ``width`` only cut out a micro-batch of the result.

        Args:
            rollouts: the rollouts.
            logprobs: current log-probs of the tokens (detached), shaped like the output; needed
                when the rollouts carry ``old_logprobs`` (PPO ratio) or ``kl_coef > 0``. Without
                them the ratio is 1 (on-policy), as in GradAlign's scoring.
            rows: (S',) row indices to return (default: all rows).
            width: number of leading token columns to return (default: all T).

        Returns:
            (S', width) weights, zero outside the response mask.
        """
        call = "GRPOObjective.token_weights"
        rows = torch.arange(len(rollouts), device=rollouts.device) if rows is None else rows
        width = rollouts.input_ids.shape[1] if width is None else width
        shape = (int(rows.numel()), int(width))
        if logprobs is not None and tuple(logprobs.shape) != shape:
            raise GradAlignError(
                f"{call}: logprobs must have shape {shape}, got {tuple(logprobs.shape)}"
            )
        w = self.advantages(rollouts)[rows][:, None].expand(shape)  # (S', W)
        if rollouts.old_logprobs is not None:
            if logprobs is None:
                raise GradAlignError(
                    f"{call}: rollouts carry old_logprobs, so the current logprobs are needed"
                )
            old = rollouts.old_logprobs[rows, :width]  # (S', W)
            w = w * self._ratio_factor(logprobs.float(), old, w)
        if self.kl_coef > 0:
            if rollouts.ref_logprobs is None:
                raise GradAlignError(
                    f"{call}: kl_coef={self.kl_coef} needs rollouts.ref_logprobs, got None"
                )
            if logprobs is None:
                raise GradAlignError(f"{call}: kl_coef > 0 needs the current logprobs")
            # d/dlogp of k3 = exp(ref - logp) - (ref - logp) - 1 is 1 - exp(ref - logp).
            delta = (rollouts.ref_logprobs[rows, :width] - logprobs.float()).clamp(max=20.0)
            w = w - self.kl_coef * (1.0 - torch.exp(delta))
        weights = (w * self.aggregation(rollouts)[rows, :width]).float()
        mask = rollouts.response_mask[rows, :width]
        return torch.where(mask, weights, torch.zeros_like(weights))

    def _ratio_factor(
        self, logprobs: torch.Tensor, old: torch.Tensor, adv: torch.Tensor
    ) -> torch.Tensor:
        """d(min(ratio*A, clip(ratio)*A))/dlogp divided by A: ratio where unclipped, else 0."""
        high = self.clip_low if self.clip_high is None else self.clip_high
        ratio = torch.exp((logprobs - old).clamp(max=20.0))  # (S, T)
        clipped = ratio.clamp(1.0 - self.clip_low, 1.0 + high)
        active = ratio * adv <= clipped * adv
        return torch.where(active, ratio, torch.zeros_like(ratio))
