"""Letting the event loop run while a worker thread walks the process table.

A look at the process table reads one or two small files per process: with 1,000 processes on
the host that is 10 to 30 ms of Python in a stop's worker thread. That thread gives up the GIL
around each system call but takes it straight back, before a waiting thread has even woken up;
so the event loop's thread gets the GIL only when CPython forces a switch, after
``sys.getswitchinterval()`` (5 ms by default). Every tick of the loop during the look came that
late. A :class:`GilShare` called once per item of such a walk sleeps briefly every half
millisecond of work, and a waiting thread takes the GIL in that moment.
"""

from __future__ import annotations

import asyncio
import time

__all__ = ["GilShare"]

#: Work between two pauses (seconds).
_SLICE = 0.0005
#: A pause: long enough for a thread woken by the GIL's release to take it.
_PAUSE = 0.0001
#: (Names of this module's own, so tests can replace them without touching ``time``.)
_sleep = time.sleep
_clock = time.perf_counter


class GilShare:
    """Call once per item of a long loop; pauses ``_PAUSE`` after every ``_SLICE`` of work.

    On a thread that runs an event loop it never pauses: there the pause itself would be the
    stall (a synchronous clean-up that looks at the table from the loop's own thread).
    """

    __slots__ = ("_next", "_on")

    def __init__(self) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self._on = True
        else:
            self._on = False
        self._next = _clock() + _SLICE

    def __call__(self) -> None:
        if self._on and _clock() >= self._next:
            _sleep(_PAUSE)
            self._next = _clock() + _SLICE
