"""Problem ids of a pool, validated; seeded permutations shared by every process; [`ProblemIds`][gradalign.rollouts.ProblemIds].

gradalign's problem ids are integers (``Rollouts.group_ids``, ``Selection.ids``, `Curriculum` pool
positions). [`ProblemIds`][gradalign.rollouts.ProblemIds] maps a dataset's own ids (usually strings) to
those integers and back.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Iterable, Sequence
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
        named = string_ids_message(where, name, value)
        kind = type(value).__name__
        raise GradAlignError(
            named or f"{where}: {name} must be a tensor of numbers, got {kind} {_short(value)}"
        ) from exc


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _first_string(value: Any) -> str | bytes | None:
    """A string among ``value``'s entries (or ``value`` itself), else None."""
    if isinstance(value, (str, bytes)):
        return value
    if hasattr(value, "tolist") and not isinstance(value, torch.Tensor):  # numpy, pandas
        value = value.tolist()
    if isinstance(value, Sequence):
        return next((v for v in value if isinstance(v, (str, bytes))), None)
    return None


def string_ids_message(where: str, name: str, value: Any) -> str | None:
    """The refusal of string ids, with the exact mapping to use; None if ``value`` holds none."""
    sample = _first_string(value)
    if sample is None:
        return None
    return (
        f"{where}: {name} must be integers, got strings such as {sample!r}. Map them with "
        "ga.ProblemIds, built once from every id of the pool in pool order: "
        f"ids = ga.ProblemIds(dataset['id']); pass ids.encode(your_ids) as {name}; "
        "ids.decode(selection.ids) gives the strings back"
    )


def _ids_in_range(where: str, name: str, value: Any, n: int) -> torch.Tensor:
    """(m,) int64 on CPU: 1-D integers in [0, n), repeats allowed."""
    ids = _tensor(where, name, value)
    integer = not (ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool)
    if ids.dim() != 1 or not (integer or ids.numel() == 0):
        raise GradAlignError(
            f"{where}: {name} must be 1-D integers, got shape {tuple(ids.shape)} {ids.dtype}"
        )
    ids = ids.to("cpu", torch.int64)
    bad = ids[(ids < 0) | (ids >= n)][:5].tolist()
    if bad:
        raise GradAlignError(f"{where}: {name} must be in [0, {n}), got {bad}")
    return ids


def _ids(where: str, name: str, value: Any, pool_size: int) -> torch.Tensor:
    """Problem ids: 1-D integers, unique, in [0, pool_size). Returns (n,) int64 on CPU."""
    ids = _ids_in_range(where, name, value, pool_size)
    if torch.unique(ids).numel() != ids.numel():
        raise GradAlignError(f"{where}: {name} must not repeat a problem, got {ids[:20].tolist()}")
    return ids


def _listed(where: str, name: str, value: Any) -> list[Any]:
    """``value``'s entries as a list; tensors give ints (a 0-d tensor hashes by identity)."""
    if isinstance(value, torch.Tensor) and value.dim() == 1:
        return list(value.tolist())
    if isinstance(value, (str, bytes, torch.Tensor)) or not isinstance(value, Iterable):
        raise GradAlignError(
            f"{where}: {name} must be a sequence of ids (a list, a 1-D tensor, a dataset "
            f"column), got {type(value).__name__} {_short(value)}; wrap a single id in a list"
        )
    return list(value)


class ProblemIds:
    """A pool's own problem ids (strings, usually) mapped to the int64 ids gradalign uses, and back.

    Group ids, selections and `Curriculum` pool positions are integers. Build one ``ProblemIds``
    from the id column of the whole pool, in pool order, and keep it: each id maps to its position
    in that column, the row index that ``Curriculum(pool_size=len(ids))`` and the TRL trainer use,
    so an integer means the same problem in every batch, round and process.

    Args:
        names: every problem id of the pool, in pool order (e.g. ``dataset["id"]``); hashable and
            unique.

    Raises:
        GradAlignError: ``names`` is one string or not iterable, holds an unhashable id, or
            repeats one.

    Examples:
        >>> ids = ProblemIds(["gsm8k-7", "gsm8k-3", "math-1"])
        >>> group_ids = ids.encode(["math-1", "math-1", "gsm8k-7", "gsm8k-7"])
        >>> group_ids
        tensor([2, 2, 0, 0])
        >>> ids.decode(torch.tensor([0, 2]))
        ['gsm8k-7', 'math-1']
        >>> len(ids)
        3
    """

    def __init__(self, names: Iterable[Hashable]) -> None:
        where = "ProblemIds"
        self._names = tuple(_listed(where, "names", names))
        self._index: dict[Hashable, int] = {}
        for i, name in enumerate(self._names):
            try:
                first = self._index.setdefault(name, i)
            except TypeError as exc:
                raise GradAlignError(
                    f"{where}: names must be hashable (strings or ints), got "
                    f"{type(name).__name__} {_short(name)} at position {i}"
                ) from exc
            if first != i:
                raise GradAlignError(
                    f"{where}: names must be unique (one per problem of the pool), got {name!r} "
                    f"at positions {first} and {i}"
                )

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"ProblemIds({len(self)} ids: {_short(list(self._names[:3]))})"

    @property
    def names(self) -> tuple[Hashable, ...]:
        """(N,) the pool's ids; ``names[i]`` is the id that integer ``i`` stands for."""
        return self._names

    def encode(self, names: Iterable[Hashable]) -> torch.Tensor:
        """(n,) int64 position of each id in the pool: the group ids to give `Rollouts`.

        Raises:
            GradAlignError: an id that the pool lacks (or that is unhashable).
        """
        where = "ProblemIds.encode"
        values = _listed(where, "names", names)
        try:
            out = [self._index.get(v, -1) for v in values]
        except TypeError as exc:
            raise GradAlignError(
                f"{where}: names must be hashable ids, got {_short(values)}"
            ) from exc
        unknown = [v for v, i in zip(values, out, strict=True) if i < 0]
        if unknown:
            raise GradAlignError(
                f"{where}: {len(unknown)} ids are not among the {len(self)} ids of the pool, e.g. "
                f"{_short(unknown[:5])}; build ProblemIds from every id of the pool"
            )
        return torch.tensor(out, dtype=torch.int64)

    def decode(self, ids: torch.Tensor | Iterable[int]) -> list[Hashable]:
        """The pool's ids at integer positions ``ids`` (e.g. ``selection.ids``), in order.

        Raises:
            GradAlignError: ``ids`` that are not 1-D integers in ``[0, len(self))``.
        """
        pos = _ids_in_range("ProblemIds.decode", "ids", ids, len(self))
        return [self._names[i] for i in pos.tolist()]
