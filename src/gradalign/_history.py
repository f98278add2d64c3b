"""Private: the per-problem tables of a [`Curriculum`][gradalign.curriculum.Curriculum], replayed from its log.

The curriculum keeps one plain-Python log (recorded rounds and observed pass rates); every table
here is derived from it, never stored beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def is_record(entry: Any) -> bool:
    """A recorded round (entries of states saved before observations existed have no kind)."""
    return not isinstance(entry, dict) or entry.get("kind", "record") == "record"


@dataclass
class Tables:
    """Per-problem tables replayed from a curriculum's log."""

    seen_count: torch.Tensor  # (N,) int64
    selected_count: torch.Tensor  # (N,) int64
    last_round: torch.Tensor  # (N,) int64
    last: dict[str, torch.Tensor]  # "scores"/"accuracy" -> (N,) float32
    known: dict[str, torch.Tensor]  # "scores"/"accuracy" -> (N,) bool
    hist: dict[str, dict[int, list[tuple[int, float]]]]
    selected_rounds: dict[int, list[int]]
    obs_count: torch.Tensor  # (N,) int64 rollouts observed
    obs_sum: torch.Tensor  # (N,) float64 reward sum of observed rollouts
    obs_last: torch.Tensor  # (N,) float32
    obs_index: torch.Tensor  # (N,) int64 index of the latest observation, -1: never

    @classmethod
    def replay(cls, n: int, log: list[dict[str, Any]]) -> Tables:
        t = cls(
            seen_count=torch.zeros(n, dtype=torch.int64),
            selected_count=torch.zeros(n, dtype=torch.int64),
            last_round=torch.full((n,), -1, dtype=torch.int64),
            last={k: torch.zeros(n, dtype=torch.float32) for k in ("scores", "accuracy")},
            known={k: torch.zeros(n, dtype=torch.bool) for k in ("scores", "accuracy")},
            hist={"scores": {}, "accuracy": {}},
            selected_rounds={},
            obs_count=torch.zeros(n, dtype=torch.int64),
            obs_sum=torch.zeros(n, dtype=torch.float64),
            obs_last=torch.zeros(n, dtype=torch.float32),
            obs_index=torch.full((n,), -1, dtype=torch.int64),
        )
        observations = 0
        for e in log:
            if is_record(e):
                t._add_record(e)
            else:
                t._add_observation(e, observations)
                observations += 1
        return t

    def _set(self, key: str, r: int, ids: list[int], values: list[float]) -> None:
        if ids:
            self.last[key][ids] = torch.tensor(values, dtype=torch.float32)
            self.known[key][ids] = True
        for pid, value in zip(ids, values, strict=True):
            self.hist[key].setdefault(pid, []).append((r, value))

    def _add_record(self, e: dict[str, Any]) -> None:
        r, seen, selected = e["round"], e["seen"], e["selected"]
        self.seen_count[seen] += 1
        self.last_round[seen] = r
        self.selected_count[selected] += 1
        for pid in selected:
            self.selected_rounds.setdefault(pid, []).append(r)
        for key in ("scores", "accuracy"):
            self._set(key, r, e[f"{key}_ids"], e[key])

    def _add_observation(self, e: dict[str, Any], index: int) -> None:
        ids, rates, counts = e["ids"], e["pass_rates"], e["counts"]
        self._set("accuracy", e["round"], ids, rates)
        if ids:
            c = torch.tensor(counts, dtype=torch.int64)
            self.obs_count[ids] += c
            self.obs_sum[ids] += torch.tensor(rates, dtype=torch.float64) * c
            self.obs_last[ids] = torch.tensor(rates, dtype=torch.float32)
            self.obs_index[ids] = index
