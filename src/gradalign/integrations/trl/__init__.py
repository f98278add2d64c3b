"""GradAlign inside TRL's ``GRPOTrainer``: re-select the training problems every few steps.

Implementations:

- [`objective_from_config`][gradalign.integrations.trl_config.objective_from_config] (from [`gradalign.integrations.trl_config`][gradalign.integrations.trl_config], which needs no
  TRL): the loss settings of a ``trl.GRPOConfig`` as a [`GRPOObjective`][gradalign.objective.GRPOObjective].
- [`StreamingSelectionSampler`][gradalign.integrations.trl.StreamingSelectionSampler]: an endless ``Sampler[int]`` in the layout of TRL's
  ``RepeatSampler`` that re-reads the latest selection of a [`Curriculum`][gradalign.curriculum.Curriculum] at every
  generation block.
- [`GradAlignGRPOTrainer`][gradalign.integrations.trl.GradAlignGRPOTrainer]: a ``trl.GRPOTrainer`` that runs a selection round before the first
  step and every ``rescore_every`` optimizer steps, and trains only on the selected problems.

A selection round takes ``curriculum.next_chunk()``, samples ``num_generations`` completions per
candidate and ``num_validation_generations`` per validation prompt with the trainer's own generation
path (``GRPOTrainer._generate``: same generation config, chat template, vLLM or transformers
backend), scores them with the trainer's reward functions (``_calculate_rewards``: the dataset's
extra columns as keyword arguments, combined with ``reward_weights``), builds
[`Rollouts`][gradalign.rollouts.Rollouts] grouped by dataset index, runs ``GradAlign.select`` and records the
selection in the curriculum. Rounds are kept out of the trainer's logged metrics and token count;
their own summary is logged under ``gradalign/...``.

How a selection reaches the trainer: the training dataloader is built once and reads ahead
(accelerate's ``DataLoaderShard`` holds one batch in hand, and the Trainer collects the
``gradient_accumulation_steps`` batches of a step before running it), so the generation batch
consumed right after a round was drawn before the round. Two pieces make every generation batch
after a round hold only selected problems:

1. [`StreamingSelectionSampler`][gradalign.integrations.trl.StreamingSelectionSampler] snapshots the selection at the start of every block of
   ``generation_batch_size // num_generations`` problems, so every block drawn after a round comes
   from the new selection. It is endless (it has no length), so the Trainer runs for
   ``args.max_steps`` steps, with no epochs over a pool that keeps changing.
2. The trainer adds a ``gradalign_index`` column (the row index) to the training dataset. When a
   generation batch is about to be generated, a batch holding any problem outside the current
   selection (one read ahead) is replaced by the sampler's next block; the column is dropped
   before generation, so reward functions never see it.

Several processes (``torchrun`` / ``accelerate launch``): each rank samples its share of a round in
generation calls seeded per call, so rollouts do not depend on the number of ranks; the selection
is computed once over every rank's shard (``GradAlign`` over ``torch.distributed``) and recorded on every
rank; each rank serves its slice of every generation block.

Limits of this version: no ``tools``, ``rollout_func`` or ``environment_factory``,
``multi_objective_aggregation="sum_then_normalize"`` only, and a resumed checkpoint does not
restore the curriculum (save ``trainer.curriculum.state_dict()``).

Examples:
    A complete, tested script is ``examples/integrations/trl_one_process.py``.

    ```python
    from gradalign.integrations.trl import GradAlignGRPOTrainer

    trainer = GradAlignGRPOTrainer(
        model, reward_fn, args=GRPOConfig(output_dir="out", max_steps=100),
        train_dataset=pool, validation_dataset=trusted, chunk_size=64, rescore_every=10)
    trainer.train()
    ```
"""

from __future__ import annotations

from gradalign.integrations.trl._sampler import StreamingSelectionSampler
from gradalign.integrations.trl._setup import INDEX_COLUMN, ON_EMPTY
from gradalign.integrations.trl._trainer import GradAlignGRPOTrainer
from gradalign.integrations.trl_config import LOSS_AGGREGATION_OF, objective_from_config

__all__ = [
    "INDEX_COLUMN",
    "LOSS_AGGREGATION_OF",
    "ON_EMPTY",
    "GradAlignGRPOTrainer",
    "StreamingSelectionSampler",
    "objective_from_config",
]
