"""Private: token log-probabilities of response tokens, with the vocabulary projection chunked.

Only response positions need logits, and the (S, T, V) logits never need to exist at once: the decoder
body runs once, hidden states at response positions are gathered, and the output head plus
log-softmax run over chunks of rows, each recomputed in the backward pass (activation checkpointing),
so peak memory holds one (rows, V) chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from gradalign.errors import GradAlignError

DEFAULT_LOGITS_ELEMENTS = 2**24  # elements of one (rows, V) logits chunk: 64 MiB in float32


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (peft layers stay in place)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _logits_transform(config: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """Model-specific post-processing transformers applies to the head's output."""
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    divide = getattr(config, "logits_scaling", None)

    def transform(logits: torch.Tensor) -> torch.Tensor:
        if scale is not None:
            logits = logits * scale
        if divide is not None:
            logits = logits / divide
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return transform


def _split_model(model: nn.Module) -> tuple[nn.Module, nn.Module, Any] | None:
    base = _unwrap(model)
    get_decoder = getattr(base, "get_decoder", None)
    get_head = getattr(base, "get_output_embeddings", None)
    if not (callable(get_decoder) and callable(get_head)):
        return None
    try:
        body, head = get_decoder(), get_head()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    if body is None or body is base or not isinstance(head, nn.Module):
        return None
    return body, head, getattr(base, "config", None)


def _head_logprobs(
    head: nn.Module, transform: Callable[[torch.Tensor], torch.Tensor]
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def fn(hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = transform(head(hidden).float())  # (N, V)
        logz = torch.logsumexp(logits, dim=-1)  # (N,)
        return logits.gather(-1, targets[:, None]).squeeze(-1) - logz  # (N,)

    return fn


def response_positions(response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) rows and (N,) columns of the logits that predict response tokens, row-major.

    The output head runs on the hidden states at exactly these positions, in this order.
    """
    rows, cols = response_mask[:, 1:].nonzero(as_tuple=True)  # logits at t-1 predict token t
    return rows, cols


def response_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    max_logits_elements: int = DEFAULT_LOGITS_ELEMENTS,
    checkpoint_chunks: bool = True,
) -> torch.Tensor:
    """(S, T) float32 log pi(input_ids[s, t] | input_ids[s, :t]) at response positions, 0 elsewhere.

    Differentiable with respect to the model's parameters when grad mode is on.
    """
    s, t = input_ids.shape
    rows, cols = response_positions(response_mask)  # (N,), (N,)
    targets = input_ids[:, 1:][rows, cols]  # (N,)
    split = _split_model(model)
    if split is None:
        logits = _model_logits(model, input_ids, attention_mask)  # (S, T, V)
        flat = torch.log_softmax(logits[:, :-1][rows, cols].float(), dim=-1)  # (N, V)
        values = flat.gather(-1, targets[:, None]).squeeze(-1)  # (N,)
    else:
        body, head, config = split
        hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden.last_hidden_state  # (S, T, H)
        gathered = hidden[:, :-1][rows, cols]  # (N, H)
        fn = _head_logprobs(head, _logits_transform(config))
        vocab = int(getattr(head, "out_features", 0) or getattr(config, "vocab_size", 1) or 1)
        step = max(1, max_logits_elements // vocab)
        # One chunk gains nothing from checkpointing: its recompute would only cost time.
        use_ckpt = checkpoint_chunks and torch.is_grad_enabled() and gathered.shape[0] > step
        parts = []
        for i in range(0, gathered.shape[0], step):
            h, y = gathered[i : i + step], targets[i : i + step]
            parts.append(checkpoint(fn, h, y, use_reentrant=False) if use_ckpt else fn(h, y))
        values = torch.cat(parts) if parts else gathered.new_zeros(0, dtype=torch.float32)
    out = torch.zeros(s, t, dtype=torch.float32, device=input_ids.device)  # (S, T)
    return out.index_put((rows, cols + 1), values.float())


def _model_logits(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
    if logits is None and isinstance(out, tuple):
        logits = out[0]
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise GradAlignError(
            "response_logprobs: the model must return (S, T, V) logits or an output with .logits, "
            f"got {type(out).__name__}"
        )
    return logits
