"""`StreamingSelectionSampler`: the endless train sampler in the layout of TRL's ``RepeatSampler``."""

from __future__ import annotations

from typing import Any

import torch

from gradalign._validate import check_int
from gradalign.sampler import SelectionSampler, SelectionSource


def _check_count(where: str, name: str, value: Any, minimum: int = 1) -> int:
    return int(check_int(where, name, value, minimum))


class StreamingSelectionSampler(SelectionSampler):
    """Endless indices of the latest selection, in the layout of TRL's ``RepeatSampler``.

    [`SelectionSampler`][gradalign.sampler.SelectionSampler] with ``endless=True`` and TRL's argument names.

    Problems come in blocks of ``batch_size``; each block is served ``repeat_count`` times in a
    row and each problem ``num_generations`` times consecutively. Every block starts by checking
    the source: after a new record, blocks walk the new selection from its start. Within one
    selection the problems are walked in passes, each a fresh order from
    [`SelectionSampler`][gradalign.sampler.SelectionSampler] (seeded by ``seed``, the record count and the pass), so
    every selected problem is served once per pass. Before any record the sampler serves
    ``initial_ids``, else the whole pool.

    The sampler has no length: a Trainer given it needs ``max_steps``. Its position (the block
    in hand, down to the index) is in ``state_dict()``; ``load_state_dict()``, after the
    curriculum's own, resumes the stream where it stopped.

    Args:
        source: a [`Curriculum`][gradalign.curriculum.Curriculum] or any [`SelectionSource`][gradalign.sampler.SelectionSource].
        num_generations: rollouts per problem (``GRPOConfig.num_generations``).
        batch_size: problems per block (``generation_batch_size // num_generations``).
        repeat_count: times each block is served (``num_iterations * steps_per_generation``).
        seed: seed of the order.
        shuffle: permute each pass; False walks the selection in rank order.
        initial_ids: (K0,) problems served before the first record.

    Raises:
        GradAlignError: bad settings; from `next_block`, an empty selection.

    Examples:
        >>> import torch
        >>> from gradalign import Curriculum
        >>> cur = Curriculum(pool_size=6, chunk_size=6)
        >>> sampler = StreamingSelectionSampler(cur, num_generations=2, batch_size=2, shuffle=False)
        >>> stream = iter(sampler)
        >>> [next(stream) for _ in range(4)]
        [0, 0, 1, 1]
        >>> _ = cur.next_chunk()
        >>> cur.record(torch.tensor([5, 3]))
        >>> [next(stream) for _ in range(8)]  # the new selection from the next block on
        [5, 5, 3, 3, 5, 5, 3, 3]
    """

    def __init__(
        self,
        source: SelectionSource,
        *,
        num_generations: int = 1,
        batch_size: int = 1,
        repeat_count: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        initial_ids: torch.Tensor | None = None,
    ) -> None:
        super().__init__(
            source,
            num_generations=num_generations,
            seed=seed,
            shuffle=shuffle,
            repeat_count=repeat_count,
            batch_size=batch_size,
            initial_ids=initial_ids,
            endless=True,
        )
