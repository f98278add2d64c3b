"""Private: settings as frozen dataclasses whose fields declare their own check.

Every settings class of the library (extractors, the objective, the projector, the distributed
settings, the policies) is a frozen dataclass; each field that needs a check is declared with
``option(default, rule)`` and ``check_options(self)`` in ``__post_init__`` runs every rule in field
order. A rule returns the value to store (a numpy integer becomes an ``int``), so a built object
holds only checked, plain values, and being frozen it stays that way. Choices are ``Literal``
types: ``choice(ScaleRewards)`` accepts exactly the strings of ``ScaleRewards``.

Messages name the call, the rule and the value received:
``GRPOObjective: eps must be >= 0, got -1.0``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from collections.abc import Callable
from dataclasses import field
from typing import Any, get_args

from gradalign._validate import SEED_RANGE, check_choice, check_int
from gradalign.errors import GradAlignError

__all__ = [
    "Rule",
    "boolean",
    "check_options",
    "choice",
    "choices",
    "function",
    "instance",
    "integer",
    "option",
    "real",
    "required",
    "seed_rule",
]

Rule = Callable[[str, str, Any], Any]
"""One field's check: ``rule(call, name, value)`` returns the value to store or raises."""


def option(default: Any, rule: Rule, *, kw_only: bool = False) -> Any:
    """A dataclass field with ``default`` whose value ``rule`` checks in ``check_options``."""
    return field(default=default, metadata={"rule": rule}, kw_only=kw_only)


def required(rule: Rule) -> Any:
    """A dataclass field without a default whose value ``rule`` checks in ``check_options``."""
    return field(metadata={"rule": rule})


def check_options(obj: Any, call: str | None = None) -> None:
    """Run the rule of every field of the dataclass ``obj`` declared with ``option``; store the
    normalized values (also on a frozen dataclass)."""
    call = call or type(obj).__name__
    for f in dataclasses.fields(obj):
        rule = f.metadata.get("rule")
        if rule is None:
            continue
        value = getattr(obj, f.name)
        checked = rule(call, f.name, value)
        if checked is not value:
            object.__setattr__(obj, f.name, checked)


def _plain_int(value: Any) -> Any:
    """numpy integers as Python ints; bools and everything else unchanged (then rejected)."""
    integral = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    return operator.index(value) if integral and not isinstance(value, int) else value


def integer(minimum: int | None = None, maximum: int | None = None, *, none: bool = False) -> Rule:
    """An int (numpy integers accepted, bools refused) within the bounds; None when ``none``."""

    def check(call: str, name: str, value: Any) -> Any:
        return check_int(call, name, _plain_int(value), minimum, maximum, allow_none=none)

    return check


def seed_rule() -> Rule:
    """A seed ``torch.Generator.manual_seed`` accepts: an int from 0 to 2**64 - 1."""
    return integer(*SEED_RANGE)


def real(
    minimum: float | None = None,
    *,
    none: bool = False,
    finite: bool = True,
    ok: Callable[[float], bool] | None = None,
    rule: str | None = None,
) -> Rule:
    """A real number (bools refused), never NaN, finite unless ``finite=False``, ``>= minimum``
    and passing ``ok``. With ``rule`` every failure says ``must be {rule}``; without, each names
    its own condition (a real number, finite, the bound)."""

    def check(call: str, name: str, value: Any) -> Any:
        if value is None and none:
            return None
        or_none = " or None" if none else ""

        def fail(default: str) -> GradAlignError:
            said = rule if rule is not None else default
            return GradAlignError(f"{call}: {name} must be {said}{or_none}, got {value!r}")

        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            if rule is not None:
                raise fail("")
            raise GradAlignError(
                f"{call}: {name} must be a real number{or_none}, got "
                f"{type(value).__name__} {value!r}"
            )
        number = float(value)
        if math.isnan(number) or (finite and math.isinf(number)):
            raise fail("finite" if finite else "a real number, not NaN")
        if minimum is not None and not number >= minimum:
            raise fail(f">= {minimum}")
        if ok is not None and not ok(number):
            raise fail("valid")
        return value if isinstance(value, (int, float)) else number

    return check


def boolean() -> Rule:
    """True or False (not 0/1)."""

    def check(call: str, name: str, value: Any) -> Any:
        if not isinstance(value, bool):
            raise GradAlignError(f"{call}: {name} must be a bool, got {value!r}")
        return value

    return check


def choices(literal: Any) -> tuple[str, ...]:
    """The strings of a ``Literal[...]`` type, in order."""
    values = get_args(literal)
    assert values and all(isinstance(v, str) for v in values), literal
    return values


def choice(literal: Any, *, none: bool = False) -> Rule:
    """One of the strings of the ``Literal`` type ``literal``; None when ``none``."""
    allowed = choices(literal)

    def check(call: str, name: str, value: Any) -> Any:
        if value is None and none:
            return None
        return check_choice(call, name, value, allowed)

    return check


def function(*, none: bool = False) -> Rule:
    """A callable; None when ``none``."""

    def check(call: str, name: str, value: Any) -> Any:
        if (value is None and none) or callable(value):
            return value
        raise GradAlignError(f"{call}: {name} must be callable, got {value!r}")

    return check


def instance(cls: type, what: str, *, none: bool = True) -> Rule:
    """An instance of ``cls`` (named ``what`` in the message); None when ``none``."""

    def check(call: str, name: str, value: Any) -> Any:
        if value is None and none:
            return None
        if not isinstance(value, cls):
            or_none = " or None" if none else ""
            raise GradAlignError(
                f"{call}: {name} must be a {what}{or_none}, got {type(value).__name__}"
            )
        return value

    return check
