"""Starting afresh in a forked child (POSIX; Windows never forks).

A process forked from the host (gunicorn's ``--preload``, a ``fork`` multiprocessing pool) gets
copies of our objects but not their threads, possibly locks held at the fork, and the parent's
children. Objects holding such state register with :func:`start_afresh_after_fork`; each is told
once after every fork, in the child. Module-level state uses :func:`after_fork_in_child`.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from typing import Protocol

__all__ = ["ForkAware", "after_fork_in_child", "start_afresh_after_fork"]


class ForkAware(Protocol):
    """An object that puts itself right in a forked child."""

    def _forked(self) -> None:
        """Called in the child after a fork: drop the parent's threads, locks and children."""


def after_fork_in_child(callback: Callable[[], object]) -> None:
    """Have ``callback`` called in the child after every ``fork`` of this process (POSIX;
    nothing on Windows, which never forks)."""
    register = getattr(os, "register_at_fork", None)
    if register is not None:
        register(after_in_child=callback)


_AWARE: weakref.WeakSet[ForkAware] = weakref.WeakSet()


def start_afresh_after_fork(obj: ForkAware) -> None:
    """Call ``obj._forked()`` in the child after every fork, for as long as ``obj`` lives."""
    _AWARE.add(obj)


def _tell_all() -> None:
    for obj in list(_AWARE):
        obj._forked()


after_fork_in_child(_tell_all)
