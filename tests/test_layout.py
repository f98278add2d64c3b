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


# --- the namespace ---------------------------------------------------------------------------

README = SRC.parents[1] / "README.md"


def _pipeline_table() -> list[list[str]]:
    text = README.read_text()
    block = text[text.index("## The pipeline") :].split("\n\n")[2]
    rows = [r.strip("|").split("|") for r in block.splitlines()[2:]]
    assert len(rows) >= 10 and all(len(r) == 3 for r in rows), rows
    return [[cell.strip() for cell in r] for r in rows]


def _names(cell: str) -> list[str]:
    return [n for n in cell.split("`")[1::2] if n.isidentifier()]


def test_readme_pipeline_table_names_exist_where_it_says() -> None:
    import importlib

    top = set(ga.__all__)
    listed_top: set[str] = set()
    for stage, on_top, elsewhere in _pipeline_table():
        for name in _names(on_top):
            assert name in top and hasattr(ga, name), f"{stage}: gradalign.{name}"
            listed_top.add(name)
        for part in filter(None, (p.strip() for p in elsewhere.split(";"))):
            module_cell, _, names = part.partition(":")
            module = module_cell.strip().strip("`")
            assert module.startswith("gradalign."), part
            try:
                mod = importlib.import_module(module)
            except ImportError:  # an integration whose optional extra is absent
                continue
            for name in _names(names):
                assert hasattr(mod, name), f"{stage}: {module}.{name}"
    assert listed_top == top - {"__version__"}, "every top-level name is in the table once"


def test_top_level_is_small_and_moved_names_warn_once_with_their_new_home() -> None:
    import importlib

    assert len(ga.__all__) <= 20 and dir(ga) == sorted(ga.__all__)
    for name, home in ga.MOVED.items():
        assert name not in ga.__all__
        with pytest.warns(DeprecationWarning, match=f"from {home} import {name}"):
            obj = getattr(ga, name)
        assert obj is getattr(importlib.import_module(home), name)
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        ga.nothing_here  # noqa: B018
