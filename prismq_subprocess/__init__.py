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
import threading as _threading
import warnings as _warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from . import abc as abc
    from . import exceptions as exceptions
    from . import testing as testing
    from ._api import *  # noqa: F403 - every name of __all__, imported as itself there

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

#: The public sub-modules, attributes of the package once the API is loaded.
_SUBMODULES = ("abc", "exceptions", "testing")

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


def _load_api() -> None:
    """Import the whole API (the first use of any of its names does): every name of
    ``__all__`` becomes an attribute, shown as ``prismq_subprocess.X``; then the public
    sub-modules, which show the names the top level does not hold under their own. The same
    order whichever way in came first: each public sub-module calls this first thing, before
    its own imports.

    Only the API's import runs under the lock, never a public sub-module's: a thread importing
    one holds its import lock when it calls this, and the two locks taken in opposite orders
    by two threads hung both for good. The private modules are all imported under it, one
    thread at a time, as the package's own import lock did when ``__init__`` imported them.
    """
    global _api_state
    if _api_state != "loaded":
        with _api_lock:  # (re-entered by a sub-module's own call, in the loading thread)
            if _api_state != "new":
                return
            _api_state = "loading"
            try:
                from . import _api
                from ._core._public import publish

                namespace = globals()
                for name in __all__:
                    namespace[name] = getattr(_api, name)
                publish(__name__, namespace, __all__)
            except BaseException:
                _api_state = "new"
                raise
            _api_state = "loaded"
    for name in _SUBMODULES:
        if name not in globals():
            _importlib.import_module(f"{__name__}.{name}")


if not TYPE_CHECKING:  # (type checkers: the names above, no catch-all)

    def __getattr__(name: str) -> object:
        """Load the API on first use of one of its names; serve the names that moved to a
        public sub-module, with a DeprecationWarning."""
        if name in _API_NAMES:
            _load_api()
            namespace = globals()
            try:
                return namespace[name]
            except KeyError:
                # Deleted since (unittest.mock.patch deletes a name it found missing from the
                # module when it began, the first use of the API): served again.
                if name in _SUBMODULES:
                    value = _importlib.import_module(f"{__name__}.{name}")
                else:
                    value = getattr(namespace["_api"], name)
                namespace[name] = value
                return value
        home = _MOVED.get(name)
        if home is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        _warnings.warn(
            f"prismq_subprocess.{name} moved to prismq_subprocess.{home}.{name} in 0.2; "
            "import it from there (the top-level name goes away in 0.3)",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(_importlib.import_module(f"{__name__}.{home}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | _API_NAMES)


_API_NAMES = frozenset((*__all__, *_SUBMODULES))
_api_lock = _threading.RLock()
_api_state = "new"
