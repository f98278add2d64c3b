"""Contracts every extractor keeps: model state at every yield, grad mode, progress, memory."""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
import textwrap
import warnings
from typing import Any, ClassVar

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from gradalign import GradAlign
from gradalign.extractors import (
    FactorizedGradient,
    FullGradient,
    GradientExtractor,
    LoRAGradient,
    RandomProjectedGradient,
)
from tests.helpers import make_rollouts

GROUPS = [0, 0, 1, 1, 2, 2, 3, 3]
REWARDS = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0]


def _extractors() -> dict[str, GradientExtractor]:
    return {
        "full": FullGradient(group_chunk=1),
        "random-projected": RandomProjectedGradient(dim=32, group_chunk=1),
        "factorized": FactorizedGradient(4, 4, group_chunk=1, batch_size=2),
        "lora": LoRAGradient(group_chunk=1, batch_size=2),
    }


def _model(name: str, base: nn.Module) -> nn.Module:
    model = copy.deepcopy(base)
    if name == "lora":
        config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], lora_dropout=0.1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = get_peft_model(model, config)
    return model


def _state(model: nn.Module) -> tuple[list[bool], list[bool]]:
    return [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]


@pytest.mark.parametrize("name", list(_extractors()))
def test_model_state_is_restored_at_every_yield(qwen: nn.Module, name: str) -> None:
    model = _model(name, qwen).train()
    for p in list(model.parameters())[::3]:
        p.requires_grad_(False)
    before = _state(model)
    ro = make_rollouts(vocab=qwen.config.vocab_size, groups=GROUPS, rewards=REWARDS)
    stream = _extractors()[name].iter_groups(model, ro)
    first = next(stream)  # the generator is paused here
    assert len(first) == 1
    assert _state(model) == before
    del stream  # abandoned: nothing to restore any more
    assert _state(model) == before
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", list(_extractors()))
def test_select_works_under_no_grad(qwen: nn.Module, name: str) -> None:
    model = _model(name, qwen)
    ro = make_rollouts(vocab=qwen.config.vocab_size, groups=GROUPS, rewards=REWARDS)
    val = make_rollouts(
        vocab=qwen.config.vocab_size, groups=[g + 10 for g in GROUPS], rewards=REWARDS, seed=1
    )
    ext = _extractors()[name]
    expected = GradAlign(ext).score(model, ro, val).scores
    with torch.no_grad():
        got = GradAlign(ext).score(model, ro, val).scores
    assert got is not None and expected is not None
    torch.testing.assert_close(got, expected)
    assert torch.isfinite(got).all()


class _FakeBar:
    made: ClassVar[list[Any]] = []

    def __init__(self, total: int, **kwargs: Any) -> None:
        self.total, self.updates = total, []
        _FakeBar.made.append(self)

    def update(self, n: int) -> None:
        self.updates.append(n)

    def close(self) -> None:
        pass


@pytest.mark.parametrize("name", list(_extractors()))
def test_progress_counts_groups(
    qwen: nn.Module, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tqdm.auto

    monkeypatch.setattr(tqdm.auto, "tqdm", _FakeBar)
    _FakeBar.made = []
    ro = make_rollouts(vocab=qwen.config.vocab_size, groups=GROUPS, rewards=REWARDS)
    ext = _extractors()[name]
    ext = dataclasses.replace(
        ext, group_chunk=None
    )  # one chunk: the bar must still move group by group
    ext.per_group(_model(name, qwen), ro, progress=True)
    (bar,) = _FakeBar.made
    assert bar.total == 4
    assert sum(bar.updates) == 4
    assert len([u for u in bar.updates if u]) >= 2


def test_random_projected_memory_does_not_grow_with_the_pool() -> None:
    """Peak RSS for 20 and 320 groups of a model with D ~ 88k: (G, D) rows would add ~110 MB."""
    script = textwrap.dedent(
        """
        import resource, sys, torch
        from gradalign import RandomProjectedGradient
        from gradalign.testing import tiny_model
        from tests.helpers import make_rollouts
        torch.set_num_threads(1)
        g = int(sys.argv[1])
        model = tiny_model()
        ro = make_rollouts(vocab=model.config.vocab_size, groups=[i // 2 for i in range(2 * g)],
                           rewards=[float(i % 2) for i in range(2 * g)], max_prompt=3, max_response=2)
        RandomProjectedGradient(dim=256, kind="sjlt", batch_size=2).per_group(model, ro)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
        """
    )

    def peak(groups: int) -> int:
        out = subprocess.run(
            [sys.executable, "-c", script, str(groups)], capture_output=True, text=True, check=True
        )
        return int(out.stdout.split()[-1])

    small, large = peak(20), peak(320)
    assert large - small < 40, (small, large)  # MiB; the (320, 256) result is 0.3 MiB
