"""The demo's sampling: [`gradalign.sampling`][gradalign.sampling], re-exported (it moved there)."""

from gradalign.sampling import render_prompts, sample_completions, stop_tokens, trim_completion

__all__ = ["render_prompts", "sample_completions", "stop_tokens", "trim_completion"]
