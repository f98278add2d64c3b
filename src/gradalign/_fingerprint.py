"""Private: content fingerprints of settings, model weights and rollout groups (for the store and
for the ranks of a distributed selection).

A fingerprint is a short hex digest of content, never of ``repr``: two preconditioners with other
values, another model, or other rewards for the same group ids give other fingerprints.

Implementations: `settings_digest` (extractor and objective settings, tensors by value),
`model_digest` (class, parameter names, shapes, dtypes, trainable flags and an evenly spaced
sample of values), `group_digests` (each group's rows: attended tokens, response flags, rewards,
log-probs; the padding side does not change it), and the ranks' check: `fingerprint` (what every
rank of a distributed selection must agree on) and `check_same_fingerprint`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gradalign._calls import current_call
from gradalign.errors import GradAlignError
from gradalign.rollouts import Rollouts

if TYPE_CHECKING:
    from gradalign.selector import GradAlign

_SAMPLE = 64  # values sampled per parameter


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    head = f"{t.dtype}{tuple(t.shape)}".encode()
    return head + t.view(torch.uint8).numpy().tobytes() if t.numel() else head


def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        h.update(b"T" + _tensor_bytes(obj))
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        h.update(f"D{type(obj).__qualname__}".encode())
        for f in dataclasses.fields(obj):
            h.update(f.name.encode())
            _feed(h, getattr(obj, f.name))
    elif isinstance(obj, Mapping):
        h.update(b"M")
        for key in sorted(obj, key=str):
            h.update(str(key).encode())
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for item in obj:
            _feed(h, item)
    else:
        h.update(f"{type(obj).__qualname__}:{obj!r}".encode())


def settings_digest(*objects: Any) -> str:
    """Digest of dataclass settings (extractors, objectives), tensors hashed by value."""
    h = hashlib.sha256()
    for obj in objects:
        _feed(h, obj)
    return h.hexdigest()[:32]


def _is_sharded(p: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - builds without distributed tensors
        return False
    return isinstance(p, DTensor) or isinstance(p.data, DTensor)


def model_digest(model: nn.Module) -> str:
    """Digest of the model's class, parameter names, shapes, dtypes, trainable flags and
    ``_SAMPLE`` evenly spaced values of each parameter (as float64 bytes, so a float32 weight
    is hashed exactly).

    Sharded parameters (FSDP2's DTensor) contribute their global shape only: each rank holds
    another shard, so their values cannot be compared without a collective of their own.
    The store and the ranks' settings check both use this one digest.
    """
    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, p in model.named_parameters():
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|{p.requires_grad}".encode())
        if _is_sharded(p) or p.numel() == 0:
            continue
        flat = p.detach().reshape(-1)
        h.update(_tensor_bytes(flat[:: max(1, flat.numel() // _SAMPLE)][:_SAMPLE].double()))
    return h.hexdigest()[:32]


def group_digests(rollouts: Rollouts) -> dict[int, str]:
    """Group id -> digest of its rows' content, in row order, padding removed."""
    out: dict[int, Any] = {}
    attn = rollouts.attention_mask.bool().cpu()
    parts = {
        "ids": rollouts.input_ids.cpu(),
        "resp": rollouts.response_mask.cpu(),
        "old": None if rollouts.old_logprobs is None else rollouts.old_logprobs.cpu(),
        "ref": None if rollouts.ref_logprobs is None else rollouts.ref_logprobs.cpu(),
    }
    rewards, groups = rollouts.rewards.cpu(), rollouts.group_ids.cpu().tolist()
    for row, g in enumerate(groups):
        h = out.setdefault(g, hashlib.sha256())
        keep = attn[row]
        for key, value in parts.items():
            if value is not None:
                h.update(key.encode() + _tensor_bytes(value[row][keep]))
        h.update(_tensor_bytes(rewards[row : row + 1]))
    return {g: h.hexdigest()[:24] for g, h in out.items()}


# What every rank must agree on before a collective selection ----------------------------------

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


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
        "model": model_digest(model),
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
