"""Command line of the demo: ``python -m gradalign.demo [--tiny] [options]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gradalign.demo.run import DemoConfig, run_demo
from gradalign.errors import GradAlignError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gradalign.demo",
        description="GradAlign on SmolLM2-135M-Instruct with half the pool's rewards corrupted.",
    )
    p.add_argument("--tiny", action="store_true", help="random tiny model; runs in seconds")
    p.add_argument("--pool", type=int, help="candidate problems (default 32; tiny 16)")
    p.add_argument("--rollouts", type=int, help="rollouts per problem (default 4)")
    p.add_argument("--val", type=int, help="clean validation problems (default 16; tiny 4)")
    p.add_argument("--seed", type=int, help="seed of everything (default 0)")
    p.add_argument("--select-fraction", type=float, help="fraction selected (default 0.25)")
    p.add_argument("--max-new-tokens", type=int, help="completion length cap (default 40; tiny 8)")
    p.add_argument("--temperature", type=float, help="sampling temperature (default 0.7)")
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
    tiny = args.pop("tiny")
    overrides = {k: v for k, v in args.items() if v is not None}
    try:
        config = DemoConfig.tiny_defaults(**overrides) if tiny else DemoConfig(**overrides)
        config.progress = True
        result = run_demo(config, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except GradAlignError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(result.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
