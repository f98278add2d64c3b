"""Private: the checks of settings every public class shares, each a ``GradAlignError`` on failure.

Messages name the call, the rule and the value received:
``RandomProjectedGradient: dim must be an int >= 1, got True``.
"""

from __future__ import annotations

from typing import Any

from gradalign.errors import GradAlignError

SEED_RANGE = (0, 2**64 - 1)
"""Seeds: non-negative and within what ``torch.Generator.manual_seed`` accepts."""


def check_int(
    call: str,
    name: str,
    value: Any,
    minimum: int | None = None,
    maximum: int | None = None,
    *,
    allow_none: bool = False,
) -> Any:
    """``value`` if it is an int (not a bool) within the bounds, or None when allowed."""
    if value is None and allow_none:
        return None
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum):
        return value
    rule = "an int"
    if minimum is not None and maximum is not None:
        rule += f" from {minimum} to {maximum}"
    elif minimum is not None:
        rule += f" >= {minimum}"
    elif maximum is not None:
        rule += f" <= {maximum}"
    rule += " or None" if allow_none else ""
    raise GradAlignError(f"{call}: {name} must be {rule}, got {value!r}")


def check_seed(call: str, value: Any, name: str = "seed") -> int:
    """An int seed that ``torch.Generator.manual_seed`` accepts."""
    return int(check_int(call, name, value, *SEED_RANGE))


def check_choice(call: str, name: str, value: Any, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise GradAlignError(f"{call}: {name} must be one of {choices}, got {value!r}")
    return value
