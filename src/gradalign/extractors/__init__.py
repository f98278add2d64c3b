"""Gradient extractors: one gradient row per problem group.

Implementations: [`FullGradient`][gradalign.extractors.full.FullGradient] (exact), [`RandomProjectedGradient`][gradalign.extractors.full.RandomProjectedGradient] (seeded random
projection, never stored), built on [`GradientExtractor`][gradalign.extractors.base.GradientExtractor] and returning [`GroupGradients`][gradalign.extractors.base.GroupGradients].
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
