"""The examples run end to end: the walkthrough notebook and ``online_loop.py --quick``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOK = EXAMPLES / "walkthrough.ipynb"
ONLINE_LOOP = EXAMPLES / "online_loop.py"


def _offline_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def test_notebook_is_stored_without_outputs() -> None:
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "the walkthrough has no code cells"
    for i, cell in enumerate(code):
        assert cell.outputs == [], f"code cell {i} has stored outputs; clear them"
        assert cell.execution_count is None, f"code cell {i} has an execution count; clear it"


def test_walkthrough_notebook_executes() -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # "python3" is ipykernel's kernelspec under sys.prefix; jupyter_client launches it with
    # sys.executable, so the kernel runs in this interpreter's environment.
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=180,
        resources={"metadata": {"path": str(EXAMPLES)}},
    )
    # Raises CellExecutionError, with the failing cell's traceback, if a cell fails.
    client.execute(env=_offline_env())
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the score plot is missing"
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "GradAlign top 6:" in text
    assert "sampler serves:" in text


def test_online_loop_quick_prints_the_table() -> None:
    proc = subprocess.run(
        [sys.executable, str(ONLINE_LOOP), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        env=_offline_env(),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[1].split() == ["round", "GradAlign", "AccGreedy", "Random"], proc.stdout
    rows = [line.split() for line in lines if re.fullmatch(r"\s*\d+(\s+[0-9.]+){3}", line)]
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3], proc.stdout
    values = [float(v) for r in rows for v in r[1:]]
    assert all(0.0 <= v <= 1.0 for v in values), proc.stdout
    assert len(set(rows[0][1:])) == 1, "every method must start from the same model"
    share = lines[lines.index("corrupted share of selections") + 1].split()
    assert len(share) == 3 and all(s.endswith("%") for s in share), proc.stdout
