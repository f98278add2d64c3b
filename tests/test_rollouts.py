"""Rollouts: validation on construction, token-id and text constructors."""

from __future__ import annotations

import pytest
import torch

from gradalign import GradAlignError, Rollouts
from gradalign.testing import tiny_tokenizer


def _base(**override: object) -> dict[str, object]:
    kw: dict[str, object] = {
        "input_ids": torch.tensor([[5, 6, 7, 0], [5, 6, 8, 9], [4, 4, 4, 4]]),
        "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]]),
        "response_mask": torch.tensor([[0, 0, 1, 0], [0, 0, 1, 1], [0, 1, 1, 1]]).bool(),
        "rewards": torch.tensor([1.0, 0.0, 0.5]),
        "group_ids": torch.tensor([7, 7, 3]),
    }
    kw.update(override)
    return kw


def test_group_bookkeeping() -> None:
    ro = Rollouts(**_base())  # type: ignore[arg-type]
    assert ro.unique_groups.tolist() == [3, 7]
    assert ro.group_index.tolist() == [1, 1, 0]
    assert ro.group_sizes().tolist() == [1, 2]
    assert ro.group_token_counts().tolist() == [3, 3]  # group 3: row 2 (3 tokens); 7: rows 0, 1
    assert ro.group_mean_rewards().tolist() == [0.5, 0.5]
    assert ro.group_reward_spread().tolist() == [0.0, 1.0]
    sub = ro.select_groups([7])
    assert sub.group_ids.tolist() == [7, 7] and sub.input_ids.shape == (2, 4)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"input_ids": torch.zeros(3)}, "input_ids must be 2-D"),
        ({"input_ids": torch.zeros(3, 4)}, "input_ids must hold integers"),
        ({"attention_mask": torch.ones(3, 5)}, "attention_mask must have the shape"),
        ({"rewards": torch.tensor([1.0, float("nan"), 0.0])}, "rewards must be finite, got nan"),
        ({"rewards": torch.tensor([1.0, 0.0])}, "rewards must have one entry per row"),
        ({"group_ids": torch.tensor([1.5, 1.0, 2.0])}, "group_ids must hold integers"),
        ({"group_ids": torch.tensor([[1, 1, 2]])}, "group_ids must have one entry per row"),
        (
            {"response_mask": torch.tensor([[1, 0, 1, 0], [0, 0, 1, 1], [0, 1, 1, 1]]).bool()},
            "response_mask[:, 0] must be False",
        ),
        (
            {"response_mask": torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]]).bool()},
            "marks padding",
        ),
        (
            {"response_mask": torch.tensor([[0, 0, 0, 0], [0, 0, 1, 1], [0, 1, 1, 1]]).bool()},
            "rows [0] have none",
        ),
        ({"old_logprobs": torch.zeros(3, 2)}, "old_logprobs must have the shape"),
    ],
)
def test_bad_input_names_field_and_value(override: dict[str, object], message: str) -> None:
    with pytest.raises(GradAlignError, match="Rollouts") as info:
        Rollouts(**_base(**override))  # type: ignore[arg-type]
    assert message in str(info.value)


def test_from_token_ids_pads_and_masks() -> None:
    ro = Rollouts.from_token_ids(
        [[1, 2, 3], [4]], [[5], [6, 7, 8]], [1.0, 0.0], [0, 0], pad_token_id=99
    )
    assert ro.input_ids.tolist() == [[1, 2, 3, 5], [4, 6, 7, 8]]
    assert ro.response_mask.tolist() == [[False, False, False, True], [False, True, True, True]]
    short = Rollouts.from_token_ids(
        [[1, 2, 3], [4]], [[5, 6], [6, 7, 8]], [1.0, 0.0], [0, 0], pad_token_id=99, max_length=4
    )
    assert short.input_ids.tolist() == [[1, 2, 3, 5], [4, 6, 7, 8]]
    with pytest.raises(GradAlignError, match="leaving no room"):
        Rollouts.from_token_ids([[1, 2, 3]], [[5]], [1.0], [0], max_length=3)
    with pytest.raises(GradAlignError, match="completion 0 is empty"):
        Rollouts.from_token_ids([[1]], [[]], [1.0], [0])


def test_from_texts_boundary_is_exact() -> None:
    tok = tiny_tokenizer()
    prompts = ["2+2=", "What is 3*3?"]
    completions = ["4", " nine"]
    ro = Rollouts.from_texts(tok, prompts, completions, [1.0, 0.0], [0, 1])
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        resp_ids = ro.input_ids[i][ro.response_mask[i]].tolist()
        expected = tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert resp_ids == expected
        n_prompt = len(tok(p)["input_ids"])
        assert not ro.response_mask[i, :n_prompt].any()
    chat = Rollouts.from_texts(tok, prompts, completions, [1.0, 0.0], [0, 1], chat_template=True)
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": prompts[0]}], add_generation_prompt=True, tokenize=False
    )
    first_resp = int(chat.response_mask[0].nonzero()[0])
    assert tok.decode(chat.input_ids[0, :first_resp]) == rendered
    with pytest.raises(GradAlignError, match="2 prompts but 1 completions"):
        Rollouts.from_texts(tok, prompts, ["4"], [1.0, 0.0], [0, 1])


def test_from_generate_splits_hf_generate_output() -> None:
    """Left-padded prompts through a real ``generate`` with k = 3 return sequences per prompt."""
    from gradalign.testing import tiny_model, tiny_tokenizer

    model, tok = tiny_model(), tiny_tokenizer()
    tok.padding_side = "left"
    texts = ["1+1=", "What is 12-5? "]
    batch = tok(texts, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    out = model.generate(
        **batch,
        do_sample=True,
        max_new_tokens=6,
        num_return_sequences=3,
        pad_token_id=0,
        eos_token_id=1,
    )
    rewards = torch.arange(6, dtype=torch.float32)
    ro = Rollouts.from_generate(
        batch.input_ids,
        out,
        rewards,
        pad_token_id=0,
        eos_token_id=1,
        prompt_mask=batch.attention_mask,
    )
    assert ro.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    width = batch.input_ids.shape[1]
    for row in range(6):
        prompt = tok(texts[row // 3]).input_ids
        generated = out[row, width:].tolist()
        completion = generated[: generated.index(1) + 1] if 1 in generated else generated
        n = len(prompt) + len(completion)
        assert ro.input_ids[row, :n].tolist() == prompt + completion
        assert ro.response_mask[row].nonzero().flatten().tolist() == list(range(len(prompt), n))
    torch.testing.assert_close(ro.rewards, rewards)


def test_from_generate_rejects_a_foreign_prompt_batch() -> None:
    prompt = torch.tensor([[0, 5, 6]])
    with pytest.raises(GradAlignError, match="must repeat prompt_ids"):
        Rollouts.from_generate(
            prompt, torch.tensor([[0, 5, 7, 3, 1]]), [1.0], pad_token_id=0, eos_token_id=1
        )
    with pytest.raises(GradAlignError, match="multiple of 1 rows"):
        Rollouts.from_generate(
            prompt, torch.tensor([[0, 5, 6]]), [1.0], pad_token_id=0, eos_token_id=1
        )
