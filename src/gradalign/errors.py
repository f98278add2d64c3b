"""Exceptions raised by gradalign.

Every check on user input raises [`GradAlignError`][gradalign.errors.GradAlignError]. Its message names the call, the rule that was
broken and the value received, e.g. ``Rollouts: group_ids has 12 entries but input_ids has 16 rows``.
"""

from __future__ import annotations

__all__ = ["GradAlignError"]


class GradAlignError(ValueError):
    """Bad input to a gradalign call (a ``ValueError``, so existing handlers keep working).

    Examples:
        >>> import gradalign as ga
        >>> try:
        ...     ga.FactorizedGradient(dim_in=0)
        ... except ga.GradAlignError as err:  # a ValueError
        ...     print(err)
        FactorizedGradient: dim_in must be an int >= 1 or None, got 0
    """
