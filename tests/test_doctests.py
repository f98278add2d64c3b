"""Every ``>>>`` example in gradalign's docstrings runs here, output compared as written.

Examples may use the names a user's session would already hold, set up once below: ``torch``,
``ga`` (``import gradalign as ga``), every public name of ``gradalign``, ``model`` (a tiny causal
LM), ``rollouts`` (four groups of two rollouts of it), ``peft_model`` (``model`` with LoRA adapters)
and ``tmp_path`` (an empty folder). Examples that need a trainer, a cluster or a downloaded model are
plain code blocks in the docs instead and are not collected.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import gradalign as ga
from gradalign.testing import tiny_model


def _examples(name: str) -> list[doctest.DocTest]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optional extras (verl) announce what they cannot load
        module = importlib.import_module(name)
    return [t for t in doctest.DocTestFinder(exclude_empty=True).find(module) if t.examples]


def _importable(name: str) -> bool:
    try:
        _examples(name)
    except ImportError:  # an integration whose optional extra is not installed
        return False
    return True


def _modules() -> list[str]:
    """gradalign's modules that hold examples."""
    names = ["gradalign"] + [
        info.name for info in pkgutil.walk_packages(ga.__path__, prefix="gradalign.")
    ]
    return sorted(n for n in names if _importable(n) and _examples(n))


def _session(tmp_path: Path) -> dict[str, Any]:
    model = tiny_model("qwen2", seed=0)
    rollouts = ga.Rollouts.from_token_ids(
        [[5, 6, 7]] * 2 + [[8, 9]] * 2 + [[10, 11, 12]] * 2 + [[13, 14]] * 2,
        [[20, 21, 1], [22, 1], [23, 1], [24, 25, 1], [26, 1], [27, 1], [28, 29, 1], [30, 1]],
        [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0],
        [0, 0, 1, 1, 2, 2, 3, 3],
    )
    names: dict[str, Any] = {name: getattr(ga, name) for name in ga.__all__}
    names.update(torch=torch, ga=ga, model=model, rollouts=rollouts, tmp_path=tmp_path)
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_alpha=8)
    with warnings.catch_warnings():  # peft reads a property transformers has deprecated
        warnings.simplefilter("ignore", FutureWarning)
        names["peft_model"] = get_peft_model(tiny_model("qwen2", seed=0), config)
    return names


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples_run(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    tests = _examples(name)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    runner = doctest.DocTestRunner(optionflags=flags)
    report: list[str] = []
    for test in tests:
        test.globs = {**_session(tmp_path), **test.globs}
        runner.run(test, out=report.append)
    failed = runner.summarize(verbose=False).failed
    assert failed == 0, "".join(report)


def test_every_public_class_and_function_has_an_example() -> None:
    missing = []
    for name in ga.__all__:
        obj = getattr(ga, name)
        if not (isinstance(obj, type) or callable(obj)) or name in {"__version__"}:
            continue
        if ">>>" not in (obj.__doc__ or "") and "```" not in (obj.__doc__ or ""):
            missing.append(name)
    assert not missing, f"public names without an example: {missing}"
