"""Private: content fingerprints of settings, model weights and rollout groups (for the store).

A fingerprint is a short hex digest of content, never of ``repr``: two preconditioners with other
values, another model, or other rewards for the same group ids give other fingerprints.

Implementations: `settings_digest` (extractor and objective settings, tensors by value),
`model_digest` (parameter names, shapes, dtypes and an evenly spaced sample of values) and
`group_digests` (each group's rows: attended tokens, response flags, rewards, log-probs;
the padding side does not change it).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from gradalign.rollouts import Rollouts

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


def model_digest(model: nn.Module) -> str:
    """Digest of parameter names, shapes, dtypes and ``_SAMPLE`` evenly spaced values of each."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLE)
        h.update(name.encode())
        h.update(_tensor_bytes(flat[::step][:_SAMPLE].float()))
        h.update(f"{tuple(p.shape)}{p.dtype}".encode())
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
