"""gradalign: gradient-aligned data selection for LLM reinforcement learning.

Pick, every few training steps, the RL problems whose policy gradient points the same way as the
gradient of a small trusted validation set (GradAlign, arXiv 2602.21492). The pipeline:
[`Rollouts`][gradalign.rollouts.Rollouts] -> [`GRPOObjective`][gradalign.objective.GRPOObjective] (prepared once into [`TokenWeights`][gradalign.token_weights.TokenWeights]) -> an extractor ([`FullGradient`][gradalign.extractors.full.FullGradient],
[`RandomProjectedGradient`][gradalign.extractors.full.RandomProjectedGradient], ...) -> [`cosine`][gradalign.scoring.cosine] / [`inner_product`][gradalign.scoring.inner_product] against a target ->
a policy from [`gradalign.policies`][gradalign.policies] -> [`GradAlign`][gradalign.selector.GradAlign] ties them together, and
[`Curriculum`][gradalign.curriculum.Curriculum] drives rounds.
"""

from __future__ import annotations

from gradalign import policies
from gradalign._forward import response_logprobs
from gradalign.alignment import Alignment, Selection, Targets
from gradalign.candidates import Candidates
from gradalign.curriculum import Curriculum, ProblemStats
from gradalign.diagnostics import ScoreBreakdown, score_breakdown, segment_norms
from gradalign.distributed import DistributedGradAlign
from gradalign.errors import GradAlignError
from gradalign.extractors import (
    FactorizedGradient,
    FullGradient,
    GradientExtractor,
    GroupGradients,
    LoRAGradient,
    RandomProjectedGradient,
)
from gradalign.objective import GRPOObjective, Objective, TokenWeightObjective
from gradalign.preconditioning import AdamPreconditioner
from gradalign.rollouts import ProblemIds, Rollouts
from gradalign.rounds import Informative, Round, fill_round
from gradalign.sampler import SelectionSampler
from gradalign.scoring import aggregate_tasks, build_target, cosine, inner_product
from gradalign.selector import GradAlign
from gradalign.store import GradientStore
from gradalign.token_weights import BatchStats, TokenWeights

__version__ = "0.2.0"

__all__ = [
    "AdamPreconditioner",
    "Alignment",
    "BatchStats",
    "Candidates",
    "Curriculum",
    "DistributedGradAlign",
    "FactorizedGradient",
    "FullGradient",
    "GRPOObjective",
    "GradAlign",
    "GradAlignError",
    "GradientExtractor",
    "GradientStore",
    "GroupGradients",
    "Informative",
    "LoRAGradient",
    "Objective",
    "ProblemIds",
    "ProblemStats",
    "RandomProjectedGradient",
    "Rollouts",
    "Round",
    "ScoreBreakdown",
    "Selection",
    "SelectionSampler",
    "Targets",
    "TokenWeightObjective",
    "TokenWeights",
    "__version__",
    "aggregate_tasks",
    "build_target",
    "cosine",
    "fill_round",
    "inner_product",
    "policies",
    "response_logprobs",
    "score_breakdown",
    "segment_norms",
]
