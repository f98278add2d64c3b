"""The pure part of the verl integration: DataProto batches as groups and as Rollouts.

Nothing here imports verl: the converters read a ``DataProto``'s ``batch`` (tensors) and
``non_tensor_batch`` (numpy arrays) by name, so they work on any object laid out the same way.
[`gradalign.integrations.verl`][gradalign.integrations.verl] holds the sampler.

Implementations: [`BatchGroups`][gradalign.integrations.verl_data.BatchGroups], [`group_batch`][gradalign.integrations.verl_data.group_batch] (a DataProto's rows grouped by ``uid``,
each group mapped to its dataset index, with per-row rewards) and [`rollouts_from_dataproto`][gradalign.integrations.verl_data.rollouts_from_dataproto]
(a DataProto as [`Rollouts`][gradalign.rollouts.Rollouts], one group per problem).

Shape glossary: S rows (rollouts), L prompt + response columns, R response columns, U uid groups.
"""

# No ``from __future__ import annotations``: verl's class_path may load the sampler module by path,
# and dataclasses cannot resolve string annotations there.
import importlib
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from gradalign.errors import GradAlignError
from gradalign.rollouts import Rollouts, group_stats

__all__ = [
    "REWARD_KEYS",
    "BatchGroups",
    "group_batch",
    "load_callable",
    "rollouts_from_dataproto",
]

REWARD_KEYS = ("token_level_scores", "token_level_rewards")


@dataclass(frozen=True)
class BatchGroups:
    """The rows of a DataProto grouped by uid.

    Attributes:
        uids: (U,) the uid of each group, in order of first appearance.
        group_ids: (U,) int64 dataset index of each group's problem (or the group's ordinal when
            no index is read); two uids may share one (the same problem sampled twice).
        row_group: (S,) int64 position in ``uids`` of each row's group.
        rewards: (S,) float32 reward of each row (its token rewards summed over the response).
    """

    uids: tuple[Any, ...]
    group_ids: torch.Tensor
    row_group: torch.Tensor
    rewards: torch.Tensor

    @property
    def row_ids(self) -> torch.Tensor:
        """(S,) int64 problem id (dataset index) of each row."""
        return self.group_ids[self.row_group]

    def problem_pass_rates(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(P,) problem ids ascending, (P,) rollout counts and (P,) mean rewards, merging uids."""
        st = group_stats(self.row_ids, self.rewards)
        return st.ids, st.counts, st.mean.float()


def _tensors(call: str, batch: Any) -> Any:
    tensors = getattr(batch, "batch", None)
    if tensors is None or not hasattr(batch, "non_tensor_batch"):
        raise GradAlignError(
            f"{call}: batch must be a verl DataProto (with .batch and .non_tensor_batch), "
            f"got {type(batch).__name__}"
        )
    return tensors


def _keys(call: str, batch: Any) -> set[str]:
    # TensorDict refuses ``key in td``; its keys() view answers.
    return set(_tensors(call, batch).keys())


def _get(call: str, batch: Any, key: str) -> torch.Tensor:
    if key not in _keys(call, batch):
        raise GradAlignError(
            f"{call}: batch.batch has no {key!r}; got keys {sorted(_keys(call, batch))}"
        )
    return torch.as_tensor(batch.batch[key]).detach().cpu()


def _response_mask(call: str, batch: Any) -> torch.Tensor:
    """(S, R) bool: verl's ``response_mask``, else the response part of the attention mask."""
    if "response_mask" in _keys(call, batch):
        return _get(call, batch, "response_mask").bool()
    width = _get(call, batch, "responses").shape[1]
    return _get(call, batch, "attention_mask")[:, -width:].bool()


def _row_rewards(call: str, batch: Any, reward_key: str | None) -> torch.Tensor:
    """(S,) float32 sum of the token rewards over each row's response."""
    keys = _keys(call, batch)
    key = reward_key or next((k for k in REWARD_KEYS if k in keys), REWARD_KEYS[0])
    scores = _get(call, batch, key).float()  # (S, R)
    return (scores * _response_mask(call, batch)).sum(-1)


def _as_index(call: str, key: str, row: int, value: Any) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise GradAlignError(
            f"{call}: {key} of row {row} must be an integer dataset index, got {value!r}"
        ) from None


def _indices(call: str, batch: Any, index_key: str, n: int) -> list[int]:
    """(S,) the dataset index of each row: non_tensor_batch[index_key] or extra_info[index_key]."""
    extra = batch.non_tensor_batch
    if index_key in extra:
        values = list(extra[index_key])
    elif "extra_info" in extra:
        values = [dict(info or {}).get(index_key) for info in extra["extra_info"]]
    else:
        raise GradAlignError(
            f"{call}: batch.non_tensor_batch needs {index_key!r} (verl copies extra_info['index'] "
            f"there) or 'extra_info'; got keys {sorted(extra)}"
        )
    if len(values) != n:
        raise GradAlignError(f"{call}: {index_key} has {len(values)} entries for {n} rows")
    return [_as_index(call, index_key, row, v) for row, v in enumerate(values)]


def group_batch(
    batch: Any,
    *,
    group_key: str = "uid",
    index_key: str | None = "index",
    index_to_position: Mapping[int, int] | None = None,
    reward_key: str | None = None,
) -> BatchGroups:
    """Group a DataProto's rows by uid and map each group to its dataset index.

    Args:
        batch: a verl ``DataProto`` (or any object with ``.batch`` tensors and
            ``.non_tensor_batch`` arrays in its layout).
        group_key: the non-tensor key that groups rollouts of one prompt ("uid" in verl).
        index_key: the non-tensor (or ``extra_info``) key holding the dataset index; None numbers
            the groups 0..U-1 in order of first appearance.
        index_to_position: maps index values to dataset positions (default: the identity).
        reward_key: the (S, R) token reward tensor; default "token_level_scores" (the verifier's),
            else "token_level_rewards".

    Raises:
        GradAlignError: a key is missing, an index is not an integer or not in the map, or the
            rows of one uid carry different indices.
    """
    call = "group_batch"
    if group_key not in getattr(batch, "non_tensor_batch", {}):
        _tensors(call, batch)
        raise GradAlignError(f"{call}: batch.non_tensor_batch has no {group_key!r} to group rows")
    uids_per_row = list(batch.non_tensor_batch[group_key])
    first: dict[Any, int] = {}
    row_group = torch.tensor([first.setdefault(u, len(first)) for u in uids_per_row])  # (S,)
    uids = tuple(first)
    if index_key is None:
        group_ids = torch.arange(len(uids))
    else:
        rows = _indices(call, batch, index_key, len(uids_per_row))
        per_uid: dict[int, set[int]] = {}
        for g, index in zip(row_group.tolist(), rows, strict=True):
            per_uid.setdefault(g, set()).add(index)
        mixed = {uids[g]: sorted(v) for g, v in per_uid.items() if len(v) > 1}
        if mixed:
            raise GradAlignError(
                f"{call}: the rows of one {group_key} must share one {index_key}, got "
                f"{dict(list(mixed.items())[:5])}"
            )
        indices = [next(iter(per_uid[g])) for g in range(len(uids))]
        if index_to_position is not None:
            missing = [i for i in indices if i not in index_to_position]
            if missing:
                raise GradAlignError(
                    f"{call}: {index_key} values {missing[:10]} are not in the dataset's index map"
                )
            indices = [index_to_position[i] for i in indices]
        group_ids = torch.tensor(indices, dtype=torch.int64)
    rewards = _row_rewards(call, batch, reward_key)
    if rewards.shape != (len(uids_per_row),):
        raise GradAlignError(
            f"{call}: {len(uids_per_row)} {group_key}s but rewards of shape {tuple(rewards.shape)}"
        )
    return BatchGroups(uids, group_ids.long(), row_group.long(), rewards)


def _pack(keep: torch.Tensor, values: torch.Tensor, fill: float | bool) -> torch.Tensor:
    """(S, L) values -> (S, T) with each row's kept entries moved to the left, in order."""
    width = max(2, int(keep.sum(1).max()))
    out = torch.full((keep.shape[0], width), fill, dtype=values.dtype)
    rows = torch.arange(keep.shape[0])[:, None].expand_as(keep)  # (S, L)
    cols = keep.long().cumsum(1) - 1  # (S, L) destination column of each kept entry
    out[rows[keep], cols[keep]] = values[keep]
    return out


def rollouts_from_dataproto(
    batch: Any,
    *,
    group_key: str = "uid",
    index_key: str | None = "index",
    index_to_position: Mapping[int, int] | None = None,
    reward_key: str | None = None,
    pad_token_id: int = 0,
    include_logprobs: bool = False,
) -> Rollouts:
    """A verl DataProto as [`Rollouts`][gradalign.rollouts.Rollouts], one group per problem.

    Each row keeps its attended tokens (verl left-pads prompts and right-pads responses), moved
    to the left so rows are right-padded as [`Rollouts`][gradalign.rollouts.Rollouts] expects; the response
    mask is verl's ``response_mask`` (tool outputs of multi-turn rollouts stay as context). Group
    ids are dataset indices (see [`group_batch`][gradalign.integrations.verl_data.group_batch]): uids of the same problem form one group.

    Args:
        batch: a DataProto with ``responses`` (S, R), ``attention_mask`` (S, L), ``input_ids``
            (S, L) or ``prompts`` (S, L - R), token rewards (S, R), and ``uid`` (+ index) arrays.
        group_key: as in [`group_batch`][gradalign.integrations.verl_data.group_batch].
        index_key: as in [`group_batch`][gradalign.integrations.verl_data.group_batch].
        index_to_position: as in [`group_batch`][gradalign.integrations.verl_data.group_batch].
        reward_key: as in [`group_batch`][gradalign.integrations.verl_data.group_batch].
        pad_token_id: the padding id of the packed rows.
        include_logprobs: carry ``old_log_probs`` and ``ref_log_prob`` (S, R) when present.

    Examples:
        With ``batch`` a verl ``DataProto`` after reward computation (see
        ``examples/integrations/verl_v1_scorer.py``):

        ```python
        ro = rollouts_from_dataproto(batch)
        sel = GradAlign().select(model, ro, validation)  # ids are dataset indices
        ```
    """
    call = "rollouts_from_dataproto"
    groups = group_batch(
        batch,
        group_key=group_key,
        index_key=index_key,
        index_to_position=index_to_position,
        reward_key=reward_key,
    )
    keys = _keys(call, batch)
    responses = _get(call, batch, "responses")  # (S, R)
    if "input_ids" in keys:
        ids = _get(call, batch, "input_ids")  # (S, L)
    else:
        ids = torch.cat([_get(call, batch, "prompts"), responses], dim=1)  # (S, L)
    attn = _get(call, batch, "attention_mask").bool()  # (S, L)
    s, length = ids.shape
    r = responses.shape[1]
    if tuple(attn.shape) != (s, length) or length <= r:
        raise GradAlignError(
            f"{call}: attention_mask {tuple(attn.shape)} must match input_ids {(s, length)}, "
            f"which must be longer than responses ({r} columns)"
        )
    prompt_part = torch.zeros(s, length - r, dtype=torch.bool)
    resp = torch.cat([prompt_part, _response_mask(call, batch)], dim=1) & attn  # (S, L)
    extra = {}
    if include_logprobs:
        for src, dst in (("old_log_probs", "old_logprobs"), ("ref_log_prob", "ref_logprobs")):
            if src in keys:
                full = torch.cat([prompt_part.float(), _get(call, batch, src).float()], dim=1)
                extra[dst] = _pack(attn, full, 0.0)
    return Rollouts(
        input_ids=_pack(attn, ids.long(), pad_token_id),
        attention_mask=_pack(attn, attn.long(), 0),
        response_mask=_pack(attn, resp, False),
        rewards=groups.rewards,
        group_ids=groups.row_ids,
        **extra,
    )


def load_callable(where: str, spec: str, *, what: str = "scorer") -> Callable[..., Any]:
    """The function named by ``"package.module:function"`` (a hook given in a verl config)."""
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise GradAlignError(
            f"{where}: {what} must be 'package.module:function', got {spec!r} ({exc})"
        ) from exc
    if not callable(fn):
        raise GradAlignError(f"{where}: {what} {spec!r} is not callable")
    return fn
