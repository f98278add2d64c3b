"""`GradAlignGRPOTrainer`: a ``trl.GRPOTrainer`` that runs selection rounds and trains on the selection."""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOTrainer

from gradalign._validate import check_choice
from gradalign.candidates import Candidates
from gradalign.curriculum import Curriculum
from gradalign.distributed import Distributed, barrier
from gradalign.errors import GradAlignError
from gradalign.integrations.trl._sampler import StreamingSelectionSampler, _check_count
from gradalign.integrations.trl._setup import (
    INDEX_COLUMN,
    ON_EMPTY,
    _check_dataset,
    _curriculum,
    _round_seed,
    _without_index,
)
from gradalign.integrations.trl_config import (
    objective_from_config,
)
from gradalign.objective import GRPOObjective
from gradalign.rollouts import Rollouts
from gradalign.selector import GradAlign, Selection


class _SelectionRounds(TrainerCallback):
    """Runs the trainer's selection rounds: before step 1 and every ``rescore_every`` steps."""

    def __init__(self, trainer: GradAlignGRPOTrainer) -> None:
        self._trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == 0:
            self._trainer.run_selection_round()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step = state.global_step
        if step % self._trainer.rescore_every == 0 and step < state.max_steps:
            self._trainer.run_selection_round()


class GradAlignGRPOTrainer(GRPOTrainer):
    """A ``trl.GRPOTrainer`` that trains only on problems selected by GradAlign.

    Before the first step and then every ``rescore_every`` optimizer steps it runs
    [`run_selection_round`][gradalign.integrations.trl.GradAlignGRPOTrainer.run_selection_round] with the current policy; the train sampler (a
    [`StreamingSelectionSampler`][gradalign.integrations.trl.StreamingSelectionSampler] over ``curriculum``) then serves only the selected problems,
    from the next generation batch on. Everything else (generation, rewards, loss, logging) is
    the ``GRPOTrainer``'s.

    Args:
        model: as for ``GRPOTrainer``.
        reward_funcs: as for ``GRPOTrainer``.
        args: a ``GRPOConfig``; ``args.max_steps`` must be set.
        train_dataset: the candidate pool, a map-style ``datasets.Dataset``.
        validation_dataset: the trusted validation problems, a ``datasets.Dataset`` with a
            ``prompt`` column and the extra columns the reward functions read.
        selector: a [`GradAlign`][gradalign.selector.GradAlign] (extractor, scorer, policy); default
            ``GradAlign()`` (``FactorizedGradient(32, 32)``, cosine, the best quarter). Its objective is replaced by
            ``objective``.
        objective: the GRPO loss used for scoring; default ``objective_from_config(args)``.
        curriculum: the chunks of the pool; default ``Curriculum(len(train_dataset),
            chunk_size, seed=args.seed)``.
        chunk_size: candidates per round (default: the whole pool); only without ``curriculum``.
        rescore_every: optimizer steps between rounds.
        num_validation_generations: completions per validation prompt; default
            ``num_generations``.
        on_empty: what a round that yields no informative selection does (every validation or
            candidate group without reward spread, no scorable candidate, a policy that selects
            nothing, or only zero scores): "previous" keeps the selection in force (the whole
            pool before the first), "random" records a seeded random sample of the chunk (as
            many problems as the last selection; half the chunk before any), "all" records the
            whole chunk, "error" raises. Each such round warns once and logs
            ``gradalign/fallback`` = 1.
        round_timeout: with several processes, seconds a rank waits for the others at each
            synchronisation point of a round before raising (None: the process group's timeout).
        **kwargs: passed on to ``GRPOTrainer`` (``processing_class``, ``callbacks``, ...).

    Attributes:
        curriculum: the [`Curriculum`][gradalign.curriculum.Curriculum] holding every round's record.
        last_selection: the latest recorded [`Selection`][gradalign.alignment.Selection] (None before).
        in_selection_round: True while a round samples and scores (reward functions may check it).
        replaced_batches: generation batches drawn before a round and replaced after it.
        fallback_rounds: rounds that fell back (see ``on_empty``).

    Raises:
        GradAlignError: unsupported settings (see the module docstring) or bad arguments.

    Examples:
        A complete, tested script is ``examples/integrations/trl_one_process.py``.

        ```python
        trainer = GradAlignGRPOTrainer(
            model, reward_fn, args=GRPOConfig(output_dir="out", max_steps=200),
            train_dataset=pool, validation_dataset=trusted, processing_class=tokenizer,
            selector=GradAlign(RandomProjectedGradient(dim=8192), policy=TopFraction(0.25)),
            chunk_size=256, rescore_every=20)
        trainer.train()
        ```
    """

    def __init__(
        self,
        model: Any,
        reward_funcs: Any = None,
        args: Any = None,
        train_dataset: Any = None,
        *,
        validation_dataset: Dataset,
        selector: GradAlign | None = None,
        objective: GRPOObjective | None = None,
        curriculum: Curriculum | None = None,
        chunk_size: int | None = None,
        rescore_every: int = 10,
        num_validation_generations: int | None = None,
        on_empty: str = "previous",
        round_timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        where = "GradAlignGRPOTrainer"
        _check_dataset(where, "train_dataset", train_dataset)
        _check_dataset(where, "validation_dataset", validation_dataset)
        if INDEX_COLUMN in train_dataset.column_names:
            raise GradAlignError(f"{where}: train_dataset must not have a {INDEX_COLUMN!r} column")
        if selector is not None and not isinstance(selector, GradAlign):
            raise GradAlignError(
                f"{where}: selector must be a GradAlign, got {type(selector).__name__}"
            )
        if objective is not None and not isinstance(objective, GRPOObjective):
            raise GradAlignError(
                f"{where}: objective must be a GRPOObjective, got {type(objective).__name__}"
            )
        self.rescore_every = _check_count(where, "rescore_every", rescore_every)
        self.on_empty = check_choice(where, "on_empty", on_empty, ON_EMPTY)
        self._settings = Distributed(timeout=round_timeout)
        self.curriculum = _curriculum(where, curriculum, chunk_size, train_dataset, args)
        tagged = train_dataset.add_column(INDEX_COLUMN, list(range(len(train_dataset))))
        super().__init__(model, reward_funcs, args, tagged, **kwargs)
        k = (
            self.num_generations
            if num_validation_generations is None
            else num_validation_generations
        )
        self.num_validation_generations = _check_count(where, "num_validation_generations", k, 2)
        self._check_supported(where)
        self.validation_dataset = validation_dataset
        self.objective: GRPOObjective = (
            objective_from_config(self.args) if objective is None else objective
        )
        self.selector = copy.copy(selector) if selector is not None else GradAlign()
        self.selector.objective = self.objective
        if self.accelerator.num_processes > 1 and self.selector.distributed in ("auto", True):
            self.selector.distributed = self._settings
        self.last_selection: Selection | None = None
        self.in_selection_round = False
        self.replaced_batches = 0
        self.fallback_rounds = 0
        self._sampler: StreamingSelectionSampler | None = None
        self.add_callback(_SelectionRounds(self))

    @property
    def _config(self) -> Any:
        return self.args  # a GRPOConfig, typed by Trainer as TrainingArguments

    @property
    def _policy(self) -> torch.nn.Module:
        model: Any = self.model  # set by Trainer.__init__
        return model

    @property
    def _pool(self) -> Dataset:
        pool: Any = self.train_dataset  # the tagged pool, set by Trainer.__init__
        return pool

    def _check_supported(self, where: str) -> None:
        if self.args.max_steps <= 0:
            raise GradAlignError(
                f"{where}: args.max_steps must be > 0 (the selection sampler is endless, so the "
                f"Trainer cannot count epochs), got {self.args.max_steps}"
            )
        problems = {
            "tools": bool(self.tools),
            "rollout_func": self.rollout_func is not None,
            "environment_factory": self.environment_factories is not None,
            f"multi_objective_aggregation={self.multi_objective_aggregation!r}": (
                self.multi_objective_aggregation != "sum_then_normalize"
            ),
            # vLLM generates each prompt num_generations times, whatever the request.
            "use_vllm with num_validation_generations != num_generations": (
                self.use_vllm and self.num_validation_generations != self.num_generations
            ),
        }
        found = [name for name, bad in problems.items() if bad]
        if found:
            raise GradAlignError(f"{where}: not supported yet: {', '.join(found)}")

    # -- the train sampler and the generation batch ---------------------------------------------

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        columns = self._signature_columns
        if columns is not None and INDEX_COLUMN not in columns:
            self._signature_columns = [*columns, INDEX_COLUMN]

    def _get_train_sampler(self, dataset: Any = None) -> StreamingSelectionSampler:
        args = self._config
        self._sampler = StreamingSelectionSampler(
            self.curriculum,
            num_generations=args.num_generations,
            batch_size=args.generation_batch_size // args.num_generations,
            repeat_count=args.num_iterations * args.steps_per_generation,
            seed=args.seed,
            shuffle=bool(args.shuffle_dataset),
        )
        return self._sampler

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        if inputs and INDEX_COLUMN in inputs[0]:
            if self._policy.training:
                inputs = self._only_selected(inputs)
            inputs = [_without_index(row) for row in inputs]
        return super()._generate_and_score_completions(inputs)

    def _only_selected(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The generation batch, or the sampler's next block if it was drawn before a round."""
        sampler = self._sampler
        if sampler is None:
            return rows
        allowed = set(sampler.current_ids().tolist())
        if all(int(row[INDEX_COLUMN]) in allowed for row in rows):
            return rows
        keys, pool = list(rows[0]), self._pool
        fresh: list[dict[str, Any]] = []
        for pid in sampler.next_block().tolist():
            row = pool[pid]
            fresh.extend(
                {key: row[key] for key in keys} for _ in range(self._config.num_generations)
            )
        # The block is the whole generation batch; accelerate hands rank r its r-th slice.
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        if world > 1 and len(fresh) == world * len(rows):
            fresh = fresh[rank * len(rows) : (rank + 1) * len(rows)]
        if len(fresh) != len(rows):
            raise GradAlignError(
                f"GradAlignGRPOTrainer: a generation batch has {len(rows)} rows but a sampler "
                f"block gives {len(fresh)}"
            )
        self.replaced_batches += 1
        return fresh

    # -- selection rounds ------------------------------------------------------------------------

    def run_selection_round(self) -> Selection | None:
        """Score the next chunk of the pool with the current policy and record the selection.

        With several processes every rank samples and scores its share of the chunk and of the
        validation set, and ``GradAlign`` (over ``torch.distributed``) gives every rank
        the same selection. A round with no informative selection falls back as ``on_empty`` says.

        Returns:
            The recorded selection, or None when the previous one stays in force.
        """
        multi = self.accelerator.num_processes > 1
        if multi:  # a rank that died or hangs fails the round here, not in a collective
            barrier(f"selection round {self.curriculum.round + 1}", self._settings)
        chunk = self.curriculum.next_chunk()  # (M,)
        r = self.curriculum.round
        with self._round_context():
            candidates = self._sample(self._pool, chunk.tolist(), self._config.num_generations, r)
            validation = self._sample(
                self.validation_dataset,
                range(len(self.validation_dataset)),
                self.num_validation_generations,
                r,
                validation=True,
            )
        reason = self._empty_reason(candidates, validation)
        selection = None
        if reason is None:
            model = self.accelerator.unwrap_model(self.model)
            selection = self._select(model, candidates, validation)
            if not selection.ids.numel():
                reason = "the policy selected nothing"
            elif selection.scores is not None and not bool(selection.scores.ne(0).any()):
                reason = "every selected problem scores 0 (no reward spread)"
        if reason is not None:
            return self._fall_back(chunk, reason)
        assert selection is not None
        self.curriculum.record(selection)
        self.last_selection = selection
        self._log_round(candidates, validation, selection, fallback=False)
        return selection

    def _select(
        self, model: torch.nn.Module, candidates: Rollouts | None, validation: Rollouts | None
    ) -> Selection:
        # Under torch.distributed each rank passes its shard (None for none); one process, both.
        return self.selector.select(model, candidates, validation)

    def _empty_reason(self, candidates: Rollouts | None, validation: Rollouts | None) -> str | None:
        """Why a round has nothing to select from (the same on every rank), else None."""
        local = [
            validation is not None and not bool(self.objective.zero_spread(validation).all()),
            candidates is not None,
            candidates is not None and not bool(self.objective.zero_spread(candidates).all()),
        ]
        if self.accelerator.num_processes > 1:
            flags = torch.tensor(local, dtype=torch.int64)
            gathered = self.accelerator.gather(flags.to(self.accelerator.device)).view(-1, 3)
            local = [bool(x) for x in gathered.cpu().amax(0).tolist()]
        if not local[0]:
            return "every validation group has zero reward spread (no target gradient)"
        if not local[1]:
            return "no candidate got a scorable rollout"
        if not local[2]:
            return "every candidate group has zero reward spread"
        return None

    def _fall_back(self, chunk: torch.Tensor, reason: str) -> Selection | None:
        step = self.state.global_step
        self.fallback_rounds += 1
        warnings.warn(
            f"GradAlignGRPOTrainer: round {self.curriculum.round} at step {step}: {reason}; "
            f"on_empty={self.on_empty!r}",
            UserWarning,
            stacklevel=3,
        )
        self._metrics["train"]["gradalign/fallback"].append(1.0)
        if self.on_empty == "error":
            raise GradAlignError(
                f"GradAlignGRPOTrainer.run_selection_round: round {self.curriculum.round} at step "
                f"{step}: {reason} (on_empty='error')"
            )
        if self.on_empty == "previous":
            return None
        if self.on_empty == "all":
            ids = chunk
        else:  # "random": seeded by the round, the same on every rank
            last = len(self.curriculum.selected_ids()) or max(1, len(chunk) // 2)
            gen = torch.Generator().manual_seed(_round_seed(self.args.seed, self.curriculum.round))
            ids = chunk[torch.randperm(len(chunk), generator=gen)[: min(last, len(chunk))]]
        selection = Selection(ids=ids.clone(), scores=None, candidates=Candidates(ids=chunk))
        self.curriculum.record(selection)
        self.last_selection = selection
        return selection

    @contextlib.contextmanager
    def _round_context(self) -> Iterator[None]:
        """Sample in train mode as training does; keep the round out of the logs and token count."""
        saved = (self._metrics, self._pending_extra_logs, self._pending_metrics)
        policy = self._policy
        tokens, training = self.state.num_input_tokens_seen, policy.training
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._pending_extra_logs, self._pending_metrics = defaultdict(list), defaultdict(list)
        self.in_selection_round = True
        policy.train()
        try:
            yield
        finally:
            policy.train(training)
            self.in_selection_round = False
            self._metrics, self._pending_extra_logs, self._pending_metrics = saved
            self.state.num_input_tokens_seen = tokens

    def _sample(
        self,
        dataset: Dataset,
        ids: Iterable[int],
        k: int,
        round_index: int,
        *,
        validation: bool = False,
    ) -> Rollouts | None:
        """``k`` scored rollouts of each problem ``ids`` of ``dataset`` taken by this rank.

        The problems are cut into generation calls of ``generation_batch_size // k`` problems
        (the last one padded by repeating its problems); call c runs on rank ``c % world`` with
        the torch RNG seeded by ``(seed, round, c)``. So a problem's rollouts are the same however
        many processes share the round, and every rank makes the same number of calls of the same
        size (TRL gathers rewards and lengths across ranks inside each call). Padding rows are
        dropped. Validation problem ``i`` gets group id ``-1 - i``: never a pool index.
        """
        ids = [int(i) for i in ids]
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        per_call = max(1, self._config.generation_batch_size // k)
        calls = [ids[i : i + per_call] for i in range(0, len(ids), per_call)]
        mine = list(range(rank, len(calls), world))
        rounds = -(-len(calls) // world)  # calls per rank, padded with a discarded call
        prompt_ids: list[list[int]] = []
        completion_ids: list[list[int]] = []
        rewards: list[float] = []
        groups: list[int] = []
        for j in range(rounds):
            c = mine[j] if j < len(mine) else 0
            keep = len(calls[c]) if j < len(mine) else 0
            part = calls[c] + [calls[c][-1]] * (per_call - len(calls[c]))
            stream = 2 * round_index + int(validation)
            p_ids, c_ids, total = self._generate_call(dataset, part, k, stream, c)
            for row, pid in enumerate(i for i in part for _ in range(k)):
                if row < keep * k and not bool(torch.isnan(total[row])) and len(c_ids[row]):
                    prompt_ids.append(list(p_ids[row]))
                    completion_ids.append(list(c_ids[row]))
                    rewards.append(float(total[row]))
                    groups.append(-1 - pid if validation else pid)
        if not groups:
            return None
        return Rollouts.from_token_ids(
            prompt_ids, completion_ids, rewards, groups, pad_token_id=self._tokenizer.pad_token_id
        )

    def _generate_call(
        self, dataset: Dataset, part: list[int], k: int, stream: int, call: int
    ) -> tuple[Any, Any, torch.Tensor]:
        """One generation call: prompt ids, completion ids and (S,) total rewards (NaN:
        unscorable, every reward function returned None)."""
        rows = [_without_index(dataset[i]) for i in part]
        inputs = [dict(row) for row in rows for _ in range(k)]
        prompts = [row["prompt"] for row in inputs]
        device = self.accelerator.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(_round_seed(self.args.seed, stream, call))
            generated = self._generate(prompts)
        p_ids, c_ids, completions = generated[0], generated[1], generated[3]
        per_func = self._calculate_rewards(inputs, prompts, completions, c_ids)  # (W * S, F)
        n, rank = len(inputs), self.accelerator.process_index
        per_func = per_func[rank * n : (rank + 1) * n]  # TRL gathers every rank's rows
        total = (per_func * self.reward_weights.to(per_func.device)).nansum(dim=1)  # (S,)
        # TRL gives unscorable completions (every reward None) no advantage: leave them out.
        total = torch.where(torch.isnan(per_func).all(dim=1), float("nan"), total)
        return p_ids, c_ids, total.cpu()

    def _log_round(
        self,
        candidates: Rollouts | None,
        validation: Rollouts | None,
        selection: Selection,
        *,
        fallback: bool,
    ) -> None:
        metrics = self._metrics["train"]
        metrics["gradalign/fallback"].append(float(fallback))
        metrics["gradalign/num_selected"].append(float(selection.ids.numel()))
        if candidates is not None:
            metrics["gradalign/candidate_reward"].append(candidates.rewards.mean().item())
        if validation is not None:
            metrics["gradalign/validation_reward"].append(validation.rewards.mean().item())
        if selection.scores is not None:
            metrics["gradalign/selected_score"].append(selection.scores.float().mean().item())
