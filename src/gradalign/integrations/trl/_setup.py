"""What the trainer checks and derives before a round: the index column, ``on_empty``, the
datasets, the curriculum and the per-call generation seeds."""

from __future__ import annotations

import hashlib
from typing import Any

from datasets import Dataset

from gradalign.curriculum import Curriculum
from gradalign.errors import GradAlignError

INDEX_COLUMN = "gradalign_index"
"""Column that [`GradAlignGRPOTrainer`][gradalign.integrations.trl.GradAlignGRPOTrainer] adds to the training dataset: each row's index."""


def _without_index(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != INDEX_COLUMN}


def _check_dataset(where: str, name: str, dataset: Any) -> None:
    if not isinstance(dataset, Dataset):
        raise GradAlignError(
            f"{where}: {name} must be a map-style datasets.Dataset (problems are picked by index), "
            f"got {type(dataset).__name__}"
        )
    if "prompt" not in dataset.column_names or len(dataset) == 0:
        raise GradAlignError(
            f"{where}: {name} needs a 'prompt' column and at least one row, got columns "
            f"{dataset.column_names} and {len(dataset)} rows"
        )


ON_EMPTY = ("previous", "random", "all", "error")
"""What [`GradAlignGRPOTrainer`][gradalign.integrations.trl.GradAlignGRPOTrainer] does in a round with nothing to select (``on_empty``)."""


def _round_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed from the trainer seed and a round's stream and call indices."""
    digest = hashlib.blake2b("/".join(map(str, (seed, *parts))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _curriculum(
    where: str, curriculum: Curriculum | None, chunk_size: int | None, pool: Dataset, args: Any
) -> Curriculum:
    if curriculum is None:
        size = len(pool) if chunk_size is None else chunk_size
        return Curriculum(pool_size=len(pool), chunk_size=size, seed=getattr(args, "seed", 0))
    if chunk_size is not None:
        raise GradAlignError(f"{where}: give chunk_size or curriculum, not both")
    if not isinstance(curriculum, Curriculum) or curriculum.pool_size != len(pool):
        raise GradAlignError(
            f"{where}: curriculum must be a Curriculum over the {len(pool)} training rows, got "
            f"{type(curriculum).__name__} with pool_size={getattr(curriculum, 'pool_size', None)}"
        )
    return curriculum
