"""prismq_subprocess: run child processes and background work from asyncio code, reliably.

Start with :class:`SubprocessWrapper` (or the drop-in :func:`create_subprocess_exec`) and
:class:`RunMode`; see README.md and docs/ for the guides.
"""

from __future__ import annotations

import contextlib as _contextlib
from asyncio.subprocess import DEVNULL, PIPE, STDOUT

from ._detect import ENV_VAR, ModeDecision, ModeSource, detect_run_mode
from ._dropin import create_subprocess_exec, create_subprocess_shell, run
from ._event_loop import install_subprocess_policy, subprocess_loop_factory
from ._exceptions import (
    CommandNotFoundError,
    CwdNotADirectoryError,
    CwdNotFoundError,
    InvalidArgumentTypeError,
    InvalidCommandError,
    InvalidCwdError,
    InvalidEnvironmentError,
    InvalidRunModeError,
    InvalidTimeoutError,
    ModuleExecutionException,
    PrismQError,
    ProcessFailedError,
    ProcessTimeoutError,
    ResourceLimitException,
    RunStateError,
    SubprocessPolicyException,
    WrapperClosedError,
)
from ._lifecycle import DEFAULT_GRACE_PERIOD, execute_with_timeout, terminate_gracefully
from ._lines import iter_lines
from ._modes import RunMode
from ._process import ProcessLike, StreamReaderLike, StreamWriterLike
from ._result import DEFAULT_MAX_OUTPUT_BYTES, ProcessResult
from ._strategies import (
    AsyncStrategy,
    DryRunStrategy,
    LocalStrategy,
    SubprocessStrategy,
    ThreadedStrategy,
)
from ._strategies._dry_run import DryRunCall, DryRunRecorder, DryRunResponse
from ._wrapper import SubprocessWrapper

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_GRACE_PERIOD",
    "DEFAULT_MAX_OUTPUT_BYTES",
    "DEVNULL",
    "ENV_VAR",
    "PIPE",
    "STDOUT",
    "AsyncStrategy",
    "CommandNotFoundError",
    "CwdNotADirectoryError",
    "CwdNotFoundError",
    "DryRunCall",
    "DryRunRecorder",
    "DryRunResponse",
    "DryRunStrategy",
    "InvalidArgumentTypeError",
    "InvalidCommandError",
    "InvalidCwdError",
    "InvalidEnvironmentError",
    "InvalidRunModeError",
    "InvalidTimeoutError",
    "LocalStrategy",
    "ModeDecision",
    "ModeSource",
    "ModuleExecutionException",
    "PrismQError",
    "ProcessFailedError",
    "ProcessLike",
    "ProcessResult",
    "ProcessTimeoutError",
    "ResourceLimitException",
    "RunMode",
    "RunStateError",
    "StreamReaderLike",
    "StreamWriterLike",
    "SubprocessPolicyException",
    "SubprocessStrategy",
    "SubprocessWrapper",
    "ThreadedStrategy",
    "WrapperClosedError",
    "create_subprocess_exec",
    "create_subprocess_shell",
    "detect_run_mode",
    "execute_with_timeout",
    "install_subprocess_policy",
    "iter_lines",
    "run",
    "subprocess_loop_factory",
    "terminate_gracefully",
]

# Show public names as prismq_subprocess.X in tracebacks and docs, not the private module.
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("prismq_subprocess._"):
        with _contextlib.suppress(AttributeError, TypeError):
            _obj.__module__ = __name__
del _name, _obj
