"""Durations given as seconds or ``timedelta``: a float, or our specific error, never a bare one."""

from __future__ import annotations

import math
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

import prismq_subprocess as pq
from prismq_subprocess._core._durations import interval_seconds, timeout_seconds
from prismq_subprocess.exceptions import InvalidIntervalError, InvalidTimeoutError

# Ints beyond the largest float: float() of them raised a bare OverflowError (and formatting one
# of 5000 digits for the message would raise ValueError).
HUGE = [10**309, -(10**309), 10**5000]


@pytest.mark.parametrize("value", HUGE, ids=["1e309", "-1e309", "5000-digits"])
def test_an_int_too_large_for_a_float_is_our_error(value: int) -> None:
    with pytest.raises(InvalidIntervalError) as interval:
        interval_seconds(value)
    assert isinstance(interval.value, ValueError)
    assert len(str(interval.value)) < 200
    with pytest.raises(InvalidTimeoutError) as timeout:
        timeout_seconds(value)
    assert isinstance(timeout.value, ValueError)
    assert len(str(timeout.value)) < 200


def test_public_schedulers_refuse_a_huge_interval() -> None:
    with pytest.raises(InvalidIntervalError):
        pq.PeriodicTask("huge", 10**400, lambda: None)
    with pytest.raises(InvalidIntervalError):
        pq.MemoryMonitor(check_interval=10**400)


@given(
    st.one_of(
        st.integers(),
        st.floats(allow_nan=True, allow_infinity=True),
        st.timedeltas(),
        st.booleans(),
        st.none(),
        st.text(max_size=3),
    )
)
def test_any_value_gives_seconds_or_our_error(value: object) -> None:
    try:
        seconds = interval_seconds(value)  # type: ignore[arg-type]
    except InvalidIntervalError:
        pass
    else:
        assert math.isfinite(seconds) and seconds > 0
    try:
        limit = timeout_seconds(value)  # type: ignore[arg-type]
    except InvalidTimeoutError:
        pass
    else:
        assert limit is None or (math.isfinite(limit) and limit >= 0)


def test_ordinary_values_still_pass() -> None:
    assert interval_seconds(2) == 2.0
    assert interval_seconds(timedelta(milliseconds=5)) == 0.005
    assert timeout_seconds(0) == 0.0
    assert timeout_seconds(math.inf) is None
    assert timeout_seconds(None) is None
