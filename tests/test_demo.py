"""Tests for gradalign.demo: problems and verifier, AUROC, sampling helpers, the tiny end-to-end run."""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from gradalign.demo import DemoConfig, run_demo
from gradalign.demo.__main__ import main
from gradalign.demo.problems import final_number, format_reward, make_problems, verify
from gradalign.demo.report import auroc, corrupted_share
from gradalign.demo.sampling import render_prompts, sample_completions, trim_completion
from gradalign.errors import GradAlignError
from gradalign.testing import tiny_model, tiny_tokenizer

# --- problems and verifier -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3 + 4 = 7", 7.0),
        ("The answer is 12.", 12.0),
        ("so 12-5", 5.0),  # a subtraction, not the number -5
        ("the temperature is -3", -3.0),
        ("(4)-2", 2.0),
        ("1,200 cards", 1200.0),
        ("half of 7 is 3.5", 3.5),
        ("$15.00 in total", 15.0),
        ("no number here", None),
        ("", None),
    ],
)
def test_final_number(text: str, expected: float | None) -> None:
    assert final_number(text) == expected


@pytest.mark.parametrize(
    ("completion", "answer", "reward"),
    [
        ("5 x 2 = 10. So there are 10 cards.", 10, 1.0),
        ("5 x 2 = 10, but 12 is the answer", 10, 0.0),  # only the last number counts
        ("There are 10.0 cards", 10, 1.0),
        ("I am not sure.", 10, 0.0),
        ("10 - 3 = 7", 7, 1.0),
    ],
)
def test_verify(completion: str, answer: int, reward: float) -> None:
    assert verify(completion, answer) == reward


def test_format_reward() -> None:
    assert format_reward("abc 4", 99) == 1.0
    assert format_reward("abc", 4) == 0.0


def _solve(question: str) -> int:
    """Independent solver: the first two numbers and the operation named by the story."""
    a, b = (int(x) for x in re.findall(r"\d+", question)[:2])
    if re.search(r"more|in all|Tuesday", question):
        return a + b
    if re.search(r"gave|taken out|younger", question):
        return a - b
    return a * b


def test_problems_deterministic_and_correct() -> None:
    first, again, other = make_problems(60, seed=3), make_problems(60, seed=3), make_problems(60, 4)
    assert first == again
    assert first != other
    assert [p.id for p in make_problems(5, seed=0, start_id=10)] == list(range(10, 15))
    assert len({p.question for p in first}) == 60
    val = make_problems(20, seed=0, exclude={p.question for p in first})
    assert not {p.question for p in val} & {p.question for p in first}
    assert {p.operation for p in first} == {"+", "-", "*"}
    for p in first:
        assert p.answer == _solve(p.question), p
        assert p.answer > 0
        assert p.question.isascii()


# --- report ----------------------------------------------------------------------------------


def _auroc_by_pairs(scores: list[float], positive: list[bool]) -> float:
    pos = [s for s, y in zip(scores, positive, strict=True) if y]
    neg = [s for s, y in zip(scores, positive, strict=True) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auroc_hand_examples() -> None:
    assert auroc([0.9, 0.8, 0.2, 0.1], [True, True, False, False]) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [False, False, True, True]) == 0.0
    # Pairs: (0.9,0.1)=1, (0.9,0.5)=1, (0.5,0.1)=1, (0.5,0.5)=1/2 -> 3.5/4.
    assert auroc([0.9, 0.1, 0.5, 0.5], [True, False, True, False]) == 0.875
    assert auroc([0.0, 0.0, 0.0, 0.0, 0.0], [True, False, True, False, False]) == 0.5
    # Pairs: (3,1)=1, (3,2)=1, (0,1)=0, (0,2)=0 -> 1/2.
    assert auroc([3.0, 1.0, 0.0, 2.0], [True, False, True, False]) == 0.5


def test_auroc_matches_pair_count_with_ties() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=30).astype(float).tolist()  # many ties
    positive = (rng.random(30) < 0.4).tolist()
    assert math.isclose(auroc(scores, positive), _auroc_by_pairs(scores, positive))


def test_auroc_rejects_bad_input() -> None:
    with pytest.raises(GradAlignError, match="auroc: needs both classes"):
        auroc([0.1, 0.2], [True, True])
    with pytest.raises(GradAlignError, match="auroc: scores must be finite"):
        auroc([float("nan"), 0.2], [True, False])
    with pytest.raises(GradAlignError, match="auroc: scores and positive"):
        auroc([0.1, 0.2, 0.3], [True, False])


def test_corrupted_share() -> None:
    assert corrupted_share([1, 2, 3, 4], {2, 4, 9}) == 0.5
    assert corrupted_share([], {1}) == 0.0


# --- sampling --------------------------------------------------------------------------------


def test_trim_completion() -> None:
    assert trim_completion([5, 6, 1, 1, 0], eos_token_id=1) == [5, 6, 1]
    assert trim_completion([1, 1], eos_token_id=1) == [1]
    assert trim_completion([5, 6, 7], eos_token_id=1) == [5, 6, 7]


def test_sample_completions_seeded_and_rng_free() -> None:
    model, tok = tiny_model(), tiny_tokenizer()
    prompts = render_prompts(tok, ["1+1?", "What is 12 - 5?"])
    assert tok.decode(prompts[0]) == "<|user|>\n1+1?\n<|assistant|>\n"
    kwargs = {"eos_token_id": 1, "pad_token_id": 0, "max_new_tokens": 6, "temperature": 1.0}
    state = torch.get_rng_state()
    a = sample_completions(model, prompts, seed=5, batch_size=1, **kwargs)  # type: ignore[arg-type]
    b = sample_completions(model, prompts, seed=5, batch_size=1, **kwargs)  # type: ignore[arg-type]
    assert torch.equal(torch.get_rng_state(), state)
    assert a == b
    assert all(1 <= len(c) <= 6 for c in a)
    assert all(0 not in c for c in a)  # no padding inside a completion


# --- end to end ------------------------------------------------------------------------------


def test_tiny_demo_end_to_end_and_deterministic(tmp_path: Path) -> None:
    config = DemoConfig.tiny_defaults(pool=8, val=4, out_dir=tmp_path)
    result = run_demo(config)
    assert set(result.shares) == {
        "GradAlign-cosine",
        "GradAlign-inner-product",
        "AccGreedy",
        "Random",
    }
    assert result.num_selected == 2
    assert result.pool_share == 0.5
    assert all(0.0 <= v <= 1.0 for v in result.shares.values())
    assert all(0.0 <= v <= 1.0 and math.isfinite(v) for v in result.aurocs.values())
    assert [r.rank for r in result.rows] == list(range(1, 9))
    assert sorted(r.problem_id for r in result.rows) == list(range(8))
    assert sum(r.corrupted for r in result.rows) == 4
    assert sum(r.selected for r in result.rows) == 2
    cos = [r.cosine for r in result.rows]
    assert cos == sorted(cos, reverse=True)
    assert all(math.isfinite(r.cosine) and math.isfinite(r.inner_product) for r in result.rows)
    # Groups without reward spread have a zero gradient and score exactly 0.
    assert all(r.cosine == 0.0 for r in result.rows if r.accuracy in (0.0, 1.0))
    assert result.png_path == tmp_path / "gradalign_scores.png"
    assert result.png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "AUROC" in result.report()
    again = run_demo(config)
    assert again.rows == result.rows
    assert again.shares == result.shares


def test_cli_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--tiny", "--pool", "4", "--val", "4", "--out-dir", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "GradAlign-cosine" in out
    assert (tmp_path / "gradalign_scores.png").exists()


def test_cli_reports_bad_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--tiny", "--pool", "1"]) == 1
    assert "DemoConfig: pool * corrupt_fraction" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"pool": 0}, "pool must be >= 1"),
        ({"select_fraction": 0.0}, "select_fraction"),
        ({"temperature": 0.0}, "temperature"),
        ({"corrupt_fraction": 1.0}, "corrupt_fraction"),
    ],
)
def test_config_validation(overrides: dict[str, float], match: str) -> None:
    with pytest.raises(GradAlignError, match=match):
        DemoConfig(**overrides)  # type: ignore[arg-type]


@pytest.mark.slow
def test_smollm2_demo_small(tmp_path: Path) -> None:
    # Full-length completions and 8 validation problems: shorter runs can leave every validation
    # group without reward spread, and GradAlign then (rightly) refuses to score.
    config = DemoConfig(pool=4, rollouts=4, val=8, out_dir=tmp_path)
    result = run_demo(config)
    assert result.png_path.exists()
    assert all(math.isfinite(v) for v in result.aurocs.values())
    assert 0.0 < result.stats["validation acc"] < 1.0
