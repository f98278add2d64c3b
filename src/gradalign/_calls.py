"""Private: which public call is running, so that errors raised deep inside name it.

``@api_call("GradAlign.select")`` marks a public entry point; `current_call` returns the
outermost one running now (``GradAlign.select`` when ``select`` calls ``targets``).
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

_P = ParamSpec("_P")
_R = TypeVar("_R")
_CALL: contextvars.ContextVar[str | None] = contextvars.ContextVar("gradalign_call", default=None)


def current_call(default: str) -> str:
    """The outermost public call running now (errors name it), else ``default``."""
    return _CALL.get() or default


def api_call(name: str) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """Decorator: errors raised below this call name ``name`` unless an outer call is named."""

    def wrap(fn: Callable[_P, _R]) -> Callable[_P, _R]:
        @functools.wraps(fn)
        def inner(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            token = _CALL.set(_CALL.get() or name)
            try:
                return fn(*args, **kwargs)
            finally:
                _CALL.reset(token)

        return inner

    return wrap
