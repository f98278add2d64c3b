"""GradAlign in verl's v1 trainer (verl 0.9): a replay buffer that trains on the best-aligned groups.

verl 0.9's v1 trainer keeps finished GRPO groups in a replay buffer (TransferQueue keys
``{uid}_{session}_{index}``) and lets a ``ReplayBuffer`` subclass choose which of them form the next
training batch, in ``_select_prompt_uids``. [`GradAlignReplayBuffer`][gradalign.integrations.verl_v1.GradAlignReplayBuffer] is that subclass. Plug it
in with::

    trainer.v1.sampler.custom_sampler.path=pkg://gradalign.integrations.verl_v1
    trainer.v1.sampler.custom_sampler.name=GradAlignReplayBuffer
    +trainer.v1.sampler.sampler_kwargs.scorer=my_project.scoring:score_groups
    +trainer.v1.sampler.sampler_kwargs.select_fraction=0.5

What runs where. The buffer runs on the driver, which holds no model. Before every training batch
of ``batch_size`` groups it asks the trainer (through ``refill_fn``) for enough extra prompts that
``ceil(batch_size / select_fraction)`` groups finish, waits for them, and calls the scorer with
their uids; the scorer (your code, on the driver) computes each group's GradAlign score wherever
the policy lives, e.g. by sending the groups' token ids and rewards to an actor worker that runs
``GradAlign.score`` against trusted validation rollouts, and returns ``{uid: score}``. The buffer
keeps the ``batch_size`` best-scored groups and discards the rest (they were sampled by the current
policy and would be off-policy next step).

Scorer contract: ``scorer(partition_id=str, uids=list[str], trajectories=dict[key, tag]) ->
Mapping[str, float]``, one finite score per uid. The trajectory keys are ``{uid}_{session}_{index}``;
read their fields from TransferQueue with ``transfer_queue.kv_batch_get``.

Only the sync trainer mode is supported (the async buffer trades freshness for throughput, which a
per-batch selection undoes). Validation batches are served as verl serves them.

Implementations: [`GradAlignReplayBuffer`][gradalign.integrations.verl_v1.GradAlignReplayBuffer] and [`BufferSettings`][gradalign.integrations.verl_v1.BufferSettings].
"""

# No ``from __future__ import annotations``: verl may load this module by path.
import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer

from gradalign._options import boolean, check_options, integer, option, real
from gradalign.errors import GradAlignError
from gradalign.integrations.verl_data import load_callable

__all__ = ["BufferSettings", "GradAlignReplayBuffer"]


@dataclasses.dataclass(frozen=True)
class BufferSettings:
    """Options of [`GradAlignReplayBuffer`][gradalign.integrations.verl_v1.GradAlignReplayBuffer], from ``trainer.v1.sampler.sampler_kwargs``.

    Args:
        scorer: ``"package.module:function"`` (or a callable) returning ``{uid: score}``.
        select_fraction: keep the best ``batch_size`` of ``ceil(batch_size / select_fraction)``
            finished groups (the paper's 1/q); 1.0 scores without choosing.
        refill_multiple: extra prompts are requested in multiples of this (verl's
            ``data.gen_batch_size`` when it differs from ``train_batch_size``).
        discard_unselected: drop the groups not chosen (default) instead of keeping them for later.
    """

    scorer: Any = None
    select_fraction: float = option(0.5, real(ok=lambda v: 0 < v <= 1, rule="in (0, 1]"))
    refill_multiple: int = option(1, integer(1))
    discard_unselected: bool = option(True, boolean())

    def __post_init__(self) -> None:
        where = "GradAlignReplayBuffer"
        if self.scorer is None:
            raise GradAlignError(
                f"{where}: sampler_kwargs.scorer is required: 'package.module:function' returning "
                "{uid: GradAlign score} for the finished groups"
            )
        check_options(self, call=where)

    @classmethod
    def from_kwargs(cls, kwargs: Any) -> "BufferSettings":
        raw = {} if kwargs is None else {str(k): v for k, v in dict(kwargs).items()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise GradAlignError(
                f"GradAlignReplayBuffer: unknown sampler_kwargs {unknown}; known: {sorted(known)}"
            )
        return cls(**raw)

    def candidates(self, batch_size: int) -> int:
        """Finished groups to choose ``batch_size`` from."""
        return max(batch_size, math.ceil(batch_size / self.select_fraction - 1e-9))


class GradAlignReplayBuffer(ReplayBuffer):
    """verl v1 replay buffer that trains on the finished groups with the best GradAlign scores.

    Takes verl's constructor arguments (``trainer_mode``, ``trainer_config``,
    ``max_off_policy_threshold``, ``max_off_policy_strategy``, ``sampler_kwargs``, ``refill_fn``,
    ...); its own options come from ``sampler_kwargs`` ([`BufferSettings`][gradalign.integrations.verl_v1.BufferSettings]). See the module
    docstring for the wiring.

    Attributes:
        settings: the [`BufferSettings`][gradalign.integrations.verl_v1.BufferSettings].
        last_scores: ``{uid: score}`` of the latest selection's candidates.
        num_selections: training batches selected so far.
    """

    def __init__(
        self,
        trainer_mode: str,
        trainer_config: Any,
        max_off_policy_threshold: int | None,
        max_off_policy_strategy: str,
        sampler_kwargs: Any,
        poll_interval: float = 2.0,
        refill_fn: Callable[[int], Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if trainer_mode != "sync":
            raise GradAlignError(
                f"GradAlignReplayBuffer: only trainer_mode='sync' is supported, got {trainer_mode!r}"
            )
        self.settings = BufferSettings.from_kwargs(sampler_kwargs)
        if refill_fn is None and self.settings.select_fraction < 1:
            raise GradAlignError(
                "GradAlignReplayBuffer: choosing among more groups than the batch needs refill_fn "
                "(the v1 trainer passes it) or select_fraction=1"
            )
        super().__init__(
            trainer_mode,
            trainer_config,
            max_off_policy_threshold,
            max_off_policy_strategy,
            sampler_kwargs,
            poll_interval=poll_interval,
            refill_fn=refill_fn,
            **kwargs,
        )
        scorer = self.settings.scorer
        self._scorer: Callable[..., Any] = (
            scorer if callable(scorer) else load_callable("GradAlignReplayBuffer", str(scorer))
        )
        self.last_scores: dict[str, float] = {}
        self.num_selections = 0
        self._batch_size: int | None = None
        self._requested = 0

    def sample(self, global_steps: int, partition_id: str, batch_size: int) -> Any:
        """verl's sampling loop, with the train batch chosen among more finished groups."""
        if partition_id != "train":
            return super().sample(global_steps, partition_id, batch_size)
        self._batch_size, self._requested = batch_size, 0
        try:
            return super().sample(global_steps, partition_id, batch_size)
        finally:
            self._batch_size = None

    def _sampleable_terminal_keys(self, partition_id: str, eviction_reasons: Any) -> set[str]:
        keys: set[str] = super()._sampleable_terminal_keys(partition_id, eviction_reasons)
        if partition_id != "train" or self._batch_size is None:
            return keys
        need = self.settings.candidates(self._batch_size)
        if len(keys) >= need:
            return keys
        in_flight = len(self.pending_keys[partition_id]) + len(self.running_keys[partition_id])
        missing = need - len(keys) - in_flight - self._requested
        if missing > 0 and self.refill_fn is not None:
            step = self.settings.refill_multiple
            extra = -(-missing // step) * step
            self.refill_fn(extra)
            self._requested += extra
            in_flight += extra
        # Hold the batch back while more candidates are on their way; choose from what finished
        # once nothing is left in flight.
        return set() if in_flight > 0 else keys

    def _select_prompt_uids(
        self, partition_id: str, sampleable_keys: set[str], batch_size: int
    ) -> tuple[list[str], dict[str, dict], dict[str, int]]:
        ordered, snapshot, steps = super()._select_prompt_uids(
            partition_id, sampleable_keys, len(sampleable_keys)
        )  # every sampleable uid, oldest first
        if partition_id != "train":
            return ordered[:batch_size], snapshot, steps
        scores = self._scores(partition_id, ordered, snapshot)
        ranked = sorted(range(len(ordered)), key=lambda i: -scores[ordered[i]])  # ties: oldest
        chosen = [ordered[i] for i in ranked[:batch_size]]
        surplus = set(ordered) - set(chosen)
        if surplus and self.settings.discard_unselected:
            self._clear_groups(partition_id, surplus)
        self.last_scores = scores
        self.num_selections += 1
        return chosen, snapshot, steps

    def _scores(
        self, partition_id: str, uids: list[str], snapshot: dict[str, dict]
    ) -> dict[str, float]:
        where = "GradAlignReplayBuffer"
        out = self._scorer(partition_id=partition_id, uids=list(uids), trajectories=snapshot)
        if not isinstance(out, Mapping):
            raise GradAlignError(
                f"{where}: the scorer must return a mapping uid -> score, got {type(out).__name__}"
            )
        missing = [u for u in uids if u not in out]
        if missing:
            raise GradAlignError(f"{where}: the scorer returned no score for uids {missing[:10]}")
        scores = {u: float(out[u]) for u in uids}
        bad = [u for u, v in scores.items() if not math.isfinite(v)]
        if bad:
            raise GradAlignError(f"{where}: the scorer returned non-finite scores for {bad[:10]}")
        return scores
