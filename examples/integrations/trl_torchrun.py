"""GradAlignGRPOTrainer under several processes.

Run: ``torchrun --nproc_per_node 2 examples/integrations/trl_torchrun.py`` (or
``accelerate launch --num_processes 2 ...``). Each rank generates and scores its share of every
round; the selection is computed once, identical on every rank; each rank trains on its part of
the selected problems. A rank that stalls for more than ``round_timeout`` seconds makes the others
raise a GradAlignError naming it.
"""

import os
import tempfile

from datasets import Dataset
from trl import GRPOConfig

import gradalign as ga
from gradalign.integrations.trl import GradAlignGRPOTrainer
from gradalign.testing import tiny_model, tiny_tokenizer


def reward(completions: list[str], **_: object) -> list[float]:
    return [sum(c.islower() for c in text) / 8 for text in completions]


world = int(os.environ.get("WORLD_SIZE", "1"))
tok = tiny_tokenizer()
tok.padding_side = "left"
args = GRPOConfig(
    output_dir=tempfile.mkdtemp(),
    max_steps=4,
    per_device_train_batch_size=8 // world,  # the same global batch on any number of ranks
    num_generations=4,
    max_completion_length=8,
    report_to="none",
    use_cpu=True,  # gloo on CPU; drop it on GPUs
    save_strategy="no",
    disable_tqdm=True,
)
trainer = GradAlignGRPOTrainer(
    tiny_model(),
    reward,
    args,
    Dataset.from_dict({"prompt": [f"q{i}:" for i in range(16)]}),
    validation_dataset=Dataset.from_dict({"prompt": [f"v{i}:" for i in range(4)]}),
    processing_class=tok,
    selector=ga.GradAlign(ga.FactorizedGradient(16, 16), policy=ga.policies.TopK(3)),
    chunk_size=8,
    rescore_every=2,
    round_timeout=60.0,
)
trainer.train()
if trainer.accelerator.is_main_process:
    print("selections:", [r["selected"] for r in trainer.curriculum.state_dict()["records"]])
