"""GradAlign in a plain PyTorch loop: a Curriculum, a selector and a sampler, no framework.

Run: ``python examples/integrations/plain_loop.py`` (seconds on a CPU).
"""

import torch

import gradalign as ga
from gradalign.testing import tiny_model, tiny_tokenizer

tok, model = tiny_tokenizer(), tiny_model()
pool = [f"q{i}:" for i in range(16)]  # the candidate problems
val = [f"v{i}:" for i in range(4)]  # trusted validation problems
k = 4  # rollouts per problem


def rollouts(prompts: list[str], ids: list[int]) -> ga.Rollouts:
    """Sample k completions per prompt and reward them (here: lowercase letters written)."""
    batch = tok([p for p in prompts for _ in range(k)], return_tensors="pt", padding=True)
    out = model.generate(**batch, do_sample=True, max_new_tokens=6, pad_token_id=0)
    texts = tok.batch_decode(out[:, batch.input_ids.shape[1] :], skip_special_tokens=True)
    rewards = [sum(c.islower() for c in t) / 6 for t in texts]
    return ga.Rollouts.from_generate(
        batch.input_ids.view(len(prompts), k, -1)[:, 0],  # one row per prompt, as generate had it
        out,
        rewards,
        [i for i in ids for _ in range(k)],
        pad_token_id=0,
        eos_token_id=1,
        prompt_mask=batch.attention_mask.view(len(prompts), k, -1)[:, 0],
    )


torch.manual_seed(0)
tok.padding_side = "left"
curriculum = ga.Curriculum(pool_size=len(pool), chunk_size=8, seed=0)
selector = ga.GradAlign(ga.FactorizedGradient(8, 8), policy=ga.policies.TopK(3))
sampler = ga.SelectionSampler(curriculum, num_generations=k, shuffle=False)
validation = rollouts(val, [-1 - i for i in range(len(val))])  # ids that no pool problem uses
for round_ in range(2):
    chunk = curriculum.next_chunk().tolist()
    selection = selector.select(model, rollouts([pool[i] for i in chunk], chunk), validation)
    curriculum.record(selection)
    print(f"round {round_}: selected {selection.ids.tolist()}, serving {list(sampler)[:6]}...")
    # ... train a few GRPO steps on the problems the sampler serves ...
