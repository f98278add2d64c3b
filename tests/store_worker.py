"""A separate process that writes a GradientStore, for the fault-injection tests.

``python -m tests.store_worker PATH POOL [--hold SIGNAL] [--stall-after N SIGNAL]``

- ``POOL`` is ``a`` or ``b`` (two disjoint pools of the same model) or ``all``;
- ``--hold SIGNAL RELEASE``: once extraction starts (the lock is held), touch SIGNAL and wait for
  the file RELEASE to appear;
- ``--stall-after N SIGNAL``: after N chunks are committed, touch SIGNAL and sleep (to be killed).

Prints ``ok`` or ``GradAlignError: <message>`` and exits 0 either way.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from gradalign import GradAlignError, GRPOObjective, Rollouts
from gradalign.extractors import FactorizedGradient, GradientExtractor, GroupGradients
from gradalign.store import GradientStore
from gradalign.testing import tiny_model
from tests.helpers import make_rollouts

# Groups of 3 rows in micro-batches of at most 6: packs of 2 groups.
EXTRACTOR = FactorizedGradient(dim_in=4, dim_out=4, group_chunk=1, batch_size=6)


def pool(which: str, vocab: int) -> Rollouts:
    """Pool "a" (group ids 0..9), "b" (100..109) or "all" (both), 3 rollouts per group."""
    ids = [*range(10), *range(100, 110)]
    groups = [g for g in ids for _ in range(3)]
    rewards = [float((i * 7 + g) % 3 == 0) for i, g in enumerate(groups)]
    everything = make_rollouts(vocab=vocab, groups=groups, rewards=rewards, seed=5)
    return (
        everything
        if which == "all"
        else everything.select_groups(ids[:10] if which == "a" else ids[10:])
    )


def model() -> nn.Module:
    return tiny_model("qwen2", seed=3)


class _Paced(GradientExtractor):
    """The extractor, with a pause per chunk or a stall after some chunks."""

    def __init__(self, hold: tuple[Path, Path] | None, stall: tuple[int, Path] | None) -> None:
        self.hold, self.stall, self.calls = hold, stall, 0

    def __repr__(self) -> str:
        return repr(EXTRACTOR)

    def group_packs(self, rollouts: Rollouts, objective: GRPOObjective | None = None) -> list[int]:
        return EXTRACTOR.group_packs(rollouts, objective)

    def iter_groups(
        self,
        model: nn.Module,
        rollouts: Rollouts,
        objective: GRPOObjective | None = None,
        *,
        progress: bool = False,
    ) -> Iterator[GroupGradients]:
        if self.stall is not None and self.calls == self.stall[0]:
            self.stall[1].touch()  # N chunks are committed: wait to be killed
            time.sleep(60)
        self.calls += 1
        if self.hold is not None:
            self.hold[0].touch()
            while not self.hold[1].exists():
                time.sleep(0.05)
        yield from EXTRACTOR.iter_groups(model, rollouts, objective)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path", type=Path)
    parser.add_argument("pool", choices=["a", "b", "all"])
    parser.add_argument("--hold", nargs=2, type=Path)
    parser.add_argument("--stall-after", nargs=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    m = model()
    stall = (
        None if args.stall_after is None else (int(args.stall_after[0]), Path(args.stall_after[1]))
    )
    try:
        GradientStore(args.path).extract(
            _Paced(None if args.hold is None else tuple(args.hold), stall),
            m,
            pool(args.pool, m.config.vocab_size),
            group_chunk=2,
        )
        print("ok")
    except GradAlignError as err:
        print(f"GradAlignError: {err}")


if __name__ == "__main__":
    main()
