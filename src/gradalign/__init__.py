"""gradalign: gradient-aligned data selection for LLM reinforcement learning.

Pick, every few training steps, the RL problems whose policy gradient points the same way as the
gradient of a small trusted validation set (GradAlign, arXiv 2602.21492). The pipeline:
[`Rollouts`][gradalign.rollouts.Rollouts] -> [`GRPOObjective`][gradalign.objective.GRPOObjective] (prepared once into [`TokenWeights`][gradalign.token_weights.TokenWeights]) -> an extractor ([`FullGradient`][gradalign.extractors.full.FullGradient],
[`RandomProjectedGradient`][gradalign.extractors.full.RandomProjectedGradient], ...) -> [`cosine`][gradalign.scoring.cosine] / [`inner_product`][gradalign.scoring.inner_product] against a target ->
a policy from [`gradalign.policies`][gradalign.policies] -> [`GradAlign`][gradalign.selector.GradAlign] ties them together, and
[`Curriculum`][gradalign.curriculum.Curriculum] drives rounds.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from gradalign import policies
from gradalign.alignment import Selection
from gradalign.candidates import Candidates
from gradalign.curriculum import Curriculum
from gradalign.errors import GradAlignError
from gradalign.extractors import (
    FactorizedGradient,
    FullGradient,
    LoRAGradient,
    RandomProjectedGradient,
)
from gradalign.objective import GRPOObjective
from gradalign.rollouts import ProblemIds, Rollouts
from gradalign.rounds import Informative, fill_round
from gradalign.sampler import SelectionSampler
from gradalign.scoring import cosine, inner_product
from gradalign.selector import GradAlign
from gradalign.store import GradientStore

__version__ = "0.2.0"

__all__ = [
    "Candidates",
    "Curriculum",
    "FactorizedGradient",
    "FullGradient",
    "GRPOObjective",
    "GradAlign",
    "GradAlignError",
    "GradientStore",
    "Informative",
    "LoRAGradient",
    "ProblemIds",
    "RandomProjectedGradient",
    "Rollouts",
    "Selection",
    "SelectionSampler",
    "__version__",
    "cosine",
    "fill_round",
    "inner_product",
    "policies",
]

# Names that were top-level until 0.2.0 and now live only in their subpackage. Reading one from
# ``gradalign`` still works in 0.3.x, with a DeprecationWarning naming the new import; 0.4.0
# removes these aliases.
MOVED: dict[str, str] = {
    "AdamPreconditioner": "gradalign.preconditioning",
    "Alignment": "gradalign.alignment",
    "Targets": "gradalign.alignment",
    "BatchStats": "gradalign.token_weights",
    "TokenWeights": "gradalign.token_weights",
    "DistributedGradAlign": "gradalign.distributed",
    "GradientExtractor": "gradalign.extractors",
    "GroupGradients": "gradalign.extractors",
    "response_logprobs": "gradalign.extractors",
    "Objective": "gradalign.objective",
    "TokenWeightObjective": "gradalign.objective",
    "ProblemStats": "gradalign.curriculum",
    "Round": "gradalign.rounds",
    "ScoreBreakdown": "gradalign.diagnostics",
    "score_breakdown": "gradalign.diagnostics",
    "segment_norms": "gradalign.diagnostics",
    "aggregate_tasks": "gradalign.scoring",
    "build_target": "gradalign.scoring",
}


def __getattr__(name: str) -> Any:
    home = MOVED.get(name)
    if home is None:
        raise AttributeError(f"module 'gradalign' has no attribute {name!r}")
    warnings.warn(
        f"gradalign.{name} moved to {home}.{name} in 0.3.0 (use `from {home} import {name}`); "
        "the top-level alias is removed in 0.4.0",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(home), name)


def __dir__() -> list[str]:
    return sorted(__all__)
