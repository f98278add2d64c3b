"""Select from reasoning-gym tasks: noisy rewards inside one task, and one task out of a mixed pool.

Needs ``pip install "gradalign[reasoning-gym]"``. Run:

- ``python examples/tutorials/reasoning_gym_tasks.py --model tiny --json out.json`` (seconds; a random
  tiny model, so the numbers only show that everything runs);
- ``OMP_NUM_THREADS=1 python examples/tutorials/reasoning_gym_tasks.py --model smollm2 --seeds 0 1 2
  --json docs/results/reasoning_gym_smollm2.json`` (the run the tutorial page reports).

Scenario A ("noisy"): per task, half of the pool's problems get Bernoulli(0.5) rewards that ignore
the completion; GradAlign, with a few clean problems of the task as validation, should rank them
last. Scenario B ("mixed"): one pool of every task, validation from one target task; GradAlign
should select that task's problems. Both are compared with AccGreedy and Random.
"""

from __future__ import annotations

# --8<-- [start:imports]
import argparse
import dataclasses
import json
import random
import statistics
import time
import zlib
from importlib import metadata
from pathlib import Path
from typing import Any

import reasoning_gym
import torch

import gradalign as ga
from gradalign.metrics import auroc, selected_share
from gradalign.sampling import sample_rollouts, stop_tokens

# --8<-- [end:imports]

# --8<-- [start:problems]
# reasoning-gym task -> its config; two are made easier so a 135M model gets some right.
TASKS: dict[str, dict[str, Any]] = {
    "letter_counting": {},
    "syllogism": {},
    "count_bits": {"max_n": 255},
    "basic_arithmetic": {
        "min_terms": 2,
        "max_terms": 2,
        "max_digits": 1,
        "allow_parentheses": False,
        "allow_negation": False,
    },
}


def problems(task: str, n: int, seed: int) -> tuple[Any, list[dict], dict]:
    """The dataset, ``n`` entries with distinct questions, and one more entry as the example."""
    dataset = reasoning_gym.create_dataset(task, size=4 * n + 8, seed=seed, **TASKS[task])
    entries, seen = [], set()
    for entry in dataset:
        if entry["question"] not in seen:
            seen.add(entry["question"])
            entries.append(entry)
    if len(entries) < n + 1:
        raise ValueError(f"{task}: only {len(entries)} distinct questions for {n} + 1")
    return dataset, entries[:n], entries[n]


# --8<-- [end:problems]


# --8<-- [start:rollouts]
def one_shot_prompts(tokenizer: Any, example: dict, entries: list[dict]) -> list[list[int]]:
    """Chat prompts: the example's question and answer as a first exchange, then the question."""
    prompts = []
    for entry in entries:
        messages = [
            {"role": "user", "content": example["question"]},
            {"role": "assistant", "content": example["answer"]},
            {"role": "user", "content": entry["question"]},
        ]
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        prompts.append(list(out["input_ids"] if hasattr(out, "keys") else out))
    return prompts


def rollouts(
    model: Any,
    tokenizer: Any,
    task: tuple[Any, list[dict], dict],
    group_ids: list[int],
    *,
    k: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
) -> ga.Rollouts:
    """k completions of every entry, scored by the dataset's own verifier (one line each)."""
    dataset, entries, example = task

    def reward(i: int, completion: list[int]) -> float:
        answer = tokenizer.decode(completion, skip_special_tokens=True).strip()
        return float(dataset.score_answer(answer=answer, entry=entries[i]))

    return sample_rollouts(
        model,
        one_shot_prompts(tokenizer, example, entries),
        k,
        reward,
        group_ids=group_ids,
        stop_token_ids=stop_tokens(tokenizer) | {tokenizer.eos_token_id},
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
    )


# --8<-- [end:rollouts]


# --8<-- [start:noisy]
def _positions(order: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(G,) position of each of ``ids`` in ``order`` (a permutation of them)."""
    where = {g: i for i, g in enumerate(order.tolist())}
    return torch.tensor([float(where[g]) for g in ids.tolist()])


def _rows(table: ga.Candidates, cosine: torch.Tensor, bad: set[int], pool: ga.Rollouts) -> list:
    """Scenario A per problem: corrupted, cosine, pass rate and spread as scored, true pass rate."""
    true_pass = ga.Candidates.from_rollouts(pool).pass_rate  # before the corruption
    assert table.pass_rate is not None and table.reward_std is not None and true_pass is not None
    columns = (table.ids.tolist(), cosine, table.pass_rate, table.reward_std, true_pass)
    return [
        {
            "id": g,
            "corrupted": g in bad,
            "cosine": float(c),
            "pass_rate": float(p),
            "reward_std": float(s),
            "true_pass_rate": float(t),
        }
        for g, c, p, s, t in zip(*columns, strict=True)
    ]


def corrupt(pool: ga.Rollouts, seed: int) -> tuple[ga.Rollouts, set[int]]:
    """Half of the problems, drawn at random, get fair coin-flip rewards."""
    rng = random.Random(seed)
    ids = pool.unique_groups.tolist()
    bad = set(rng.sample(ids, len(ids) // 2))
    rewards = [
        float(rng.random() < 0.5) if g in bad else r
        for g, r in zip(pool.group_ids.tolist(), pool.rewards.tolist(), strict=True)
    ]
    return dataclasses.replace(pool, rewards=torch.tensor(rewards)), bad


def noisy(model: Any, pool: ga.Rollouts, validation: ga.Rollouts, seed: int) -> dict:
    """Scenario A: does each method keep the corrupted problems out of its selection?"""
    noisy_pool, bad = corrupt(pool, seed)
    selector = ga.GradAlign(
        ga.FactorizedGradient(32, 32, share_prompts=True), policy=ga.policies.TopFraction(0.25)
    )
    selection = selector.select(model, noisy_pool, validation)
    table = ga.Candidates.from_rollouts(noisy_pool)  # what the baselines see: rewards only
    k = len(selection.ids)
    picks = {
        "GradAlign": selection.ids,
        "AccGreedy": ga.policies.AccGreedy(k)(table),
        "Random": ga.policies.Random(k, seed=seed)(table),
    }
    clean = [g not in bad for g in table.ids.tolist()]
    keys = {  # each method's ranking of the whole pool, higher = kept first
        "GradAlign": selection.alignment.cosine,
        "AccGreedy": -(table.pass_rate - 0.5).abs(),
        "Random": -_positions(ga.policies.Random(len(table), seed=seed)(table), table.ids),
    }
    return {
        "num_selected": k,
        "pool_share": len(bad) / len(table),
        "selected": {m: ids.tolist() for m, ids in picks.items()},
        "corrupted_share": {m: selected_share(ids, bad) for m, ids in picks.items()},
        "auroc": {m: auroc(key.numpy(), clean) for m, key in keys.items()},
        "problems": _rows(table, selection.alignment.cosine, bad, pool),
    }


# --8<-- [end:noisy]


# --8<-- [start:mixed]
def mixed(model: Any, pool: ga.Rollouts, validation: ga.Rollouts, tasks: dict, seed: int) -> dict:
    """Scenario B: with a target task's validation, how much of each selection is that task?

    ``tasks`` maps every group id (pool and validation) to its task. One candidate pass serves
    every target: the table keeps one cosine per validation task (``task_scores``), the same
    scores as ``select`` with only that task's validation problems.
    """
    selector = ga.GradAlign(
        ga.FactorizedGradient(32, 32, share_prompts=True), policy=ga.policies.TopFraction(0.25)
    )
    val_tasks = {g: tasks[g] for g in validation.unique_groups.tolist()}
    targets = selector.targets(model, validation, tasks=val_tasks)  # one direction per task
    table = selector.score(model, pool, targets)  # task_scores: (G, Q), Q in targets.labels order
    out = {}
    for q, target in enumerate(targets.labels):
        picked = selector.apply_policy(dataclasses.replace(table, scores=table.task_scores[:, q]))
        k = len(picked.ids)
        on_target = {g for g in table.ids.tolist() if tasks[g] == target}
        picks = {
            "GradAlign": picked.ids,
            "AccGreedy": ga.policies.AccGreedy(k)(table),
            "Random": ga.policies.Random(k, seed=seed)(table),
        }
        positive = [g in on_target for g in table.ids.tolist()]
        out[target] = {
            "num_selected": k,
            "pool_share": len(on_target) / len(table),
            "selected": {m: ids.tolist() for m, ids in picks.items()},
            "target_share": {m: selected_share(ids, on_target) for m, ids in picks.items()},
            "auroc_GradAlign": auroc(table.task_scores[:, q].numpy(), positive),
        }
    return out


# --8<-- [end:mixed]


def _seed(*parts: object) -> int:
    """A stable seed per (stage, task, seed): independent draws that do not depend on order."""
    return zlib.crc32("-".join(map(str, parts)).encode())


def _task_stats(pool: ga.Rollouts, validation: ga.Rollouts, entries: list[dict]) -> dict:
    pool_table, val_table = (
        ga.Candidates.from_rollouts(pool),
        ga.Candidates.from_rollouts(validation),
    )
    assert pool_table.pass_rate is not None and val_table.pass_rate is not None
    return {
        "pool_pass_rate": float(pool_table.pass_rate.mean()),
        "pool_mean_reward": float(pool.rewards.mean()),
        "pool_groups_with_spread": int((~pool_table.zero_spread).sum()),
        "validation_pass_rate": float(val_table.pass_rate.mean()),
        "validation_groups_with_spread": int((~val_table.zero_spread).sum()),
        "answers": [e["answer"] for e in entries],
    }


def run_seed(model: Any, tokenizer: Any, args: argparse.Namespace, seed: int) -> dict:
    """Both scenarios for one seed: sample every task once, then score."""
    t0 = time.perf_counter()
    pools, vals, tasks, stats = [], [], {}, {}
    for t, task in enumerate(TASKS):
        n, m = args.pool, args.val
        data = problems(task, n + m, _seed("problems", task, seed))
        pool_task, val_task = (data[0], data[1][:n], data[2]), (data[0], data[1][n:], data[2])
        ids = [t * 1000 + i for i in range(n)], [100_000 + t * 1000 + i for i in range(m)]
        opts = dict(k=args.k, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
        pools.append(
            rollouts(model, tokenizer, pool_task, ids[0], **opts, seed=_seed("pool", task, seed))
        )
        vals.append(
            rollouts(model, tokenizer, val_task, ids[1], **opts, seed=_seed("val", task, seed))
        )
        tasks.update({g: task for g in ids[0] + ids[1]})
        stats[task] = _task_stats(pools[-1], vals[-1], pool_task[1])
    t1 = time.perf_counter()
    result: dict[str, Any] = {"seed": seed, "tasks": stats, "noisy": {}, "mixed": {}}
    targets = [task for task in TASKS if stats[task]["validation_groups_with_spread"] > 0]
    for t, task in enumerate(TASKS):
        if task in targets:
            result["noisy"][task] = noisy(model, pools[t], vals[t], _seed("noisy", task, seed))
    kept = [vals[t] for t, task in enumerate(TASKS) if task in targets]
    if kept:
        pool, val = ga.Rollouts.concat(pools), ga.Rollouts.concat(kept)
        result["mixed"] = mixed(model, pool, val, tasks, _seed("mixed", seed))
    result["skipped"] = sorted(set(TASKS) - set(targets))  # no validation group with spread
    result["timings"] = {"sample_s": t1 - t0, "select_s": time.perf_counter() - t1}
    return result


def summarize(runs: list[dict]) -> dict:
    """Mean and sample sd over seeds of every metric of every task (seeds that have it)."""

    def stat(values: list[float]) -> dict:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return {"mean": statistics.fmean(values), "sd": sd, "per_seed": values}

    out: dict[str, Any] = {"noisy": {}, "mixed": {}}
    for scenario, metrics in (
        ("noisy", ("corrupted_share", "auroc")),
        ("mixed", ("target_share",)),
    ):
        for task in TASKS:
            have = [r[scenario][task] for r in runs if task in r[scenario]]
            if have:
                out[scenario][task] = {
                    f"{metric}/{m}": stat([h[metric][m] for h in have])
                    for metric in metrics
                    for m in have[0][metric]
                }
                if scenario == "mixed":
                    out[scenario][task]["auroc/GradAlign"] = stat(
                        [h["auroc_GradAlign"] for h in have]
                    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--pool", type=int, default=None, help="pool problems per task")
    parser.add_argument("--val", type=int, default=8, help="validation problems per task")
    parser.add_argument("--k", type=int, default=8, help="rollouts per problem")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    tiny = args.model == "tiny"
    args.pool = args.pool or (8 if tiny else 32)
    args.max_new_tokens = args.max_new_tokens or (8 if tiny else 10)
    if tiny:
        from gradalign.testing import tiny_model, tiny_tokenizer

        model, tokenizer = tiny_model(), tiny_tokenizer()
    else:
        from gradalign.demo.models import load_smollm2

        model, tokenizer = load_smollm2()
    start, runs = time.perf_counter(), []
    for seed in args.seeds:
        runs.append(run_seed(model, tokenizer, args, seed))
        print(f"seed {seed}: {json.dumps(runs[-1]['timings'])}", flush=True)
    summary = summarize(runs)
    report(summary)
    if args.json is not None:
        config = {k: v for k, v in vars(args).items() if k != "json"}
        versions = {p: metadata.version(p) for p in ("reasoning-gym", "torch", "gradalign")}
        config |= {"tasks": TASKS, "threads": torch.get_num_threads(), "versions": versions}
        out = {"config": config, "wall_s": time.perf_counter() - start, "summary": summary}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out | {"seeds": runs}, indent=1) + "\n")


def report(summary: dict) -> None:
    """One line per scenario, task and metric: mean ± sd over seeds, then each seed."""
    for scenario, tasks in summary.items():
        for task, metrics in tasks.items():
            for name, s in metrics.items():
                seeds = " ".join(f"{v:.3f}" for v in s["per_seed"])
                print(
                    f"{scenario:6} {task:17} {name:26} {s['mean']:.3f} ± {s['sd']:.3f}  [{seeds}]"
                )


if __name__ == "__main__":
    main()
