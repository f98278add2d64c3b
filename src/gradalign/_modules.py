"""Private: which modules and parameters an extractor differentiates (peft's ``target_modules``)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from torch import nn

from gradalign._options import Rule
from gradalign.errors import GradAlignError

TargetModules = str | Sequence[str] | None


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or transformers' Conv1D (GPT-2's transposed linear layer)."""
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _output_head_names(model: nn.Module) -> set[str]:
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        return set()
    return {name for name, module in model.named_modules() if module is head}


def _is_adapter_piece(name: str) -> bool:
    # peft wraps a targeted Linear; the wrapper keeps its name, its pieces sit below it.
    return ".lora_" in name or ".base_layer" in name or name.startswith(("lora_", "base_layer"))


def _target_modules_rule(call: str, name: str, value: Any) -> Any:
    check_target_modules(call, value)
    return value


TARGET_MODULES_RULE: Rule = _target_modules_rule
"""The check of every extractor's ``target_modules`` field."""


def check_target_modules(call: str, target_modules: Any) -> None:
    """Reject a ``target_modules`` that is not None, a string or a non-empty list of strings."""
    if target_modules is None or isinstance(target_modules, str):
        return
    ok = isinstance(target_modules, (list, tuple, set, frozenset)) and bool(target_modules)
    if not ok or not all(isinstance(k, str) for k in target_modules):
        raise GradAlignError(
            f"{call}: target_modules must be None, a string or a non-empty list of strings, "
            f"got {target_modules!r}"
        )


def match_modules(
    model: nn.Module, target_modules: TargetModules, *, call: str, linear_only: bool = False
) -> list[tuple[str, nn.Module]]:
    """Modules selected by ``target_modules`` with peft's conventions.

    Args:
        model: the model.
        target_modules: None (every module with parameters; only linear layers when
            ``linear_only``), "all-linear" (every linear layer except the output head, as in peft),
            a regex string matched against the full module name, or a list of name suffixes
            (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``).
        call: the public call, for error messages.
        linear_only: keep only linear layers among the matches.

    Returns:
        (name, module) pairs in the model's module order.
    """
    named = [(n, m) for n, m in model.named_modules() if n and not _is_adapter_piece(n)]
    if target_modules is None:
        chosen = [(n, m) for n, m in named if not linear_only or is_linear(m)]
        if not linear_only:
            chosen = [(n, m) for n, m in chosen if any(True for _ in m.parameters(recurse=False))]
    elif target_modules == "all-linear":
        heads = _output_head_names(model)
        chosen = [(n, m) for n, m in named if is_linear(m) and n not in heads]
    elif isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as exc:
            raise GradAlignError(
                f"{call}: target_modules {target_modules!r} is not a valid regex: {exc}"
            ) from exc
        chosen = [(n, m) for n, m in named if pattern.fullmatch(n)]
    else:
        check_target_modules(call, target_modules)
        keys = list(target_modules)
        chosen = [(n, m) for n, m in named if any(n == k or n.endswith("." + k) for k in keys)]
    if linear_only:
        chosen = [(n, m) for n, m in chosen if is_linear(m)]
    if not chosen:
        available = sorted({n for n, m in named if any(True for _ in m.parameters(recurse=False))})
        shown = ", ".join(available[:40]) + (" ..." if len(available) > 40 else "")
        raise GradAlignError(
            f"{call}: target_modules={target_modules!r} matches no "
            f"{'linear ' if linear_only else ''}module; modules with parameters: {shown}"
        )
    return chosen


def target_parameters(
    model: nn.Module, target_modules: TargetModules, *, call: str
) -> list[tuple[str, nn.Parameter]]:
    """Parameters to differentiate, named as in ``model.named_parameters()``, in that order.

    With ``target_modules=None`` these are the parameters that currently require grad (all
    trainable parameters); otherwise every parameter of the matched modules.
    """
    params = list(model.named_parameters())
    if target_modules is None:
        chosen = [(n, p) for n, p in params if p.requires_grad]
        if not chosen:
            raise GradAlignError(
                f"{call}: the model has no trainable parameters (requires_grad=False everywhere); "
                "unfreeze some or pass target_modules"
            )
        return chosen
    wanted = {
        id(p) for _, m in match_modules(model, target_modules, call=call) for p in m.parameters()
    }
    return [(n, p) for n, p in params if id(p) in wanted]
