"""`Distributed` (which process group, how long to wait for a late rank) and how
`GradAlign(distributed=...)` resolves to it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from gradalign._calls import current_call
from gradalign._options import check_options, option
from gradalign.errors import GradAlignError


def _check_timeout(call: str, name: str, value: Any) -> Any:
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    if seconds is not None and (
        isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0
    ):
        raise GradAlignError(f"{call}: {name} must be > 0 seconds or None, got {value!r}")
    return value


@dataclass(frozen=True)
class Distributed:
    """Settings of the multi-process path of [`GradAlign`][gradalign.selector.GradAlign].

    Args:
        group: the process group whose ranks share the selection; None is the default group.
        timeout: seconds (or a ``timedelta``) to wait at each synchronisation point for the
            slowest rank; None uses the group's own timeout (``init_process_group(timeout=...)``).
            It must exceed the largest difference in extraction time between ranks.

    Examples:
        >>> selector = GradAlign(distributed=Distributed(timeout=600))
        >>> selector.distributed.timeout
        600
    """

    group: Any = None
    timeout: float | timedelta | None = option(None, _check_timeout)

    def __post_init__(self) -> None:
        check_options(self)

    @property
    def timedelta(self) -> timedelta | None:
        """The timeout as a ``timedelta`` (None: the group's own)."""
        t = self.timeout
        return t if isinstance(t, timedelta) or t is None else timedelta(seconds=float(t))


def check_distributed_option(call: str, option: Any) -> bool | str | Distributed:
    """Validate a ``distributed=`` argument: "auto", True, False or a [`Distributed`][gradalign.distributed.Distributed]."""
    if option == "auto" or isinstance(option, bool | Distributed):
        return option
    raise GradAlignError(
        f"{call}: distributed must be 'auto', True, False or a gradalign.distributed.Distributed, "
        f"got {option!r}"
    )


def is_distributed(group: Any = None) -> bool:
    """Whether ``torch.distributed`` is initialized with more than one rank in ``group``."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def resolve(option: bool | str | Distributed) -> Distributed | None:
    """The settings to use now, or None for the single-process path.

    "auto" is distributed when [`is_distributed`][gradalign.distributed.is_distributed]; True or a [`Distributed`][gradalign.distributed.Distributed] require an
    initialized ``torch.distributed``; a group of one rank always takes the single-process path.
    """
    if option is False:
        return None
    settings = option if isinstance(option, Distributed) else Distributed()
    initialized = dist.is_available() and dist.is_initialized()
    if not initialized:
        if option == "auto":
            return None
        raise GradAlignError(
            f"{current_call('GradAlign')}: distributed={option!r} but torch.distributed is not "
            "initialized; call torch.distributed.init_process_group first or pass "
            "distributed=False"
        )
    return settings if dist.get_world_size(settings.group) > 1 else None
