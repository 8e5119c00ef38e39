"""Every exception prismq_subprocess raises, in one hierarchy under :class:`PrismQError`.

``from prismq_subprocess.exceptions import InvalidTimeoutError``. The ones an application
usually catches are also available from the top-level package. Where callers already catch a
builtin, ours inherits it too: a timeout is a ``TimeoutError``, a missing program a
``FileNotFoundError``, bad input a ``ValueError`` or ``TypeError``, using a closed object a
``RuntimeError`` (every such error derives from :class:`ClosedError`).
"""

from __future__ import annotations

from . import _load_api

_load_api()  # first thing: see there

from ._core._exceptions import *  # noqa: F403 - every exception, listed once in _core/_exceptions.py
from ._core._public import publish

# Written out, not computed: type checkers read a literal list (a star import of this module
# brings every name in for mypy and pyright too); tests/test_exports.py checks it is complete.
__all__ = [
    "BackendClosedError",
    "ClosedError",
    "CommandNotExecutableError",
    "CommandNotFoundError",
    "CwdNotADirectoryError",
    "CwdNotFoundError",
    "DuplicateRunError",
    "ExecutableFormatError",
    "InvalidArgumentTypeError",
    "InvalidBackendError",
    "InvalidCommandError",
    "InvalidCwdError",
    "InvalidEncodingError",
    "InvalidEnvironmentError",
    "InvalidIntervalError",
    "InvalidLimitError",
    "InvalidLogDirError",
    "InvalidOptionError",
    "InvalidParametersError",
    "InvalidQueryError",
    "InvalidReadingError",
    "InvalidRunError",
    "InvalidRunIdError",
    "InvalidRunModeError",
    "InvalidSSEEventError",
    "InvalidSubscriptionError",
    "InvalidTaskError",
    "InvalidTimeoutError",
    "ModuleExecutionException",
    "NoRunningLoopError",
    "OutputClosedError",
    "OutputNotFoundError",
    "OutputWaitTimeoutError",
    "PoolClosedError",
    "PreexecFnError",
    "PrismQError",
    "ProcessFailedError",
    "ProcessTimeoutError",
    "RegistryBusyError",
    "RegistryClosedError",
    "RegistryDatabaseError",
    "RegistryFullError",
    "RegistryOpenError",
    "RegistryReadOnlyError",
    "RegistrySchemaError",
    "ResourceLimitException",
    "ResourceWaitTimeoutError",
    "RunClaimedError",
    "RunNotFoundError",
    "RunStateError",
    "RunnerClosedError",
    "ScriptNotFoundError",
    "ShutdownHandlerError",
    "SpawnFailedError",
    "StdinAlreadySentError",
    "StrategyContractError",
    "StreamBusyError",
    "StreamNotOpenError",
    "SubprocessPolicyException",
    "TaskManagerClosedError",
    "TaskTimeoutError",
    "UnknownUserError",
    "UnscriptedCommandError",
    "WrapperClosedError",
]

publish(__name__, globals(), __all__)
