"""The demo's settings: [`DemoConfig`][gradalign.demo.config.DemoConfig], validated on construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradalign.demo.problems import TASKS
from gradalign.errors import GradAlignError

__all__ = ["EXTRACTORS", "DemoConfig"]

EXTRACTORS = ("factorized", "full")


@dataclass
class DemoConfig:
    """Settings of [`run_demo`][gradalign.demo.run.run_demo]; the defaults run 5 seeds of SmolLM2-135M in about 10 minutes on 2 CPU cores.

    Args:
        tiny: Use the random tiny model of [`gradalign.testing`][gradalign.testing] and a format-only reward.
        task: Problem family, one of ``gradalign.demo.problems.TASKS``.
        pool: Candidate problems per seed (``corrupt_fraction`` of them get corrupted rewards).
        rollouts: Rollouts per problem (pool and validation).
        val: Clean validation problems per seed.
        seeds: The seeds to run; each draws its own problems, rollouts and corruption.
        select_fraction: Fraction of the pool each method selects.
        corrupt_fraction: Fraction of the pool whose rewards are replaced by Bernoulli(0.5).
        max_new_tokens: Length cap of a completion; None takes the task's (4 for "addition",
            40 for "word").
        temperature: Sampling temperature (plain sampling, no top-k/top-p).
        extractor: "factorized" (``FactorizedGradient`` with ``projection_dim`` per side) or
            "full" (``FullGradient``: exact, about twice as slow here).
        projection_dim: K_in = K_out of the factorized projection.
        out_dir: Folder of the PNG.
        cache_dir: Model cache root; None uses ``$GRADALIGN_CACHE`` or ``~/.cache/gradalign``.
        grad_batch_size: Sequences per forward/backward of the gradient pass.
        gen_batch_size: Rollouts decoded together.
        progress: Show tqdm bars.
    """

    tiny: bool = False
    task: str = "addition"
    pool: int = 32
    rollouts: int = 16
    val: int = 8
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    select_fraction: float = 0.25
    corrupt_fraction: float = 0.5
    max_new_tokens: int | None = None
    temperature: float = 1.3
    extractor: str = "factorized"
    projection_dim: int = 32
    out_dir: Path = Path("demo_out")
    cache_dir: Path | None = None
    grad_batch_size: int = 128
    gen_batch_size: int = 256
    progress: bool = False

    def __post_init__(self) -> None:
        for name in ("pool", "rollouts", "val", "projection_dim", "grad_batch_size"):
            if getattr(self, name) < 1:
                raise GradAlignError(f"DemoConfig: {name} must be >= 1, got {getattr(self, name)}")
        self.seeds = tuple(int(s) for s in self.seeds)
        if not self.seeds or min(self.seeds) < 0 or len(set(self.seeds)) != len(self.seeds):
            raise GradAlignError(
                f"DemoConfig: seeds must be distinct integers >= 0, got {self.seeds}"
            )
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise GradAlignError(
                f"DemoConfig: max_new_tokens must be >= 1 or None, got {self.max_new_tokens}"
            )
        if self.gen_batch_size < 1:
            raise GradAlignError(
                f"DemoConfig: gen_batch_size must be >= 1, got {self.gen_batch_size}"
            )
        if self.task not in TASKS:
            raise GradAlignError(f"DemoConfig: task must be one of {TASKS}, got {self.task!r}")
        if self.extractor not in EXTRACTORS:
            raise GradAlignError(
                f"DemoConfig: extractor must be one of {EXTRACTORS}, got {self.extractor!r}"
            )
        if not 0 < self.select_fraction <= 1:
            raise GradAlignError(
                f"DemoConfig: select_fraction must be in (0, 1], got {self.select_fraction}"
            )
        n_bad = round(self.pool * self.corrupt_fraction)
        if not 1 <= n_bad <= self.pool - 1:
            raise GradAlignError(
                "DemoConfig: pool * corrupt_fraction must leave at least one clean and one "
                f"corrupted problem, got pool={self.pool}, corrupt_fraction={self.corrupt_fraction}"
            )
        if not self.temperature > 0:
            raise GradAlignError(f"DemoConfig: temperature must be > 0, got {self.temperature}")
        self.out_dir = Path(self.out_dir)
        self.cache_dir = None if self.cache_dir is None else Path(self.cache_dir)

    @property
    def new_tokens(self) -> int:
        """The completion length cap in effect."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        return 4 if self.task == "addition" else 40

    @classmethod
    def tiny_defaults(cls, **overrides: Any) -> DemoConfig:
        """A config for the tiny model that runs in seconds; ``overrides`` replace fields."""
        base: dict[str, Any] = {"pool": 16, "rollouts": 8, "val": 4, "seeds": (0,)}
        return cls(**{**base, **overrides, "tiny": True})

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready settings (paths as strings, the effective completion cap included)."""
        out = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}
        out["seeds"] = list(self.seeds)
        out["max_new_tokens"] = self.new_tokens
        return out
