"""benchmarks/study.py --quick: every regime and method runs through fill_round, the JSON has the
schema the report reads, and a second run resumes (skips every finished run).

The numbers of the tiny random model mean nothing; the study's design and results are on
docs/training-study.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_covers_every_regime_and_method(tmp_path: Path) -> None:
    out = tmp_path / "q.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "study.py"), "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import study

    data = json.loads(out.read_text())
    settings = data["settings"]
    assert settings["quick"] is True and settings["seeds"] == [0]
    assert set(data["runs"]) == set(study.REGIMES)
    for regime, methods in data["runs"].items():
        assert tuple(methods) == study.REGIMES[regime]
        for method, runs in methods.items():
            run = runs["0"]
            assert len(run["accuracy"]) == settings["rounds"] + 1
            assert all(0.0 <= a <= 1.0 for a in run["accuracy"])
            assert len(run["rounds"]) == settings["rounds"]
            for r in run["rounds"]:
                assert len(r["selected"]) == settings["keep"]  # every method trains on k problems
                assert 1 <= r["chunks"] <= 1 + settings["max_extra_chunks"]
                assert r["candidates"] <= r["chunks"] * settings["chunk"]
                assert 0.0 <= r["corrupted"] <= 1.0 and 0.0 <= r["target"] <= 1.0
            drawn = sum(r["candidates"] for r in run["rounds"])
            assert run["candidate_rollouts"] == drawn * settings["rollouts"]
            expected_val = settings["rounds"] * settings["val"] * settings["rollouts"]
            assert run["validation_rollouts"] == (expected_val if method == "GradAlign" else 0)
            # Round 0 is the same starting model for every method of a seed.
            assert run["accuracy"][0] == methods["GradAlign"]["0"]["accuracy"][0]
    assert "### noisy" in proc.stdout and "| Random |" in proc.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert again.returncode == 0 and "seed 0]" not in again.stdout


def test_paired_analysis_by_hand() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import study

    assert study.area([0.0, 1.0, 1.0]) == 0.75  # trapezoid (0.5 + 1.0) over 2 rounds
    mean, lo, hi = study.interval([0.1, 0.3])
    # mean 0.2, sd 0.1414, t(1) 12.706: half-width 12.706 * 0.1414 / sqrt(2) = 1.2706
    assert (
        abs(mean - 0.2) < 1e-12
        and abs(hi - mean - 1.2706) < 1e-4
        and abs(mean - lo - 1.2706) < 1e-4
    )
    assert study.first_reach([0.1, 0.4, 0.3, 0.5], 0.35) == 1
    assert study.first_reach([0.1, 0.2], 0.35) is None


def test_report_of_a_study_still_running() -> None:
    """Baselines that finished different seeds: the per-seed table shows a dash, no crash."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import study

    def run(curve: list[float]) -> dict:
        rounds = [{"selected": [0], "chunks": 1, "candidates": 4, "corrupted": 0.0, "target": 0.0}]
        return {"accuracy": curve, "rounds": rounds * (len(curve) - 1), "candidate_rollouts": 64,
                "validation_rollouts": 0, "extra_chunks": 0, "seconds": 1.0}  # fmt: skip

    methods = study.REGIMES["noisy"]
    runs = {m: {"0": run([0.1, 0.2])} for m in methods}
    runs["GradAlign"]["1"] = run([0.1, 0.4])
    runs[methods[1]]["1"] = run([0.1, 0.3])  # seed 1 finished for one baseline only
    text = study.report({"runs": {"noisy": runs}, "settings": {}})
    seed_1 = next(line for line in text.splitlines() if line.startswith("| 1 |"))
    # areas 0.25 and 0.20 (one round, trapezoid)
    assert seed_1.split("|")[2].strip() == "+0.0500" and seed_1.split("|")[3].strip() == "-"
