"""Clean-up that runs to its end inside a cancelled anyio cancel scope.

asyncio cancels a task once: the ``CancelledError`` is raised at one ``await``, and the clean-up
that follows (stopping a tree with its grace period, waiting for the child, recording the run)
runs undisturbed. anyio (and so FastAPI and Starlette, which run request handlers and background
tasks under anyio) cancels level-triggered: once a cancel scope is cancelled, every ``await``
inside it raises ``CancelledError`` again until the scope is left, and only a scope entered with
``shield=True`` keeps it out. Without that shield our clean-up was cut short at its first await:
a child never got its SIGTERM and grace period, a stop did not wait for the child, a run was
recorded without its exit status, a ``terminate_gracefully()`` in a ``finally`` block returned at
once and left a child that ignores SIGTERM running.

:func:`shielded_if_cancelled` gives the clean-up the shield trio and anyio give their own
(``Process.aclose()``), only when the calling task sits in a cancelled anyio scope: plain asyncio
code never imports anyio for it and keeps its edge-triggered semantics (a second
``task.cancel()`` still reaches the clean-up; anyio's shield does not stop asyncio's
cancellations). The clean-up it shields is bounded (a grace period, the drain time, a registry
write), so a shielded clean-up never hangs the scope for longer than that.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
import sys
from collections.abc import Collection, Iterator
from typing import Any

__all__ = [
    "anyio_cancelled",
    "cleaning_up_after_a_cancel",
    "shielded_if_cancelled",
    "wait_all_or_cancel",
]

# True inside a block that shielded_if_cancelled() did shield: there the scope no longer looks
# cancelled (the shield hides it), yet the clean-up inside still runs on a cancelled caller's
# time, and a nested clean-up must keep its own bounds (see cleaning_up_after_a_cancel()).
_SHIELDING: contextvars.ContextVar[bool] = contextvars.ContextVar("prismq_shielding", default=False)


def anyio_cancelled() -> bool:
    """Whether the calling task is inside an anyio cancel scope that has been cancelled (and
    no shielded scope in between): every ``await`` of it would raise ``CancelledError``."""
    anyio = sys.modules.get("anyio")
    if anyio is None:  # nobody imported anyio, so no anyio scope can be around us
        return False
    try:
        return bool(anyio.current_effective_deadline() == -math.inf)
    except Exception:  # not on an event loop anyio knows: no anyio scope either
        return False


# What the block runs in when no anyio scope is cancelled: one shared object, so the common case
# (every run's clean-up) costs no generator or context object per call.
_AS_IS: contextlib.AbstractContextManager[None] = contextlib.nullcontext()


def cleaning_up_after_a_cancel() -> bool:
    """Whether the calling task is in a cancelled anyio scope, or inside a clean-up that
    :func:`shielded_if_cancelled` shielded from one (where :func:`anyio_cancelled` answers
    ``False``: the shield hides the scope). A clean-up that may wait without end bounds its
    wait when this is true, so a cancelled scope is never held for long."""
    return _SHIELDING.get() or anyio_cancelled()


@contextlib.contextmanager
def _shield() -> Iterator[Any]:
    """``anyio.CancelScope(shield=True)`` that also marks its block (``_SHIELDING``), and lets
    a new cancellation of a scope around it through once, as asyncio's second cancellation
    (see :func:`_watch_enclosing`)."""
    token = _SHIELDING.set(True)
    try:
        with sys.modules["anyio"].CancelScope(shield=True) as scope:
            watch = _watch_enclosing(scope)
            try:
                yield scope
            finally:
                if watch is not None:
                    watch.end()
    finally:
        _SHIELDING.reset(token)


def _watch_enclosing(shield: Any) -> _Watch | None:
    """A watch that cancels the calling task once (``task.cancel()``) when one of the scopes
    around ``shield`` is cancelled that was not when the shield was entered; None when there
    is none to watch.

    The shield keeps out the cancellation that started the clean-up, and with it every other:
    an outer scope cancelled meanwhile (a request's deadline, a client that left, a server
    shutting down) would wait for the whole clean-up, grace period included. That is the
    second cancellation, which kills what is left at once. It is delivered as asyncio delivers
    a second ``task.cancel()``, once (edge-triggered), because that is what every clean-up here
    handles: it kills, then still waits for the child, unhindered. (Cancelling the shielded
    scope instead would be level-triggered: every later await of the clean-up would fail too.)
    anyio has no hook for a scope's cancellation, so the scopes are looked at every 50 ms (and
    at a deadline when one is due sooner); they are found through the scope's parent link,
    anyio's own attribute: where it is missing nothing is watched, and the clean-up keeps its
    bound as before.
    """
    around = []
    parent = getattr(shield, "_parent_scope", None)
    while parent is not None:
        around.append(parent)
        if getattr(parent, "shield", True):
            break  # nothing beyond a shielded scope can cancel us
        parent = getattr(parent, "_parent_scope", None)
    # A scope inside one that is cancelled is cancelled already, whether or not it was told
    # (a task group's scope is, when a member then fails): only those beyond the outermost
    # cancelled one bring a new cancellation.
    cancelled = [i for i, scope in enumerate(around) if getattr(scope, "cancel_called", True)]
    watched = around[cancelled[-1] + 1 :] if cancelled else around
    if not watched:
        return None
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # (anyio on trio: the library's own work always runs on asyncio)
        return None
    task = asyncio.current_task()
    return None if task is None else _Watch(loop, task, watched)


class _Watch:
    """Looks at ``watched`` every 50 ms (sooner when a deadline is due), from loop callbacks
    rather than a task: nothing is left pending once :meth:`cancel` is called."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any], watched: list[Any]
    ) -> None:
        self._loop = loop
        self._task = task
        self._watched = watched
        self._fired = False
        self._handle: asyncio.Handle = loop.call_soon(self._look)

    def _look(self) -> None:
        now = self._loop.time()
        pause = _WATCH_EVERY
        for scope in self._watched:
            deadline = scope.deadline
            if scope.cancel_called or deadline <= now:
                self._fired = True
                # In the words anyio cancels with, so the scope takes the CancelledError for
                # its own when it reaches it (and ends it there, as after its own delivery).
                self._task.cancel(f"Cancelled via cancel scope {id(scope):x}")
                return
            pause = min(pause, deadline - now)
        self._handle = self._loop.call_later(pause, self._look)

    def end(self) -> None:
        """The shielded block is over: stop looking, and withdraw the cancel request made, if
        any, from the task's count (whether the clean-up let its ``CancelledError`` out or
        handled it): anyio's scopes around tell their own cancellations from foreign ones by
        that count."""
        self._handle.cancel()
        if self._fired:
            self._task.uncancel()


_WATCH_EVERY = 0.05


def shielded_if_cancelled() -> contextlib.AbstractContextManager[Any]:
    """A context manager: ``anyio.CancelScope(shield=True)`` when the calling task is in a
    cancelled anyio scope (see :func:`anyio_cancelled`); otherwise one that does nothing.

    The cancellation is not lost: once the block ends, the scope's next ``await`` raises again
    (and the ``CancelledError`` being handled, if any, propagates as before).
    """
    if not anyio_cancelled():
        return _AS_IS
    return _shield()


async def wait_all_or_cancel(tasks: Collection[asyncio.Task[Any]]) -> None:
    """Wait until every one of ``tasks`` is done. Cancelled meanwhile: cancel them all, wait
    until they have ended (their clean-up ran), then let ``CancelledError`` propagate.

    Call it in the body of the ``asyncio.TaskGroup`` that owns ``tasks``, instead of leaving
    the wait to the group's exit: inside a cancelled anyio scope the group's exit is cancelled
    again at every loop iteration, and it waits again every time, so the loop spins at full
    speed for as long as the children's clean-up lasts. Here the wait for their ends is
    shielded from such a scope (see :func:`shielded_if_cancelled`). asyncio's own second
    cancellation still reaches it, and the group's exit then waits for the children as usual.
    """
    if not tasks:
        return
    try:
        await asyncio.wait(tasks)
    except asyncio.CancelledError:
        for task in tasks:
            task.cancel()
        with shielded_if_cancelled():
            await asyncio.wait(tasks)
        raise
