"""Private: problem ids of a pool, validated, and seeded permutations shared by every process."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from gradalign._validate import check_int
from gradalign.errors import GradAlignError


def _permutation(n: int, *parts: object) -> torch.Tensor:
    """(n,) int64 permutation from a local generator seeded by ``parts``, same in every process."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
    return torch.randperm(n, generator=generator)


def _check_int(where: str, name: str, value: Any, minimum: int | None = None) -> int:
    return int(check_int(where, name, value, minimum))


def _tensor(where: str, name: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        kind = type(value).__name__
        raise GradAlignError(f"{where}: {name} must be a tensor of numbers, got {kind}") from exc


def _ids(where: str, name: str, value: Any, pool_size: int) -> torch.Tensor:
    """Problem ids: 1-D integers, unique, in [0, pool_size). Returns (n,) int64 on CPU."""
    ids = _tensor(where, name, value)
    integer = not (ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool)
    if ids.dim() != 1 or not (integer or ids.numel() == 0):
        raise GradAlignError(
            f"{where}: {name} must be 1-D integers, got shape {tuple(ids.shape)} {ids.dtype}"
        )
    ids = ids.to("cpu", torch.int64)
    bad = ids[(ids < 0) | (ids >= pool_size)][:5].tolist()
    if bad:
        raise GradAlignError(f"{where}: {name} must be in [0, {pool_size}), got {bad}")
    if torch.unique(ids).numel() != ids.numel():
        raise GradAlignError(f"{where}: {name} must not repeat a problem, got {ids[:20].tolist()}")
    return ids
