"""Gradient extractors: one gradient row per problem group.

Implementations: :class:`FullGradient` (exact), :class:`RandomProjectedGradient` (seeded random
projection, never stored), built on :class:`GradientExtractor` and returning :class:`GroupGradients`.
"""

from gradalign.extractors.base import GradientExtractor, GroupGradients, Segment
from gradalign.extractors.full import FullGradient, RandomProjectedGradient

__all__ = [
    "FullGradient",
    "GradientExtractor",
    "GroupGradients",
    "RandomProjectedGradient",
    "Segment",
]
