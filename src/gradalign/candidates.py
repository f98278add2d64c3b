"""The candidate table that every selection policy reads.

Implementations: [`Candidates`][gradalign.candidates.Candidates] (one row per candidate problem: ids, scores, accuracy, reward
spread, zero-gradient flags, per-task scores, gradients), validated on construction and built from
rollouts with [`Candidates.from_rollouts`][gradalign.candidates.Candidates.from_rollouts].

Shapes: G candidates, D gradient dim, Q validation targets (tasks).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import torch

from gradalign.errors import GradAlignError
from gradalign.stats import group_stats

if TYPE_CHECKING:
    from gradalign.rollouts import Rollouts

__all__ = ["CandidateTable", "Candidates"]

# Optional field -> (dtype, number of dims).
_FIELDS: dict[str, tuple[torch.dtype, int]] = {
    "scores": (torch.float32, 1),
    "accuracy": (torch.float32, 1),
    "pass_rate": (torch.float32, 1),
    "reward_std": (torch.float32, 1),
    "zero_spread": (torch.bool, 1),
    "zero_gradient": (torch.bool, 1),
    "task_scores": (torch.float32, 2),
    "grads": (torch.float32, 2),
}


def _as_ids(call: str, ids: Any) -> torch.Tensor:
    ids = torch.as_tensor(ids).detach().cpu()
    if ids.shape == (0,):  # an empty list arrives as float32
        ids = ids.long()
    if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise GradAlignError(
            f"{call}: ids must be a 1-D integer tensor, got {ids.dtype} of shape {tuple(ids.shape)}"
        )
    return ids.long()


def _check_field(name: str, value: Any, g: int) -> torch.Tensor:
    """Validate one optional field of a G-row table and return it as a CPU tensor of its dtype."""
    dtype, ndim = _FIELDS[name]
    if not isinstance(value, torch.Tensor):
        raise GradAlignError(f"Candidates: {name} must be a torch.Tensor, got {type(value)}")
    if value.dim() != ndim or value.shape[0] != g:
        want = "(G,)" if ndim == 1 else "(G, ...) 2-D"
        raise GradAlignError(
            f"Candidates: {name} must have shape {want} with G={g}, got {tuple(value.shape)}"
        )
    if (dtype == torch.bool) != (value.dtype == torch.bool) or value.is_complex():
        kind = "a bool" if dtype == torch.bool else "a real-valued"
        raise GradAlignError(f"Candidates: {name} must be {kind} tensor, got {value.dtype}")
    value = value.detach().to("cpu", dtype)
    if value.is_floating_point() and value.isnan().any():
        rows = value.isnan().reshape(g, -1).any(1).nonzero().flatten().tolist()
        raise GradAlignError(f"Candidates: {name} contains NaN in rows {rows}")
    if value.is_floating_point() and not value.isfinite().all():
        raise GradAlignError(f"Candidates: {name} must be finite, got inf")
    if name in ("accuracy", "pass_rate") and ((value < 0) | (value > 1)).any():
        bad = value[(value < 0) | (value > 1)][:5].tolist()
        raise GradAlignError(
            f"Candidates: {name} must lie in [0, 1], got {bad}; for rewards outside [0, 1] pass "
            "their mean as scores, or build the table with Candidates.from_rollouts (its "
            "pass_rate counts rewards >= pass_threshold)"
        )
    if name == "reward_std" and (value < 0).any():
        raise GradAlignError(f"Candidates: reward_std must be >= 0, got min {value.min().item()}")
    return value


@dataclass(eq=False)
class Candidates:
    """The table every policy reads: one row per candidate problem (group).

    After construction every field is a CPU tensor of the dtype below, or None (all but ``ids``).

    Args:
        ids: (G,) unique integer problem/group ids (int64).
        scores: (G,) float32 alignment scores (aggregated over targets).
        accuracy: (G,) float32 mean reward of the group (rewards in [0, 1]); with 0/1 rewards
            it is the pass rate.
        pass_rate: (G,) float32 fraction of the group's rollouts whose reward reaches
            ``pass_threshold`` (see [`from_rollouts`][gradalign.candidates.Candidates.from_rollouts]): a
            pass rate under partial-credit rewards too. Policies that rank by pass rate
            (AccGreedy, Learnability, AccuracyBand, ...) read it, else ``accuracy``.
        reward_std: (G,) float32 population std of the group's rewards (0 = zero-spread group).
        zero_spread: (G,) bool, True where the group's rewards have no spread by the rule of
            [`gradalign.stats.zero_spread`][gradalign.stats.zero_spread] (with the objective's tolerance when the
            table comes from [`GradAlign.score`][gradalign.selector.GradAlign.score]).
        zero_gradient: (G,) bool, True where the group gradient had zero norm (score defined 0).
        task_scores: (G, Q) float32 per-validation-task scores.
        grads: (G, D) float32 (projected) group gradients.

    Raises:
        GradAlignError: a field is not a tensor or has the wrong shape or dtype, ids repeat, a field
            holds NaN or inf, accuracy lies outside [0, 1], or reward_std is negative.

    Examples:
        >>> import torch, gradalign as ga
        >>> ro = ga.Rollouts.from_token_ids([[5, 6], [5, 6], [7, 8], [7, 8]],
        ...     [[9, 1], [10, 1], [11, 1], [12, 1]], [1.0, 0.0, 1.0, 1.0], [0, 0, 1, 1])
        >>> table = ga.Candidates.from_rollouts(ro, scores=torch.tensor([0.3, -0.1]))
        >>> table.ids, table.accuracy, table.reward_std
        (tensor([0, 1]), tensor([0.5000, 1.0000]), tensor([0.5000, 0.0000]))
    """

    ids: torch.Tensor
    scores: torch.Tensor | None = None
    accuracy: torch.Tensor | None = None
    reward_std: torch.Tensor | None = None
    pass_rate: torch.Tensor | None = None
    zero_spread: torch.Tensor | None = None
    zero_gradient: torch.Tensor | None = None
    task_scores: torch.Tensor | None = None
    grads: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.ids, torch.Tensor):
            raise GradAlignError(f"Candidates: ids must be a torch.Tensor, got {type(self.ids)}")
        self.ids = _as_ids("Candidates", self.ids)
        uniq, counts = torch.unique(self.ids, return_counts=True)
        if (counts > 1).any():
            raise GradAlignError(f"Candidates: ids must be unique, got {uniq[counts > 1].tolist()}")
        for name in _FIELDS:
            if getattr(self, name) is not None:
                setattr(self, name, _check_field(name, getattr(self, name), len(self.ids)))

    @classmethod
    def from_rollouts(
        cls,
        rollouts: Rollouts,
        scores: torch.Tensor | None = None,
        *,
        task_scores: torch.Tensor | None = None,
        grads: torch.Tensor | None = None,
        zero_gradient: torch.Tensor | None = None,
        zero_spread_tol: float = 0.0,
        pass_threshold: float | None = None,
    ) -> Candidates:
        """One row per group of ``rollouts``; accuracy, pass rate and reward spread come from its rewards.

        Args:
            rollouts: anything with ``group_ids`` (S,) integers and ``rewards`` (S,) floats.
            scores: (G,) scores in the order of the sorted unique group ids (as are the others).
            task_scores: (G, Q) per-task scores.
            grads: (G, D) group gradients.
            zero_gradient: (G,) bool zero-norm flags.
            zero_spread_tol: the tolerance of the zero-spread rule (use the objective's).
            pass_threshold: a rollout passes when its reward is at least this. None (default):
                1.0 (full credit) when every reward lies in [0, 1], else no pass rate (a reward
                model's scores have no natural threshold; name one to get it).

        Returns:
            Candidates with ids = sorted unique group ids, accuracy = mean reward per group (None
            when a reward lies outside [0, 1]), pass_rate = fraction of rollouts with reward
            ``>= pass_threshold`` (None as said above), and reward_std = population std (unbiased=False) per group,
            exactly 0 for constant groups.

        Examples:
            >>> ro = Rollouts.from_token_ids([[5]] * 4, [[9, 1]] * 4, [1.0, 0.5, 0.5, 0.0],
            ...                              [0, 0, 1, 1])  # partial credit
            >>> table = Candidates.from_rollouts(ro)
            >>> table.accuracy, table.pass_rate  # mean reward, and full-credit pass rate
            (tensor([0.7500, 0.2500]), tensor([0.5000, 0.0000]))
            >>> Candidates.from_rollouts(ro, pass_threshold=0.5).pass_rate
            tensor([1.0000, 0.5000])
        """
        gids = _as_ids("Candidates.from_rollouts", rollouts.group_ids)
        rewards = torch.as_tensor(rollouts.rewards).detach().cpu().double()  # (S,)
        if rewards.shape != gids.shape or rewards.isnan().any():
            raise GradAlignError(
                f"Candidates.from_rollouts: rewards must be NaN-free with the shape of group_ids "
                f"{tuple(gids.shape)}, got {tuple(rewards.shape)}"
            )
        unit = bool(((rewards >= 0) & (rewards <= 1)).all())
        if pass_threshold is None:
            pass_threshold = 1.0 if unit else None
        elif (
            isinstance(pass_threshold, bool)
            or not isinstance(pass_threshold, int | float)
            or not math.isfinite(pass_threshold)
        ):
            raise GradAlignError(
                "Candidates.from_rollouts: pass_threshold must be a finite number or None, got "
                f"{pass_threshold!r}"
            )
        st = group_stats(gids, rewards)
        passed = None
        if pass_threshold is not None:
            passed = group_stats(gids, (rewards >= pass_threshold).double()).mean.float()
        return cls(
            ids=st.ids,
            scores=scores,
            accuracy=st.mean.float() if unit else None,
            reward_std=st.std.float(),
            pass_rate=passed,
            zero_spread=st.zero_spread(zero_spread_tol),
            zero_gradient=zero_gradient,
            task_scores=task_scores,
            grads=grads,
        )

    @classmethod
    def concat(cls, tables: Sequence[Candidates]) -> Candidates:
        """The rows of several tables as one (ids must not repeat); a field is kept when every
        table has it.

        Examples:
            >>> a = Candidates(ids=torch.tensor([3, 1]), scores=torch.tensor([0.5, -0.1]))
            >>> b = Candidates(ids=torch.tensor([7]), scores=torch.tensor([0.2]))
            >>> both = Candidates.concat([a, b])
            >>> both.ids, both.scores
            (tensor([3, 1, 7]), tensor([ 0.5000, -0.1000,  0.2000]))
        """
        if not tables or not all(isinstance(t, Candidates) for t in tables):
            raise GradAlignError(
                f"Candidates.concat: tables must be a non-empty list of Candidates, got {tables!r}"
            )
        values: dict[str, Any] = {"ids": torch.cat([t.ids for t in tables])}
        for name in _FIELDS:
            parts = [getattr(t, name) for t in tables]
            if all(p is not None for p in parts):
                if len({p.shape[1:] for p in parts}) > 1:
                    raise GradAlignError(
                        f"Candidates.concat: {name} has shapes {[tuple(p.shape) for p in parts]}; "
                        "the tables must have the same number of columns"
                    )
                values[name] = torch.cat(parts)
        return cls(**values)

    def has_spread(self, call: str = "Candidates.has_spread") -> torch.Tensor:
        """(G,) bool, True where a group has reward spread: not ``zero_spread`` when set, else
        ``reward_std > 0``, else a pass rate strictly between 0 and 1 (the same rule at tolerance 0
        for binary rewards).

        Raises:
            GradAlignError: none of ``zero_spread``, ``reward_std``, ``accuracy`` is set.
        """
        if self.zero_spread is not None:
            return ~self.zero_spread
        if self.reward_std is not None:
            return self.reward_std > 0
        if self.accuracy is not None:
            return (self.accuracy != 0) & (self.accuracy != 1)
        raise GradAlignError(
            f"{call}: candidates.zero_spread, reward_std and accuracy are all None; build "
            "candidates with Candidates.from_rollouts(rollouts) or pass zero_spread=/reward_std=..."
        )

    def __len__(self) -> int:
        return len(self.ids)

    def positions(self, ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """(n,) int64 row positions of ``ids``; GradAlignError if one is not a candidate."""
        want = _as_ids("Candidates.positions", ids)
        order = torch.argsort(self.ids)
        pos = torch.searchsorted(self.ids[order], want).clamp_max(max(len(self) - 1, 0))
        found = self.ids[order][pos] == want if len(self) else torch.zeros_like(want).bool()
        if not found.all():
            raise GradAlignError(f"Candidates: ids {want[~found].tolist()} are not candidates")
        return order[pos]

    def subset(self, ids: torch.Tensor | Sequence[int]) -> Candidates:
        """The rows whose id is in ``ids``, in the order given (unique ids of this table)."""
        pos = self.positions(ids)
        return replace(self, **{name: v[pos] for name, v in self.to_dict().items()})

    def to_dict(self) -> dict[str, torch.Tensor]:
        """The fields that are set, by name."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {name: v for name, v in values.items() if v is not None}

    def table(self, max_rows: int = 20) -> CandidateTable:
        """A compact table of the first ``max_rows`` rows; 2-D fields appear as shapes.

        The result is a ``str`` (``print`` it); a notebook shows it as an HTML table.
        """
        d = self.to_dict()
        cols = [n for n in ("ids", "scores", "accuracy", "reward_std", "zero_gradient") if n in d]
        shapes = "".join(f", {n} {tuple(d[n].shape)}" for n in ("task_scores", "grads") if n in d)
        rows = [
            tuple(
                f"{v:.4g}" if isinstance(v, float) else str(v)
                for v in (d[c][i].item() for c in cols)
            )
            for i in range(min(len(self), max_rows))
        ]
        return CandidateTable.of(
            f"Candidates(G={len(self)}{shapes})", cols, rows, max(0, len(self) - max_rows)
        )

    def __repr__(self) -> str:
        return str(self.table(max_rows=10))

    def _repr_html_(self) -> str:
        return self.table(max_rows=10)._repr_html_()


class CandidateTable(str):
    """What [`Candidates.table`][gradalign.candidates.Candidates.table] returns: the text table, as a ``str``.

    ``print(table)`` prints the text; Jupyter shows an HTML table (``_repr_html_``) and IPython
    the text itself, not a quoted string with ``\\n`` escapes.

    Attributes:
        caption: the first line, e.g. ``Candidates(G=24, task_scores (24, 1))``.
        columns: the column names.
        rows: the shown rows, each cell as printed (floats to 4 significant digits).
        more: the number of rows left out.

    Examples:
        >>> t = Candidates(ids=torch.tensor([3, 7]), scores=torch.tensor([0.25, -0.5])).table()
        >>> print(t)
        Candidates(G=2)
                  ids         scores
                    3           0.25
                    7           -0.5
        >>> t.rows, t._repr_html_().startswith("<table><caption>Candidates(G=2)</caption>")
        ((('3', '0.25'), ('7', '-0.5')), True)
    """

    caption: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    more: int

    @classmethod
    def of(
        cls, caption: str, columns: Sequence[str], rows: Sequence[Sequence[str]], more: int = 0
    ) -> CandidateTable:
        """The table whose text is the caption, then the columns and rows right-aligned in 13."""
        lines = [caption, *("  ".join(f"{c:>13}" for c in row) for row in [columns, *rows])]
        if more:
            lines.append(f"... ({more} more rows)")
        out = cls("\n".join(lines))
        out.caption, out.columns, out.more = caption, tuple(columns), more
        out.rows = tuple(tuple(row) for row in rows)
        return out

    def _repr_html_(self) -> str:
        def cells(tag: str, row: Sequence[str]) -> str:
            return "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in row)

        body = "".join(f"<tr>{cells('td', row)}</tr>" for row in self.rows)
        if self.more:
            body += f'<tr><td colspan="{len(self.columns)}">... ({self.more} more rows)</td></tr>'
        return (
            f"<table><caption>{html.escape(self.caption)}</caption>"
            f"<thead><tr>{cells('th', self.columns)}</tr></thead><tbody>{body}</tbody></table>"
        )

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(str(self))
