"""Command line of the demo: ``python -m gradalign.demo [--tiny] [--seeds 0-4] [--json PATH]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gradalign.demo.problems import TASKS
from gradalign.demo.run import EXTRACTORS, DemoConfig, run_demo
from gradalign.errors import GradAlignError


def parse_seeds(text: str) -> tuple[int, ...]:
    """Seeds from ``"3"``, ``"0-4"`` (inclusive) or ``"0,2,7-9"``.

    Examples:
        >>> parse_seeds("0,2,7-9")
        (0, 2, 7, 8, 9)
    """
    seeds: list[int] = []
    try:
        for part in text.split(","):
            lo, sep, hi = part.strip().partition("-")
            seeds += range(int(lo), int(hi) + 1) if sep else [int(lo)]
    except ValueError:
        raise GradAlignError(
            f"--seeds: expected integers and ranges like 0-4 or 0,2,5, got {text!r}"
        ) from None
    if not seeds:
        raise GradAlignError(f"--seeds: the range {text!r} holds no seed")
    return tuple(seeds)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gradalign.demo",
        description="GradAlign on SmolLM2-135M-Instruct with half the pool's rewards corrupted.",
    )
    p.add_argument("--tiny", action="store_true", help="random tiny model; runs in seconds")
    p.add_argument("--seeds", help="seeds to run: 0-4 (default), 3, or 0,2,7-9")
    p.add_argument("--seed", type=int, help="run this one seed (same as --seeds N)")
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    p.add_argument("--task", choices=TASKS, help="problem family (default addition)")
    p.add_argument("--pool", type=int, help="candidate problems per seed (default 32; tiny 16)")
    p.add_argument("--rollouts", type=int, help="rollouts per problem (default 16; tiny 8)")
    p.add_argument("--val", type=int, help="clean validation problems (default 8; tiny 4)")
    p.add_argument("--select-fraction", type=float, help="fraction selected (default 0.25)")
    p.add_argument("--max-new-tokens", type=int, help="completion cap (default: the task's)")
    p.add_argument("--temperature", type=float, help="sampling temperature (default 1.3)")
    p.add_argument("--extractor", choices=EXTRACTORS, help="gradient extractor (factorized)")
    p.add_argument("--projection-dim", type=int, help="factorized K per side (default 32)")
    p.add_argument("--out-dir", type=Path, help="folder of the PNG (default demo_out)")
    p.add_argument(
        "--cache-dir",
        type=Path,
        help="model cache root (default $GRADALIGN_CACHE or ~/.cache/gradalign)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, run the demo, print its report; returns the exit status."""
    args = vars(_parser().parse_args(argv))
    tiny, json_path = args.pop("tiny"), args.pop("json")
    seed, seeds = args.pop("seed"), args.pop("seeds")
    overrides = {k: v for k, v in args.items() if v is not None}
    try:
        if seed is not None and seeds is not None:
            raise GradAlignError("--seed and --seeds: give one of them, got both")
        if seeds is not None or seed is not None:
            overrides["seeds"] = parse_seeds(seeds) if seeds is not None else (seed,)
        config = DemoConfig.tiny_defaults(**overrides) if tiny else DemoConfig(**overrides)
        config.progress = True
        result = run_demo(config, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except GradAlignError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(result.report())
    if json_path is not None:
        print(f"JSON: {result.write_json(json_path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
