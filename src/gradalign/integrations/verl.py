"""verl integration: a curriculum sampler over GradAlign selections, and DataProto -> Rollouts.

Implementations: [`GradAlignSampler`][gradalign.integrations.verl.GradAlignSampler] (an ``AbstractCurriculumSampler`` that verl loads from
``data.sampler.class_path`` / ``data.sampler.class_name``) and [`SamplerSettings`][gradalign.integrations.verl.SamplerSettings] (its
options, read from ``data_config.gradalign``). The DataProto converters [`group_batch`][gradalign.integrations.verl_data.group_batch] and
[`rollouts_from_dataproto`][gradalign.integrations.verl_data.rollouts_from_dataproto] live in [`gradalign.integrations.verl_data`][gradalign.integrations.verl_data], which needs no verl,
and are re-exported here.

What runs where. verl builds the sampler in its driver process, which holds no model, and calls
``sampler.update(batch)`` after every training step with the step's DataProto. So:

* ``update(batch)`` (driver) groups the rows by ``non_tensor_batch["uid"]`` (never by position:
  verl reorders rows when balancing), maps each group to its dataset index, and records each
  problem's pass rate (mean reward of its rollouts) in `GradAlignSampler.pass_rates`.
* Gradient scoring needs the current policy and rollouts of the round's candidates and of the
  validation set, which the sampler does not have. Call [`GradAlignSampler.next_candidates`][gradalign.integrations.verl.GradAlignSampler.next_candidates],
  generate those rollouts, turn them into [`Rollouts`][gradalign.rollouts.Rollouts] with
  [`rollouts_from_dataproto`][gradalign.integrations.verl_data.rollouts_from_dataproto], and call [`GradAlignSampler.score_and_select`][gradalign.integrations.verl.GradAlignSampler.score_and_select] wherever the
  model lives (a custom trainer, a worker; several ranks may each pass a shard, see
  [`gradalign.distributed`][gradalign.distributed]). Or score elsewhere and hand the result to
  [`GradAlignSampler.record`][gradalign.integrations.verl.GradAlignSampler.record]. An ``on_update`` hook (``data.gradalign.on_update``, a
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
from collections.abc import Callable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Sampler

from gradalign._options import boolean, check_options, choice, instance, integer, option, real
from gradalign._validate import SEED_RANGE
from gradalign.curriculum import Curriculum
from gradalign.distributed import resolve
from gradalign.errors import GradAlignError
from gradalign.integrations.verl_data import (
    BatchGroups,
    _as_index,
    group_batch,
    load_callable,
    rollouts_from_dataproto,
)
from gradalign.policies import TopFraction, TopK
from gradalign.rollouts import Rollouts
from gradalign.sampler import SelectionSampler
from gradalign.scoring import Scorer, TargetReduction
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


@dataclass(frozen=True)
class SamplerSettings:
    """Options of [`GradAlignSampler`][gradalign.integrations.verl.GradAlignSampler], from ``data_config.gradalign`` (all optional).

    Args:
        chunk_size: M candidates per round; None = the whole dataset.
        seed: seed of the chunks and of the serving order; None = ``data.seed`` or 0.
        shuffle: serve each selection in a seeded random order (else in rank order).
        select_fraction: keep the best ``round(fraction * M)`` candidates (the paper's M/q; default 0.25, as ``GradAlign()``).
        select_k: keep the best k instead (overrides ``select_fraction``).
        scorer: "cosine" (the paper's) or "inner_product".
        target: validation target, "mean", "normalized-mean" or "batch".
        index_key: non-tensor key of the dataset index ("index", verl's ``extra_info.index``).
        index_lookup: read every dataset row's ``index_key`` once to map it to its position
            (needed when ``extra_info.index`` is not the row position, e.g. after filtering).
        reward_key: token reward tensor; None = "token_level_scores", else "token_level_rewards".
        on_update: ``"package.module:function"`` called as ``fn(sampler, batch)`` after each update.
    """

    chunk_size: int | None = option(None, integer(1, none=True))
    seed: int | None = option(None, integer(*SEED_RANGE, none=True))
    shuffle: bool = option(True, boolean())
    select_fraction: float = option(0.25, real(ok=lambda v: 0 < v <= 1, rule="in (0, 1]"))
    select_k: int | None = option(None, integer(1, none=True))
    scorer: Scorer = option("cosine", choice(Scorer))
    target: TargetReduction = option("mean", choice(TargetReduction))
    index_key: str = option("index", instance(str, "str", none=False))
    index_lookup: bool = option(False, boolean())
    reward_key: str | None = option(None, instance(str, "str"))
    on_update: str | None = option(None, instance(str, "str"))

    def __post_init__(self) -> None:
        check_options(self, call="GradAlignSampler")

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
        data_config: verl's ``data`` config: reads ``gradalign`` (see [`SamplerSettings`][gradalign.integrations.verl.SamplerSettings]),
            ``seed``, ``train_batch_size`` and ``dataloader_num_workers``.
        selector: the [`GradAlign`][gradalign.selector.GradAlign] to score with; default built from settings.
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
        self.selector = selector or GradAlign(scorer=st.scorer, policy=policy, target=st.target)
        if on_update is None and st.on_update is not None:
            on_update = load_callable(where, st.on_update, what="on_update")
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
        """[`group_batch`][gradalign.integrations.verl_data.group_batch] with this sampler's index and reward settings."""
        return group_batch(
            batch,
            index_key=self.settings.index_key,
            index_to_position=self.index_to_position,
            reward_key=self.settings.reward_key,
        )

    def rollouts(self, batch: Any, **kwargs: Any) -> Rollouts:
        """[`rollouts_from_dataproto`][gradalign.integrations.verl_data.rollouts_from_dataproto] with this sampler's index and reward settings."""
        kwargs.setdefault("index_key", self.settings.index_key)
        kwargs.setdefault("index_to_position", self.index_to_position)
        kwargs.setdefault("reward_key", self.settings.reward_key)
        return rollouts_from_dataproto(batch, **kwargs)

    @property
    def num_updates(self) -> int:
        """Training batches seen by [`update`][gradalign.integrations.verl.GradAlignSampler.update]."""
        return self.curriculum.num_observations

    @property
    def pass_rates(self) -> dict[str, torch.Tensor]:
        """(N,) per problem: ``count`` of rollouts seen in updates, ``mean`` reward over them,
        ``last`` mean reward of the latest update that saw it and ``last_update`` (-1: never);
        the curriculum's [`pass_rates`][gradalign.curriculum.Curriculum.pass_rates]."""
        rates = self.curriculum.pass_rates()
        rates["last_update"] = rates.pop("last_observation")
        return rates

    # GradAlign rounds ----------------------------------------------------------------------------

    def next_candidates(self) -> torch.Tensor:
        """Start a round: (<= M,) dataset indices whose rollouts [`score_and_select`][gradalign.integrations.verl.GradAlignSampler.score_and_select] needs."""
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

        ``candidates`` group ids must be dataset indices (as [`rollouts_from_dataproto`][gradalign.integrations.verl_data.rollouts_from_dataproto]
        gives). The selection is served from the next epoch of the dataloader on.
        """
        if self.curriculum.round < 0:
            raise GradAlignError(
                "GradAlignSampler.score_and_select: no round started; call next_candidates() first"
            )
        sharded = resolve(self.selector.distributed) is not None
        if not sharded and (candidates is None or validation is None):
            raise GradAlignError(
                "GradAlignSampler.score_and_select: candidates and validation rollouts are needed "
                "(None is only for a rank without a shard, with torch.distributed initialized)"
            )
        # Under torch.distributed each rank passes its shard (None for none).
        sel = self.selector.select(model, candidates, validation, tasks=tasks, progress=progress)
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
        """Resume from [`state_dict`][gradalign.integrations.verl.GradAlignSampler.state_dict]."""
        if not isinstance(state, Mapping) or "curriculum" not in state:
            raise GradAlignError(
                "GradAlignSampler.load_state_dict: the state must hold 'curriculum', got keys "
                f"{sorted(state)[:10] if isinstance(state, Mapping) else type(state).__name__}"
            )
        self.curriculum.load_state_dict(state["curriculum"])
