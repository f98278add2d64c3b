"""The collectives of a distributed selection: a monitored barrier that names late ranks, and the
all-reduces and all-gathers of batch statistics, target state, candidate rows and tables."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist

from gradalign._calls import current_call
from gradalign.candidates import Candidates
from gradalign.distributed._settings import Distributed
from gradalign.errors import GradAlignError
from gradalign.objective import BatchStats
from gradalign.rollouts import Rollouts


def _seconds(settings: Distributed) -> str:
    td = settings.timedelta
    return "the process group's timeout" if td is None else f"{td.total_seconds():g} s"


def _late_ranks(message: str, settings: Distributed) -> str:
    """'rank 1' / 'ranks 1, 2' from gloo's monitored_barrier message, else the peer if only one."""
    found = re.search(r"[Rr]anks?:?\s*\[?([\d,\s]+)\]?\s*failed to pass", message)
    if found:
        ranks = [r for r in re.split(r"[,\s]+", found.group(1)) if r]
        return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(ranks)}"
    # Rank 0 talks to every rank in a monitored barrier, the others only to rank 0.
    me, world = dist.get_rank(settings.group), dist.get_world_size(settings.group)
    peers = [r for r in range(world) if r != me] if me == 0 else [0]
    return f"rank {peers[0]}" if len(peers) == 1 else "a rank"


def barrier(phase: str, settings: Distributed) -> None:
    """Wait for every rank of the group before ``phase``, at most ``settings.timeout``.

    Raises:
        GradAlignError: a rank did not arrive in time (it died, hangs or is far slower), e.g.
            ``GradAlign.select: rank 1 did not reach the all-reduce of the targets within 30 s``.
    """
    if "gloo" not in str(dist.get_backend(settings.group)):
        return  # no monitored barrier: the group's own timeout bounds the collective
    try:
        dist.monitored_barrier(settings.group, timeout=settings.timedelta, wait_all_ranks=True)
    except RuntimeError as exc:
        text = str(exc)
        how = "" if "failed to pass" in text else " (its connection closed: it probably exited)"
        raise GradAlignError(
            f"{current_call('GradAlign')}: {_late_ranks(text, settings)} did not reach {phase} "
            f"within {_seconds(settings)}{how}; torch.distributed: {text.splitlines()[0]}"
        ) from exc


@contextlib.contextmanager
def _collective(phase: str, settings: Distributed) -> Iterator[None]:
    """A monitored barrier, then the collective with its backend errors named."""
    barrier(phase, settings)
    try:
        yield
    except RuntimeError as exc:
        raise GradAlignError(
            f"{current_call('GradAlign')}: {phase} failed across ranks (a rank died or timed out "
            f"after {_seconds(settings)}): {str(exc).splitlines()[0]}"
        ) from exc


def _gather_objects(phase: str, payload: Any, settings: Distributed) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size(settings.group)
    with _collective(phase, settings):
        dist.all_gather_object(out, payload, group=settings.group)
    return out


def _duplicates(what: str, per_rank: list[torch.Tensor | None]) -> None:
    """GradAlignError naming the group ids held by more than one rank."""
    owner: dict[int, list[int]] = {}
    for rank, ids in enumerate(per_rank):
        for i in [] if ids is None else ids.tolist():
            owner.setdefault(int(i), []).append(rank)
    shared = {i: ranks for i, ranks in sorted(owner.items()) if len(ranks) > 1}
    if shared:
        shown = ", ".join(f"{i} (ranks {r})" for i, r in list(shared.items())[:10])
        raise GradAlignError(
            f"{current_call('GradAlign')}: {what} group ids must be unique across ranks (each rank "
            f"passes its own shard), got {len(shared)} shared: {shown}; shard by group or pass "
            "distributed=False to score on every rank alone"
        )


def _device(settings: Distributed) -> torch.device:
    backend = str(dist.get_backend(settings.group))
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_max(value: int, settings: Distributed, *, phase: str = "an all-reduce") -> int:
    """The largest ``value`` over the ranks of the group."""
    t = torch.tensor([value], dtype=torch.int64, device=_device(settings))
    with _collective(phase, settings):
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=settings.group)
    return int(t.item())


def all_reduce_target_state(
    sums: torch.Tensor | None,
    weights: torch.Tensor | None,
    settings: Distributed,
    *,
    group_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the (Q, D) target sums and (Q,) weights of every rank.

    Args:
        sums: this rank's ``TargetAccumulator.state()[0]``, or None for a rank without
            validation groups.
        weights: the matching (Q,) weights, or None.
        settings: the group and timeout.
        group_ids: this rank's validation group ids; ids held by two ranks raise.

    Returns:
        (Q, D) and (Q,) float32 on the device of ``sums`` (CPU for a rank without groups).

    Raises:
        GradAlignError: no rank has validation groups, the ranks disagree on (Q, D) (different
            models, extractors or tasks), a validation group id is on two ranks, or a rank did
            not arrive in time.
    """
    call = current_call("GradAlign.targets")
    shape = None if sums is None else tuple(sums.shape)
    ids = None if group_ids is None else group_ids.detach().cpu()
    info = _gather_objects("the exchange of validation shapes", (shape, ids), settings)
    _duplicates("validation", [i for _, i in info])
    shapes = {s for s, _ in info if s is not None}
    if not shapes:
        raise GradAlignError(f"{call}: no rank passed validation rollouts")
    if len(shapes) > 1:
        by_rank = {r: s for r, (s, _) in enumerate(info)}
        raise GradAlignError(
            f"{call}: the ranks' target sums must share one (Q, D) shape (same model, extractor "
            f"and tasks everywhere), got {by_rank}"
        )
    (q, d) = shapes.pop()
    device = _device(settings)
    flat = torch.zeros(q * d + q, dtype=torch.float32, device=device)  # (Q*D + Q,)
    if sums is not None and weights is not None:
        flat[: q * d] = sums.reshape(-1).to(device, torch.float32)
        flat[q * d :] = weights.to(device, torch.float32)
    with _collective("the all-reduce of the targets", settings):
        dist.all_reduce(flat, group=settings.group)
    home = torch.device("cpu") if sums is None else sums.device
    return flat[: q * d].view(q, d).to(home), flat[q * d :].to(home)


def all_gather_rows(
    what: str,
    ids: torch.Tensor | None,
    rows: Mapping[str, torch.Tensor | None],
    settings: Distributed,
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """All ranks' per-group rows, merged and sorted by group id.

    Args:
        what: what the rows are ("candidate"), for messages.
        ids: (G_r,) this rank's group ids, or None for a rank without a shard.
        rows: name -> (G_r, ...) values per group (None values stay None).
        settings: the group and timeout.

    Returns:
        (G,) ids ascending and name -> (G, ...) rows in that order, on the CPU.

    Raises:
        GradAlignError: an id is on two ranks, no rank has rows, or a rank did not arrive.
    """
    payload = None
    if ids is not None:
        payload = (
            ids.detach().cpu(),
            {k: None if v is None else v.detach().cpu() for k, v in rows.items()},
        )
    gathered = _gather_objects(f"the all-gather of the {what} scores", payload, settings)
    parts = [p for p in gathered if p is not None]
    _duplicates(what, [None if p is None else p[0] for p in gathered])
    if not parts:
        raise GradAlignError(f"{current_call('GradAlign')}: no rank passed {what} rollouts")
    all_ids = torch.cat([p[0] for p in parts])  # (G,)
    order = torch.argsort(all_ids)
    merged: dict[str, torch.Tensor | None] = {}
    for name in rows:
        values = [p[1][name] for p in parts]
        merged[name] = None if values[0] is None else torch.cat(values)[order]
    return all_ids[order], merged


def all_gather_alignment(
    ids: torch.Tensor | None,
    dot: torch.Tensor | None,
    grad_norm: torch.Tensor | None,
    zero_spread: torch.Tensor | None,
    settings: Distributed,
    *,
    grads: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """All ranks' candidate rows: ``(ids, dot, grad_norm, zero_spread, grads)`` sorted by id.

    Shapes: (G,), (G, Q), (G,), (G,) and (G, D) or None; a rank without candidates passes None.
    """
    rows = {"dot": dot, "grad_norm": grad_norm, "zero_spread": zero_spread, "grads": grads}
    out_ids, out = all_gather_rows("candidate", ids, rows, settings)
    dot_, norm_, spread_ = out["dot"], out["grad_norm"], out["zero_spread"]
    if dot_ is None or norm_ is None or spread_ is None:
        raise GradAlignError(f"{current_call('GradAlign')}: a rank sent candidates without scores")
    return out_ids, dot_, norm_, spread_, out["grads"]


def all_reduce_batch_stats(
    stats: BatchStats | None, settings: Distributed, *, phase: str
) -> BatchStats | None:
    """The batch statistics of every rank's shard combined (None when no rank has one).

    With them each rank prepares its shard exactly as the whole batch would be prepared, which is
    what makes ``scale_rewards="batch"`` and the default length of ``"seq-mean-token-sum-norm"``
    work across processes.
    """
    combined: BatchStats | None = None
    for item in _gather_objects(phase, stats, settings):
        if item is not None:
            combined = item if combined is None else combined.combine(item)
    return combined


def all_gather_candidates(rollouts: Rollouts | None, settings: Distributed) -> Candidates:
    """Every rank's groups as one [`Candidates`][gradalign.candidates.Candidates] table (ids, accuracy, pass rate, reward_std).

    Pass rates and reward spreads are computed locally per group (a group lives on one rank), so
    they equal the single-process ones exactly.
    """
    local = None if rollouts is None else Candidates.from_rollouts(rollouts)
    ids, rows = all_gather_rows(
        "candidate",
        None if local is None else local.ids,
        {
            "accuracy": None if local is None else local.accuracy,
            "reward_std": None if local is None else local.reward_std,
            "pass_rate": None if local is None else local.pass_rate,
        },
        settings,
    )
    return Candidates(
        ids=ids,
        accuracy=rows["accuracy"],
        reward_std=rows["reward_std"],
        pass_rate=rows["pass_rate"],
    )
