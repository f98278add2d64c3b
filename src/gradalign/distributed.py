"""Selection over several processes: each rank scores its shard of groups, all ranks agree.

Implementations: [`Distributed`][gradalign.distributed.Distributed] (which process group, how long to wait for a late rank),
[`TorchDistributed`][gradalign.distributed.TorchDistributed] (the
[`Communicator`][gradalign.communicator.Communicator] that ``GradAlign`` uses over the ranks),
[`DistributedGradAlign`][gradalign.distributed.DistributedGradAlign] (a ``GradAlign`` pinned to a group), [`resolve`][gradalign.distributed.resolve] (``GradAlign(distributed=...)`` to a
[`Distributed`][gradalign.distributed.Distributed] or None), [`is_distributed`][gradalign.distributed.is_distributed], [`barrier`][gradalign.distributed.barrier] (a monitored barrier that
names the ranks that did not arrive), [`fingerprint`][gradalign.distributed.fingerprint] and the collectives
[`all_reduce_batch_stats`][gradalign.distributed.all_reduce_batch_stats],
[`all_reduce_target_state`][gradalign.distributed.all_reduce_target_state] (sums the target accumulators of all ranks), [`all_gather_rows`][gradalign.distributed.all_gather_rows]
and [`all_gather_alignment`][gradalign.distributed.all_gather_alignment] (variable-size per-rank rows merged by group id) and
[`all_reduce_max`][gradalign.distributed.all_reduce_max].

[`GradAlign`][gradalign.selector.GradAlign] runs its one pipeline through
[`TorchDistributed`][gradalign.distributed.TorchDistributed] when ``distributed`` resolves to a
group of several ranks (``"auto"``, the default, does when ``torch.distributed`` is initialized
with more than one rank): every rank passes its own shard of candidate and validation groups (group
ids unique across ranks; a rank without a shard passes None). Batch statistics are all-reduced
first, so each shard is weighted as in the whole batch (``scale_rewards="batch"`` included).
Validation gradients are accumulated locally and the (Q, D) sums and (Q,) weights are all-reduced,
so the target equals the single-process one for every reduction ("mean", "normalized-mean" and
"batch" are all sums). Candidate rows (dot products, norms, flags, pass rates) are all-gathered and
sorted by id, so every rank holds the whole candidate table and runs the (deterministic) policy to
the same selection.

At the first collective of every call the ranks compare a fingerprint of their settings
(extractor, objective, scorer, target, policy and its k) and of the model (class, parameter names,
shapes and dtypes, and a strided sample of the weights of every parameter that is not sharded):
a rank with another seed, model or k gives a [`GradAlignError`][gradalign.errors.GradAlignError]
naming the field and the ranks, instead of one agreed wrong selection.

Before every collective a ``monitored_barrier`` (gloo groups) waits at most ``timeout``; a rank
that died or hangs gives a [`GradAlignError`][gradalign.errors.GradAlignError] naming it instead of a hang. Other
backends (NCCL) have no monitored barrier: there the process group's own timeout applies
(``init_process_group(timeout=...)``; set ``TORCH_NCCL_ASYNC_ERROR_HANDLING=1``).

Shape glossary: G candidate groups (G_r on rank r), Q targets, D gradient dimension.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from gradalign._calls import current_call
from gradalign.alignment import Alignment
from gradalign.candidates import Candidates
from gradalign.errors import GradAlignError
from gradalign.objective import BatchStats
from gradalign.rollouts import Rollouts
from gradalign.scoring import row_norms

if TYPE_CHECKING:
    from gradalign.selector import GradAlign

__all__ = [
    "Distributed",
    "DistributedGradAlign",
    "TorchDistributed",
    "all_gather_alignment",
    "all_gather_candidates",
    "all_gather_rows",
    "all_reduce_batch_stats",
    "all_reduce_max",
    "all_reduce_target_state",
    "barrier",
    "fingerprint",
    "is_distributed",
    "resolve",
]


@dataclass(frozen=True)
class Distributed:
    """Settings of the multi-process path of [`GradAlign`][gradalign.selector.GradAlign].

    Args:
        group: the process group whose ranks share the selection; None is the default group.
        timeout: seconds (or a ``timedelta``) to wait at each synchronisation point for the
            slowest rank; None uses the group's own timeout (``init_process_group(timeout=...)``).
            It must exceed the largest difference in extraction time between ranks.

    Examples:
        >>> selector = GradAlign(distributed=Distributed(timeout=600))
        >>> selector.distributed.timeout
        600
    """

    group: Any = None
    timeout: float | timedelta | None = None

    def __post_init__(self) -> None:
        t = self.timeout
        seconds = t.total_seconds() if isinstance(t, timedelta) else t
        if seconds is not None and (isinstance(seconds, bool) or not seconds > 0):
            raise GradAlignError(f"Distributed: timeout must be > 0 seconds or None, got {t!r}")

    @property
    def timedelta(self) -> timedelta | None:
        """The timeout as a ``timedelta`` (None: the group's own)."""
        t = self.timeout
        return t if isinstance(t, timedelta) or t is None else timedelta(seconds=float(t))


def check_distributed_option(call: str, option: Any) -> bool | str | Distributed:
    """Validate a ``distributed=`` argument: "auto", True, False or a [`Distributed`][gradalign.distributed.Distributed]."""
    if option == "auto" or isinstance(option, bool | Distributed):
        return option
    raise GradAlignError(
        f"{call}: distributed must be 'auto', True, False or a gradalign.distributed.Distributed, "
        f"got {option!r}"
    )


def is_distributed(group: Any = None) -> bool:
    """Whether ``torch.distributed`` is initialized with more than one rank in ``group``."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def resolve(option: bool | str | Distributed) -> Distributed | None:
    """The settings to use now, or None for the single-process path.

    "auto" is distributed when [`is_distributed`][gradalign.distributed.is_distributed]; True or a [`Distributed`][gradalign.distributed.Distributed] require an
    initialized ``torch.distributed``; a group of one rank always takes the single-process path.
    """
    if option is False:
        return None
    settings = option if isinstance(option, Distributed) else Distributed()
    initialized = dist.is_available() and dist.is_initialized()
    if not initialized:
        if option == "auto":
            return None
        raise GradAlignError(
            f"{current_call('GradAlign')}: distributed={option!r} but torch.distributed is not "
            "initialized; call torch.distributed.init_process_group first or pass "
            "distributed=False"
        )
    return settings if dist.get_world_size(settings.group) > 1 else None


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


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_SAMPLE = 64  # weights sampled per parameter for the model's fingerprint


def _is_sharded(p: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - builds without distributed tensors
        return False
    return isinstance(p, DTensor) or isinstance(p.data, DTensor)


def _model_digest(model: nn.Module) -> str:
    """Class, parameter names, shapes, dtypes and a strided weight sample, hashed.

    Sharded parameters (FSDP2's DTensor) contribute their global shape only: each rank holds
    another shard, so their values cannot be compared without a collective of their own.
    """
    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, p in model.named_parameters():
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|{p.requires_grad}".encode())
        if _is_sharded(p) or p.numel() == 0:
            continue
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // _SAMPLE)][:_SAMPLE].double().cpu()
        # Replicas hold the same bits; 9 significant digits are exact for float32 weights.
        h.update(",".join(f"{v:.9g}" for v in sample.tolist()).encode())
    return h.hexdigest()[:16]


def fingerprint(selector: GradAlign, model: nn.Module) -> dict[str, str]:
    """What every rank must agree on: the selector's settings (readable) and the model (a digest).

    Reprs are used with memory addresses removed, so two equal settings built in two processes
    give the same text; a policy is a dataclass whose repr shows its k and seed.
    """

    def text(obj: Any) -> str:
        return _ADDRESS.sub("", repr(obj))

    return {
        "extractor": text(selector.extractor),
        "objective": text(selector.objective),
        "scorer": text(selector.scorer),
        "target": text(selector.target),
        "policy": text(selector.policy),
        "keep_grads": text(selector.keep_grads),
        "preconditioner": text(selector.preconditioner),
        "model": _model_digest(model),
    }


def _common_prefix(texts: list[str]) -> int:
    """Length of the longest prefix all ``texts`` share (character by character)."""
    first = min(texts, key=len)
    return next((i for i, ch in enumerate(first) if any(t[i] != ch for t in texts)), len(first))


def _window(text: str | None, start: int, width: int = 160) -> str:
    if text is None:
        return "None"
    head = "..." if start > 0 else ""
    tail = "..." if len(text) > start + width else ""
    return f"{head}{text[start : start + width]}{tail}"


def check_same_fingerprint(per_rank: list[dict[str, str]]) -> None:
    """GradAlignError naming each field on which the ranks' fingerprints differ."""
    problems = []
    for field in per_rank[0]:
        values = [fp.get(field) for fp in per_rank]
        if len(set(values)) > 1:
            groups: dict[str | None, list[int]] = {}
            for rank, v in enumerate(values):
                groups.setdefault(v, []).append(rank)
            # Long reprs are shown from shortly before their first difference.
            start = max(0, _common_prefix([v or "" for v in values]) - 40)
            shown = "; ".join(f"ranks {ranks}: {_window(v, start)}" for v, ranks in groups.items())
            problems.append(f"{field} ({shown})")
    if problems:
        raise GradAlignError(
            f"{current_call('GradAlign')}: every rank must use the same settings and model, but "
            f"they differ in {'; and '.join(problems)}; build the selector and load the model "
            "the same way on every rank"
        )


class TorchDistributed:
    """The [`Communicator`][gradalign.communicator.Communicator] over a ``torch.distributed`` group.

    Every rank passes its own shard (group ids unique across ranks; None for a rank without one).
    Batch statistics and target sums are all-reduced, candidate rows and tables all-gathered and
    sorted by id; before each collective a monitored barrier waits at most ``settings.timeout``.

    Args:
        settings: the process group and timeout.
    """

    sharded = True

    def __init__(self, settings: Distributed) -> None:
        self.settings = settings

    def check_same(self, selector: GradAlign, model: nn.Module) -> None:
        per_rank = _gather_objects(
            "the comparison of settings", fingerprint(selector, model), self.settings
        )
        check_same_fingerprint(per_rank)

    def batch_stats(self, rollouts: Rollouts | None, what: str) -> BatchStats | None:
        local = None if rollouts is None else BatchStats.of(rollouts)
        return all_reduce_batch_stats(
            local, self.settings, phase=f"the exchange of {what} statistics"
        )

    def reduce_target(
        self,
        sums: torch.Tensor | None,
        weights: torch.Tensor | None,
        group_ids: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return all_reduce_target_state(sums, weights, self.settings, group_ids=group_ids)

    def gather_alignment(
        self,
        local: Alignment | None,
        *,
        target: torch.Tensor,
        labels: tuple[Any, ...],
        aggregate: str,
    ) -> Alignment:
        ids, dot, norm, spread, grads = all_gather_alignment(
            None if local is None else local.ids,
            None if local is None else local.dot,
            None if local is None else local.grad_norm,
            None if local is None else local.zero_spread,
            self.settings,
            grads=None if local is None else local.grads,
        )
        return Alignment(
            ids=ids,
            dot=dot,
            grad_norm=norm,
            target_norm=row_norms(target),
            zero_spread=spread,
            task_labels=labels,
            grads=grads,
            aggregate=aggregate,
        )

    def gather_candidates(self, rollouts: Rollouts | None) -> Candidates:
        return all_gather_candidates(rollouts, self.settings)


class DistributedGradAlign:
    """A [`GradAlign`][gradalign.selector.GradAlign] bound to a process group: a thin alias.

    ``GradAlign(distributed="auto")`` (the default) already runs over every rank when
    ``torch.distributed`` is initialized with several; this alias pins the group and timeout
    (``GradAlign(..., distributed=Distributed(group, timeout))`` does the same) and refuses to
    start without an initialized process group. Every method is the selector's, on a copy of it.

    Args:
        selector: the settings: extractor, objective, scorer, policy, target.
        settings: the process group and timeout; None for the default group.

    Examples:
        Inside a ``torchrun`` job, after ``torch.distributed.init_process_group``:

        ```python
        driver = DistributedGradAlign(GradAlign(FactorizedGradient()))
        sel = driver.select(model, my_candidate_shard, my_validation_shard)  # same on every rank
        ```
    """

    def __init__(self, selector: GradAlign, settings: Distributed | None = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise GradAlignError(
                "DistributedGradAlign: torch.distributed is not initialized; call "
                "torch.distributed.init_process_group first"
            )
        self.settings = Distributed() if settings is None else settings
        self.selector = copy.copy(selector)
        self.selector.distributed = self.settings

    def __getattr__(self, name: str) -> Any:
        # targets, alignment, score, select, apply_policy: the bound selector's
        return getattr(self.__dict__["selector"], name)
