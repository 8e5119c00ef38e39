"""prismq_subprocess: run child processes and background work from asyncio code, reliably.

Start with :class:`SubprocessWrapper` (or the drop-in :func:`create_subprocess_exec`) and
:class:`RunMode`; see README.md, docs/API.md and the other guides in docs/.

The top level holds the everyday API: every class and function the PrismQ guides use, and the
exceptions an application usually catches. Three public modules hold the rest:

- :mod:`prismq_subprocess.abc`: contracts for extenders (strategies, process protocols, the run
  registry base class, the closing protocol, callback types);
- :mod:`prismq_subprocess.testing`: the DRY_RUN test doubles;
- :mod:`prismq_subprocess.exceptions`: every exception.

Every object that holds resources closes with ``await obj.aclose()`` or ``async with obj:``.
"""

from __future__ import annotations

import importlib as _importlib
import warnings as _warnings
from asyncio.subprocess import DEVNULL, PIPE, STDOUT
from typing import TYPE_CHECKING

from ._background._cancel_result import CancelResult
from ._background._executor import ConcurrentExecutor, ModuleSpec
from ._background._log_names import run_id_from_log_path, run_log_path
from ._background._memory_registry import RunRegistry
from ._background._module_args import parameters_to_args
from ._background._module_runner import ModuleRunner
from ._background._orphan_stop import stop_orphan_tree
from ._background._output_capture import (
    OutputCapture,
    OutputChunk,
    OutputChunks,
    OutputEnd,
    OutputGap,
    OutputItem,
    OutputLine,
    OutputSubscription,
)
from ._background._periodic import PeriodicTask, PeriodicTaskStats
from ._background._process_manager import ProcessManager
from ._background._run_record import Run, RunOwner, RunStatus
from ._background._sqlite_registry import SQLiteRunRegistry
from ._background._sse import SSE_HEADERS, SSEEvent, sse_events
from ._background._task_manager import BackgroundTaskManager, ExitCode, TaskHandle
from ._background._wrapper_pool import ResourcePool
from ._core._detect import ENV_VAR, ModeDecision, ModeSource, detect_run_mode
from ._core._dropin import create_subprocess_exec, create_subprocess_shell, run
from ._core._event_loop import install_subprocess_policy, subprocess_loop_factory
from ._core._exceptions import (
    ClosedError,
    CommandNotFoundError,
    InvalidParametersError,
    ModuleExecutionException,
    OutputNotFoundError,
    PrismQError,
    ProcessFailedError,
    ProcessTimeoutError,
    ResourceLimitException,
    ResourceWaitTimeoutError,
    RunNotFoundError,
    ScriptNotFoundError,
    SubprocessPolicyException,
    TaskTimeoutError,
)
from ._core._host_shutdown import (
    ShutdownHandler,
    install_shutdown_handler,
    stop_for_host_shutdown,
)
from ._core._line_stream import LineStream
from ._core._lines import iter_line_batches, iter_lines
from ._core._modes import RunMode
from ._core._public import publish as _publish
from ._core._result import DEFAULT_MAX_OUTPUT_BYTES, ProcessResult
from ._core._tree_stop import (
    DEFAULT_GRACE_PERIOD,
    containment_report,
    execute_with_timeout,
    terminate_gracefully,
    terminate_many,
)
from ._core._wrapper import SubprocessWrapper
from ._platform import ContainmentReport
from ._platform._orphans import OrphanCheck, ProcessIdentity
from ._resources._memory_monitor import MemoryMonitor
from ._resources._readings import PsutilResourceReader, ResourceSnapshot
from ._resources._resource_manager import LimitViolation, ResourceCheck, ResourceManager
from ._resources._tree_sampler import ProcessTreeSampler, TreeSample

if TYPE_CHECKING:
    # The names that moved in 0.2 (see _MOVED), so type checkers still resolve old imports.
    from ._background._memory_registry import BaseRunRegistry as BaseRunRegistry
    from ._core._exceptions import CwdNotADirectoryError as CwdNotADirectoryError
    from ._core._exceptions import CwdNotFoundError as CwdNotFoundError
    from ._core._exceptions import DuplicateRunError as DuplicateRunError
    from ._core._exceptions import InvalidArgumentTypeError as InvalidArgumentTypeError
    from ._core._exceptions import InvalidCommandError as InvalidCommandError
    from ._core._exceptions import InvalidCwdError as InvalidCwdError
    from ._core._exceptions import InvalidEnvironmentError as InvalidEnvironmentError
    from ._core._exceptions import InvalidIntervalError as InvalidIntervalError
    from ._core._exceptions import InvalidLimitError as InvalidLimitError
    from ._core._exceptions import InvalidQueryError as InvalidQueryError
    from ._core._exceptions import InvalidRunError as InvalidRunError
    from ._core._exceptions import InvalidRunModeError as InvalidRunModeError
    from ._core._exceptions import InvalidTimeoutError as InvalidTimeoutError
    from ._core._exceptions import OutputClosedError as OutputClosedError
    from ._core._exceptions import PoolClosedError as PoolClosedError
    from ._core._exceptions import RegistryClosedError as RegistryClosedError
    from ._core._exceptions import RegistrySchemaError as RegistrySchemaError
    from ._core._exceptions import RunnerClosedError as RunnerClosedError
    from ._core._exceptions import RunStateError as RunStateError
    from ._core._exceptions import TaskManagerClosedError as TaskManagerClosedError
    from ._core._exceptions import WrapperClosedError as WrapperClosedError
    from ._core._process import ProcessLike as ProcessLike
    from ._core._process import StreamReaderLike as StreamReaderLike
    from ._core._process import StreamWriterLike as StreamWriterLike
    from ._strategies import AsyncStrategy as AsyncStrategy
    from ._strategies import DryRunStrategy as DryRunStrategy
    from ._strategies import LocalStrategy as LocalStrategy
    from ._strategies import SubprocessStrategy as SubprocessStrategy
    from ._strategies import ThreadedStrategy as ThreadedStrategy
    from ._strategies._dry_run import DryRunCall as DryRunCall
    from ._strategies._dry_run import DryRunRecorder as DryRunRecorder
    from ._strategies._dry_run import DryRunResponse as DryRunResponse

__version__ = "0.2.0"

__all__ = [
    "DEFAULT_GRACE_PERIOD",
    "DEFAULT_MAX_OUTPUT_BYTES",
    "DEVNULL",
    "ENV_VAR",
    "PIPE",
    "STDOUT",
    "BackgroundTaskManager",
    "ClosedError",
    "CommandNotFoundError",
    "ConcurrentExecutor",
    "ContainmentReport",
    "ExitCode",
    "InvalidParametersError",
    "LimitViolation",
    "LineStream",
    "MemoryMonitor",
    "ModeDecision",
    "ModeSource",
    "ModuleExecutionException",
    "ModuleRunner",
    "ModuleSpec",
    "OutputCapture",
    "OutputGap",
    "OutputItem",
    "OutputLine",
    "OutputSubscription",
    "PeriodicTask",
    "PeriodicTaskStats",
    "PrismQError",
    "ProcessFailedError",
    "ProcessManager",
    "ProcessResult",
    "ProcessTimeoutError",
    "ProcessTreeSampler",
    "PsutilResourceReader",
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
    "RunStatus",
    "SQLiteRunRegistry",
    "ScriptNotFoundError",
    "SubprocessPolicyException",
    "SubprocessWrapper",
    "TaskHandle",
    "TaskTimeoutError",
    "TreeSample",
    "containment_report",
    "create_subprocess_exec",
    "create_subprocess_shell",
    "detect_run_mode",
    "execute_with_timeout",
    "install_subprocess_policy",
    "iter_line_batches",
    "iter_lines",
    "parameters_to_args",
    "run",
    "subprocess_loop_factory",
    "terminate_gracefully",
    "terminate_many",
]
# Output capture: chunks, log files, SSE, cancel results.
__all__ += [
    "SSE_HEADERS",
    "CancelResult",
    "OutputChunk",
    "OutputChunks",
    "OutputEnd",
    "OutputNotFoundError",
    "SSEEvent",
    "run_id_from_log_path",
    "run_log_path",
    "sse_events",
]
# Host shutdown: stop every tree on SIGTERM; recover what a dead host left running.
__all__ += [
    "OrphanCheck",
    "ProcessIdentity",
    "ShutdownHandler",
    "install_shutdown_handler",
    "stop_for_host_shutdown",
    "stop_orphan_tree",
]

# Top level first: a name available here is shown as prismq_subprocess.X.
_publish(__name__, globals(), __all__)

# The public sub-modules, importable as attributes (prismq_subprocess.testing.X); published
# after the top level, see above.
from . import abc as abc  # noqa: E402
from . import exceptions as exceptions  # noqa: E402
from . import testing as testing  # noqa: E402

#: Names that left the top level in 0.2, and the public module that now holds each. Importing
#: them from the top level still works, with a DeprecationWarning, until 0.3.
_MOVED: dict[str, str] = {
    **dict.fromkeys(
        (
            "AsyncStrategy",
            "BaseRunRegistry",
            "LocalStrategy",
            "ProcessLike",
            "StreamReaderLike",
            "StreamWriterLike",
            "SubprocessStrategy",
            "ThreadedStrategy",
        ),
        "abc",
    ),
    **dict.fromkeys(
        ("DryRunCall", "DryRunRecorder", "DryRunResponse", "DryRunStrategy"), "testing"
    ),
    **dict.fromkeys(
        (
            "CwdNotADirectoryError",
            "CwdNotFoundError",
            "DuplicateRunError",
            "InvalidArgumentTypeError",
            "InvalidCommandError",
            "InvalidCwdError",
            "InvalidEnvironmentError",
            "InvalidIntervalError",
            "InvalidLimitError",
            "InvalidQueryError",
            "InvalidRunError",
            "InvalidRunModeError",
            "InvalidTimeoutError",
            "OutputClosedError",
            "PoolClosedError",
            "RegistryClosedError",
            "RegistrySchemaError",
            "RunStateError",
            "RunnerClosedError",
            "TaskManagerClosedError",
            "WrapperClosedError",
        ),
        "exceptions",
    ),
}


def __getattr__(name: str) -> object:
    """Serve the names that moved to a public sub-module, with a DeprecationWarning."""
    home = _MOVED.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _warnings.warn(
        f"prismq_subprocess.{name} moved to prismq_subprocess.{home}.{name} in 0.2; import it "
        "from there (the top-level name goes away in 0.3)",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(_importlib.import_module(f"{__name__}.{home}"), name)
