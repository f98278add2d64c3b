"""The tutorial pages' code: every script under examples/tutorials runs and prints what its page shows.

The pages include these files section by section, so a tutorial cannot drift from code that runs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "examples" / "tutorials"
PAGES = ROOT / "docs" / "tutorials"


def _run(script: str, *args: str) -> str:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(
        [sys.executable, str(TUTORIALS / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_every_snippet_section_a_page_includes_exists() -> None:
    included = 0
    for page in PAGES.glob("*.md"):
        for path, section in re.findall(r'--8<-- "([^":]+)(?::(\w+))?"', page.read_text()):
            source = (ROOT / path).read_text()
            included += 1
            if section:
                assert f"# --8<-- [start:{section}]" in source, (page.name, path, section)
                assert f"# --8<-- [end:{section}]" in source, (page.name, path, section)
    assert included >= 10


def test_score_rollouts() -> None:
    out = _run("score_rollouts.py")
    assert "6 problems, 48 rollouts" in out
    # the logged prompt went through the chat template, and the completion ends with EOS
    assert "'<|user|>\\n1+1=\\n<|assistant|>\\n2<eos>'" in out
    rows = [
        line.split() for line in out.splitlines() if re.fullmatch(r"\s*\d+\s+-?[0-9.e-]+.*", line)
    ]
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3, 4, 5]
    scores = {int(r[0]): float(r[1]) for r in rows}
    selected = [int(x) for x in re.search(r"selected: \[([^\]]*)\]", out)[1].split(",")]
    # TopK(2): the two best scores, best first
    assert selected == sorted(scores, key=scores.get, reverse=True)[:2]


def test_select_dataset(tmp_path: Path) -> None:
    out = _run("select_dataset.py", str(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "ranked.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == list(range(24))
    assert [r["rank"] for r in rows] == list(range(24))
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores, reverse=True)
    selected = [r for r in rows if r["selected"]]
    # the best quarter of the problems with reward spread (a pass rate strictly inside (0, 1))
    with_spread = [r for r in rows if 0.0 < r["pass_rate"] < 1.0]
    assert selected == with_spread[: max(1, round(len(with_spread) * 0.25))]
    assert all(0.0 < r["pass_rate"] < 1.0 for r in selected)
    assert f"; {len(selected)} selected" in out
    assert (
        f"datasets.Dataset with {len(selected)} rows" in out or "datasets is not installed" in out
    )


def test_grpo_loop_learns_the_format_reward() -> None:
    out = _run("grpo_loop.py")
    rewards = [float(x) for x in re.findall(r"mean reward ([0-9.]+)", out)]
    assert len(rewards) == 12
    assert out.count("selected [") == 3  # rounds at steps 0, 4 and 8
    # trained on its selections, the policy's reward rises well above where it starts
    assert sum(rewards[-4:]) / 4 > rewards[0] + 0.25, out


def test_grpo_loop_trains_on_what_was_scored() -> None:
    out = _run("grpo_loop.py", "--scored")
    rounds = re.findall(
        r"step (\d+): selected \[([^\]]*)\] from (\d) chunk\(s\), (\d+) rollouts, "
        r"shortfall (\d); mean reward ([0-9.]+)",
        out,
    )
    skipped = re.findall(r"step \d+: no target, skipped", out)
    assert len(rounds) + len(skipped) == 12 and len(rounds) >= 8, out
    for _, ids, chunks, n_rollouts, shortfall, _ in rounds:
        assert len(ids.split(",")) == 4  # k problems every round
        assert 1 <= int(chunks) <= 3  # at most max_extra_chunks=2 extra chunks
        # 8 rollouts of each drawn problem; chunks of 8 problems (never one problem twice)
        assert int(n_rollouts) % 8 == 0 and 64 <= int(n_rollouts) <= 64 * int(chunks)
        assert int(shortfall) == 0 or int(chunks) == 3  # short only after the limit
    rewards = [float(r[-1]) for r in rounds]
    assert sum(rewards[-4:]) / 4 > rewards[0] + 0.2, out


@pytest.mark.parametrize("plot", [False, True])
def test_choose_extractor(tmp_path: Path, plot: bool) -> None:
    png = tmp_path / "scatter.png"
    if plot:
        pytest.importorskip("matplotlib")
    out = _run("choose_extractor.py", *(["--plot", str(png)] if plot else []))
    rows = {}
    for line in out.splitlines():
        m = re.match(r"(\S.*?\))\s+(\d+)\s+(-?[0-9.]+)\s+(\d)/6\s+([0-9.]+)$", line)
        if m:
            rows[m[1]] = (int(m[2]), float(m[3]), int(m[4]))
    assert len(rows) == 5, out
    assert rows["FullGradient (exact)"][1:] == (1.0, 6)
    # a larger projection of the same kind is closer to the exact scores
    assert rows["FactorizedGradient(32, 32)"][1] > rows["FactorizedGradient(8, 8)"][1]
    assert rows["RandomProjectedGradient(8192)"][1] > 0.8
    assert rows["RandomProjectedGradient(1024)"][0] == 1024
    assert png.exists() == plot


def test_reasoning_gym_tasks(tmp_path: Path) -> None:
    pytest.importorskip("reasoning_gym")
    out_json = tmp_path / "rg.json"
    out = _run("reasoning_gym_tasks.py", "--model", "tiny", "--json", str(out_json))
    result = json.loads(out_json.read_text())
    tasks = ["letter_counting", "syllogism", "count_bits", "basic_arithmetic"]
    (run,) = result["seeds"]
    assert list(run["tasks"]) == tasks
    for stats in run["tasks"].values():
        assert 0.0 <= stats["pool_pass_rate"] <= stats["pool_mean_reward"] + 1e-6 <= 1.0 + 1e-6
        assert 0 <= stats["validation_groups_with_spread"] <= 8 and len(stats["answers"]) == 8
    # a task is skipped exactly when none of its validation groups has reward spread (no target)
    skipped = [t for t in tasks if run["tasks"][t]["validation_groups_with_spread"] == 0]
    assert run["skipped"] == sorted(skipped) and len(skipped) < len(tasks)
    assert sorted(run["noisy"]) == sorted(run["mixed"]) == sorted(set(tasks) - set(skipped))
    for task, res in run["noisy"].items():
        rows = res["problems"]
        bad = {r["id"] for r in rows if r["corrupted"]}
        assert len(rows) == 8 and len(bad) == 4 and res["pool_share"] == 0.5
        assert res["num_selected"] == 2  # TopFraction(0.25) of 8
        assert all(-1.0 - 1e-6 <= r["cosine"] <= 1.0 + 1e-6 for r in rows)
        # the corruption changes only the corrupted groups' rewards
        assert all(r["pass_rate"] == r["true_pass_rate"] for r in rows if not r["corrupted"])
        by_cosine = sorted(rows, key=lambda r: -r["cosine"])
        assert sorted(res["selected"]["GradAlign"]) == sorted(r["id"] for r in by_cosine[:2])
        for method, ids in res["selected"].items():
            assert len(ids) == 2 and len(set(ids)) == 2
            assert res["corrupted_share"][method] == sum(i in bad for i in ids) / 2, task
            assert 0.0 <= res["auroc"][method] <= 1.0
        pairs = [
            (a["cosine"], b["cosine"])
            for a in rows
            for b in rows
            if not a["corrupted"] and b["corrupted"]
        ]  # clean above corrupted counts 1, a tie 1/2
        by_hand = sum((x > y) + 0.5 * (x == y) for x, y in pairs) / len(pairs)
        assert res["auroc"]["GradAlign"] == pytest.approx(by_hand)
    for target, res in run["mixed"].items():
        assert res["num_selected"] == 8 and res["pool_share"] == 0.25  # 8 of 4 x 8
        for method, ids in res["selected"].items():
            on_target = sum(i // 1000 == tasks.index(target) for i in ids)  # ids: task * 1000 + i
            assert len(set(ids)) == 8 and res["target_share"][method] == on_target / 8, method
        assert 0.0 <= res["auroc_GradAlign"] <= 1.0
    # the summary holds each seed's numbers; one seed: its mean is that number and sd 0
    share = result["summary"]["noisy"][next(iter(run["noisy"]))]["corrupted_share/GradAlign"]
    assert share["sd"] == 0.0 and share["per_seed"] == [share["mean"]]
    assert re.search(r"noisy\s+\w+\s+auroc/GradAlign\s+[0-9.]+ ± 0.000", out), out
