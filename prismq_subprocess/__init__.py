"""prismq_subprocess: run child processes and background work from asyncio code, reliably.

Start with :class:`SubprocessWrapper` (or the drop-in :func:`create_subprocess_exec`) and
:class:`RunMode`; see README.md and docs/ for the guides.
"""

from __future__ import annotations

import contextlib as _contextlib
from asyncio.subprocess import DEVNULL, PIPE, STDOUT

from ._background._executor import ConcurrentExecutor, ModuleSpec
from ._background._memory_registry import BaseRunRegistry, RunRegistry
from ._background._module_args import parameters_to_args
from ._background._module_runner import ModuleRunner
from ._background._output_capture import (
    OutputCapture,
    OutputGap,
    OutputItem,
    OutputLine,
    OutputSubscription,
)
from ._background._periodic import PeriodicTask, PeriodicTaskStats
from ._background._process_manager import ProcessManager
from ._background._run_record import Run, RunOwner, RunStatus
from ._background._sqlite_registry import SQLiteRunRegistry
from ._background._task_manager import BackgroundTaskManager
from ._background._wrapper_pool import ResourcePool
from ._core._detect import ENV_VAR, ModeDecision, ModeSource, detect_run_mode
from ._core._dropin import create_subprocess_exec, create_subprocess_shell, run
from ._core._event_loop import install_subprocess_policy, subprocess_loop_factory
from ._core._exceptions import (
    CommandNotFoundError,
    CwdNotADirectoryError,
    CwdNotFoundError,
    DuplicateRunError,
    InvalidArgumentTypeError,
    InvalidCommandError,
    InvalidCwdError,
    InvalidEnvironmentError,
    InvalidIntervalError,
    InvalidLimitError,
    InvalidParametersError,
    InvalidQueryError,
    InvalidRunError,
    InvalidRunModeError,
    InvalidTimeoutError,
    ModuleExecutionException,
    OutputClosedError,
    PoolClosedError,
    PrismQError,
    ProcessFailedError,
    ProcessTimeoutError,
    RegistryClosedError,
    RegistrySchemaError,
    ResourceLimitException,
    ResourceWaitTimeoutError,
    RunnerClosedError,
    RunNotFoundError,
    RunStateError,
    ScriptNotFoundError,
    SubprocessPolicyException,
    TaskManagerClosedError,
    WrapperClosedError,
)
from ._core._line_stream import LineStream
from ._core._lines import iter_lines
from ._core._modes import RunMode
from ._core._process import ProcessLike, StreamReaderLike, StreamWriterLike
from ._core._result import DEFAULT_MAX_OUTPUT_BYTES, ProcessResult
from ._core._tree_stop import DEFAULT_GRACE_PERIOD, execute_with_timeout, terminate_gracefully
from ._core._wrapper import SubprocessWrapper
from ._resources._memory_monitor import MemoryMonitor
from ._resources._readings import PsutilResourceReader, ResourceSnapshot
from ._resources._resource_manager import LimitViolation, ResourceCheck, ResourceManager
from ._resources._tree_sampler import ProcessTreeSampler, TreeSample
from ._strategies import (
    AsyncStrategy,
    DryRunStrategy,
    LocalStrategy,
    SubprocessStrategy,
    ThreadedStrategy,
)
from ._strategies._dry_run import DryRunCall, DryRunRecorder, DryRunResponse

# isort: split
# Issue 11 additions, kept apart (the list above is curated elsewhere).
from ._core._exceptions import (
    CommandNotExecutableError,
    ExecutableFormatError,
    InvalidEncodingError,
    InvalidOptionError,
    SpawnFailedError,
    UnknownUserError,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_GRACE_PERIOD",
    "DEFAULT_MAX_OUTPUT_BYTES",
    "DEVNULL",
    "ENV_VAR",
    "PIPE",
    "STDOUT",
    "AsyncStrategy",
    "BackgroundTaskManager",
    "BaseRunRegistry",
    "CommandNotFoundError",
    "ConcurrentExecutor",
    "CwdNotADirectoryError",
    "CwdNotFoundError",
    "DryRunCall",
    "DryRunRecorder",
    "DryRunResponse",
    "DryRunStrategy",
    "DuplicateRunError",
    "InvalidArgumentTypeError",
    "InvalidCommandError",
    "InvalidCwdError",
    "InvalidEnvironmentError",
    "InvalidIntervalError",
    "InvalidLimitError",
    "InvalidParametersError",
    "InvalidQueryError",
    "InvalidRunError",
    "InvalidRunModeError",
    "InvalidTimeoutError",
    "LimitViolation",
    "LineStream",
    "LocalStrategy",
    "MemoryMonitor",
    "ModeDecision",
    "ModeSource",
    "ModuleExecutionException",
    "ModuleRunner",
    "ModuleSpec",
    "OutputCapture",
    "OutputClosedError",
    "OutputGap",
    "OutputItem",
    "OutputLine",
    "OutputSubscription",
    "PeriodicTask",
    "PeriodicTaskStats",
    "PoolClosedError",
    "PrismQError",
    "ProcessFailedError",
    "ProcessLike",
    "ProcessManager",
    "ProcessResult",
    "ProcessTimeoutError",
    "ProcessTreeSampler",
    "PsutilResourceReader",
    "RegistryClosedError",
    "RegistrySchemaError",
    "ResourceCheck",
    "ResourceLimitException",
    "ResourceManager",
    "ResourcePool",
    "ResourceSnapshot",
    "ResourceWaitTimeoutError",
    "Run",
    "RunMode",
    "RunNotFoundError",
    "RunOwner",
    "RunRegistry",
    "RunStateError",
    "RunStatus",
    "RunnerClosedError",
    "SQLiteRunRegistry",
    "ScriptNotFoundError",
    "StreamReaderLike",
    "StreamWriterLike",
    "SubprocessPolicyException",
    "SubprocessStrategy",
    "SubprocessWrapper",
    "TaskManagerClosedError",
    "ThreadedStrategy",
    "TreeSample",
    "WrapperClosedError",
    "create_subprocess_exec",
    "create_subprocess_shell",
    "detect_run_mode",
    "execute_with_timeout",
    "install_subprocess_policy",
    "iter_lines",
    "parameters_to_args",
    "run",
    "subprocess_loop_factory",
    "terminate_gracefully",
]
__all__ += [
    "CommandNotExecutableError",
    "ExecutableFormatError",
    "InvalidEncodingError",
    "InvalidOptionError",
    "SpawnFailedError",
    "UnknownUserError",
]

# Show public names as prismq_subprocess.X in tracebacks and docs, not the private module.
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("prismq_subprocess._"):
        with _contextlib.suppress(AttributeError, TypeError):
            _obj.__module__ = __name__
del _name, _obj
