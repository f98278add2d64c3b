"""Gradient extractors: one gradient row per problem group.

Implementations, each built on [`GradientExtractor`][gradalign.extractors.base.GradientExtractor] and
returning [`GroupGradients`][gradalign.extractors.base.GroupGradients]:

- [`FullGradient`][gradalign.extractors.full.FullGradient]: the exact gradient of every trainable
  parameter (or of ``target_modules``);
- [`RandomProjectedGradient`][gradalign.extractors.full.RandomProjectedGradient]: the full gradient
  times a seeded random projection that is regenerated, never stored;
- [`FactorizedGradient`][gradalign.extractors.factorized.FactorizedGradient]: a per-layer projection
  of each linear layer's input and output gradient, every candidate from one batched backward;
- [`LoRAGradient`][gradalign.extractors.lora.LoRAGradient]: the gradient of a peft model's LoRA
  adapter weights, optionally projected.

[`response_logprobs`][gradalign.extractors.response_logprobs] is the forward pass they share: the
per-token log-probabilities of the response tokens, with the vocabulary's log-softmax chunked.
"""

from gradalign.extractors._forward import response_logprobs
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
    "response_logprobs",
]
