"""Blocking calls of user code in a daemon thread each, awaited from the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from collections.abc import Callable, Mapping
from typing import Any

from ._event_loop import running_asyncio_loop

__all__ = ["call_in_daemon_thread"]


async def call_in_daemon_thread(
    func: Callable[..., object], args: tuple[Any, ...], kwargs: Mapping[str, Any], name: str
) -> object:
    """Call ``func(*args, **kwargs)`` in a new daemon thread and await its result.

    Like ``asyncio.to_thread`` (the caller's context variables are copied), except that the
    thread is a daemon of its own: a call that never returns is abandoned when the awaiting
    task is cancelled and holds up neither ``asyncio.run()`` nor interpreter exit. Whatever
    the call raises, ``SystemExit``, ``KeyboardInterrupt`` and ``GeneratorExit`` included, is
    raised here (a ``StopIteration`` as a ``RuntimeError`` caused by it).

    Cancellation: stops waiting; the call goes on in its thread and its result is dropped.

    Raises:
        NoRunningLoopError: called outside asyncio (trio); nothing was called.
    """
    loop = running_asyncio_loop()
    # The outcome travels as a result and is raised here, in this frame: a future refuses a
    # StopIteration (TypeError on 3.11/3.12, and the waiter waited for ever), and a
    # GeneratorExit thrown into the awaiting task closes every coroutine up its await chain
    # instead of reaching the nearest ``except``.
    future: asyncio.Future[tuple[object, BaseException | None]] = loop.create_future()
    context = contextvars.copy_context()

    def settle(outcome: tuple[object, BaseException | None]) -> None:
        if not future.done():  # else the waiter was cancelled
            future.set_result(outcome)

    def target() -> None:
        result: object = None
        error: BaseException | None = None
        try:
            result = context.run(func, *args, **kwargs)
        except BaseException as exc:  # handed to the awaiting task, which decides
            error = exc
        # RuntimeError: the loop is closed, so nobody waits for this result any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, (result, error))

    threading.Thread(target=target, name=name, daemon=True).start()
    result, error = await future
    if isinstance(error, StopIteration):
        # Raised from a coroutine it would become "coroutine raised StopIteration"; say who.
        raise RuntimeError(f"{name}: the function raised StopIteration") from error
    if error is not None:
        try:
            raise error
        finally:
            del error  # no reference cycle through the traceback
    return result
