"""``python -m gradalign.demo``: GradAlign on SmolLM2-135M with half the rewards corrupted.

The demo samples rollouts of arithmetic word problems, corrupts the rewards of half the pool,
scores every problem by the alignment of its GRPO gradient with a clean validation gradient, and
reports how many corrupted problems GradAlign, AccGreedy and Random select. ``--tiny`` runs the
same pipeline on a random tiny model in seconds.

Examples:
    >>> from gradalign.demo import DemoConfig, run_demo
    >>> result = run_demo(DemoConfig.tiny_defaults(out_dir=tmp_path))  # tiny model, seconds
    >>> sorted(result.shares)  # share of corrupted problems each policy selected
    ['AccGreedy', 'GradAlign', 'GradAlign (inner product)', 'Random']
"""

from __future__ import annotations

from gradalign.demo.run import DemoConfig, DemoResult, run_demo

__all__ = ["DemoConfig", "DemoResult", "run_demo"]
