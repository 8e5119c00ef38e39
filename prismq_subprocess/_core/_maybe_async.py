"""Calling user callbacks that may be plain functions or coroutine functions."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable

__all__ = ["call_callback", "is_async_callable"]


def is_async_callable(func: Callable[..., object]) -> bool:
    """True when calling ``func`` returns an awaitable coroutine (also for objects whose
    ``__call__`` is ``async def``, and ``functools.partial`` of a coroutine function)."""
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(
        getattr(func, "__call__", None)  # noqa: B004 - we want the async-ness of __call__
    )


async def call_callback(
    callback: Callable[..., object], *args: object, logger: logging.Logger, what: str
) -> None:
    """Call ``callback(*args)``, awaiting the result if it is awaitable.

    An exception raised by the callback is logged with its traceback and swallowed: a faulty
    observer must never stop the monitor that notifies it. ``SystemExit`` too (a helper that
    calls ``sys.exit()`` must not end a web server), as ``PeriodicTask`` treats it.
    Cancellation and ``KeyboardInterrupt`` (a real interrupt of the loop's thread) propagate.
    """
    try:
        result = callback(*args)
        if inspect.isawaitable(result):
            await result
    except (Exception, SystemExit):
        logger.exception("%s callback %r raised", what, callback)


def generator_function_kind(func: object) -> str | None:
    """``"async generator"`` or ``"generator"`` if calling ``func`` makes a generator (whose
    body runs only when something iterates it: a callback or task function of that kind would
    never run), else ``None``."""
    if inspect.isasyncgenfunction(func):
        return "async generator"
    if inspect.isgeneratorfunction(func):
        return "generator"
    return None
