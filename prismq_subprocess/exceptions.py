"""Every exception prismq_subprocess raises, in one hierarchy under :class:`PrismQError`.

``from prismq_subprocess.exceptions import InvalidTimeoutError``. The ones an application
usually catches are also available from the top-level package. Where callers already catch a
builtin, ours inherits it too: a timeout is a ``TimeoutError``, a missing program a
``FileNotFoundError``, bad input a ``ValueError`` or ``TypeError``, using a closed object a
``RuntimeError`` (every such error derives from :class:`ClosedError`).
"""

from __future__ import annotations

from ._core._exceptions import (
    BackendClosedError,
    ClosedError,
    CommandNotFoundError,
    CwdNotADirectoryError,
    CwdNotFoundError,
    DuplicateRunError,
    InvalidArgumentTypeError,
    InvalidBackendError,
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
from ._core._public import publish

__all__ = [
    "BackendClosedError",
    "ClosedError",
    "CommandNotFoundError",
    "CwdNotADirectoryError",
    "CwdNotFoundError",
    "DuplicateRunError",
    "InvalidArgumentTypeError",
    "InvalidBackendError",
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
    "ModuleExecutionException",
    "OutputClosedError",
    "PoolClosedError",
    "PrismQError",
    "ProcessFailedError",
    "ProcessTimeoutError",
    "RegistryClosedError",
    "RegistrySchemaError",
    "ResourceLimitException",
    "ResourceWaitTimeoutError",
    "RunNotFoundError",
    "RunStateError",
    "RunnerClosedError",
    "ScriptNotFoundError",
    "SubprocessPolicyException",
    "TaskManagerClosedError",
    "WrapperClosedError",
]

publish(__name__, globals(), __all__)
