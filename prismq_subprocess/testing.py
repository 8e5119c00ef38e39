"""Test doubles for applications that use prismq_subprocess: nothing here starts a process.

DRY_RUN is to prismq_subprocess what ``httpx.MockTransport`` is to httpx. Give a wrapper a
:class:`DryRunStrategy` with a :class:`DryRunRecorder`; the recorder answers each command from
a table or a :class:`DryRunHandler` (default: returncode 0, no output) and keeps every
:class:`DryRunCall` for the test to inspect::

    recorder = DryRunRecorder({("git", "status"): DryRunResponse(stdout=b"clean\\n")})
    async with SubprocessWrapper(strategy=DryRunStrategy(recorder=recorder)) as wrapper:
        await code_under_test(wrapper)
    assert recorder.commands == [("git", "status")]

:class:`PlatformOps` / :func:`platform_ops` (the ``ops=`` argument of ``SubprocessWrapper`` and
the strategies) let a test run the Windows (or POSIX) process-group code on another platform with
its operating-system calls replaced, e.g. ``platform_ops("win32", kill=record)``.
"""

from __future__ import annotations

from ._core._public import publish
from ._platform import PlatformOps, platform_ops
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

__all__ = [
    "DryRunCall",
    "DryRunHandler",
    "DryRunProcess",
    "DryRunRecorder",
    "DryRunResponse",
    "DryRunStrategy",
    "PlatformOps",
    "ProcessEntry",
    "ProcessTable",
    "StopRecord",
    "StopTarget",
    "platform_ops",
]

publish(__name__, globals(), __all__)
