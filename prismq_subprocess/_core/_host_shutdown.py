"""Stopping every child tree when the host itself is told to end: :class:`ShutdownHandler`.

Children run in sessions of their own (so a tree stop can reach their whole group), which also
means a signal sent to the host's process group never reaches them: a host ended by SIGTERM
without clean-up leaves them running. SIGINT is different only because ``asyncio.run`` turns it
into a cancellation, which closes everything on the way out.

The handler is opt-in (a library should not take a process-wide signal behind its host's back)
and cooperative: on the signal it stops the trees of every live :class:`SubprocessWrapper` and
``ModuleRunner`` in the process (each of them takes part here when it is made), lets the runners
record their runs CANCELLED with the reason, all within a bounded time, and then hands the
signal on to whatever handled it before (uvicorn's handler, ``asyncio.run``'s, or the default
action, which ends the process). On Windows the console events (Ctrl+Break, the console window
closing, log-off, shutdown) are handled the same way, through the platform layer.
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Any, Protocol

from .._platform import IS_WINDOWS, platform_ops
from .._platform._console import (
    CTRL_BREAK_EVENT,
    CTRL_CLOSE_EVENT,
    CTRL_SHUTDOWN_EVENT,
    ConsoleEvents,
    console_event_name,
)
from .._platform._orphans import ProcessIdentity
from ._exceptions import InvalidArgumentTypeError, InvalidTimeoutError, ShutdownHandlerError
from ._process import ProcessLike
from ._tree_stop import DEFAULT_GRACE_PERIOD, _known
from ._validation import check_timeout, reason_text

__all__ = [
    "ShutdownHandler",
    "child_identity",
    "install_shutdown_handler",
    "stop_for_host_shutdown",
    "take_part_in_host_shutdown",
]

logger = logging.getLogger(__name__)

#: After the grace period the trees are killed; recording the runs gets this much longer.
RECORD_SECONDS = 2.0
#: The most grace a ``CTRL_CLOSE_EVENT`` gets, whatever was configured: Windows ends a closing
#: console's process about 5 s after the event, and the kill must come before that.
CLOSE_GRACE = 3.0
#: How long the console thread waits for that stop before it kills from its own thread (the
#: loop may be too busy to) and returns: still before Windows' 5 s.
CLOSE_WAIT = 4.0


class HostShutdownParticipant(Protocol):
    """An object whose children the host shutdown stops (wrappers, module runners)."""

    def _host_claims(self) -> Iterable[ProcessLike]:
        """Children it stops itself, with its own bookkeeping (nobody else stops them)."""
        ...

    async def _host_stop(self, reason: str, claimed: frozenset[int]) -> None:
        """Stop its children (not those whose ``id()`` is in ``claimed``) and record what it
        records; ``reason`` says why."""
        ...

    def _host_kill(self) -> None:
        """Kill every child it has at once (the grace period is over)."""
        ...


_PARTICIPANTS: weakref.WeakSet[Any] = weakref.WeakSet()


def take_part_in_host_shutdown(participant: HostShutdownParticipant) -> None:
    """Have ``participant`` stopped by the host shutdown while it lives (held weakly)."""
    _PARTICIPANTS.add(participant)


def child_identity(process: ProcessLike) -> ProcessIdentity | None:
    """The identity (pid, start time, containment cookie) of a child we spawned, for a run
    registry to keep; None without a cookie (nothing could prove it ours later).

    A child already gone (a shell that started a daemon and exited) gets the start 0.0,
    which is no process's: a later check finds its pid gone (the cookie then finds what it
    left running) or taken by another process, which is never touched (not even by a stop
    that takes a matching start alone as proof; a start noted at the spawn could match a
    stranger's to the tick).
    """
    child = _known(process)
    if child is None or child.containment is None or child.containment.cookie is None:
        return None
    variable = platform_ops().containment_report().cookie_variable
    if variable is None:
        return None
    identity = ProcessIdentity.of(process.pid, variable, child.containment.cookie)
    if identity is None:
        identity = ProcessIdentity(process.pid, 0.0, f"{variable}={child.containment.cookie}")
    return identity


async def stop_for_host_shutdown(
    reason: str = "host shutting down", *, grace: float = DEFAULT_GRACE_PERIOD
) -> None:
    """Stop the child trees of every live ``SubprocessWrapper`` and ``ModuleRunner`` in this
    process and record the runs; return within about ``grace`` + 2 seconds.

    Each runner cancels its runs with ``reason`` (they are recorded CANCELLED, the trees stopped
    by their usual stop: SIGTERM, its grace period, SIGKILL); each wrapper stops its other
    children. Whatever is still running after ``grace`` seconds is killed at once, and the runs
    then get 2 more seconds to be recorded. The wrappers and runners stay open. This is what
    :class:`ShutdownHandler` does on a signal; call it yourself from your own handler.

    Cancellation: the trees still running are killed at once, then ``CancelledError``
    propagates.

    Raises:
        InvalidTimeoutError: ``grace`` is negative.
        InvalidArgumentTypeError: ``reason`` is not a str a registry can record (each run's
            cancel refused it, and nothing stopped).
    """
    reason = reason_text(reason)
    grace = check_timeout(grace, "grace") or 0.0
    participants: list[HostShutdownParticipant] = list(_PARTICIPANTS)
    if not participants:
        return
    claimed = frozenset(id(p) for part in participants for p in part._host_claims())
    tasks = [asyncio.ensure_future(part._host_stop(reason, claimed)) for part in participants]
    try:
        _, pending = await asyncio.wait(tasks, timeout=grace)
        if pending:
            logger.warning(
                "host shutdown: children still running after %.3g s; killing them", grace
            )
            _kill_all(participants)
            _, pending = await asyncio.wait(pending, timeout=RECORD_SECONDS)
            for task in pending:
                task.cancel()
    except BaseException:
        _kill_all(participants)
        raise
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            logger.error("host shutdown: a stop failed", exc_info=task.exception())


def _kill_all(participants: Sequence[HostShutdownParticipant]) -> None:
    for part in participants:
        try:
            part._host_kill()
        except Exception:
            logger.exception("host shutdown: killing the children of %r failed", part)


@dataclass
class _Previous:
    """What handled a signal before us."""

    #: ``signal.getsignal()``: a callable, ``SIG_DFL``, ``SIG_IGN`` or None (not set from Python).
    handler: Any
    #: A handler installed through ``loop.add_signal_handler`` on our loop (callback, args).
    loop_callback: tuple[Callable[..., Any], tuple[Any, ...]] | None = None
    #: How we are installed for this signal: ``"loop"`` or ``"signal"``.
    via: str = "signal"
    #: The loop hands the signal to a handler of its own table itself (see ``_install_one``).
    loop_dispatches: bool = False


def _default_signals() -> tuple[int, ...]:
    return (int(signal.SIGTERM),)


class ShutdownHandler:
    """Stops every child tree (and records the runs) when the host receives SIGTERM, then hands
    the signal on to the handler that was there before. Opt-in: nothing is installed until
    :meth:`install` (or :func:`install_shutdown_handler`).

    Use it from the event loop that runs your children, e.g. in a FastAPI lifespan (see
    docs/LIFECYCLE.md, "Host shutdown")::

        @contextlib.asynccontextmanager
        async def lifespan(app):
            with pq.install_shutdown_handler(grace=5.0):
                yield

    On the signal (in the loop, through ``loop.add_signal_handler``; through ``signal.signal``
    where the loop cannot, e.g. Windows' Proactor loop or a thread's loop): runs
    :func:`stop_for_host_shutdown` with the reason ``"host received SIGTERM"``, bounded by
    ``grace`` + 2 s, then chains: calls the previous Python handler (uvicorn's ``handle_exit``,
    ``asyncio.run``'s SIGINT handler, a handler installed with ``loop.add_signal_handler``),
    does nothing for ``SIG_IGN``, or for the default action uninstalls itself and raises the
    signal again so the process ends as it would have. A second signal during the stop kills the
    trees at once and chains at once.

    On Windows the console events ``CTRL_BREAK_EVENT``, ``CTRL_CLOSE_EVENT`` and
    ``CTRL_SHUTDOWN_EVENT`` are handled too (``console_events``): Windows calls the handler on a
    thread of its own, which waits (bounded) for the stop and then lets the previous handlers
    run. Windows ends a closing console's process about 5 s after the event, whatever runs, so
    for ``CTRL_CLOSE_EVENT`` the grace is at most 3 s (the trees are killed then) and the
    handler returns within 4 s.

    Installing is idempotent (a second :meth:`install` does nothing); :meth:`uninstall`
    restores the previous handlers and returns them. ``with handler:`` installs and
    uninstalls. Both need the main thread.

    Args:
        signals: the signals to handle (default: SIGTERM); one given twice counts once.
        grace: seconds the trees get to stop before they are killed.
        console_events: the Windows console events to handle (ignored elsewhere).
        console: the Windows console layer (tests inject one; default: the real one on
            Windows, none elsewhere).

    Raises:
        InvalidTimeoutError: ``grace`` is negative or not finite.
        InvalidArgumentTypeError: ``signals`` or ``console_events`` are not ints.
        ShutdownHandlerError: a signal cannot be handled (not a signal of this platform,
            SIGKILL, SIGSTOP).
    """

    def __init__(
        self,
        signals: Iterable[int] | None = None,
        *,
        grace: float = DEFAULT_GRACE_PERIOD,
        console_events: Iterable[int] = (CTRL_BREAK_EVENT, CTRL_CLOSE_EVENT, CTRL_SHUTDOWN_EVENT),
        console: ConsoleEvents | None = None,
    ) -> None:
        self.grace = check_timeout(grace, "grace") or 0.0
        if math.isinf(self.grace):
            # The stop is bounded by grace + 2 s, and Windows' console thread waits that long.
            raise InvalidTimeoutError("grace must be a finite number of seconds, got inf")
        self.signals = _ints(_default_signals() if signals is None else signals, "signals")
        for sig in self.signals:
            _check_catchable(sig)
        self.console_events = _ints(console_events, "console_events")
        self._console = (
            console if console is not None else (ConsoleEvents.load() if IS_WINDOWS else None)
        )
        self._console_token = -1
        self._previous: dict[int, _Previous] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        # A second signal passed the signal on already: the running stop must not do it again.
        # It belongs to that one stop; the next stop starts without it.
        self._escalated = False

    # -- state ----------------------------------------------------------------------------------
    @property
    def installed(self) -> bool:
        """True between :meth:`install` and :meth:`uninstall`."""
        return self._loop is not None

    def __repr__(self) -> str:
        names = ", ".join(_signal_name(s) for s in self.signals)
        return f"<ShutdownHandler [{names}] grace={self.grace:g} installed={self.installed}>"

    def __enter__(self) -> ShutdownHandler:
        return self.install()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.uninstall()

    # -- installing -----------------------------------------------------------------------------
    def install(self) -> ShutdownHandler:
        """Handle the signals from now on (from the running event loop); return self. Idempotent.

        Raises:
            ShutdownHandlerError: no running event loop, not the main thread (signal handlers
                are process-wide and Python sets them from the main thread only), or another
                ShutdownHandler is installed.
        """
        global _INSTALLED
        with _INSTALL_LOCK:
            _drop_stale()
            if self.installed:
                return self
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                raise ShutdownHandlerError(
                    "install the shutdown handler from a coroutine of the event loop that runs "
                    "your children (e.g. in a FastAPI lifespan)"
                ) from None
            _check_main_thread("installed")
            if _INSTALLED is not None:
                raise ShutdownHandlerError(
                    f"{_INSTALLED!r} is installed already; uninstall it first (one per process: "
                    "signal handlers are process-wide)"
                )
            self._loop = loop
            self._task = None
            self._escalated = False
            try:
                for sig in self.signals:
                    self._previous[sig] = self._install_one(loop, sig)
                if self._console is not None and self.console_events:
                    self._console_token = self._console.add(self._on_console_event)
            except BaseException:
                self._restore()
                raise
            _INSTALLED = self
        logger.debug("%r installed", self)
        return self

    def _install_one(self, loop: asyncio.AbstractEventLoop, sig: int) -> _Previous:
        previous = _Previous(signal.getsignal(sig))
        # A handler another party installed through loop.add_signal_handler lives in the loop's
        # table (a CPython detail), not in signal.getsignal(): keep it to chain and restore.
        table = getattr(loop, "_signal_handlers", None)
        handle = table.get(sig) if isinstance(table, dict) else None
        if handle is not None and hasattr(handle, "_callback"):
            previous.loop_callback = (handle._callback, tuple(handle._args or ()))
        if _is_ours(previous.handler) or (
            previous.loop_callback is not None and _is_ours(previous.loop_callback[0])
        ):
            # Chaining to a handler of ours would call it again, for ever, and restoring it
            # would leave it installed: what ours replaced is unknown, so the default stands in.
            previous = _Previous(signal.SIG_DFL)
        elif not isinstance(table, dict) and getattr(previous.handler, "__self__", None) is loop:
            # A loop that keeps its table to itself (uvloop): a handler installed through its
            # add_signal_handler sits behind the Python-level handler the loop set (a method of
            # the loop). Replacing it through add_signal_handler would drop it for good (it can
            # be neither chained nor restored). Ours goes in front through signal.signal and the
            # entry stays: the loop still hands the signal to it at once (from its own wakeup
            # descriptor), so chaining must not call it again; uninstalling puts it back.
            previous.loop_dispatches = True
            signal.signal(sig, self._from_signal)
            return previous
        try:
            loop.add_signal_handler(sig, self._on_signal, sig)
            previous.via = "loop"
        except (NotImplementedError, RuntimeError, ValueError):
            # Windows' loops have no add_signal_handler: a plain handler hands over to the loop.
            signal.signal(sig, self._from_signal)
        return previous

    def uninstall(self) -> dict[int, Any]:
        """Restore the previous handlers; return them by signal number (what
        ``signal.getsignal`` gave for each before :meth:`install`). Idempotent ({} when not
        installed).

        A handler that could not be restored is left out of the result and logged.

        Raises:
            ShutdownHandlerError: not the main thread (Python sets signal handlers from the main
                thread only); the handler stays installed, and uninstalling it from the main
                thread restores the previous handlers.
        """
        global _INSTALLED
        with _INSTALL_LOCK:
            if not self.installed:
                return {}
            _check_main_thread("uninstalled")
            restored = self._restore()
            if _INSTALLED is self:
                _INSTALLED = None
        return restored

    def _restore(self) -> dict[int, Any]:
        loop = self._loop
        restored: dict[int, Any] = {}
        for sig, previous in self._previous.items():
            try:
                self._restore_one(loop, sig, previous)
            except Exception:
                logger.exception("%r: restoring the handler of %s failed", self, _signal_name(sig))
                continue
            restored[sig] = previous.handler
        self._previous = {}
        if self._console is not None and self._console_token != -1:
            self._console.remove(self._console_token)
            self._console_token = -1
        self._loop = None
        return restored

    @staticmethod
    def _restore_one(loop: asyncio.AbstractEventLoop | None, sig: int, previous: _Previous) -> None:
        if previous.via == "loop" and loop is not None and not loop.is_closed():
            loop.remove_signal_handler(sig)
            if previous.loop_callback is not None:
                callback, args = previous.loop_callback
                loop.add_signal_handler(sig, callback, *args)
                return
        handler = previous.handler
        if handler is None or previous.loop_callback is not None:
            # Unknown, or a closed loop's no-op (its callback can no longer run).
            handler = signal.SIG_DFL
        signal.signal(sig, handler)

    # -- receiving ------------------------------------------------------------------------------
    def _from_signal(self, signum: int, frame: FrameType | None) -> None:
        """A plain ``signal.signal`` handler: runs between two bytecodes of the main thread,
        so it only hands the signal to the loop."""
        loop = self._loop
        if loop is None or loop.is_closed():
            self._kill_now_and_chain(signum)
            return
        try:
            loop.call_soon_threadsafe(self._on_signal, signum)
        except RuntimeError:  # the loop closed meanwhile
            self._kill_now_and_chain(signum)

    def _on_signal(self, signum: int) -> None:
        """In the loop: start the stop; a second signal during it kills and chains at once."""
        reason = f"host received {_signal_name(signum)}"
        if self._task is not None and not self._task.done():
            logger.warning("%s again during the shutdown stop: killing the trees now", reason)
            self._escalated = True
            self._kill_now_and_chain(signum)
            return
        logger.warning("%s: stopping every child tree before passing it on", reason)
        self._escalated = False
        self._task = asyncio.ensure_future(self._stop_then_chain(signum, reason))

    async def _stop_then_chain(self, signum: int, reason: str) -> None:
        try:
            await stop_for_host_shutdown(reason, grace=self.grace)
        finally:
            if not self._escalated:
                # From a loop callback rather than this task: a SystemExit or KeyboardInterrupt
                # the previous handler raises then ends the loop as from any signal callback,
                # instead of also being kept in a task nobody awaits ("never retrieved").
                asyncio.get_running_loop().call_soon(self._chain, signum)

    def _kill_now_and_chain(self, signum: int) -> None:
        _kill_all(list(_PARTICIPANTS))
        self._chain(signum)

    def _chain(self, signum: int) -> None:
        previous = self._previous.get(signum)
        if previous is None:
            return  # uninstalled meanwhile: the signal was handled by the stop
        if previous.loop_dispatches:
            return  # the loop handed it to its handler already
        try:
            if previous.loop_callback is not None:
                callback, args = previous.loop_callback
                callback(*args)
                return
            handler = previous.handler
            if callable(handler):
                handler(signum, None)
                return
        except Exception:
            # The trees are stopped; a failing handler is the host's bug, not a reason to lose
            # it (it would end in a task nobody awaits, or in the middle of the main thread).
            logger.exception(
                "host shutdown: the previous handler of %s raised", _signal_name(signum)
            )
            return
        if handler == signal.SIG_IGN:
            return
        # The default action: end the process as the signal would have, now that the children
        # are stopped and recorded.
        self.uninstall()
        signal.raise_signal(signum)

    def _on_console_event(self, event: int) -> bool:
        """Windows calls this on a thread of its own: ask the loop for the stop, wait for it
        (bounded), then return False so the previous handlers run (the last one ends us)."""
        if event not in self.console_events:
            return False
        loop = self._loop
        if loop is None or loop.is_closed():
            _kill_all(list(_PARTICIPANTS))
            return False
        done = threading.Event()
        reason = f"host received {console_event_name(event)}"
        grace, wait = self.grace, self.grace + RECORD_SECONDS + 1.0
        if event == CTRL_CLOSE_EVENT:
            # Windows ends us about 5 s after this event: a kill after that never comes.
            grace, wait = min(grace, CLOSE_GRACE), min(wait, CLOSE_WAIT)

        def start() -> None:
            task = asyncio.ensure_future(stop_for_host_shutdown(reason, grace=grace))
            task.add_done_callback(lambda _t: done.set())

        try:
            loop.call_soon_threadsafe(start)
        except RuntimeError:
            _kill_all(list(_PARTICIPANTS))
            return False
        if not done.wait(wait):
            _kill_all(list(_PARTICIPANTS))
        return False


_INSTALLED: ShutdownHandler | None = None
_INSTALL_LOCK = threading.RLock()


def _drop_stale() -> None:
    # A handler whose loop has closed without uninstalling it: closing a loop removes its
    # signal handlers (leaving the default action), so restore what was there before ours.
    # Only the main thread can restore signal handlers; elsewhere the caller fails on its own
    # main-thread check instead.
    installed = _INSTALLED
    if installed is not None and _is_stale(installed) and _on_main_thread():
        logger.warning("%r: its event loop closed without uninstalling it; uninstalled", installed)
        installed.uninstall()


def _is_stale(handler: ShutdownHandler) -> bool:
    return handler._loop is not None and handler._loop.is_closed()


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _check_main_thread(what: str) -> None:
    if not _on_main_thread():
        raise ShutdownHandlerError(
            f"the shutdown handler can only be {what} from the main thread (Python sets signal "
            "handlers there only)"
        )


def install_shutdown_handler(
    signals: Iterable[int] | None = None,
    *,
    grace: float = DEFAULT_GRACE_PERIOD,
    console_events: Iterable[int] | None = None,
) -> ShutdownHandler:
    """Install the process's :class:`ShutdownHandler` (from a coroutine of the loop that runs
    your children) and return it; when one is installed already, return that one (idempotent:
    handlers never stack). ``handler.uninstall()`` (or ``with install_shutdown_handler():``)
    restores the previous handlers.

    Raises:
        ShutdownHandlerError: no running event loop, not the main thread, or a signal that
            cannot be handled.
        InvalidTimeoutError: ``grace`` is negative or not finite.
    """
    with _INSTALL_LOCK:
        _drop_stale()
        if _INSTALLED is not None and not _is_stale(_INSTALLED):
            return _INSTALLED
        if console_events is None:
            return ShutdownHandler(signals, grace=grace).install()
        return ShutdownHandler(signals, grace=grace, console_events=console_events).install()


def installed_shutdown_handler() -> ShutdownHandler | None:
    """The installed :class:`ShutdownHandler`, if any."""
    return _INSTALLED


def _ints(values: Iterable[int], what: str) -> tuple[int, ...]:
    try:
        items = tuple(values)
    except TypeError:
        raise InvalidArgumentTypeError(f"{what} must be an iterable of ints") from None
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int):
            raise InvalidArgumentTypeError(f"{what} must hold ints, got {item!r}")
    # Each once: a signal given twice would find our own handler as the one to pass it on to.
    return tuple(dict.fromkeys(int(i) for i in items))


#: Signals no process can catch.
_UNCATCHABLE = frozenset(
    int(getattr(signal, name)) for name in ("SIGKILL", "SIGSTOP") if hasattr(signal, name)
)


def _check_catchable(sig: int) -> None:
    if sig in _UNCATCHABLE or sig not in {int(s) for s in signal.valid_signals()}:
        raise ShutdownHandlerError(
            f"{_signal_name(sig)} cannot be handled: not a signal of this platform, or one no "
            "process can catch"
        )


def _is_ours(callback: object) -> bool:
    return isinstance(getattr(callback, "__self__", None), ShutdownHandler)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
