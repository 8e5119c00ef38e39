"""Test doubles for applications that use prismq_subprocess: nothing here starts a process.

DRY_RUN is to prismq_subprocess what ``httpx.MockTransport`` is to httpx. Give a wrapper a
:class:`DryRunStrategy` with a :class:`DryRunRecorder`; the recorder answers each command from
a table or a :class:`DryRunHandler` (default: returncode 0, no output) and keeps every
:class:`DryRunCall` for the test to inspect::

    recorder = DryRunRecorder({("git", "status"): DryRunResponse(stdout=b"clean\\n")})
    async with SubprocessWrapper(strategy=DryRunStrategy(recorder=recorder)) as wrapper:
        await code_under_test(wrapper)
    assert recorder.commands == [("git", "status")]

:class:`DryRunScript` scripts answers per command (exact arguments, prefix, regex or predicate;
one-shot or repeating; lines streamed over time) and is strict about commands nobody scripted;
:func:`override_strategy` makes every wrapper that would auto-detect its mode (the application's
own, and the drop-ins) use a given mode or strategy, e.g. ``override_strategy(script.strategy)``.
The pytest plugin (``pq_dry_run``, ``pq_mode``, ``pq_no_leaks``; docs/TESTING.md) is built on
them.

:class:`PlatformOps` / :func:`platform_ops` (the ``ops=`` argument of ``SubprocessWrapper`` and
the strategies) let a test run the Windows (or POSIX) process-group code on another platform with
its operating-system calls replaced, e.g. ``platform_ops("win32", kill=record)``.
:class:`ConsoleEvents` (the ``console=`` argument of ``ShutdownHandler``) does the same for the
Windows console control events: ``ConsoleEvents(kernel32=stand_in, routine_factory=lambda f: f)``.
"""

from __future__ import annotations

from . import _load_api

_load_api()  # first thing: see there

from ._core._override import override_strategy
from ._core._public import publish
from ._platform import PlatformOps, platform_ops
from ._platform._console import ConsoleEvents
from ._platform._containment import Containment
from ._platform._ops import StopRecord, StopTarget
from ._platform._table import ProcessEntry, ProcessTable
from ._strategies._dry_run import (
    DryRunCall,
    DryRunHandler,
    DryRunProcess,
    DryRunRecorder,
    DryRunResponse,
    DryRunStrategy,
)
from ._testing._script import DryRunScript, ScriptRule

__all__ = [
    "ConsoleEvents",
    "Containment",
    "DryRunCall",
    "DryRunHandler",
    "DryRunProcess",
    "DryRunRecorder",
    "DryRunResponse",
    "DryRunScript",
    "DryRunStrategy",
    "PlatformOps",
    "ProcessEntry",
    "ProcessTable",
    "ScriptRule",
    "StopRecord",
    "StopTarget",
    "override_strategy",
    "platform_ops",
]

publish(__name__, globals(), __all__)
