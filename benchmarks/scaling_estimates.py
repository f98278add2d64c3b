"""Memory and compute of each extractor per candidate group on 0.5B-8B models: estimates only.

Nothing here runs a model. The numbers follow from each model's public config (hidden size, layers,
intermediate size, heads, vocabulary) and the performance model of docs/scaling-up.md: which
matrix products an extractor runs, how many float32 gradient rows it holds, how the output head is
chunked. They were not measured on a GPU; the measured ratios (on a CPU) are on docs/performance.md.

Usage:
    python benchmarks/scaling_estimates.py                 # the tables of docs/scaling-up.md
    python benchmarks/scaling_estimates.py --rollouts 16 --prompt-tokens 512 --response-tokens 4096
    python benchmarks/scaling_estimates.py --json estimates.json

Shape glossary: G groups, k rollouts per group, T tokens per rollout (prompt + response),
P parameters, D gradient dimension, V vocabulary, h hidden size, m intermediate size, L layers.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

GIB = 2**30
MIB = 2**20
LOGITS_CHUNK = 2**24  # elements of one (rows, V) logits chunk: gradalign's max_logits_elements
CHUNK_BYTES = 2**30  # float32 bytes of rows an extractor holds before it yields (group_chunk=None)


@dataclass(frozen=True)
class Arch:
    """The config fields that fix a Llama/Qwen2-style decoder's shapes (its config.json)."""

    name: str
    hidden: int  # hidden_size
    layers: int  # num_hidden_layers
    intermediate: int  # intermediate_size
    vocab: int  # vocab_size
    heads: int  # num_attention_heads
    kv_heads: int  # num_key_value_heads
    head_dim: int  # hidden_size // num_attention_heads for these models
    qkv_bias: bool  # Qwen2 has biases on q, k, v
    tied: bool  # tie_word_embeddings

    def linears(self) -> list[tuple[int, int, bool]]:
        """(d_in, d_out, bias) of the 7 linear layers of one decoder layer."""
        h, m = self.hidden, self.intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        b = self.qkv_bias
        return (
            [(h, q, b), (h, kv, b), (h, kv, b), (q, h, False)]
            + [(h, m, False)] * 2
            + [(m, h, False)]
        )

    def linear_weights(self) -> int:
        """Weights of the decoder's linear layers (biases, embeddings and head left out)."""
        return self.layers * sum(i * o for i, o, _ in self.linears())

    def parameters(self) -> int:
        """P: every parameter, a tied embedding counted once."""
        per_layer = sum(i * o + (o if b else 0) for i, o, b in self.linears()) + 2 * self.hidden
        heads = 1 if self.tied else 2
        return self.layers * per_layer + heads * self.vocab * self.hidden + self.hidden


# From each model's config.json on the Hugging Face hub.
MODELS = (
    Arch("Qwen2.5-0.5B", 896, 24, 4864, 151936, 14, 2, 64, qkv_bias=True, tied=True),
    Arch("Llama-3.2-1B", 2048, 16, 8192, 128256, 32, 8, 64, qkv_bias=False, tied=True),
    Arch("Qwen2.5-3B", 2048, 36, 11008, 151936, 16, 2, 128, qkv_bias=True, tied=True),
    Arch("Llama-3.1-8B", 4096, 32, 14336, 128256, 32, 8, 128, qkv_bias=False, tied=False),
)


@dataclass(frozen=True)
class Workload:
    """One candidate group and the settings that size the estimate."""

    rollouts: int = 8  # k
    prompt_tokens: int = 256
    response_tokens: int = 1024
    batch_size: int = 16  # sequences per forward/backward (gradalign's default)
    groups: int = 64  # G candidate groups scored per chunk
    targets: int = 1  # Q validation targets
    factorized: int = 32  # FactorizedGradient(dim_in, dim_out), both sides
    projected: int = 8192  # RandomProjectedGradient(dim)
    lora_rank: int = 16  # LoRA r on every linear layer of the decoder ("all-linear")
    tflops: float = 400.0  # sustained bf16 TFLOP/s assumed for the time column


def row_dim(a: Arch, extractor: str, w: Workload) -> int:
    """D: the length of one group's gradient row."""
    if extractor == "full":
        return a.parameters()
    if extractor == "random-projected":
        return w.projected
    if extractor == "factorized":  # K_out x K_in per linear layer (+ K_out for a bias), head too
        k = w.factorized
        per_layer = sum(k * k + (k if b else 0) for _, _, b in a.linears())
        return a.layers * per_layer + k * k
    if extractor == "lora":  # lora_A (r, d_in) and lora_B (d_out, r) per linear layer
        return a.layers * sum(w.lora_rank * (i + o) for i, o, _ in a.linears())
    raise ValueError(f"unknown extractor {extractor!r}")


def flops(a: Arch, extractor: str, w: Workload, *, shared: bool = False) -> float:
    """Matrix-product FLOPs for one group of k rollouts.

    ``shared``: the group's prompt runs once (``share_prompts=True``, every extractor's default)
    instead of once per rollout, as a GRPO trainer's own step runs it.
    """
    k, tp, tr = w.rollouts, w.prompt_tokens, w.response_tokens
    tokens, responses = (tp + k * tr if shared else k * (tp + tr)), k * tr
    # (query, key) pairs of causal attention: a prompt once, or every rollout's whole sequence
    pairs = tp * tp / 2 + k * (tr * tp + tr * tr / 2) if shared else k * (tp + tr) ** 2 / 2
    lin = 2.0 * a.linear_weights() * tokens  # decoder linear layers, forward
    att = 4.0 * a.layers * pairs * a.heads * a.head_dim  # QK^T and AV, forward
    head = 2.0 * a.hidden * a.vocab * responses  # output head, response positions only
    if extractor in ("train", "full", "random-projected"):
        return 3 * (lin + att + head)  # forward, input-gradient and weight-gradient backward
    frozen = 2 * lin + 3 * att + 2 * head  # forward and input-gradient backward only
    if extractor == "factorized":  # project inputs and output gradients, sum their products
        kf = w.factorized
        per_token = sum(2 * i * kf + 2 * o * kf + 2 * kf * kf for i, o, _ in a.linears())
        per_response = 2 * a.hidden * kf + 2 * a.vocab * kf + 2 * kf * kf
        return frozen + a.layers * per_token * tokens + per_response * responses
    if extractor == "lora":  # adapter forward, input-gradient backward and weight gradient
        per_token = sum(3 * 2 * w.lora_rank * (i + o) for i, o, _ in a.linears())
        return frozen + a.layers * per_token * tokens
    raise ValueError(f"unknown extractor {extractor!r}")


def rows_held(a: Arch, extractor: str, w: Workload) -> float:
    """Float32 rows held while GradAlign scores G groups: Q targets, one chunk, rows in flight."""
    chunk = min(w.groups, max(1, CHUNK_BYTES // (4 * row_dim(a, extractor, w))))
    in_flight = 1.5 if extractor == "full" else 0.0  # 3.44 rows measured at Q = chunk = 1
    return w.targets + chunk + in_flight


def activation_bytes_per_token(a: Arch) -> int:
    """bf16 activations a training backward keeps per token (flash attention, no checkpointing).

    Per layer: the two norm inputs, the q/k/v/o and gate/up/down inputs, q, k, v and the attention
    output, the gate and up outputs. Extraction keeps no more (frozen layers need not keep inputs).
    """
    kv = a.kv_heads * a.head_dim
    per_layer = 6 * a.hidden + 2 * kv + 3 * a.intermediate
    return 2 * a.layers * per_layer


EXTRACTORS = {
    "factorized": "`FactorizedGradient({k}, {k})`",
    "random-projected": "`RandomProjectedGradient({K})`",
    "lora": "`LoRAGradient()`, r = {r}",
    "full": "`FullGradient()`",
}


def estimates(w: Workload, models: Sequence[Arch] = MODELS) -> dict[str, list[dict]]:
    """Per model and per extractor, every figure of the two tables."""
    seq = w.prompt_tokens + w.response_tokens
    out: dict[str, list[dict]] = {"models": [], "extractors": []}
    for a in models:
        train = flops(a, "train", w)
        biggest = a.vocab * a.hidden  # the embedding (or head): the largest gradient in flight
        out["models"].append(
            {
                "model": a.name,
                "parameters": a.parameters(),
                "weights_bf16_gib": 2 * a.parameters() / GIB,
                "activations_mib_per_sequence": activation_bytes_per_token(a) * seq / MIB,
                "logits_unchunked_gib": w.batch_size * seq * a.vocab * 4 / GIB,
                "logits_chunk_rows": LOGITS_CHUNK // a.vocab,
                "train_tflop_per_group": train / 1e12,
                "largest_gradient_gib": 2 * biggest / GIB,
            }
        )
        for key, label in EXTRACTORS.items():
            d, cost = row_dim(a, key, w), flops(a, key, w, shared=True)
            out["extractors"].append(
                {
                    "model": a.name,
                    "extractor": label.format(k=w.factorized, K=w.projected, r=w.lora_rank),
                    "D": d,
                    "row_mib": 4 * d / MIB,
                    "rows_held": rows_held(a, key, w),
                    "rows_gib": rows_held(a, key, w) * 4 * d / GIB,
                    "x_train": flops(a, key, w) / train,
                    "x_train_shared": cost / train,
                    "ms_per_group": cost / (w.tflops * 1e12) * 1e3,
                }
            )
    return out


def _size(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,.0f}"


def markdown(est: dict[str, list[dict]], w: Workload) -> str:
    """The two tables of docs/scaling-up.md."""
    lines = [
        f"Per group: k = {w.rollouts} rollouts of {w.prompt_tokens} prompt + "
        f"{w.response_tokens} response tokens; micro-batch {w.batch_size} sequences; "
        f"time at {w.tflops:g} TFLOP/s.",
        "",
        "| model | P | bf16 weights GiB | activations MiB / sequence | logits of a micro-batch, "
        "unchunked GiB | rows per 64 MiB logits chunk | training step TFLOP / group |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in est["models"]:
        lines.append(
            f"| {m['model']} | {_count(m['parameters'])} | {m['weights_bf16_gib']:.1f} | "
            f"{m['activations_mib_per_sequence']:.0f} | {m['logits_unchunked_gib']:.1f} | "
            f"{m['logits_chunk_rows']} | {m['train_tflop_per_group']:.1f} |"
        )
    lines += [
        "",
        f"| model | extractor | D | row MiB | rows held (G = {w.groups}) | rows GiB "
        "| x training step | x training step, prompts shared | ms / group, prompts shared |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in est["extractors"]:
        lines.append(
            f"| {e['model']} | {e['extractor']} | {_count(e['D'])} | {_size(e['row_mib'])} | "
            f"{e['rows_held']:g} | {_size(e['rows_gib'])} | {e['x_train']:.2f} | "
            f"{e['x_train_shared']:.2f} | {e['ms_per_group']:.0f} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> tuple[Workload, Path | None]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for field, default in asdict(Workload()).items():
        flag = "--" + field.replace("_", "-")
        parser.add_argument(flag, type=type(default), default=default, metavar="N")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    args = vars(parser.parse_args(argv))
    path = args.pop("json")
    return Workload(**args), path


def main(argv: Sequence[str] | None = None) -> str:
    w, path = parse_args(argv)
    est = estimates(w)
    if path is not None:
        path.write_text(json.dumps({"workload": asdict(w), **est}, indent=1) + "\n")
    text = markdown(est, w)
    print(text)
    return text


if __name__ == "__main__":
    main()
