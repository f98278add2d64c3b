"""verl integration: a curriculum sampler over GradAlign selections, and DataProto -> Rollouts.

Implementations: :class:`GradAlignSampler` (an ``AbstractCurriculumSampler`` that verl loads from
``data.sampler.class_path`` / ``data.sampler.class_name``), :class:`SamplerSettings` (its options,
read from ``data_config.gradalign``), :func:`group_batch` (a DataProto's rows grouped by ``uid``,
each group mapped to its dataset index, with per-row rewards) and :func:`rollouts_from_dataproto`
(a DataProto as :class:`~gradalign.Rollouts`, one group per problem).

What runs where. verl builds the sampler in its driver process, which holds no model, and calls
``sampler.update(batch)`` after every training step with the step's DataProto. So:

* ``update(batch)`` (driver) groups the rows by ``non_tensor_batch["uid"]`` (never by position:
  verl reorders rows when balancing), maps each group to its dataset index, and records each
  problem's pass rate (mean reward of its rollouts) in :attr:`GradAlignSampler.pass_rates`.
* Gradient scoring needs the current policy and rollouts of the round's candidates and of the
  validation set, which the sampler does not have. Call :meth:`GradAlignSampler.next_candidates`,
  generate those rollouts, turn them into :class:`~gradalign.Rollouts` with
  :func:`rollouts_from_dataproto`, and call :meth:`GradAlignSampler.score_and_select` wherever the
  model lives (a custom trainer, a worker; several ranks may each pass a shard, see
  :mod:`gradalign.distributed`). Or score elsewhere and hand the result to
  :meth:`GradAlignSampler.record`. An ``on_update`` hook (``data.gradalign.on_update``, a
  ``"module:function"`` called as ``fn(sampler, batch)``) runs at the end of every ``update``.
* ``__iter__`` serves the latest recorded selection (the whole pool before the first), padded to
  whole batches of ``data.train_batch_size``; a selection recorded mid-epoch is served from the
  next epoch on. verl needs ``data.dataloader_num_workers=0`` for curriculum samplers.

verl reads ``non_tensor_batch["index"]`` from ``extra_info["index"]`` of each data row (0 when
absent). The sampler takes it as the row's position in the training dataset unless
``index_lookup`` is set, which reads every row's index once to build the map. verl 0.8 and later
have no ``verl.experimental.dataset.sampler``; there the class derives from
``torch.utils.data.Sampler`` and is used by passing it to the trainer yourself.

Shape glossary: S rows (rollouts), L prompt + response columns, R response columns, U uid groups,
N dataset rows (the pool).
"""

# No ``from __future__ import annotations``: verl's class_path may load this file by path without
# registering it in sys.modules, and dataclasses cannot resolve string annotations there.
import dataclasses
import importlib
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Sampler

from gradalign.curriculum import Curriculum, SelectionSampler
from gradalign.errors import GradAlignError
from gradalign.policies import TopFraction, TopK
from gradalign.rollouts import Rollouts
from gradalign.selector import GradAlign, Selection

if TYPE_CHECKING:
    _SamplerBase = Sampler[int]
else:
    try:  # verl <= 0.7: the base class that data.sampler.class_path must subclass
        from verl.experimental.dataset.sampler import AbstractCurriculumSampler as _SamplerBase
    except ImportError:
        _SamplerBase = Sampler

__all__ = [
    "BatchGroups",
    "GradAlignSampler",
    "SamplerSettings",
    "group_batch",
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
        ids, inv = torch.unique(self.row_ids, sorted=True, return_inverse=True)
        counts = torch.bincount(inv, minlength=len(ids))
        sums = torch.zeros(len(ids), dtype=torch.float64).index_add_(0, inv, self.rewards.double())
        return ids, counts, (sums / counts).float()


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
    """A verl DataProto as :class:`~gradalign.Rollouts`, one group per problem.

    Each row keeps its attended tokens (verl left-pads prompts and right-pads responses), moved
    to the left so rows are right-padded as :class:`~gradalign.Rollouts` expects; the response
    mask is verl's ``response_mask`` (tool outputs of multi-turn rollouts stay as context). Group
    ids are dataset indices (see :func:`group_batch`): uids of the same problem form one group.

    Args:
        batch: a DataProto with ``responses`` (S, R), ``attention_mask`` (S, L), ``input_ids``
            (S, L) or ``prompts`` (S, L - R), token rewards (S, R), and ``uid`` (+ index) arrays.
        group_key: as in :func:`group_batch`.
        index_key: as in :func:`group_batch`.
        index_to_position: as in :func:`group_batch`.
        reward_key: as in :func:`group_batch`.
        pad_token_id: the padding id of the packed rows.
        include_logprobs: carry ``old_log_probs`` and ``ref_log_prob`` (S, R) when present.

    Example:
        >>> ro = rollouts_from_dataproto(batch)  # doctest: +SKIP
        >>> sel = GradAlign().select(model, ro, validation)  # ids are dataset indices  # doctest: +SKIP
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


def _load_callable(where: str, spec: str) -> Callable[..., Any]:
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise GradAlignError(
            f"{where}: on_update must be 'package.module:function', got {spec!r} ({exc})"
        ) from exc
    if not callable(fn):
        raise GradAlignError(f"{where}: on_update {spec!r} is not callable")
    return fn


@dataclass(frozen=True)
class SamplerSettings:
    """Options of :class:`GradAlignSampler`, from ``data_config.gradalign`` (all optional).

    Args:
        chunk_size: M candidates per round; None = the whole dataset.
        seed: seed of the chunks and of the serving order; None = ``data.seed`` or 0.
        shuffle: serve each selection in a seeded random order (else in rank order).
        select_fraction: keep the best ``round(fraction * M)`` candidates (the paper's M/q).
        select_k: keep the best k instead (overrides ``select_fraction``).
        score: "cosine" (the paper's) or "inner_product".
        target: validation target, "mean", "normalized-mean" or "batch".
        index_key: non-tensor key of the dataset index ("index", verl's ``extra_info.index``).
        index_lookup: read every dataset row's ``index_key`` once to map it to its position
            (needed when ``extra_info.index`` is not the row position, e.g. after filtering).
        reward_key: token reward tensor; None = "token_level_scores", else "token_level_rewards".
        on_update: ``"package.module:function"`` called as ``fn(sampler, batch)`` after each update.
    """

    chunk_size: int | None = None
    seed: int | None = None
    shuffle: bool = True
    select_fraction: float = 0.5
    select_k: int | None = None
    score: str = "cosine"
    target: str = "mean"
    index_key: str = "index"
    index_lookup: bool = False
    reward_key: str | None = None
    on_update: str | None = None

    @classmethod
    def from_config(cls, data_config: Any) -> "SamplerSettings":
        """Read ``data_config["gradalign"]`` (a dict or OmegaConf node; absent = defaults)."""
        node = None if data_config is None else data_config.get("gradalign", None)
        raw = {} if node is None else {str(k): v for k, v in node.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise GradAlignError(
                f"GradAlignSampler: unknown data.gradalign keys {unknown}; known: {sorted(known)}"
            )
        if raw.get("seed") is None and data_config is not None:
            raw["seed"] = data_config.get("seed", None)
        return cls(**raw)


class GradAlignSampler(_SamplerBase):
    """verl curriculum sampler serving GradAlign selections; see the module docstring.

    Args:
        data_source: the training dataset (verl's ``RLHFDataset``); N = ``len(data_source)``.
        data_config: verl's ``data`` config: reads ``gradalign`` (see :class:`SamplerSettings`),
            ``seed``, ``train_batch_size`` and ``dataloader_num_workers``.
        selector: the :class:`~gradalign.GradAlign` to score with; default built from settings.
        on_update: a callable ``fn(sampler, batch)`` run after each update (overrides settings).

    Example (verl <= 0.7 command line)::

        data.sampler.class_path=pkg://gradalign.integrations.verl \\
        data.sampler.class_name=GradAlignSampler data.dataloader_num_workers=0 \\
        +data.gradalign.chunk_size=512 +data.gradalign.select_fraction=0.25
    """

    def __init__(
        self,
        data_source: Sized,
        data_config: Any = None,
        *,
        selector: GradAlign | None = None,
        on_update: Callable[["GradAlignSampler", Any], None] | None = None,
    ) -> None:
        where = "GradAlignSampler"
        self.settings = st = SamplerSettings.from_config(data_config)
        workers = None if data_config is None else data_config.get("dataloader_num_workers", 0)
        if workers:
            raise GradAlignError(
                f"{where}: data.dataloader_num_workers must be 0 so that new selections reach the "
                f"loader (verl requires it of curriculum samplers), got {workers}"
            )
        n = len(data_source)
        seed = 0 if st.seed is None else st.seed
        self.curriculum = Curriculum(pool_size=n, chunk_size=st.chunk_size or n, seed=seed)
        batch = None if data_config is None else data_config.get("train_batch_size", None)
        self._sampler = SelectionSampler(
            self.curriculum, seed=seed, shuffle=st.shuffle, batch_size=batch
        )
        policy = TopK(st.select_k) if st.select_k is not None else TopFraction(st.select_fraction)
        self.selector = selector or GradAlign(scorer=st.score, policy=policy, target=st.target)
        if on_update is None and st.on_update is not None:
            on_update = _load_callable(where, st.on_update)
        self._on_update = on_update
        self.index_to_position = self._lookup(data_source) if st.index_lookup else None

    def _lookup(self, data_source: Any) -> dict[int, int]:
        key, out = self.settings.index_key, {}
        for position in range(len(data_source)):
            row = data_source[position]
            value = row.get(key, dict(row.get("extra_info") or {}).get(key))
            out[_as_index("GradAlignSampler", key, position, value)] = position
        return out

    # torch Sampler ------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[int]:
        return iter(self._sampler)

    def __len__(self) -> int:
        return len(self._sampler)

    def set_epoch(self, epoch: int) -> None:
        """Reseed the serving order (as ``DistributedSampler.set_epoch``)."""
        self._sampler.set_epoch(epoch)

    # verl -------------------------------------------------------------------------------------

    def update(self, batch: Any) -> None:
        """Record each problem's pass rate from a training step's DataProto (rows grouped by uid)."""
        groups = self.group(batch)
        ids, counts, means = groups.problem_pass_rates()
        n = self.curriculum.pool_size
        bad = ids[(ids < 0) | (ids >= n)].tolist()
        if bad:
            raise GradAlignError(
                f"GradAlignSampler.update: dataset indices must be in [0, {n}), "
                f"got {bad[:10]}; set data.gradalign.index_lookup=true if extra_info.index is not "
                "the row position"
            )
        self.curriculum.observe(ids, means, counts)
        if self._on_update is not None:
            self._on_update(self, batch)

    def group(self, batch: Any) -> BatchGroups:
        """:func:`group_batch` with this sampler's index and reward settings."""
        return group_batch(
            batch,
            index_key=self.settings.index_key,
            index_to_position=self.index_to_position,
            reward_key=self.settings.reward_key,
        )

    def rollouts(self, batch: Any, **kwargs: Any) -> Rollouts:
        """:func:`rollouts_from_dataproto` with this sampler's index and reward settings."""
        kwargs.setdefault("index_key", self.settings.index_key)
        kwargs.setdefault("index_to_position", self.index_to_position)
        kwargs.setdefault("reward_key", self.settings.reward_key)
        return rollouts_from_dataproto(batch, **kwargs)

    @property
    def num_updates(self) -> int:
        """Training batches seen by :meth:`update`."""
        return self.curriculum.num_observations

    @property
    def pass_rates(self) -> dict[str, torch.Tensor]:
        """(N,) per problem: ``count`` of rollouts seen in updates, ``mean`` reward over them,
        ``last`` mean reward of the latest update that saw it and ``last_update`` (-1: never);
        the curriculum's :meth:`~gradalign.Curriculum.pass_rates`."""
        rates = self.curriculum.pass_rates()
        rates["last_update"] = rates.pop("last_observation")
        return rates

    # GradAlign rounds ----------------------------------------------------------------------------

    def next_candidates(self) -> torch.Tensor:
        """Start a round: (<= M,) dataset indices whose rollouts :meth:`score_and_select` needs."""
        return self.curriculum.next_chunk()

    def score_and_select(
        self,
        model: torch.nn.Module,
        candidates: Rollouts | None,
        validation: Rollouts | None,
        *,
        tasks: Mapping[int, Any] | None = None,
        progress: bool = False,
    ) -> Selection:
        """Score the round's candidates with the selector, record and return the selection.

        ``candidates`` group ids must be dataset indices (as :func:`rollouts_from_dataproto`
        gives). The selection is served from the next epoch of the dataloader on.
        """
        if self.curriculum.round < 0:
            raise GradAlignError(
                "GradAlignSampler.score_and_select: no round started; call next_candidates() first"
            )
        driver = self.selector.driver()
        if driver is not None:  # each rank passes its shard (None for none)
            sel = driver.select(model, candidates, validation, tasks=tasks, progress=progress)
        elif candidates is None or validation is None:
            raise GradAlignError(
                "GradAlignSampler.score_and_select: candidates and validation rollouts are needed "
                "(None is only for a rank without a shard, with torch.distributed initialized)"
            )
        else:
            sel = self.selector.select(
                model, candidates, validation, tasks=tasks, progress=progress
            )
        self.record(sel)
        return sel

    def record(self, selection: Selection | torch.Tensor | Sequence[int]) -> None:
        """Record a selection made elsewhere (a Selection, or dataset indices in rank order)."""
        ids = torch.as_tensor(getattr(selection, "ids", selection))
        if ids.numel() == 0:
            raise GradAlignError(
                "GradAlignSampler.record: the selection is empty; the sampler would serve nothing"
            )
        self.curriculum.record(selection)

    # checkpoints (torchdata's StatefulDataLoader saves these) --------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The curriculum's position, records and observations, as plain Python."""
        return {"curriculum": self.curriculum.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`."""
        if not isinstance(state, Mapping) or "curriculum" not in state:
            raise GradAlignError(
                "GradAlignSampler.load_state_dict: the state must hold 'curriculum', got keys "
                f"{sorted(state)[:10] if isinstance(state, Mapping) else type(state).__name__}"
            )
        self.curriculum.load_state_dict(state["curriculum"])
