"""Optional integrations with RL training frameworks; each is imported only when used.

Implementations:

- :mod:`gradalign.integrations.trl` (extra ``gradalign[trl]``): :class:`GradAlignGRPOTrainer`, a
  ``trl.GRPOTrainer`` that re-selects its training problems with GradAlign every few steps, its
  :class:`StreamingSelectionSampler`, and :func:`objective_from_config`.
- :mod:`gradalign.integrations.verl`: a curriculum sampler for verl's ``data.sampler`` hook.

Import a submodule itself (``from gradalign.integrations.trl import GradAlignGRPOTrainer``);
this package imports no framework.
"""

from __future__ import annotations

__all__: list[str] = []
