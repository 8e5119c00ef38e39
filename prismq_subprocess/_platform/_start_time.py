"""Telling whether two start times read for one pid are of the same process.

psutil gives a process's start time in seconds since the epoch: the kernel's boot time plus the
ticks since boot. On Linux the boot time is ``btime`` in ``/proc/stat``, a whole number of
seconds worked out from the wall clock, so it moves by a second when NTP slews the clock across
one (this VM saw it during a test run): the same process then reads a second later or earlier.
Two readings are of one process if they agree to within the rounding of a tick, after a move of
the boot time by at most ``MAX_BOOT_TIME_MOVE`` whole seconds. A process that reused the pid has
another start, unless it started within a few ticks of a whole second's distance from the first
(which needs the pid numbers to go round within two seconds).
"""

from __future__ import annotations

import sys

__all__ = ["MAX_BOOT_TIME_MOVE", "STARTS_MOVE_WITH_THE_CLOCK", "same_start"]

#: Whether the start times psutil reads move when the wall clock is stepped: on Linux they are
#: the boot time (worked out from the wall clock at each reading) plus the ticks since boot;
#: macOS and Windows keep the wall-clock moment of the start.
STARTS_MOVE_WITH_THE_CLOCK = sys.platform.startswith("linux")

#: How many whole seconds the boot time may have moved between two readings.
MAX_BOOT_TIME_MOVE = 2
#: Agreement within the float rounding of ``ticks / CLK_TCK + btime`` (a tick is 10 ms).
_ROUNDING = 0.005


def same_start(one: float, other: float) -> bool:
    """Whether ``one`` and ``other`` (``psutil.Process.create_time()`` values) are the start of
    the same process, allowing for the boot time having moved by whole seconds between them."""
    apart = abs(one - other)
    if apart > MAX_BOOT_TIME_MOVE + _ROUNDING:
        return False
    return abs(apart - round(apart)) < _ROUNDING
