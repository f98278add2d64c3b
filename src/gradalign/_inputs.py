"""Private: the checks of what a selection call is given (rollouts, task labels) and of what a
policy returns, each a GradAlignError naming the call."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch

from gradalign._calls import current_call
from gradalign.alignment import Targets
from gradalign.errors import GradAlignError
from gradalign.policies import Candidates
from gradalign.rollouts import Rollouts


def check_selected(policy: Any, out: Any, table: Candidates) -> torch.Tensor:
    """A policy's output as (k,) int64 ids: integers, 1-D, unique, all among the candidates."""
    call = f"GradAlign.apply_policy: the policy {getattr(policy, '__name__', repr(policy))}"
    try:
        ids = torch.as_tensor(out) if out is not None else None
    except (TypeError, ValueError, RuntimeError):
        ids = None
    if ids is None or ids.dim() != 1 or not (ids.numel() == 0 or _is_int(ids)):
        shape = "" if ids is None else f" {ids.dtype} of shape {tuple(ids.shape)}"
        raise GradAlignError(
            f"{call} must return a 1-D sequence of integer candidate ids, got "
            f"{type(out).__name__}{shape}"
        )
    ids = ids.long().cpu()
    unknown = ids[~torch.isin(ids, table.ids)]
    if unknown.numel():
        raise GradAlignError(
            f"{call} returned ids that are not candidates: {unknown[:10].tolist()}"
        )
    if ids.unique().numel() != ids.numel():
        raise GradAlignError(f"{call} returned an id twice: {ids.tolist()[:20]}")
    return ids


def _is_int(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def checked_targets(targets: Targets) -> Targets:
    """Targets passed in place of validation rollouts: (Q, D) directions and Q labels."""
    directions = targets.directions
    if not isinstance(directions, torch.Tensor) or directions.dim() != 2:
        raise GradAlignError(
            "GradAlign.alignment: Targets.directions must be a (Q, D) tensor, got "
            f"{type(directions).__name__} {tuple(getattr(directions, 'shape', ()))}"
        )
    if len(targets.labels) != directions.shape[0]:
        raise GradAlignError(
            f"GradAlign.alignment: Targets has {directions.shape[0]} directions but "
            f"{len(targets.labels)} labels"
        )
    return targets


def check_rollouts(what: str, value: Any, alternative: str = "") -> None:
    """A single-process call needs ``what`` as Rollouts (or ``alternative``): None stands for a
    rank without any, which only several processes (torch.distributed) can make up for."""
    if isinstance(value, Rollouts):
        return
    got = type(value).__name__
    if value is None:
        got = "None (only a rank without any passes None, when torch.distributed runs several)"
    raise GradAlignError(
        f"{current_call('GradAlign.alignment')}: {what} must be a gradalign.Rollouts"
        f"{alternative}, got {got}"
    )


def check_tasks(tasks: Any, validation: Rollouts | None) -> None:
    """``tasks`` must be a mapping, and every label must have a group in ``validation``."""
    if tasks is None:
        return
    if not isinstance(tasks, Mapping):
        raise GradAlignError(
            "GradAlign.targets: tasks must map each validation group id to a task label "
            f"(a dict), got {type(tasks).__name__}"
        )
    if validation is None:
        return
    present = {tasks[int(g)] for g in validation.unique_groups if int(g) in tasks}
    absent = sorted({t for t in tasks.values() if t not in present}, key=str)
    if absent:
        raise GradAlignError(
            f"GradAlign.targets: tasks labels {absent} have no validation group among the "
            "validation rollouts; give each task at least one validation problem or drop those "
            "labels"
        )


def warn_shared_ids(candidates: Rollouts | None, validation: Any) -> None:
    """A UserWarning when a group id is both a candidate and a validation problem."""
    if candidates is None or not isinstance(validation, Rollouts):
        return
    cand = candidates.unique_groups
    shared = cand[torch.isin(cand, validation.unique_groups.to(cand.device))]
    if shared.numel():
        warnings.warn(
            f"GradAlign.alignment: group ids {shared[:10].tolist()} are both candidates and "
            "validation problems; if they are different problems, give them distinct ids "
            "(policies, the curriculum and the store tell problems apart by id)",
            UserWarning,
            stacklevel=4,
        )
