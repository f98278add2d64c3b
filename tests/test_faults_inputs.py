"""Inputs found wrong by fault injection: generate's padding, token ids, string problem ids,
resuming an endless sampler, and a curriculum state that is not a dict.

Each case raised another exception type, or was accepted and gave a wrong result, before; every
refusal is a GradAlignError that names the call, the rule and the value received, and says how to
fix it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import torch

import gradalign as ga
from gradalign import Curriculum, GradAlignError, ProblemIds, Rollouts, SelectionSampler
from gradalign.testing import tiny_tokenizer

EOS = 1

# --- Rollouts.from_generate: padding that cannot be told from tokens -----------------------------


def _generate(prompt: list[list[int]], completions: list[list[int]]) -> torch.Tensor:
    """(B * k, L + N) in generate's layout: each prompt row repeated k times, then completions."""
    k = len(completions) // len(prompt)
    rows = torch.tensor(prompt).repeat_interleave(k, dim=0)  # (B * k, L)
    return torch.cat([rows, torch.tensor(completions)], 1)


def test_pad_equal_to_eos_without_prompt_mask_is_refused() -> None:
    # Before: the EOS that ends the chat turn inside the prompt was dropped as padding.
    prompt = [[EOS, 5, EOS, 6]]  # left pad, then a prompt holding an EOS
    out = _generate(prompt, [[7, EOS], [8, EOS]])
    with pytest.raises(GradAlignError) as info:
        Rollouts.from_generate(
            torch.tensor(prompt), out, [1.0, 0.0], pad_token_id=EOS, eos_token_id=EOS
        )
    message = str(info.value)
    assert message.startswith("Rollouts.from_generate: pad_token_id=1 is also an eos_token_id")
    assert "pass prompt_mask=batch.attention_mask" in message


def test_pad_equal_to_eos_with_prompt_mask_keeps_the_prompt_eos() -> None:
    prompt = [[EOS, 5, EOS, 6]]
    out = _generate(prompt, [[7, EOS, EOS], [8, 9, EOS]])
    ro = Rollouts.from_generate(
        torch.tensor(prompt),
        out,
        [1.0, 0.0],
        pad_token_id=EOS,
        eos_token_id=[EOS],
        prompt_mask=torch.tensor([[0, 1, 1, 1]]),
    )
    assert ro.input_ids.tolist() == [[5, EOS, 6, 7, EOS, EOS], [5, EOS, 6, 8, 9, EOS]]
    assert ro.response_mask.sum(1).tolist() == [2, 3]


def test_pad_inside_a_prompt_without_prompt_mask_is_refused() -> None:
    # Before: the inner 0 was squeezed out of the prompt silently.
    prompt = [[0, 5, 0, 6]]
    out = _generate(prompt, [[7, EOS]])
    with pytest.raises(GradAlignError, match=r"prompt row 0 holds pad_token_id=0 between") as info:
        Rollouts.from_generate(torch.tensor(prompt), out, [1.0], pad_token_id=0, eos_token_id=EOS)
    assert "[0, 5, 0, 6]" in str(info.value) and "pass prompt_mask=" in str(info.value)


@pytest.mark.parametrize(
    ("mask", "rule"),
    [
        ([[1, 0, 1, 1]], "one contiguous run of 1s per row"),  # a hole
        ([[0, 1, 1, 0]], "one contiguous run of 1s per row"),  # padded on both sides
        ([[0, 0, 0, 0]], "one contiguous run of 1s per row"),  # an empty prompt
        ([[1, 1, 2, 1]], "prompt_mask must be 0/1 or bool, got values [1, 2]"),
        ([[1, 1, 1]], "prompt_mask must have the shape of prompt_ids (1, 4), got (1, 3)"),
    ],
)
def test_a_prompt_mask_that_is_not_one_run_per_row_is_refused(
    mask: list[list[int]], rule: str
) -> None:
    prompt = [[5, 6, 7, 8]]
    out = _generate(prompt, [[9, EOS]])
    with pytest.raises(GradAlignError) as info:
        Rollouts.from_generate(
            torch.tensor(prompt),
            out,
            [1.0],
            pad_token_id=0,
            eos_token_id=EOS,
            prompt_mask=torch.tensor(mask),
        )
    message = str(info.value)
    assert message.startswith("Rollouts.from_generate: ") and rule in message
    if "run of 1s" in rule:
        assert str(mask[0]) in message and "attention_mask given to generate" in message


def test_left_right_and_no_padding_still_split() -> None:
    prompt = [[0, 5, 6], [7, 8, 0], [9, 9, 9]]
    out = _generate(prompt, [[3, EOS], [4, 0], [2, 2]])
    ro = Rollouts.from_generate(
        torch.tensor(prompt), out, [1.0, 0.0, 1.0], pad_token_id=0, eos_token_id=EOS
    )
    assert ro.input_ids.tolist() == [[5, 6, 3, EOS, 0], [7, 8, 4, 0, 0], [9, 9, 9, 2, 2]]


# --- token ids that are not token ids --------------------------------------------------------


@pytest.mark.parametrize("pad", [None, -1, True, 1.0])
def test_from_generate_pad_token_id_must_be_a_token_id(pad: Any) -> None:
    prompt = [[0, 5, 6]]
    out = _generate(prompt, [[7, EOS]])
    with pytest.raises(GradAlignError) as info:
        Rollouts.from_generate(torch.tensor(prompt), out, [1.0], pad_token_id=pad, eos_token_id=EOS)
    message = str(info.value)
    assert message.startswith(
        f"Rollouts.from_generate: pad_token_id must be a token id (an int >= 0), got {pad!r}"
    )
    assert "tokenizer.pad_token_id" in message


def test_from_token_ids_pad_token_id_must_be_a_token_id() -> None:
    with pytest.raises(GradAlignError, match=r"from_token_ids: pad_token_id must be .* got None"):
        Rollouts.from_token_ids([[5]], [[6]], [1.0], [0], pad_token_id=None)  # type: ignore[arg-type]


@pytest.mark.parametrize("eos", ["</s>", [1, None], 2.0])
def test_from_generate_eos_token_id_must_be_token_ids(eos: Any) -> None:
    prompt = [[0, 5, 6]]
    out = _generate(prompt, [[7, EOS]])
    with pytest.raises(GradAlignError, match=r"eos_token_id must be a token id, a list") as info:
        Rollouts.from_generate(torch.tensor(prompt), out, [1.0], pad_token_id=0, eos_token_id=eos)
    assert repr(eos) in str(info.value)


# --- string problem ids ----------------------------------------------------------------------


def _from_texts(group_ids: Any) -> Rollouts:
    tok = tiny_tokenizer()
    return Rollouts.from_texts(tok, ["1+1=", "2+2="], ["2", "4"], [1.0, 0.0], group_ids)


def _from_token_ids(group_ids: Any) -> Rollouts:
    return Rollouts.from_token_ids([[5], [6]], [[7], [8]], [1.0, 0.0], group_ids)


def _from_generate(group_ids: Any) -> Rollouts:
    out = _generate([[5], [6]], [[7, EOS], [8, EOS]])
    return Rollouts.from_generate(
        torch.tensor([[5], [6]]), out, [1.0, 0.0], group_ids, pad_token_id=0, eos_token_id=EOS
    )


def _init(group_ids: Any) -> Rollouts:
    return Rollouts(
        input_ids=torch.tensor([[5, 7], [6, 8]]),
        attention_mask=torch.ones(2, 2),
        response_mask=torch.tensor([[False, True], [False, True]]),
        rewards=torch.tensor([1.0, 0.0]),
        group_ids=group_ids,
    )


@pytest.mark.parametrize(
    ("build", "call"),
    [
        (_init, "Rollouts"),
        (_from_token_ids, "Rollouts.from_token_ids"),
        (_from_texts, "Rollouts.from_texts"),
        (_from_generate, "Rollouts.from_generate"),
    ],
)
def test_string_group_ids_are_refused_with_the_mapping_to_use(
    build: Callable[[Any], Rollouts], call: str
) -> None:
    with pytest.raises(GradAlignError) as info:
        build(["gsm8k-7", "gsm8k-3"])
    message = str(info.value)
    assert message.startswith(f"{call}: group_ids must be integers, got strings such as 'gsm8k-7'")
    assert "ids = ga.ProblemIds(dataset['id'])" in message
    assert "ids.encode(your_ids) as group_ids" in message and "ids.decode(" in message


def test_string_ids_given_to_the_curriculum_and_sampler_get_the_same_advice() -> None:
    cur = Curriculum(pool_size=3, chunk_size=3)
    with pytest.raises(
        GradAlignError, match=r"Curriculum.observe: ids must be integers.*ProblemIds"
    ):
        cur.observe(["a"], [1.0])  # type: ignore[list-item]
    with pytest.raises(GradAlignError, match=r"SelectionSampler: initial_ids must be .*ProblemIds"):
        SelectionSampler(cur, initial_ids=["a"])  # type: ignore[arg-type]


def test_problem_ids_map_a_dataset_column_both_ways() -> None:
    datasets = pytest.importorskip("datasets")
    pool = datasets.Dataset.from_dict(
        {"id": ["gsm8k-7", "gsm8k-3", "math-1"], "q": ["a", "b", "c"]}
    )
    ids = ProblemIds(pool["id"])
    assert len(ids) == 3 and ids.names == ("gsm8k-7", "gsm8k-3", "math-1")
    batch = pool.select([2, 0])
    group_ids = ids.encode([i for i in batch["id"] for _ in range(2)])  # k = 2 rollouts each
    assert group_ids.dtype == torch.int64 and group_ids.tolist() == [2, 2, 0, 0]
    ro = Rollouts.from_token_ids([[5]] * 4, [[6], [7], [6], [7]], [1.0, 0.0, 1.0, 1.0], group_ids)
    assert ro.group_ids.dtype == torch.int64
    assert ids.decode(ro.unique_groups) == ["gsm8k-7", "math-1"]
    assert pool[ro.unique_groups.tolist()]["id"] == ["gsm8k-7", "math-1"]  # ints are row indices
    assert ids.decode([]) == [] and ids.encode([]).tolist() == []


@pytest.mark.parametrize(
    ("action", "message"),
    [
        (
            lambda: ProblemIds("abc"),
            r"ProblemIds: names must be a sequence of ids .* got str 'abc'",
        ),
        (
            lambda: ProblemIds(5),  # type: ignore[arg-type]
            r"ProblemIds: names must be a sequence of ids .* got int 5",
        ),
        (lambda: ProblemIds(["a", "b", "a"]), r"must be unique .* got 'a' at positions 0 and 2"),
        (
            lambda: ProblemIds([["a"]]),  # type: ignore[list-item]
            r"names must be hashable .* got list \['a'\] at position 0",
        ),
        (
            lambda: ProblemIds(["a", "b"]).encode(["a", "zz"]),
            r"ProblemIds.encode: 1 ids are not among the 2 ids of the pool, e.g. \['zz'\]",
        ),
        (
            lambda: ProblemIds(["a", "b"]).decode([0, 2]),
            r"ProblemIds.decode: ids must be in \[0, 2\), got \[2\]",
        ),
        (
            lambda: ProblemIds(["a", "b"]).decode(torch.tensor([0.5])),
            r"ProblemIds.decode: ids must be 1-D integers, got shape \(1,\) torch.float32",
        ),
    ],
)
def test_problem_ids_refuse_bad_input(action: Callable[[], object], message: str) -> None:
    with pytest.raises(GradAlignError, match=message):
        action()


# --- resuming an endless sampler --------------------------------------------------------------


def _selection_sampler(cur: Curriculum) -> SelectionSampler:
    return SelectionSampler(
        cur, num_generations=2, batch_size=3, repeat_count=2, seed=7, endless=True
    )


def _streaming_sampler(cur: Curriculum) -> SelectionSampler:
    trl = pytest.importorskip("gradalign.integrations.trl", reason="the [trl] extra")
    return trl.StreamingSelectionSampler(
        cur, num_generations=2, batch_size=3, repeat_count=2, seed=7
    )


def _run(make: Callable[[Curriculum], SelectionSampler], stop: int | None) -> list[int]:
    """Indices served over a run with two selection rounds and one trainer-style block swap.

    With ``stop``, the run is interrupted after ``stop`` steps: curriculum and sampler are saved
    (through JSON, as a checkpoint would), rebuilt fresh, loaded, and the run goes on.
    """
    cur = Curriculum(pool_size=10, chunk_size=5, seed=3)
    sampler = make(cur)
    stream = iter(sampler)
    served: list[int] = []
    steps: list[Callable[[], None]] = [
        *[lambda: served.append(next(stream))] * 7,  # mid-block: a block serves 12 indices
        lambda: cur.record(cur.next_chunk()[:4]),
        *[lambda: served.append(next(stream))] * 20,
        lambda: served.extend(sampler.next_block().tolist()),  # what the TRL trainer does
        *[lambda: served.append(next(stream))] * 5,
        lambda: cur.record(cur.next_chunk()[:2]),
        *[lambda: served.append(next(stream))] * 30,
    ]
    for i, step in enumerate(steps):
        if i == stop:
            saved = json.loads(json.dumps([cur.state_dict(), sampler.state_dict()]))
            cur = Curriculum(pool_size=10, chunk_size=5, seed=3)
            cur.load_state_dict(saved[0])
            sampler = make(cur)
            sampler.load_state_dict(saved[1])
            stream = iter(sampler)
        step()
    return served


@pytest.mark.parametrize("make", [_selection_sampler, _streaming_sampler])
@pytest.mark.parametrize("stop", [0, 3, 7, 8, 12, 19, 27, 28, 33, 34, 40])
def test_a_resumed_endless_sampler_serves_what_the_uninterrupted_run_serves(
    make: Callable[[Curriculum], SelectionSampler], stop: int
) -> None:
    assert _run(make, stop) == _run(make, None)


def test_an_endless_sampler_state_refuses_what_does_not_fit() -> None:
    cur = Curriculum(pool_size=6, chunk_size=6)
    kwargs: dict[str, Any] = {"num_generations": 2, "batch_size": 2, "shuffle": False}
    sampler = SelectionSampler(cur, endless=True, **kwargs)
    stream = iter(sampler)
    head = [next(stream) for _ in range(3)]
    state = sampler.state_dict()
    fresh = SelectionSampler(cur, endless=True, **kwargs)
    before = fresh.state_dict()
    bad_cases: list[tuple[Any, str]] = [
        (5, r"SelectionSampler.load_state_dict: state must be the dict of .*got int 5"),
        ({"format": 1}, r"state lacks keys \['pool_size'"),
        ({**state, "seed": 1}, r"state has seed=1, this sampler has 0; build the sampler with"),
        ({**state, "batch_size": 3}, r"state has batch_size=3, this sampler has 2"),
        ({**state, "stream_version": 4}, r"stream is at record 4 but the source has 0 records"),
        ({**state, "queue": [0, 9]}, r"queue must be a list of problem ids in \[0, 6\)"),
        ({**state, "block": [0]}, r"block must hold batch_size=2 problems \(or none\), got 1"),
        ({**state, "served": 9}, r"served must be at most the 4 indices of the block in hand"),
        ({**state, "served": -1}, r"served must be an int >= 0, got -1"),
    ]
    for bad, message in bad_cases:
        with pytest.raises(GradAlignError, match=message):
            fresh.load_state_dict(bad)
        assert fresh.state_dict() == before  # left unchanged
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state and head == [0, 0, 1]


def test_a_finite_sampler_state_keeps_its_epoch() -> None:
    cur = Curriculum(pool_size=8, chunk_size=8)
    sampler = SelectionSampler(cur, seed=2)
    sampler.set_epoch(3)
    again = SelectionSampler(cur, seed=2)
    again.load_state_dict(sampler.state_dict())
    assert list(again) == list(sampler)
    with pytest.raises(GradAlignError, match=r"state has endless=False, this sampler has True"):
        SelectionSampler(cur, batch_size=2, endless=True).load_state_dict(
            SelectionSampler(cur, batch_size=2).state_dict()
        )


# --- Curriculum.load_state_dict ----------------------------------------------------------------


@pytest.mark.parametrize("state", [5, None, [("format", 2)]])
def test_curriculum_state_must_be_a_dict(state: Any) -> None:
    cur = Curriculum(pool_size=4, chunk_size=2)
    with pytest.raises(GradAlignError) as info:
        cur.load_state_dict(state)
    message = str(info.value)
    assert message.startswith("Curriculum.load_state_dict: state must be a dict")
    assert "Curriculum.state_dict()" in message and type(state).__name__ in message


def test_public_names_include_problem_ids() -> None:
    assert ga.ProblemIds is ProblemIds and "ProblemIds" in ga.__all__
