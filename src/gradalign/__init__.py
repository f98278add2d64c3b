"""gradalign: gradient-aligned data selection for LLM reinforcement learning."""

from __future__ import annotations

from gradalign.errors import GradAlignError
from gradalign.objective import GRPOObjective
from gradalign.rollouts import Rollouts

__version__ = "0.1.0"

__all__ = ["GRPOObjective", "GradAlignError", "Rollouts", "__version__"]
