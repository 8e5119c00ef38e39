"""Turning user-supplied durations (seconds or ``timedelta``) into validated float seconds."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import SupportsFloat

from ._exceptions import InvalidIntervalError, InvalidTimeoutError

__all__ = ["finite", "interval_seconds", "timeout_seconds"]


def finite(value: SupportsFloat) -> bool:
    """``math.isfinite(value)``, False (not ``OverflowError``) for an int too large for a float."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _as_float(value: object) -> float | None:
    # bool is an int subclass; ``interval=True`` is almost certainly a mistake, not 1 second.
    if isinstance(value, bool):
        return None
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, int | float):
        try:
            return float(value)
        except OverflowError:  # an int beyond the largest float
            return None
    return None


def _show(value: object) -> str:
    # repr() of an int of thousands of digits is long, or raises ValueError past 4300 digits.
    if isinstance(value, int) and not isinstance(value, bool) and _as_float(value) is None:
        return "an int too large for a float"
    return repr(value)


def interval_seconds(value: float | timedelta, *, what: str = "interval") -> float:
    """Return ``value`` in seconds.

    Raises :class:`InvalidIntervalError` unless it is a positive, finite number or timedelta.
    """
    seconds = _as_float(value)
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        raise InvalidIntervalError(
            f"{what} must be a positive, finite number of seconds or a timedelta, got "
            f"{_show(value)}"
        )
    return seconds


def timeout_seconds(value: float | timedelta | None, *, what: str = "timeout") -> float | None:
    """Return ``value`` in seconds (``None`` stays ``None``: no limit).

    Raises :class:`InvalidTimeoutError` when it is negative, NaN or not a number. Zero is allowed
    (do not wait at all); ``math.inf`` is allowed and means no limit.
    """
    if value is None:
        return None
    seconds = _as_float(value)
    if seconds is None or math.isnan(seconds) or seconds < 0:
        raise InvalidTimeoutError(
            f"{what} must be a non-negative number of seconds, a timedelta or None, got "
            f"{_show(value)}"
        )
    return None if math.isinf(seconds) else seconds
