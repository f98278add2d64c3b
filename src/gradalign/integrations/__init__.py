"""Optional integrations with RL training frameworks; each is imported only when used.

Implementations:

- [`gradalign.integrations.trl`][gradalign.integrations.trl] (extra ``gradalign[trl]``): `GradAlignGRPOTrainer`, a
  ``trl.GRPOTrainer`` that re-selects its training problems with GradAlign every few steps, its
  `StreamingSelectionSampler`, and `objective_from_config`.
- [`gradalign.integrations.verl`][gradalign.integrations.verl]: a curriculum sampler for verl's ``data.sampler`` hook.

Import a submodule itself (``from gradalign.integrations.trl import GradAlignGRPOTrainer``);
this package imports no framework.
"""

from __future__ import annotations

__all__: list[str] = []
