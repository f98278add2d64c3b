"""The package's shape: no import cycle between modules, one selection pipeline.

A module imported only under ``if TYPE_CHECKING:`` is for annotations and does not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import gradalign as ga
from gradalign.communicator import Local
from gradalign.testing import tiny_model

SRC = Path(__file__).resolve().parents[1] / "src" / "gradalign"


def _runtime_imports(path: Path) -> set[str]:
    """gradalign modules ``path`` imports when it runs (module level or inside functions)."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for n in ast.walk(node))
    out = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gradalign"):
            out.add(node.module)
            # ``from gradalign import distributed`` imports the module gradalign.distributed
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("gradalign"))
    return out


def _module(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_module_imports_one_that_imports_it_back() -> None:
    graph = {_module(p): _runtime_imports(p) for p in SRC.rglob("*.py")}
    graph = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    packages = {m for m in graph if (SRC.parent / m.replace(".", "/") / "__init__.py").exists()}
    cycles = []
    for m, deps in graph.items():
        for d in deps - packages:  # a package's __init__ re-exports its children by design
            if m in graph[d] and m not in packages:
                cycles.append(tuple(sorted((m, d))))
    assert not sorted(set(cycles)), f"modules importing each other: {sorted(set(cycles))}"
    assert "gradalign.selector" not in graph["gradalign.distributed._torch"]


def test_local_and_distributed_are_one_pipeline() -> None:
    """GradAlign's public stages all go through a communicator; the old seams are gone."""
    sel = ga.GradAlign(ga.FactorizedGradient(4, 4), policy=ga.policies.TopK(1))
    assert isinstance(sel._communicator(), Local)
    for gone in ("driver", "target_state", "check_targets", "candidate_rows", "make_table",
                 "make_alignment", "resolve_targets"):  # fmt: skip
        assert not hasattr(sel, gone), gone
    assert not hasattr(ga.selector, "CandidateRows")


def test_a_communicator_sees_every_stage() -> None:
    """A recording communicator: select() asks it to combine each stage exactly once."""
    calls: list[str] = []

    class Recording(Local):
        def check_same(self, selector, model):  # type: ignore[no-untyped-def]
            calls.append("check_same")

        def batch_stats(self, rollouts, what):  # type: ignore[no-untyped-def]
            calls.append(f"batch_stats {what}")
            return None

        def reduce_target(self, sums, weights, group_ids):  # type: ignore[no-untyped-def]
            calls.append("reduce_target")
            return sums, weights

        def gather_alignment(self, local, **kw):  # type: ignore[no-untyped-def]
            calls.append("gather_alignment")
            return local

        def gather_candidates(self, rollouts):  # type: ignore[no-untyped-def]
            calls.append("gather_candidates")
            return super().gather_candidates(rollouts)

    model = tiny_model()
    ro = ga.Rollouts.from_token_ids([[5, 6]] * 4, [[9, 1], [10, 1], [11, 1], [12, 1]],
                                    [1.0, 0.0, 1.0, 0.0], [0, 0, 1, 1])  # fmt: skip
    val = ga.Rollouts.from_token_ids([[5, 6]] * 2, [[9, 1], [10, 1]], [1.0, 0.0], [100, 100])
    sel = ga.GradAlign(ga.FactorizedGradient(4, 4), policy=ga.policies.TopK(1))
    ref = sel.select(model, ro, val)
    sel._communicator = Recording  # type: ignore[method-assign]
    got = sel.select(model, ro, val)
    assert calls == ["check_same", "batch_stats validation", "reduce_target",
                     "batch_stats candidate", "gather_alignment", "gather_candidates"]  # fmt: skip
    assert torch.equal(got.ids, ref.ids) and torch.equal(got.scores, ref.scores)


@pytest.mark.parametrize("module", ["gradalign.distributed", "gradalign.communicator"])
def test_communicators_do_not_import_the_selector(module: str) -> None:
    base = SRC / module.split(".", 1)[1].replace(".", "/")
    paths = sorted(base.rglob("*.py")) if base.is_dir() else [base.with_suffix(".py")]
    assert paths and all(p.exists() for p in paths)
    for path in paths:
        assert "gradalign.selector" not in _runtime_imports(path), path
