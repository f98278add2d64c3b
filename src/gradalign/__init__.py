"""gradalign: gradient-aligned data selection for LLM reinforcement learning."""

from __future__ import annotations

__version__ = "0.1.0"
