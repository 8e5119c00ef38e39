"""Windows console control events (Ctrl+C, Ctrl+Break, the console window closing, log-off,
shutdown), through ctypes: ``SetConsoleCtrlHandler``.

Windows calls each registered routine on a thread of its own, newest first, until one returns
TRUE; the last one (the default) ends the process. A routine that does its work and returns
FALSE therefore chains to the handlers registered before it (Python's own Ctrl+C handler, then
the default). For ``CTRL_CLOSE_EVENT`` Windows ends the process once the routine returns, or
after about 5 s anyway (20 s at shutdown): the work must be quick.

Every call goes through an injectable ``kernel32`` and routine factory, so this module is
unit-tested on any OS.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from typing import Any

__all__ = [
    "CTRL_BREAK_EVENT",
    "CTRL_CLOSE_EVENT",
    "CTRL_C_EVENT",
    "CTRL_LOGOFF_EVENT",
    "CTRL_SHUTDOWN_EVENT",
    "ConsoleEvents",
    "console_event_name",
]

CTRL_C_EVENT = 0
CTRL_BREAK_EVENT = 1
CTRL_CLOSE_EVENT = 2
CTRL_LOGOFF_EVENT = 5
CTRL_SHUTDOWN_EVENT = 6

_NAMES = {
    CTRL_C_EVENT: "CTRL_C_EVENT",
    CTRL_BREAK_EVENT: "CTRL_BREAK_EVENT",
    CTRL_CLOSE_EVENT: "CTRL_CLOSE_EVENT",
    CTRL_LOGOFF_EVENT: "CTRL_LOGOFF_EVENT",
    CTRL_SHUTDOWN_EVENT: "CTRL_SHUTDOWN_EVENT",
}


def console_event_name(event: int) -> str:
    """``"CTRL_CLOSE_EVENT"`` for 2, and so on."""
    return _NAMES.get(event, f"console event {event}")


#: Turns ``callback(event) -> bool`` into something ``SetConsoleCtrlHandler`` accepts (a
#: ``WINFUNCTYPE(BOOL, DWORD)`` on Windows; the callable itself in tests).
RoutineFactory = Callable[[Callable[[int], int]], Any]


class ConsoleEvents:
    """Registers and removes console control routines; keeps each alive while registered
    (ctypes does not: a collected routine would crash the process when Windows calls it).

    ``kernel32`` is ``ctypes.WinDLL("kernel32")`` or a test's stand-in with the one function
    used, ``SetConsoleCtrlHandler(routine, add) -> int``; ``routine_factory`` turns
    ``callback(event) -> int`` into a routine (``WINFUNCTYPE(BOOL, DWORD)`` on Windows).
    """

    def __init__(self, kernel32: Any, routine_factory: RoutineFactory) -> None:
        self._k = kernel32
        self._factory = routine_factory
        self._routines: dict[int, Any] = {}
        self._lock = threading.Lock()

    @classmethod
    def load(cls) -> ConsoleEvents | None:
        """Console events through the real ``kernel32``; None off Windows."""
        windll = getattr(ctypes, "WinDLL", None)
        winfunctype = getattr(ctypes, "WINFUNCTYPE", None)
        if windll is None or winfunctype is None:
            return None
        try:
            kernel32 = windll("kernel32", use_last_error=True)
        except OSError:
            return None
        return cls(kernel32, winfunctype(ctypes.c_int, ctypes.c_uint))

    def add(self, callback: Callable[[int], bool]) -> int:
        """Register ``callback(event) -> handled``; return a token for :meth:`remove`, or -1
        when Windows refused (no console, say)."""

        def routine(event: int) -> int:
            return 1 if callback(int(event)) else 0

        native = self._factory(routine)
        if not self._k.SetConsoleCtrlHandler(native, True):
            return -1
        with self._lock:
            token = id(native)
            self._routines[token] = native
        return token

    def remove(self, token: int) -> None:
        """Unregister the routine :meth:`add` returned ``token`` for (nothing for -1)."""
        with self._lock:
            native = self._routines.pop(token, None)
        if native is not None:
            self._k.SetConsoleCtrlHandler(native, False)
