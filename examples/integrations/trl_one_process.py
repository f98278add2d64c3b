"""GradAlignGRPOTrainer (TRL) in one process: re-select the training problems every few steps.

Run: ``python examples/integrations/trl_one_process.py`` (about 10 s on a CPU). Needs
``pip install "gradalign[trl]"``.
"""

import tempfile

from datasets import Dataset
from trl import GRPOConfig

import gradalign as ga
from gradalign.integrations.trl import GradAlignGRPOTrainer
from gradalign.testing import tiny_model, tiny_tokenizer


def reward(completions: list[str], **_: object) -> list[float]:
    return [sum(c.islower() for c in text) / 8 for text in completions]


pool = Dataset.from_dict({"prompt": [f"q{i}:" for i in range(16)]})  # candidate problems
trusted = Dataset.from_dict({"prompt": [f"v{i}:" for i in range(4)]})  # validation problems
tok = tiny_tokenizer()
tok.padding_side = "left"
args = GRPOConfig(
    output_dir=tempfile.mkdtemp(),
    max_steps=4,  # the selection sampler is endless: set max_steps
    per_device_train_batch_size=8,
    num_generations=4,
    max_completion_length=8,
    report_to="none",
    use_cpu=True,
    save_strategy="no",
    disable_tqdm=True,
)
trainer = GradAlignGRPOTrainer(
    tiny_model(),
    reward,
    args,
    pool,
    validation_dataset=trusted,
    processing_class=tok,
    selector=ga.GradAlign(ga.FactorizedGradient(16, 16), policy=ga.policies.TopFraction(0.5)),
    chunk_size=8,  # candidates per round
    rescore_every=2,  # optimizer steps between rounds
    on_empty="previous",  # a round without reward spread keeps the selection in force
)
trainer.train()
print("selections:", [r["selected"] for r in trainer.curriculum.state_dict()["records"]])
