"""A GradAlignGRPOTrainer run under torchrun (or alone), for the multi-process TRL tests.

``torchrun --nproc_per_node N -m tests.trl_worker OUT [--stall-rank R --stall SECONDS]``

Trains a tiny model for a few steps with a selection round every two steps, and writes
``OUT/rank{r}.json``: the curriculum's records (selected ids per round), the problems each rank was
served, the error message (if a round failed) and how long the failing round waited.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from trl import GRPOConfig

import gradalign as ga
from gradalign.integrations.trl import GradAlignGRPOTrainer
from gradalign.testing import tiny_model, tiny_tokenizer

STEPS, RESCORE, CHUNK = 4, 2, 8


def _reward(completions: list[str], **_: Any) -> list[float]:
    return [sum(c.islower() for c in text) / 8 for text in completions]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--stall-rank", type=int, default=-1)
    parser.add_argument("--stall", type=float, default=0.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # TRL/transformers deprecation chatter
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    pool = Dataset.from_dict({"prompt": [f"q{i}:" for i in range(16)], "pid": range(16)})
    val = Dataset.from_dict({"prompt": [f"v{i}:" for i in range(4)], "pid": range(-4, 0)})
    served: list[int] = []
    trainer: GradAlignGRPOTrainer | None = None

    def reward(completions: list[str], pid: list[int], **kw: Any) -> list[float]:
        if trainer is not None and not trainer.in_selection_round:
            served.extend(int(p) for p in pid)
        return _reward(completions)

    tok = tiny_tokenizer()
    tok.padding_side = "left"
    config = GRPOConfig(
        output_dir=str(args.out / "trainer"),
        per_device_train_batch_size=8 // world,
        num_generations=4,
        max_completion_length=8,
        learning_rate=5e-3,
        max_steps=STEPS,
        logging_steps=10_000,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        disable_tqdm=True,
        seed=0,
    )
    trainer = GradAlignGRPOTrainer(
        tiny_model("qwen2", seed=0),
        reward,
        config,
        pool,
        validation_dataset=val,
        processing_class=tok,
        selector=ga.GradAlign(ga.FactorizedGradient(None, None), policy=ga.policies.TopK(3)),
        chunk_size=CHUNK,
        rescore_every=RESCORE,
        round_timeout=5.0,
    )
    if rank == args.stall_rank:
        original = trainer.run_selection_round

        def stalled() -> Any:
            if trainer is not None and trainer.curriculum.round >= 0:
                time.sleep(args.stall)  # a rank that hangs before the second round
            return original()

        trainer.run_selection_round = stalled  # type: ignore[method-assign]
    error, waited = None, 0.0
    start = time.monotonic()
    try:
        trainer.train()
    except ga.GradAlignError as exc:
        error, waited = str(exc), time.monotonic() - start
    records = trainer.curriculum.state_dict()["records"]
    result = {
        "rank": rank,
        "world": world,
        "selections": [r["selected"] for r in records],
        "records": [{k: r[k] for k in ("scores_ids", "scores")} for r in records],
        "served": served,
        "error": error,
        "waited": waited,
    }
    (args.out / f"rank{rank}.json").write_text(json.dumps(result))
    if error is not None:
        os._exit(0)  # leave the broken process group without a teardown hang


if __name__ == "__main__":
    main()
