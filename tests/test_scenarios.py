"""benchmarks/scenarios.py --quick: every scenario and method runs, and the JSON has its schema.

The numbers of the tiny random model mean nothing; the full run's numbers are in
docs/reproducing-the-paper.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_covers_every_scenario_and_method(tmp_path: Path) -> None:
    out = tmp_path / "q.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "scenarios.py"), "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import scenarios

    data = json.loads(out.read_text())
    settings = data["settings"]
    assert settings["quick"] is True and settings["seeds"] == [0]
    assert set(data["runs"]) == set(scenarios.SCENARIOS)
    for methods in data["runs"].values():
        assert set(methods) == set(scenarios.METHODS)
        for runs in methods.values():
            run = runs["0"]
            assert len(run["accuracy"]) == settings["rounds"] + 1
            assert all(0.0 <= a <= 1.0 for a in run["accuracy"])
            assert len(run["shares"]) == settings["rounds"]
            assert set(run["shares"][0]) == {"corrupted", "target", "low_utility"}
            assert run["rollouts"] > 0 and run["seconds"] > 0
    assert "### noisy" in proc.stdout and "| GradAlign |" in proc.stdout
    # Resuming from the JSON skips every finished run.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert again.returncode == 0 and "seed 0]" not in again.stdout
