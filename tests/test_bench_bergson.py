"""benchmarks/bench_bergson.py --quick runs where bergson is not installed (as in this venv):
it says bergson is missing and still prints gradalign's rows with their quality column, and its
--json table is what plot_performance.py draws."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_bergson.py"
PLOT = SCRIPT.with_name("plot_performance.py")


@pytest.mark.skipif(
    importlib.util.find_spec("bergson") is not None,
    reason="bergson is installed here: the missing-bergson path cannot be seen",
)
def test_quick_without_bergson(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    record = tmp_path / "bench.json"
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--dims", "16", "--json", str(record)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "bergson is missing" in text
    rows = [line.split() for line in text.splitlines() if line.startswith("  gradalign ")]
    assert [row[:2] for row in rows] == [["gradalign", "16x16"]]
    _, _, wall, ratio, *_, corr = rows[0]  # method, wall s, x train, ..., corr
    assert float(wall) > 0 and float(ratio) > 0
    assert 0.0 < float(corr) <= 1.0  # the projected cosines track the exact ones
    assert "  train " in text
    assert "bergson 16x16" not in text
    # the JSON holds the printed table, and plot_performance.py draws it
    bench = json.loads(record.read_text())
    assert bench["bergson"] is None and [r["model"] for r in bench["runs"]] == ["small"]
    methods = bench["runs"][0]["methods"]
    assert sorted(methods) == ["gradalign:16", "train"]
    assert methods["train"]["x_train"] == 1.0
    assert methods["gradalign:16"]["label"] == "gradalign 16x16"
    assert abs(methods["gradalign:16"]["x_train"] - float(ratio)) < 0.006
    assert abs(methods["gradalign:16"]["corr_mean"] - float(corr)) < 0.0006
    png = tmp_path / "bergson.png"
    plot = subprocess.run(
        [sys.executable, str(PLOT), str(record), "--out", str(png)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert plot.returncode == 0, plot.stderr[-3000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
