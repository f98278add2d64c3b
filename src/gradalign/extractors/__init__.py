"""Gradient extractors: one gradient row per problem group.

Implementations: :class:`FullGradient` (exact), :class:`RandomProjectedGradient` (seeded random
projection, never stored), built on :class:`GradientExtractor` and returning :class:`GroupGradients`.
"""

from gradalign.extractors.base import GradientExtractor, GroupGradients, Segment
from gradalign.extractors.factorized import FactorizedGradient
from gradalign.extractors.full import FullGradient, RandomProjectedGradient
from gradalign.extractors.lora import LoRAGradient

__all__ = [
    "FactorizedGradient",
    "FullGradient",
    "GradientExtractor",
    "GroupGradients",
    "LoRAGradient",
    "RandomProjectedGradient",
    "Segment",
]
