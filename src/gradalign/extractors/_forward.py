"""Private: token log-probabilities of response tokens, with the vocabulary projection chunked.

Only response positions need logits, and the (S, T, V) logits never need to exist at once: the decoder
body runs once, hidden states at response positions are gathered, and the output head plus
log-softmax run over chunks of rows, each recomputed in the backward pass (activation checkpointing),
so peak memory holds one (rows, V) chunk.

Rows are compacted first (attended tokens moved to the front), so left-padded, right-padded and
unpadded rows give the same numbers. With ``share_keys``, rows with the same key and the same prompt
run that prompt once: the decoder runs over each distinct prompt (minus its last token), its key/value
cache is repeated for every rollout of it, and only the rollouts' own tokens run per row. GRPO groups
share one prompt, so this removes (k - 1) / k of the prompt work of a group of k rollouts.

Shape glossary: S sequences, T tokens, W compact width, P distinct prompts, C continuation width,
N response tokens, H hidden size, V vocabulary.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from gradalign.errors import GradAlignError

DEFAULT_LOGITS_ELEMENTS = 2**24  # elements of one (rows, V) logits chunk: 64 MiB in float32

OnForward = Callable[[torch.Tensor, int, torch.Tensor], None]
"""Called before each decoder forward with (sequence of each batch row (B,), the forward's width,
sequence of each row the output head will see (N,)); hook-based extractors use it to trace rows."""


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


def fsdp_root(model: nn.Module) -> Any:
    """The FSDP2 (``fully_shard``) root of ``model`` or of the model under its peft wrapper, else
    None."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return None
    for candidate in (model, _unwrap(model)):
        if isinstance(candidate, FSDPModule):
            return candidate
    return None


@contextlib.contextmanager
def unsharded_root(model: nn.Module) -> Iterator[None]:
    """Gather an FSDP2 root's own parameters (embeddings, final norm, output head) for a
    forward and backward that call the decoder body and the head directly, bypassing the root's
    forward where FSDP would gather them; a no-op for any other model. Sharded decoder layers
    still gather their own parameters in their forward."""
    root = fsdp_root(model)
    if root is None:
        yield
        return
    root.unshard()
    try:
        yield
    finally:
        root.reshard()


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


class _TargetLogProb(torch.autograd.Function):
    """log softmax(logits)[n, targets[n]] for each row n, in one pass over the (N, V) logits.

    Forward keeps only the softmax, and the backward ``g[n] * (onehot(targets[n]) - softmax[n])``
    reuses it, so each of the N * V entries is exponentiated once. ``logsumexp`` minus the target
    logit exponentiates every entry twice and makes several more (N, V) passes: on SmolLM2 (330
    rows, 49k vocabulary, 1 thread) its forward + backward took 0.15-0.26 s beside the head's
    0.32 s of matrix products; this takes about 0.05 s.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        top = logits.amax(-1, keepdim=True)  # (N, 1)
        probs = torch.sub(logits, top).exp_()  # (N, V) unnormalized
        total = probs.sum(-1, keepdim=True)  # (N, 1)
        probs.div_(total)
        picked = logits.gather(-1, targets[:, None])  # (N, 1)
        ctx.save_for_backward(probs, targets)
        return (picked - top - total.log()).squeeze(-1)  # (N,)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        probs, targets = ctx.saved_tensors
        out = probs * grad.neg()[:, None]  # (N, V)
        return out.scatter_add_(-1, targets[:, None], grad[:, None]), None


def _head_logprobs(
    head: nn.Module, transform: Callable[[torch.Tensor], torch.Tensor]
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def fn(hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = transform(head(hidden).float())  # (N, V)
        out: torch.Tensor = _TargetLogProb.apply(logits, targets)  # (N,)
        return out

    return fn


def response_positions(response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) rows and (N,) columns of the logits that predict response tokens, row-major.

    The output head runs on the hidden states at exactly these positions, in this order.
    """
    rows, cols = response_mask[:, 1:].nonzero(as_tuple=True)  # logits at t-1 predict token t
    return rows, cols


@dataclass(frozen=True)
class _Compact:
    """Rows with their attended tokens moved to the front (right padding), as the model sees them.

    ``cols`` maps every compact position back to its column in the caller's layout.
    """

    ids: torch.Tensor  # (S, W)
    mask: torch.Tensor  # (S, W) long
    resp: torch.Tensor  # (S, W) bool
    cols: torch.Tensor  # (S, W)
    lengths: torch.Tensor  # (S,) attended tokens per row

    @classmethod
    def of(
        cls, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor
    ) -> _Compact:
        valid = attention_mask.bool()
        lengths = valid.sum(1)  # (S,)
        width = max(1, int(lengths.max().item()))
        # A stable sort on "is padding" keeps the attended tokens first and in their order.
        cols = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :width]  # (S, W)
        keep = torch.arange(width, device=valid.device)[None, :] < lengths[:, None]  # (S, W)
        return cls(
            ids=input_ids.gather(1, cols),
            mask=keep.long(),
            resp=response_mask.bool().gather(1, cols) & keep,
            cols=cols,
            lengths=lengths,
        )


def _hidden(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


@dataclass(frozen=True)
class _Gathered:
    """Hidden states that predict response tokens, with where their log-probs go."""

    hidden: torch.Tensor  # (N, H)
    targets: torch.Tensor  # (N,) the predicted token ids
    rows: torch.Tensor  # (N,) row in the caller's layout
    cols: torch.Tensor  # (N,) column in the caller's layout


def _plain(body: nn.Module, c: _Compact, on_forward: OnForward | None) -> _Gathered:
    rows, cols = response_positions(c.resp)  # (N,), (N,)
    if on_forward is not None:
        on_forward(torch.arange(len(c.ids), device=c.ids.device), c.ids.shape[1], rows)
    hidden = _hidden(body(input_ids=c.ids, attention_mask=c.mask, use_cache=False))  # (S, W, H)
    return _Gathered(
        hidden[:, :-1][rows, cols], c.ids[:, 1:][rows, cols], rows, c.cols[rows, cols + 1]
    )


def cache_argument(body: nn.Module) -> str:
    """Name of the key/value cache argument and output: "cache" (transformers >= 5.24) or the
    older "past_key_values"."""
    try:
        params = inspect.signature(type(_unwrap(body)).forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


@dataclass(frozen=True)
class _SharedPrompts:
    """Distinct (key, prompt) pairs of a compact micro-batch; each prompt runs once."""

    rep: torch.Tensor  # (P,) one sequence of each distinct prompt
    inv: torch.Tensor  # (S,) prompt of each sequence
    start: torch.Tensor  # (S,) prompt length: the position of the first response token

    @classmethod
    def plan(cls, c: _Compact, keys: torch.Tensor) -> _SharedPrompts | None:
        """None when no two rows share a (key, prompt) pair."""
        s = len(c.ids)
        start = c.resp.int().argmax(1)  # (S,) >= 1: Rollouts keeps a token before every response
        if s < 2:
            return None
        lp = int(start.max().item())
        ar = torch.arange(lp, device=c.ids.device)
        prompt = c.ids[:, :lp].masked_fill(ar[None, :] >= start[:, None], -1)  # (S, Lp)
        table = torch.cat([keys.to(prompt)[:, None], start[:, None], prompt], dim=1)  # (S, 2+Lp)
        unique, inv = torch.unique(table, dim=0, return_inverse=True)
        if unique.shape[0] == s:
            return None
        arange = torch.arange(s, device=c.ids.device)
        rep = torch.full((unique.shape[0],), s, device=c.ids.device)
        rep = rep.scatter_reduce(0, inv, arange, "amin")  # (P,)
        return cls(rep, inv, start)

    def run(self, body: nn.Module, c: _Compact, on_forward: OnForward | None) -> _Gathered:
        device = c.ids.device
        lp = int(self.start.max().item())
        p_len = self.start[self.rep]  # (P,)
        p_mask = torch.arange(lp, device=device)[None, :] < p_len[:, None]  # (P, Lp)
        if on_forward is not None:
            on_forward(self.rep, lp, torch.zeros(0, dtype=torch.long, device=device))
        out = body(input_ids=c.ids[self.rep, :lp], attention_mask=p_mask.long(), use_cache=True)
        name = cache_argument(body)
        cache: Any = getattr(out, name, None)
        if not callable(getattr(cache, "reorder_cache", None)):
            raise GradAlignError(
                "share_prompts: the model's decoder returned no key/value cache with "
                f"reorder_cache(), got {type(cache).__name__}; use share_prompts=False"
            )
        last = _hidden(out)[torch.arange(len(self.rep), device=device), p_len - 1]  # (P, H)
        cache.reorder_cache(self.inv)  # (P, ...) -> (S, ...): one copy of a prompt per rollout
        n = c.lengths - self.start  # (S,) tokens after the prompt
        cw = int(n.max().item())
        ar = torch.arange(cw, device=device)
        pos = self.start[:, None] + ar[None, :]  # (S, C) positions in the compact row
        keep = ar[None, :] < n[:, None]  # (S, C)
        at = pos.clamp(max=c.ids.shape[1] - 1)  # (S, C)
        ids, resp = c.ids.gather(1, at), c.resp.gather(1, at) & keep  # (S, C)
        mask = torch.cat([p_mask[self.inv], keep], dim=1).long()  # (S, Lp + C)
        rows, cols = resp.nonzero(as_tuple=True)  # (N,), (N,): every response token
        if on_forward is not None:
            on_forward(torch.arange(len(ids), device=device), cw, rows)
        hidden = _hidden(
            body(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos,
                use_cache=True,
                **{name: cache},
            )
        )  # (S, C, H)
        # Token c of the continuation is predicted by the hidden state before it: the prompt's
        # last one for c = 0.
        prev = torch.cat([last[self.inv][:, None], hidden[:, :-1]], dim=1)  # (S, C, H)
        orig = c.cols.gather(1, at)  # (S, C)
        return _Gathered(prev[rows, cols], ids[rows, cols], rows, orig[rows, cols])


def response_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    max_logits_elements: int = DEFAULT_LOGITS_ELEMENTS,
    checkpoint_chunks: bool = True,
    share_keys: torch.Tensor | None = None,
    on_forward: OnForward | None = None,
) -> torch.Tensor:
    """(S, T) float32 log pi(input_ids[s, t] | input_ids[s, :t]) at response positions, 0 elsewhere.

    The log-probabilities a GRPO step differentiates (``gradalign.extractors.response_logprobs``): logits only
    at response positions, the vocabulary projection chunked, any padding side.

    Args:
        model: a causal LM (transformers or peft).
        input_ids: (S, T) token ids.
        attention_mask: (S, T) 1 on attended tokens (one contiguous run per row).
        response_mask: (S, T) True on response tokens.
        max_logits_elements: size of one (rows, V) chunk of the vocabulary projection.
        checkpoint_chunks: recompute each chunk in the backward pass instead of keeping it.
        share_keys: (S,) rows with equal keys and equal prompts (the tokens before their first
            response token) run the prompt once; the result is the same up to float rounding.
        on_forward: hook called before each decoder forward (used by hook-based extractors).

    Returns:
        (S, T) log-probs, differentiable with respect to the model's parameters in grad mode.

    Examples:
        >>> import torch, gradalign as ga
        >>> from gradalign.extractors import response_logprobs
        >>> from gradalign.testing import tiny_model
        >>> ro = ga.Rollouts.from_token_ids([[5, 6], [5, 6]], [[7, 8], [9]], [1.0, 0.0], [0, 0])
        >>> lp = response_logprobs(tiny_model(), ro.input_ids, ro.attention_mask, ro.response_mask)
        >>> lp.shape, bool((lp[ro.response_mask] < 0).all()), bool((lp[~ro.response_mask] == 0).all())
        (torch.Size([2, 4]), True, True)
    """
    s, t = input_ids.shape
    c = _Compact.of(input_ids, attention_mask, response_mask)
    out = torch.zeros(s, t, dtype=torch.float32, device=input_ids.device)  # (S, T)
    split = _split_model(model)
    if split is None:
        rows, cols = response_positions(c.resp)  # (N,), (N,)
        if on_forward is not None:
            on_forward(torch.arange(s, device=input_ids.device), c.ids.shape[1], rows)
        logits = _model_logits(model, c.ids, c.mask)  # (S, W, V)
        flat = torch.log_softmax(logits[:, :-1][rows, cols].float(), dim=-1)  # (N, V)
        values = flat.gather(-1, c.ids[:, 1:][rows, cols][:, None]).squeeze(-1)  # (N,)
        return out.index_put((rows, c.cols[rows, cols + 1]), values.float())
    body, head, config = split
    plan = None if share_keys is None else _SharedPrompts.plan(c, share_keys.to(c.ids.device))
    g = _plain(body, c, on_forward) if plan is None else plan.run(body, c, on_forward)
    fn = _head_logprobs(head, _logits_transform(config))
    vocab = int(getattr(head, "out_features", 0) or getattr(config, "vocab_size", 1) or 1)
    step = max(1, max_logits_elements // vocab)
    # One chunk gains nothing from checkpointing: its recompute would only cost time.
    use_ckpt = checkpoint_chunks and torch.is_grad_enabled() and g.hidden.shape[0] > step
    parts = []
    for i in range(0, g.hidden.shape[0], step):
        h, y = g.hidden[i : i + step], g.targets[i : i + step]
        parts.append(checkpoint(fn, h, y, use_reentrant=False) if use_ckpt else fn(h, y))
    values = torch.cat(parts) if parts else g.hidden.new_zeros(0, dtype=torch.float32)
    return out.index_put((g.rows, g.cols), values.float())


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
