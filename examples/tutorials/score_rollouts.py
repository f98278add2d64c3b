"""Score your own rollouts: from ``model.generate`` output and from logged texts.

Run: ``python examples/tutorials/score_rollouts.py`` (seconds on a CPU). The tiny random model
stands in for yours: swap in ``AutoModelForCausalLM.from_pretrained(...)`` and its tokenizer.
The page shows every section after the ``imports`` one, so each block can be pasted on its own.
"""

# --8<-- [start:imports]
import torch

import gradalign as ga
from gradalign.testing import tiny_model, tiny_tokenizer

# --8<-- [end:imports]
# --8<-- [start:generate]
tok, model = tiny_tokenizer(), tiny_model()
tok.padding_side = "left"  # generate continues every prompt from its last token
problems = {0: "2+3=", 1: "4+4=", 2: "1+5=", 3: "3+3=", 4: "7+1=", 5: "2+2="}  # id -> prompt
k = 8  # rollouts per problem


def reward(completion: str) -> float:
    """A format reward: 1 if the answer holds a digit (a random tiny model rarely adds right)."""
    return float(any(c.isdigit() for c in completion))


messages = [[{"role": "user", "content": p}] for p in problems.values()]
texts = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
torch.manual_seed(0)
out = model.generate(
    **batch, do_sample=True, num_return_sequences=k, max_new_tokens=4, pad_token_id=tok.pad_token_id
)  # (6 * k, L + N): each prompt's k rows are adjacent
completions = tok.batch_decode(out[:, batch.input_ids.shape[1] :], skip_special_tokens=True)
ids = [pid for pid in problems for _ in range(k)]
rewards = [reward(c) for c in completions]

candidates = ga.Rollouts.from_generate(
    batch.input_ids,
    out,
    rewards,
    ids,
    pad_token_id=tok.pad_token_id,
    eos_token_id=tok.eos_token_id,
    prompt_mask=batch.attention_mask,
)
print(f"{candidates.num_groups} problems, {len(candidates)} rollouts")
# --8<-- [end:generate]

# --8<-- [start:texts]
logged = [  # (problem id, prompt, completion, reward), e.g. read from your RL run's logs
    (-1, "1+1=", "2", 1.0),
    (-1, "1+1=", "3", 0.0),
    (-2, "2+2=", "4", 1.0),
    (-2, "2+2=", "5", 0.0),
    (-2, "2+2=", "4", 1.0),
]
pid, prompts, outs, rs = zip(*logged, strict=True)
validation = ga.Rollouts.from_texts(
    tok, list(prompts), list(outs), list(rs), list(pid), chat_template=True
)
row = validation.input_ids[0][validation.attention_mask[0].bool()]
print(repr(tok.decode(row)))  # prompt in the chat template, completion, EOS
# --8<-- [end:texts]

# --8<-- [start:score]
selector = ga.GradAlign(ga.FactorizedGradient(16, 16), policy=ga.policies.TopK(2))
table = selector.score(model, candidates, validation)
print(table.table())
selection = selector.apply_policy(table)
print("selected:", selection.ids.tolist())
# --8<-- [end:score]
