"""prismq_subprocess: run child processes and background work from asyncio code, reliably."""

from __future__ import annotations

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

__version__ = "0.1.0"

__all__ = [
    "CommandNotFoundError",
    "CwdNotADirectoryError",
    "CwdNotFoundError",
    "InvalidArgumentTypeError",
    "InvalidCommandError",
    "InvalidCwdError",
    "InvalidEnvironmentError",
    "InvalidRunModeError",
    "InvalidTimeoutError",
    "ModuleExecutionException",
    "PrismQError",
    "ProcessFailedError",
    "ProcessTimeoutError",
    "ResourceLimitException",
    "RunStateError",
    "SubprocessPolicyException",
    "WrapperClosedError",
]
