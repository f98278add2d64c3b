"""The notebooks run outside the repository: they import only installed packages.

A notebook downloaded from the docs site, or opened from ``docs/notebooks/`` (where Jupyter starts
the kernel), cannot import a script that sits next to ``examples/online_loop.py``. The
online-curriculum notebook therefore holds the loop's code itself; it must stay the code of
``examples/online_loop.py`` (the command-line version), definition for definition.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "examples").glob("*.ipynb"))
SCRIPT = ROOT / "examples" / "online_loop.py"


def _code(path: Path) -> list[ast.Module]:
    """Each code cell parsed, IPython magics (``%...``) left out."""
    cells = json.loads(path.read_text())["cells"]
    sources = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    return [
        ast.parse("\n".join(line for line in s.splitlines() if not line.lstrip().startswith("%")))
        for s in sources
    ]


def _imported(trees: list[ast.Module]) -> set[str]:
    names: set[str] = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def _definitions(trees: list[ast.Module]) -> dict[str, str]:
    """Top-level functions, classes and constants by name, as ``ast.dump`` text."""
    out = {}
    for tree in trees:
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef):
                out[node.name] = ast.dump(node)
            elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
                out[node.targets[0].id] = ast.dump(node)
    return out


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_imports_only_installed_packages(path: Path, tmp_path: Path) -> None:
    modules = sorted(_imported(_code(path)))
    assert "gradalign" in modules
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = (
        "import importlib.util, json, sys\n"
        "specs = {m: importlib.util.find_spec(m) for m in sys.argv[1:]}\n"
        "print(json.dumps({m: s and (s.origin or '') for m, s in specs.items()}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, *modules],
        cwd=tmp_path,  # a kernel started anywhere but examples/
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    origins = json.loads(out)
    assert not [m for m, origin in origins.items() if origin is None], origins
    local = [ROOT / "examples", ROOT / "benchmarks", ROOT / "tests"]
    assert not [m for m, o in origins.items() if any(Path(o).is_relative_to(d) for d in local)]


def test_online_curriculum_notebook_holds_the_scripts_code() -> None:
    notebook = _definitions(_code(ROOT / "examples" / "online_curriculum.ipynb"))
    script = _definitions([ast.parse(SCRIPT.read_text())])
    needed = {"Config", "make_task", "collect", "grpo_step", "warm_up", "select", "run", "run_seed"}
    assert needed <= set(notebook)
    changed = sorted(n for n in set(notebook) & set(script) if notebook[n] != script[n])
    assert not changed, f"copy these definitions from {SCRIPT.name} into the notebook: {changed}"
