"""Private: the hook engine of the extractors, both kinds of hook in one place.

Parameter hooks (`FullGradient`, `RandomProjectedGradient`): `ParameterSink` takes each
parameter's gradient the moment autograd produces it.

Layer hooks (`FactorizedGradient`, `LoRAGradient`, per-layer projected gradients): `build_sites`
(the hooked linear layers with their projection matrices and column ranges), `Recorder` (hook
state of one chunk: the (Gc, D) buffer and the layout of the forward in flight) and `hooked`
(registers the hooks, removes them on exit).

For a linear layer ``y = W a + b`` the weight gradient summed over a sequence's tokens is
``sum_t g_t a_t^T``; a forward hook projects each layer input, a hook on the layer output projects
the incoming gradient, and their per-group sums of outer products are scatter-added into the rows
of the chunk.

Shape glossary: R token rows reaching a layer, K projection dimension, Gc groups of a chunk.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradalign.errors import GradAlignError
from gradalign.extractors.base import Segment
from gradalign.projection import ProjectionKind, Projector
from gradalign.projection._hashing import _LRU


class ParameterSink:
    """Where each parameter's gradient goes the moment autograd produces it.

    A tensor hook on every differentiated parameter hands its gradient to ``take`` and gives
    autograd back a zero-stride zero, so ``torch.autograd.grad`` never holds the whole gradient:
    only the parameter in flight. ``take`` is set per group (its row, or its projection sum).
    """

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.take: Callable[[int, torch.Tensor], None] | None = None
        self.last = True  # no further micro-batch of the group follows
        self._handles = [
            p.register_hook(functools.partial(self._hook, k)) for k, p in enumerate(params)
        ]

    def _hook(self, k: int, grad: torch.Tensor) -> torch.Tensor:
        if self.take is not None:
            self.take(k, grad)
        return torch.zeros((), dtype=grad.dtype, device=grad.device).expand(grad.shape)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


@dataclass
class _Site:
    """One hooked linear layer and where its gradient goes in a row."""

    name: str
    module: nn.Module
    d_in: int
    d_out: int
    transposed: bool  # transformers' Conv1D stores its weight as (d_in, d_out)
    has_bias: bool
    start: int = 0
    r_in: torch.Tensor | None = None  # (d_in, K_in), None = unprojected
    r_out: torch.Tensor | None = None  # (d_out, K_out)

    @property
    def k_in(self) -> int:
        return self.d_in if self.r_in is None else int(self.r_in.shape[1])

    @property
    def k_out(self) -> int:
        return self.d_out if self.r_out is None else int(self.r_out.shape[1])

    @property
    def size(self) -> int:
        return self.k_out * self.k_in + (self.k_out if self.has_bias else 0)


def _make_site(name: str, module: nn.Module, call: str) -> _Site:
    if isinstance(module, nn.Linear):
        d_in, d_out, transposed = module.in_features, module.out_features, False
    elif type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        d_in, d_out, transposed = int(module.nx), int(module.nf), True  # type: ignore[arg-type]
    else:
        raise GradAlignError(
            f"{call}: module {name!r} is a {type(module).__name__}, not a linear layer "
            "(nn.Linear or transformers' Conv1D)"
        )
    return _Site(name, module, d_in, d_out, transposed, getattr(module, "bias", None) is not None)


_MATRICES = _LRU(64 << 20)
"""(kind, seed, name, side, d, K, device) -> (d, K) projection matrix, reused by later calls.

A matrix depends only on its key, so the cache never changes a result; it spares regenerating
every layer's matrices on every call (a selection round calls the extractor at least twice)."""


def build_sites(
    named: list[tuple[str, nn.Module]],
    dims: tuple[int | None, int | None],
    kind: ProjectionKind,
    seed: int,
    call: str,
) -> tuple[list[_Site], tuple[Segment, ...]]:
    """Sites with their projection matrices and column ranges, plus the row's segments."""
    sites, segments, start = [], [], 0
    for name, module in named:
        site = _make_site(name, module, call)
        device = next(module.parameters()).device
        for side, k, d in (("in", dims[0], site.d_in), ("out", dims[1], site.d_out)):
            if k is not None:
                projector = Projector(dim=k, kind=kind, seed=seed)
                r = _MATRICES.get(
                    (kind, seed, name, side, d, k, str(device)),
                    functools.partial(
                        projector.block, name=name, start=0, stop=d, side=side, device=device
                    ),
                )
                setattr(site, f"r_{side}", r)  # (d, K)
        site.start = start
        start += site.size
        segments.append(Segment(name, site.start, start))
        sites.append(site)
    return sites, tuple(segments)


@dataclass(frozen=True, eq=False)
class _Runs:
    """Rows of one layer call as consecutive runs, each run from one group."""

    groups: torch.Tensor  # (R,) chunk-local group of every row
    ids: torch.Tensor  # (n,) group of each run
    counts: list[int]  # rows in each run

    @classmethod
    def of(cls, groups: torch.Tensor) -> _Runs:
        ids, counts = torch.unique_consecutive(groups, return_counts=True)
        return cls(groups, ids, counts.tolist())


@dataclass(eq=False)
class Recorder:
    """Hook state of one chunk: the (Gc, D) buffer and the layout of the forward in flight."""

    sites: list[_Site]
    head: set[int]  # ids of the output head and its submodules (LoRA pieces of a wrapped head)
    buffer: torch.Tensor  # (Gc, D) float32
    seq_group: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    row_group: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    shape: tuple[int, int] = (0, 0)
    head_group: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    cursors: dict[int, int] = field(default_factory=dict)  # per head module: rows seen so far
    recording: bool = False
    leaves: list[torch.Tensor] = field(default_factory=list)
    _per_seq: dict[int, _Runs] = field(default_factory=dict)

    def begin(self, seq_group: torch.Tensor) -> None:
        """Start a micro-batch: (S',) chunk-local group of each sequence."""
        self.seq_group, self.leaves = seq_group, []

    def layout(self, row_seq: torch.Tensor, width: int, head_seq: torch.Tensor) -> None:
        """Start a decoder forward (the micro-batch runs one, or two with shared prompts).

        Args:
            row_seq: (B,) the sequence each batch row stands for (a shared prompt: any of its).
            width: tokens per batch row.
            head_seq: (N,) the sequence of each row the output head will see, in order.
        """
        self.row_group, self.shape = self.seq_group[row_seq], (len(row_seq), width)
        self.head_group, self.cursors, self._per_seq = self.seq_group[head_seq], {}, {}
        self.recording = True

    def _repeat(self, per: int) -> _Runs:
        """Runs of the rows when every batch row has ``per`` rows (cached per forward)."""
        if per not in self._per_seq:
            self._per_seq[per] = _Runs.of(self.row_group.repeat_interleave(per))
        return self._per_seq[per]

    def token_groups(self, site: _Site, x: torch.Tensor) -> _Runs | None:
        """Groups of the rows of ``x`` flattened to (R, d_in); None to skip this call."""
        s, t = self.shape
        if id(site.module) in self.head and x.dim() == 2:
            if not self.recording:
                return None  # recompute of a checkpointed head chunk: its hooks never fire
            start = self.cursors.get(id(site.module), 0)
            self.cursors[id(site.module)] = start + x.shape[0]
            return _Runs.of(self.head_group[start : start + x.shape[0]])
        if x.dim() >= 2 and x.shape[0] == s and x.numel() % (s * site.d_in) == 0:
            return self._repeat(x.numel() // (s * site.d_in))
        if x.dim() == 2 and x.shape[0] == s * t:
            return self._repeat(t)
        raise GradAlignError(
            f"FactorizedGradient: module {site.name!r} got an input of shape {tuple(x.shape)} "
            f"whose rows cannot be traced to the forward's {s} rows of {t} tokens; "
            "leave it out with target_modules"
        )

    def leaf_hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        """Make the input embeddings' output the leaf that gradients flow back to."""
        if not (self.recording and torch.is_grad_enabled() and isinstance(output, torch.Tensor)):
            return None
        leaf = output.detach().requires_grad_()
        self.leaves.append(leaf)
        return leaf

    def forward_hook(self, site: _Site, module: nn.Module, args: Any, output: Any) -> None:
        """Project the layer input and attach the backward half to the layer output."""
        if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor)):
            return
        if not output.requires_grad or not args:
            return  # e.g. the no-grad first pass of reentrant checkpointing
        x = args[0]
        runs = self.token_groups(site, x)
        if runs is None or not runs.counts:
            return
        a = x.detach().reshape(-1, site.d_in).float()  # (R, d_in)
        if a.shape[0] != runs.groups.shape[0]:
            raise GradAlignError(
                f"FactorizedGradient: module {site.name!r} got {a.shape[0]} rows but the "
                f"micro-batch layout accounts for {runs.groups.shape[0]}"
            )
        if site.r_in is not None:
            a = a @ site.r_in  # (R, K_in)
        output.register_hook(functools.partial(self._accumulate, site, a, runs))

    def _accumulate(self, site: _Site, a: torch.Tensor, runs: _Runs, grad: torch.Tensor) -> None:
        g = grad.reshape(-1, site.d_out).float()  # (R, d_out)
        if site.r_out is not None:
            g = g @ site.r_out  # (R, K_out)
        left, right = (a, g) if site.transposed else (g, a)
        n, m = len(runs.counts), runs.counts[0]
        if all(c == m for c in runs.counts):
            w = torch.bmm(
                left.view(n, m, -1).transpose(1, 2), right.view(n, m, -1)
            )  # (n, K_left, K_right)
        else:
            pieces = zip(left.split(runs.counts), right.split(runs.counts), strict=True)
            w = torch.stack([lp.T @ rp for lp, rp in pieces])  # (n, K_left, K_right)
        n_w = site.k_out * site.k_in
        self.buffer.narrow(1, site.start, n_w).index_add_(0, runs.ids, w.flatten(1))
        if site.has_bias:
            self.buffer.narrow(1, site.start + n_w, site.k_out).index_add_(0, runs.groups, g)


@contextlib.contextmanager
def hooked(model: nn.Module, recorder: Recorder, call: str) -> Iterator[None]:
    """Register the recorder's hooks; remove every one of them on exit, also after an error."""
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    if not isinstance(emb, nn.Module):
        raise GradAlignError(
            f"{call}: the model must expose get_input_embeddings() (gradients flow back to the "
            f"embeddings' output), got {type(model).__name__} without it"
        )
    handles = []
    try:
        handles.append(emb.register_forward_hook(recorder.leaf_hook))
        for site in recorder.sites:
            hook = functools.partial(recorder.forward_hook, site)
            handles.append(site.module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
