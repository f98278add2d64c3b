"""Selection policies: a [`Candidates`][gradalign.candidates.Candidates] table in, the selected ids out, best first.

A policy is a small object with settings validated at construction and one call,
``policy(candidates) -> ids``: an int64 tensor of candidate *ids* (not positions) in rank order.

Implementations: by score [`TopK`][gradalign.policies.TopK], [`TopFraction`][gradalign.policies.TopFraction], [`BottomK`][gradalign.policies.BottomK], [`Threshold`][gradalign.policies.Threshold];
by pass rate [`AccGreedy`][gradalign.policies.AccGreedy], [`Learnability`][gradalign.policies.Learnability], [`AccuracyBand`][gradalign.policies.AccuracyBand],
[`DropZeroVariance`][gradalign.policies.DropZeroVariance]; mixed [`SimAcc`][gradalign.policies.SimAcc], [`LearnAlign`][gradalign.policies.LearnAlign], [`DiverseTopK`][gradalign.policies.DiverseTopK],
[`TaskQuota`][gradalign.policies.TaskQuota]; sampling [`Random`][gradalign.policies.Random], [`Softmax`][gradalign.policies.Softmax]; combinators [`EpsilonMix`][gradalign.policies.EpsilonMix],
[`Chain`][gradalign.policies.Chain].

Rules shared by every policy:

* Empty pool: an empty int64 tensor, no error, no warning.
* ``k`` larger than the pool (or the eligible candidates): all of them, with a ``UserWarning``.
* Ties are stable: equal keys keep the candidates' order.
* NaN never reaches a policy: [`Candidates`][gradalign.candidates.Candidates] rejects it.
* A missing signal (``scores``, ``accuracy``, ...) raises [`GradAlignError`][gradalign.errors.GradAlignError] saying how to
  provide it.
* ``seed`` builds a fresh local ``torch.Generator`` per call: calling twice gives the same ids; vary
  the seed (e.g. with the round) for fresh draws. Global RNG state is never touched.

Shapes: G candidates, D gradient dim, Q validation targets (tasks).

Examples:
    >>> import torch
    >>> from gradalign.policies import Candidates, TopK
    >>> c = Candidates(ids=torch.tensor([10, 11, 12]), scores=torch.tensor([0.1, 0.9, 0.5]))
    >>> TopK(2)(c)
    tensor([11, 12])
"""

from __future__ import annotations

from gradalign.candidates import Candidates
from gradalign.policies._base import Policy
from gradalign.policies._combine import Chain, EpsilonMix
from gradalign.policies._mixed import DiverseTopK, LearnAlign, SimAcc, TaskQuota
from gradalign.policies._pass_rate import AccGreedy, AccuracyBand, DropZeroVariance, Learnability
from gradalign.policies._sampling import Random, Softmax
from gradalign.policies._score import BottomK, Threshold, TopFraction, TopK

__all__ = [
    "AccGreedy",
    "AccuracyBand",
    "BottomK",
    "Candidates",
    "Chain",
    "DiverseTopK",
    "DropZeroVariance",
    "EpsilonMix",
    "LearnAlign",
    "Learnability",
    "Policy",
    "Random",
    "SimAcc",
    "Softmax",
    "TaskQuota",
    "Threshold",
    "TopFraction",
    "TopK",
]
