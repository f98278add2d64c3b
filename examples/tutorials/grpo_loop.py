"""GradAlign inside your GRPO loop, in plain PyTorch: rescore every few steps, train on the selection.

Run: ``python examples/tutorials/grpo_loop.py`` (about half a minute on a CPU) for select then
resample, ``python examples/tutorials/grpo_loop.py --scored`` for rounds that fill until informative
and train on what was scored. A tiny random model learns a format reward (answer with a digit); the
loop is the same for a real model. The page shows every section after the ``imports`` one (the
two loops dedented), so each block can be pasted on its own.
"""

import argparse

# --8<-- [start:imports]
import functools

import torch

import gradalign as ga
from gradalign.extractors import response_logprobs
from gradalign.policies import Chain, DropZeroVariance, TopFraction, TopK
from gradalign.testing import tiny_model, tiny_tokenizer

# --8<-- [end:imports]
# --8<-- [start:rollouts]
torch.manual_seed(0)
tok, model = tiny_tokenizer(), tiny_model()  # your policy and its tokenizer
tok.padding_side = "left"  # generate continues every prompt from its last token
pool = [f"{i % 9}+{i // 9}=" for i in range(36)]  # candidate problems, by index
trusted = ["1+1=", "2*3=", "4-1=", "5+2="]  # the validation set
k, rescore_every, steps, problems_per_step = 8, 4, 12, 4


def reward(completion: str) -> float:
    """Your verifier; here a format reward: 1 if the answer holds a digit."""
    return float(any(c.isdigit() for c in completion))


def rollouts(prompts: list[str], ids: list[int]) -> ga.Rollouts:
    """Sample k completions per prompt with the current policy and reward them."""
    messages = [[{"role": "user", "content": p}] for p in prompts]
    texts = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            **batch, do_sample=True, num_return_sequences=k, max_new_tokens=4, pad_token_id=0
        )
    completions = tok.batch_decode(out[:, batch.input_ids.shape[1] :], skip_special_tokens=True)
    return ga.Rollouts.from_generate(
        batch.input_ids,
        out,
        [reward(c) for c in completions],
        [i for i in ids for _ in range(k)],
        pad_token_id=0,
        eos_token_id=tok.eos_token_id,
        prompt_mask=batch.attention_mask,
    )


# --8<-- [end:rollouts]


# --8<-- [start:train_step]
def train_step(
    batch: ga.Rollouts, objective: ga.GRPOObjective, optimizer: torch.optim.Optimizer
) -> None:
    """One GRPO step on ``batch`` (on-policy: the ratio is 1)."""
    model.train()
    weights = objective.token_weights(batch)  # (S, T) group-relative advantages per token
    logp = response_logprobs(
        model, batch.input_ids, batch.attention_mask, batch.response_mask
    )  # (S, T)
    loss = -(weights * logp).sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    model.eval()


# --8<-- [end:train_step]


def select_then_resample() -> None:
    # --8<-- [start:loop]
    objective = ga.GRPOObjective()  # the same loss trains the model and defines the gradients
    # the policy keeps the best-aligned half of the candidates that have reward spread
    policy = Chain(DropZeroVariance(), TopFraction(0.5))
    selector = ga.GradAlign(ga.FactorizedGradient(16, 16), objective=objective, policy=policy)
    curriculum = ga.Curriculum(pool_size=len(pool), chunk_size=16, seed=0)
    # endless: one iterator for the whole run that switches to each new selection at its next block
    sampler = ga.SelectionSampler(
        curriculum, num_generations=1, batch_size=problems_per_step, endless=True
    )
    served = iter(sampler)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    validation_ids = [-1 - i for i in range(len(trusted))]  # ids no pool problem uses

    for step in range(steps):
        if step % rescore_every == 0:  # a selection round: score a fresh chunk with the model
            chunk = curriculum.next_chunk().tolist()
            candidates = rollouts([pool[i] for i in chunk], chunk)
            selection = selector.select(model, candidates, rollouts(trusted, validation_ids))
            curriculum.record(selection)
            print(f"step {step}: selected {selection.ids.tolist()}")
        ids = [next(served) for _ in range(problems_per_step)]
        batch = rollouts([pool[i] for i in ids], ids)  # fresh rollouts of the selected problems
        train_step(batch, objective, optimizer)
        print(f"step {step}: mean reward {batch.rewards.mean().item():.2f}")
    # --8<-- [end:loop]


def train_on_what_was_scored() -> None:
    # --8<-- [start:scored]
    objective = ga.GRPOObjective()
    selector = ga.GradAlign(ga.FactorizedGradient(16, 16), objective=objective)
    curriculum = ga.Curriculum(pool_size=len(pool), chunk_size=8, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    validation_ids = [-1 - i for i in range(len(trusted))]

    for step in range(steps):  # a selection round every step
        try:  # the target: computed once per round, reused for every chunk the round draws
            targets = selector.targets(model, rollouts(trusted, validation_ids))
        except ga.GradAlignError:  # no validation group has reward spread: nothing to align to
            print(f"step {step}: no target, skipped")
            continue
        rnd = ga.fill_round(
            curriculum,
            sample=lambda ids: rollouts([pool[i] for i in ids.tolist()], ids.tolist()),
            score=functools.partial(selector.score, model, validation=targets),
            policy=TopK(problems_per_step),
            k=problems_per_step,
            rule=ga.Informative(min_score=0.0),  # reward spread and a positive cosine
            max_extra_chunks=2,  # at most 3 chunks per round
        )
        curriculum.record(rnd.selection)
        batch = rnd.training_rollouts()  # the selected groups' own rollouts: no resampling
        train_step(batch, objective, optimizer)
        print(
            f"step {step}: selected {rnd.ids.tolist()} from {rnd.num_chunks} chunk(s), "
            f"{rnd.num_rollouts} rollouts, shortfall {rnd.shortfall}; "
            f"mean reward {batch.rewards.mean().item():.2f}"
        )
    # --8<-- [end:scored]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--scored", action="store_true", help="fill rounds until informative, train on them"
    )
    if parser.parse_args().scored:
        train_on_what_was_scored()
    else:
        select_then_resample()
