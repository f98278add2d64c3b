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


NOTEBOOKS = [NOTEBOOK, EXAMPLES / "online_curriculum.ipynb"]


def _stream_text(nb: object) -> list[str]:
    """Every code cell's printed text, without the lines that report wall time."""
    out = []
    for cell in nb.cells:  # type: ignore[attr-defined]
        if cell.cell_type != "code":
            continue
        text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
        out.append("\n".join(line for line in text.splitlines() if not line.startswith("seconds")))
    return out


_NUMBER = re.compile(r"-?\d+\.\d+(?:e-?\d+)?")


def _skeleton(text: str) -> str:
    """The words of a printout: decimals and lists of ids masked, spacing ignored."""
    text = re.sub(r"\[[\d,\s]*\]", "[ids]", _NUMBER.sub("#", text))
    return re.sub(r"\s+", "", re.sub(r"\b\d+\b", "#", text))


def _assert_same_printout(got: str, want: str) -> None:
    """The same text; printed decimals may differ in the last digit (thread-dependent sums)."""

    def skeleton(text: str) -> str:  # the words, numbers masked, spacing ignored (tensor padding)
        return re.sub(r"\s+", "", _NUMBER.sub("#", text))

    assert skeleton(got) == skeleton(want), (got, want)
    for a, b in zip(_NUMBER.findall(got), _NUMBER.findall(want), strict=True):
        assert float(a) == pytest.approx(float(b), rel=1e-3, abs=2e-3), (a, b, got)


def _execute(path: Path) -> object:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(path, as_version=4)
    # "python3" is ipykernel's kernelspec under sys.prefix; jupyter_client launches it with
    # sys.executable, so the kernel runs in this interpreter's environment.
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(EXAMPLES)}}
    )
    # Raises CellExecutionError, with the failing cell's traceback, if a cell fails.
    client.execute(env=_offline_env())
    return nb


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_with_its_outputs(path: Path) -> None:
    """The docs render the stored outputs: all cells run in order, no error, no warning, a plot."""
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{path.name} has no code cells"
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), (
        f"{path.name}: run all cells once, in order, from a fresh kernel"
    )
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert not [o for o in outputs if o.get("name") == "stderr"], "a stored warning or traceback"
    assert any("image/png" in o.get("data", {}) for o in outputs), "the plot is missing"


@pytest.fixture(scope="module")
def executed() -> dict[Path, object]:
    """Each notebook run once from a fresh kernel (shared by the tests below)."""
    return {}


def _fresh(path: Path, cache: dict[Path, object]) -> object:
    if path not in cache:
        cache[path] = _execute(path)
    return cache[path]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_reruns_and_prints_what_it_stores(
    path: Path, executed: dict[Path, object]
) -> None:
    """Run again from a fresh kernel, every cell prints the stored text with numbers masked.

    The online-curriculum notebook trains tiny models with sampling: float rounding that differs
    between CPUs (Intel and AMD math kernels) or thread counts changes which tokens are sampled, and
    the curves move by more than rounding. Its printed numbers are reproduced only on the machine
    that stored them: ``pytest -m reproduce`` checks that.
    """
    nbformat = pytest.importorskip("nbformat")
    fresh = _fresh(path, executed)
    stored = nbformat.read(path, as_version=4)
    for got, want in zip(_stream_text(fresh), _stream_text(stored), strict=True):
        assert _skeleton(got) == _skeleton(want), (got, want)
    text = "\n".join(_stream_text(fresh))
    if path == NOTEBOOK:
        assert "GradAlign top 6:" in text
        assert "sampler serves:" in text
    else:
        assert "summary over seeds 0, 1, 2 (mean ± sd)" in text
        shares = [float(x) for x in re.findall(r"(\d+(?:\.\d+)?)%", text)]
        assert shares and all(0 <= x <= 100 for x in shares), text


@pytest.mark.reproduce
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_outputs_are_reproduced(path: Path, executed: dict[Path, object]) -> None:
    """The stored numbers, to printing precision: on the machine (CPU, threads) that stored them."""
    nbformat = pytest.importorskip("nbformat")
    fresh = _fresh(path, executed)
    stored = nbformat.read(path, as_version=4)
    for got, want in zip(_stream_text(fresh), _stream_text(stored), strict=True):
        _assert_same_printout(got, want)


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
