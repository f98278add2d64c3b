"""Rollouts: the token-level record of sampled responses that every extractor differentiates.

Implementations: [`Rollouts`][gradalign.rollouts.Rollouts] (validated on construction), built directly from tensors, from
per-sequence token-id lists ([`Rollouts.from_token_ids`][gradalign.rollouts.Rollouts.from_token_ids]) or from text ([`Rollouts.from_texts`][gradalign.rollouts.Rollouts.from_texts]);
[`ProblemIds`][gradalign.rollouts.ProblemIds] maps a dataset's string problem ids to the integer group ids and back.

Shape glossary: S sequences, T tokens, G groups (one group = the rollouts of one problem).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from gradalign._problem_ids import ProblemIds, string_ids_message
from gradalign.errors import GradAlignError
from gradalign.stats import GroupStats, group_stats

__all__ = ["GroupStats", "ProblemIds", "Rollouts", "group_stats", "micro_batch_width"]

_TensorLike = torch.Tensor | Sequence[float] | Sequence[int]


_ID_NAMES = ("group_ids", "ids")
"""Arguments that hold problem ids: strings there get the mapping to use (ProblemIds)."""


def _as_tensor(
    name: str, value: Any, dtype: torch.dtype | None = None, call: str = "Rollouts"
) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value if dtype is None else value.to(dtype)
    try:
        return torch.as_tensor(value, dtype=dtype)
    except (TypeError, ValueError, RuntimeError) as exc:
        named = string_ids_message(call, name, value) if name in _ID_NAMES else None
        shown = repr(value)[:60]
        raise GradAlignError(
            named
            or f"{call}: {name} must be a tensor or a sequence of numbers, got "
            f"{type(value).__name__} {shown}"
        ) from exc


def micro_batch_width(attention_mask: torch.Tensor) -> int:
    """Columns a micro-batch needs: up to its last attended token, whatever the padding side."""
    attended = attention_mask.bool().any(0).nonzero()
    return int(attended.max().item()) + 1 if attended.numel() else 1


@dataclass(frozen=True, eq=False)
class Rollouts:
    """Sampled responses of several problems, one group of rollouts per problem.

    Args:
        input_ids: (S, T) int64 prompt + response tokens, right-padded.
        attention_mask: (S, T) 1 where ``input_ids`` holds a real token.
        response_mask: (S, T) bool, True where token t is a response token; its log-prob comes from the
            logits at t - 1, so column 0 is never a response token.
        rewards: (S,) finite rewards, one per sequence.
        group_ids: (S,) integer problem id of each sequence (any integers, not necessarily contiguous);
            map string ids with [`ProblemIds`][gradalign.rollouts.ProblemIds].
        old_logprobs: optional (S, T) log-probs of the tokens under the sampling policy (PPO ratio).
        ref_logprobs: optional (S, T) log-probs under a reference policy (KL penalty).

    Examples:
        >>> import torch
        >>> ro = Rollouts(
        ...     input_ids=torch.tensor([[5, 6, 7, 0], [5, 6, 8, 9]]),
        ...     attention_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
        ...     response_mask=torch.tensor([[0, 0, 1, 0], [0, 0, 1, 1]]).bool(),
        ...     rewards=torch.tensor([1.0, 0.0]),
        ...     group_ids=torch.tensor([3, 3]),
        ... )
        >>> ro.num_groups
        1
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    rewards: torch.Tensor
    group_ids: torch.Tensor
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    unique_groups: torch.Tensor = field(init=False, repr=False)
    group_index: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        ids = _as_tensor("input_ids", self.input_ids)
        if ids.dim() != 2:
            raise GradAlignError(
                f"Rollouts: input_ids must be 2-D (S, T), got shape {tuple(ids.shape)}"
            )
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise GradAlignError(f"Rollouts: input_ids must hold integers, got dtype {ids.dtype}")
        if ids.numel() and int(ids.min()) < 0:
            row = int((ids < 0).any(1).nonzero()[0])
            raise GradAlignError(
                f"Rollouts: input_ids must be token ids >= 0, got {int(ids.min())} in row {row}"
            )
        if ids.shape[0] == 0 or ids.shape[1] < 2:
            raise GradAlignError(
                f"Rollouts: input_ids needs at least one row and two columns, got {tuple(ids.shape)}"
            )
        s, t = ids.shape
        attn = self._matrix("attention_mask", self.attention_mask, (s, t))
        resp = self._matrix("response_mask", self.response_mask, (s, t))
        rewards = self._vector("rewards", self.rewards, s, torch.float32)
        groups = self._vector("group_ids", self.group_ids, s, None)
        if groups.dtype.is_floating_point or groups.dtype.is_complex or groups.dtype == torch.bool:
            raise GradAlignError(
                f"Rollouts: group_ids must hold integers, got dtype {groups.dtype}"
            )
        self._check_masks(attn.bool(), resp.bool())
        bad = ~torch.isfinite(rewards)
        if bad.any():
            row = int(bad.nonzero()[0])
            raise GradAlignError(
                f"Rollouts: rewards must be finite, got {rewards[row].item()} at row {row}"
            )
        set_ = object.__setattr__
        set_(self, "input_ids", ids.long())
        set_(self, "attention_mask", attn.long())
        set_(self, "response_mask", resp.bool())
        set_(self, "rewards", rewards)
        set_(self, "group_ids", groups.long())
        for name in ("old_logprobs", "ref_logprobs"):
            value = getattr(self, name)
            if value is not None:
                set_(self, name, self._logprobs(name, value, self.response_mask))
        unique, index = torch.unique(self.group_ids, sorted=True, return_inverse=True)
        set_(self, "unique_groups", unique)
        set_(self, "group_index", index)

    @staticmethod
    def _matrix(name: str, value: Any, shape: tuple[int, int]) -> torch.Tensor:
        out = _as_tensor(name, value)
        if tuple(out.shape) != shape:
            raise GradAlignError(
                f"Rollouts: {name} must have the shape of input_ids {shape}, got {tuple(out.shape)}"
            )
        if out.dtype != torch.bool:
            values = torch.unique(out)
            if out.dtype.is_complex or not bool(((values == 0) | (values == 1)).all()):
                raise GradAlignError(
                    f"Rollouts: {name} must be 0/1 or bool, got values {values[:5].tolist()}"
                )
        return out

    @staticmethod
    def _vector(name: str, value: Any, s: int, dtype: torch.dtype | None) -> torch.Tensor:
        raw = _as_tensor(name, value)
        if raw.is_complex():
            raise GradAlignError(f"Rollouts: {name} must be real, got complex values")
        out = raw if dtype is None else raw.to(dtype)
        if out.dim() != 1 or out.shape[0] != s:
            raise GradAlignError(
                f"Rollouts: {name} must have one entry per row of input_ids ({s}), "
                f"got shape {tuple(out.shape)}"
            )
        return out

    @staticmethod
    def _logprobs(name: str, value: Any, response: torch.Tensor) -> torch.Tensor:
        """(S, T) float32 log-probs, finite at response tokens; 0 elsewhere (never read)."""
        shape = tuple(response.shape)
        raw = _as_tensor(name, value)
        if raw.is_complex():
            raise GradAlignError(f"Rollouts: {name} must be real, got complex values")
        out = raw.to(torch.float32)
        if tuple(out.shape) != shape:
            raise GradAlignError(
                f"Rollouts: {name} must have the shape of input_ids {shape}, got {tuple(out.shape)}"
            )
        bad = response & ~torch.isfinite(out)
        if bad.any():
            row, col = (int(x) for x in bad.nonzero()[0])
            raise GradAlignError(
                f"Rollouts: {name} must be finite at response tokens, got {out[row, col].item()} "
                f"at row {row}, column {col}"
            )
        return torch.where(response, out, torch.zeros_like(out))

    @staticmethod
    def _check_masks(attn: torch.Tensor, resp: torch.Tensor) -> None:
        if resp[:, 0].any():
            row = int(resp[:, 0].nonzero()[0])
            raise GradAlignError(
                "Rollouts: response_mask[:, 0] must be False (token 0 has no preceding logits), "
                f"got True in row {row}"
            )
        outside = resp & ~attn
        if outside.any():
            row = int(outside.any(1).nonzero()[0])
            raise GradAlignError(
                f"Rollouts: response_mask marks padding (attention_mask 0) as response in row {row}"
            )
        att = attn.long()
        runs = (att[:, 1:] > att[:, :-1]).sum(1) + att[:, 0]  # (S,) starts of attended runs
        if (runs > 1).any():
            row = int((runs > 1).nonzero()[0])
            raise GradAlignError(
                "Rollouts: attention_mask must be one contiguous run of 1s per row (left, right "
                f"or no padding), got {att[row, :32].tolist()} in row {row}"
            )
        first = att.argmax(1)  # (S,) first attended column
        orphan = resp[torch.arange(len(resp)), first] & attn.any(1)
        if orphan.any():
            row = int(orphan.nonzero()[0])
            raise GradAlignError(
                f"Rollouts: response_mask marks the first attended token of row {row} (column "
                f"{int(first[row])}) as a response token; nothing precedes it to predict it"
            )
        empty = ~resp.any(1)
        if empty.any():
            rows = empty.nonzero().flatten().tolist()
            raise GradAlignError(
                f"Rollouts: every row needs at least one response token, rows {rows[:10]} have none"
            )

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_sequences(self) -> int:
        """S, the number of rollouts."""
        return len(self)

    @property
    def num_groups(self) -> int:
        """G, the number of distinct problems."""
        return int(self.unique_groups.numel())

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    def group_sizes(self) -> torch.Tensor:
        """(G,) number of rollouts of each group, in ``unique_groups`` order."""
        return torch.bincount(self.group_index, minlength=self.num_groups)

    def group_token_counts(self) -> torch.Tensor:
        """(G,) number of response tokens of each group, in ``unique_groups`` order."""
        out = torch.zeros(self.num_groups, dtype=torch.long, device=self.device)
        return out.index_add_(0, self.group_index, self.response_mask.sum(1))

    def group_mean_rewards(self) -> torch.Tensor:
        """(G,) float32 mean reward of each group (the pass rate for binary rewards)."""
        return group_stats(self.group_ids, self.rewards).mean.float()

    def group_reward_spread(self) -> torch.Tensor:
        """(G,) float32 max minus min reward of each group; 0 marks a zero-spread group (no learning signal)."""
        return group_stats(self.group_ids, self.rewards).spread.float()

    def zero_spread(self, tol: float = 0.0) -> torch.Tensor:
        """(G,) bool, True for groups without reward spread: the one rule of [`gradalign.stats.zero_spread`][gradalign.stats.zero_spread].

        Examples:
            >>> ro = Rollouts.from_token_ids([[5], [5], [6], [6]], [[7], [8], [7], [8]],
            ...                              [1.0, 0.0, 1.0, 1.0], [0, 0, 1, 1])
            >>> ro.zero_spread()
            tensor([False,  True])
        """
        return group_stats(self.group_ids, self.rewards).zero_spread(tol).to(self.device)

    def select_groups(self, ids: torch.Tensor | Sequence[int]) -> Rollouts:
        """The rollouts of the given group ids (rows keep their original order)."""
        raw = _as_tensor("ids", ids)
        if raw.numel() and (raw.is_floating_point() or raw.is_complex() or raw.dtype == torch.bool):
            raise GradAlignError(
                f"Rollouts.select_groups: ids must be integers, got {raw.dtype} {raw.flatten()[:5].tolist()}"
            )
        wanted = raw.to(self.device, torch.long).flatten()
        missing = wanted[~torch.isin(wanted, self.unique_groups)]
        if missing.numel():
            raise GradAlignError(
                f"Rollouts.select_groups: unknown group ids {missing[:10].tolist()}"
            )
        return self.select_rows(torch.isin(self.group_ids, wanted).nonzero().flatten())

    def select_rows(self, rows: torch.Tensor) -> Rollouts:
        """The rollouts at the given row indices, trimmed to their longest attended length."""
        rows = rows.to(self.device)
        width = max(2, micro_batch_width(self.attention_mask[rows])) if rows.numel() else 2
        width = max(width, int(self._last_response_col(rows)) + 1)

        def take(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[rows, :width]

        return Rollouts(
            input_ids=self.input_ids[rows, :width],
            attention_mask=self.attention_mask[rows, :width],
            response_mask=self.response_mask[rows, :width],
            rewards=self.rewards[rows],
            group_ids=self.group_ids[rows],
            old_logprobs=take(self.old_logprobs),
            ref_logprobs=take(self.ref_logprobs),
        )

    def _last_response_col(self, rows: torch.Tensor) -> int:
        cols = torch.arange(self.input_ids.shape[1], device=self.device)
        return int((self.response_mask[rows] * cols).max().item()) if rows.numel() else 0

    @classmethod
    def concat(cls, parts: Sequence[Rollouts]) -> Rollouts:
        """The rollouts of several batches as one; narrower batches are padded on the right.

        Group ids must not repeat across parts (one group is one problem's rollouts, sampled
        together). Every part carries ``old_logprobs`` (and ``ref_logprobs``) or none does.

        Args:
            parts: one or more [`Rollouts`][gradalign.rollouts.Rollouts] on the same device.

        Raises:
            GradAlignError: no parts, a part that is not Rollouts, a group id in two parts, or
                log-probs on some parts only.

        Examples:
            >>> a = Rollouts.from_token_ids([[5], [5]], [[7], [8, 9]], [1.0, 0.0], [0, 0])
            >>> b = Rollouts.from_token_ids([[6]], [[7]], [1.0], [3])
            >>> both = Rollouts.concat([a, b])
            >>> both.input_ids.shape, both.unique_groups.tolist()
            (torch.Size([3, 3]), [0, 3])
        """
        call = "Rollouts.concat"
        parts = list(parts) if isinstance(parts, (list, tuple)) else parts
        if not isinstance(parts, list) or not parts:
            raise GradAlignError(
                f"{call}: parts must be a non-empty list of Rollouts, got {parts!r}"
            )
        bad = [type(p).__name__ for p in parts if not isinstance(p, Rollouts)]
        if bad:
            raise GradAlignError(f"{call}: every part must be Rollouts, got {bad[:3]}")
        seen: set[int] = set()
        for i, p in enumerate(parts):
            shared = seen & set(p.unique_groups.tolist())
            if shared:
                raise GradAlignError(
                    f"{call}: group ids {sorted(shared)[:10]} appear in part {i} and an earlier "
                    "part; a group's rollouts must come from one part"
                )
            seen |= set(p.unique_groups.tolist())
        width = max(p.input_ids.shape[1] for p in parts)

        def cat(name: str) -> torch.Tensor | None:
            values = [getattr(p, name) for p in parts]
            present = [v is not None for v in values]
            if not any(present):
                return None
            if not all(present):
                raise GradAlignError(
                    f"{call}: {name} is set on parts {[i for i, x in enumerate(present) if x]} "
                    "but not on the others; give it to every part or to none"
                )
            padded = [
                torch.nn.functional.pad(v, (0, width - v.shape[1])) if v.dim() == 2 else v
                for v in values
            ]
            return torch.cat(padded)

        return cls(
            input_ids=cat("input_ids"),  # type: ignore[arg-type]
            attention_mask=cat("attention_mask"),  # type: ignore[arg-type]
            response_mask=cat("response_mask"),  # type: ignore[arg-type]
            rewards=cat("rewards"),  # type: ignore[arg-type]
            group_ids=cat("group_ids"),  # type: ignore[arg-type]
            old_logprobs=cat("old_logprobs"),
            ref_logprobs=cat("ref_logprobs"),
        )

    def to(self, device: torch.device | str) -> Rollouts:
        """A copy on ``device``."""

        def move(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.to(device)

        return Rollouts(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            response_mask=self.response_mask.to(device),
            rewards=self.rewards.to(device),
            group_ids=self.group_ids.to(device),
            old_logprobs=move(self.old_logprobs),
            ref_logprobs=move(self.ref_logprobs),
        )

    @classmethod
    def from_token_ids(
        cls,
        prompt_ids: Sequence[Sequence[int]],
        completion_ids: Sequence[Sequence[int]],
        rewards: _TensorLike,
        group_ids: _TensorLike,
        *,
        pad_token_id: int = 0,
        max_length: int | None = None,
    ) -> Rollouts:
        """Build rollouts from per-sequence prompt and completion token ids.

        Each row is ``prompt + completion``, right-padded with ``pad_token_id``; the completion tokens
        form the response mask. With ``max_length``, the completion is truncated first so that the
        row fits (the prompt is kept whole; a prompt that leaves no room raises). ``group_ids``
        are integers; map string ids with [`ProblemIds`][gradalign.rollouts.ProblemIds].

        Examples:
            >>> ro = Rollouts.from_token_ids([[1, 2], [1, 2]], [[3], [4, 5]], [1.0, 0.0], [0, 0])
            >>> ro.input_ids.shape
            torch.Size([2, 4])
        """
        from gradalign._tokenize import pack_token_ids

        group_ids = _as_tensor("group_ids", group_ids, call="Rollouts.from_token_ids")
        ids, attn, resp = pack_token_ids(
            prompt_ids, completion_ids, pad_token_id=pad_token_id, max_length=max_length
        )
        return cls(
            input_ids=ids,
            attention_mask=attn,
            response_mask=resp,
            rewards=rewards,  # type: ignore[arg-type]
            group_ids=group_ids,
        )

    @classmethod
    def from_generate(
        cls,
        prompt_ids: torch.Tensor,
        sequences: torch.Tensor,
        rewards: _TensorLike,
        group_ids: _TensorLike | None = None,
        *,
        pad_token_id: int,
        eos_token_id: int | Sequence[int] | None,
        prompt_mask: torch.Tensor | None = None,
        max_length: int | None = None,
    ) -> Rollouts:
        """Build rollouts from ``model.generate``'s output, as Hugging Face returns it.

        ``generate`` takes a (B, L) batch of (usually left-padded) prompts and, with
        ``num_return_sequences=k``, returns (B * k, L + N) sequences: each prompt row repeated k
        times, followed by the generated tokens, padded after the first EOS. This splits each row
        into its prompt (padding dropped) and its completion (cut after the first EOS, which is
        kept) and packs them like [`from_token_ids`][gradalign.rollouts.Rollouts.from_token_ids].

        Args:
            prompt_ids: (B, L) the ``input_ids`` passed to ``generate``.
            sequences: (B * k, L + N) what ``generate`` returned (``.sequences`` of a dict output).
            rewards: (B * k,) reward of each row.
            group_ids: (B * k,) integer problem id of each row (map strings with
                [`ProblemIds`][gradalign.rollouts.ProblemIds]); None uses the prompt's row index (0..B-1).
            pad_token_id: the padding id ``generate`` used.
            eos_token_id: the id (or ids) that end a completion; None keeps every generated token
                except trailing padding.
            prompt_mask: (B, L) the ``attention_mask`` passed to ``generate``: one run of 1s per
                row, padded on one side. None treats every ``pad_token_id`` in ``prompt_ids`` as
                padding, which needs ``pad_token_id`` to differ from every EOS id (prompts may
                hold EOS tokens) and to appear only at the edges of each row.
            max_length: as in [`from_token_ids`][gradalign.rollouts.Rollouts.from_token_ids].

        Raises:
            GradAlignError: ``pad_token_id`` is not a token id; padding is ambiguous without
                ``prompt_mask``; ``prompt_mask`` has holes or padding on both sides; the shapes of
                ``prompt_ids`` and ``sequences`` do not match ``generate``'s layout.

        Examples:
            >>> import torch
            >>> prompt = torch.tensor([[0, 5, 6], [7, 8, 9]])  # left-padded, pad id 0
            >>> out = torch.tensor([[0, 5, 6, 3, 1, 0], [0, 5, 6, 4, 4, 1],
            ...                     [7, 8, 9, 2, 1, 0], [7, 8, 9, 3, 3, 3]])
            >>> ro = Rollouts.from_generate(prompt, out, [1.0, 0.0, 0.0, 1.0],
            ...                             pad_token_id=0, eos_token_id=1)
            >>> ro.group_ids.tolist(), ro.response_mask.sum(1).tolist()
            ([0, 0, 1, 1], [2, 3, 2, 3])
        """
        from gradalign._tokenize import split_generate_output

        if group_ids is not None:
            group_ids = _as_tensor("group_ids", group_ids, call="Rollouts.from_generate")
        prompts, completions = split_generate_output(
            prompt_ids,
            sequences,
            prompt_mask=prompt_mask,
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
        )
        if group_ids is None:
            k = len(completions) // int(torch.as_tensor(prompt_ids).shape[0])
            group_ids = [row // k for row in range(len(completions))]
        return cls.from_token_ids(
            prompts,
            completions,
            rewards,
            group_ids,
            pad_token_id=pad_token_id,
            max_length=max_length,
        )

    @classmethod
    def from_texts(
        cls,
        tokenizer: Any,
        prompts: Sequence[str] | Sequence[list[dict[str, str]]],
        completions: Sequence[str],
        rewards: _TensorLike,
        group_ids: _TensorLike,
        *,
        max_length: int | None = None,
        chat_template: bool = False,
        add_eos: bool = True,
    ) -> Rollouts:
        """Tokenize prompts and completions separately, so the prompt/response boundary is exact.

        Args:
            tokenizer: a Hugging Face tokenizer.
            prompts: (S,) prompt strings, or chat messages when ``chat_template`` is True.
            completions: (S,) completion strings.
            rewards: (S,) rewards.
            group_ids: (S,) integer problem id of each completion (map strings with
                [`ProblemIds`][gradalign.rollouts.ProblemIds]).
            max_length: truncate completions so each row holds at most this many tokens.
            chat_template: render prompts with ``tokenizer.apply_chat_template`` and the generation
                prompt (a string prompt becomes one user message).
            add_eos: append the tokenizer's EOS token to each completion, as trainers do.
        """
        from gradalign._tokenize import tokenize_pairs

        call = "Rollouts.from_texts"
        group_ids = _as_tensor("group_ids", group_ids, call=call)
        for name, value in (("prompts", prompts), ("completions", completions)):
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise GradAlignError(
                    f"{call}: {name} must be a sequence with one entry per rollout, got "
                    f"{type(value).__name__} {str(value)[:40]!r}"
                )
        for i, c in enumerate(completions):
            if not isinstance(c, str):
                raise GradAlignError(
                    f"{call}: completions must be strings, got {type(c).__name__} at index {i}"
                )
        if not len(prompts) == len(completions):
            raise GradAlignError(
                f"Rollouts.from_texts: got {len(prompts)} prompts but {len(completions)} completions"
            )
        prompt_ids, completion_ids, pad = tokenize_pairs(
            tokenizer, prompts, completions, chat_template=chat_template, add_eos=add_eos
        )
        return cls.from_token_ids(
            prompt_ids,
            completion_ids,
            rewards,
            group_ids,
            pad_token_id=pad,
            max_length=max_length,
        )
