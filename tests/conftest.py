"""Shared fixtures: tiny models (CPU, offline)."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

from gradalign.testing import tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# `make test` draws the same examples on every run (no flaky CI); explore with
# `pytest --hypothesis-profile=explore` for fresh random examples.
settings.register_profile("default", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile("default")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def qwen() -> torch.nn.Module:
    return tiny_model("qwen2", seed=0)


@pytest.fixture(scope="session")
def llama_tied() -> torch.nn.Module:
    return tiny_model("llama", seed=1, tie_word_embeddings=True)
