"""The public API, pinned: what each public module exports, that it is importable, documented,
shown under its public module, and that names which moved still work from the top level.

Changing a list below is an API change: say so in CHANGELOG.md and docs/API.md.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import tomllib
import typing
import warnings
from pathlib import Path
from types import ModuleType

import pytest

import prismq_subprocess as pq

ROOT = Path(__file__).resolve().parent.parent

EXPECTED: dict[str, list[str]] = {
    "prismq_subprocess": [
        "BackgroundTaskManager",
        "CancelResult",
        "ClosedError",
        "CommandNotFoundError",
        "ConcurrentExecutor",
        "ContainmentReport",
        "DEFAULT_GRACE_PERIOD",
        "DEFAULT_MAX_OUTPUT_BYTES",
        "DEVNULL",
        "ENV_VAR",
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
        "OutputChunk",
        "OutputChunks",
        "OutputEnd",
        "OutputGap",
        "OutputItem",
        "OutputLine",
        "OutputNotFoundError",
        "OutputSubscription",
        "OrphanCheck",
        "PIPE",
        "PeriodicTask",
        "PeriodicTaskStats",
        "PrismQError",
        "ProcessFailedError",
        "ProcessIdentity",
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
        "SSEEvent",
        "SSE_HEADERS",
        "STDOUT",
        "ScriptNotFoundError",
        "ShutdownHandler",
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
        "install_shutdown_handler",
        "install_subprocess_policy",
        "iter_line_batches",
        "iter_lines",
        "parameters_to_args",
        "run",
        "run_id_from_log_path",
        "run_log_path",
        "sse_events",
        "stop_for_host_shutdown",
        "stop_orphan_tree",
        "subprocess_loop_factory",
        "terminate_gracefully",
        "terminate_many",
    ],
    "prismq_subprocess.abc": [
        "AsyncResource",
        "AsyncStrategy",
        "BaseRunRegistry",
        "CommandStartOptions",
        "ExecOptions",
        "LimitCallback",
        "LocalStrategy",
        "MemoryCallback",
        "ModuleJob",
        "ModuleStartOptions",
        "PopenOptions",
        "ProcessLike",
        "ResourceReader",
        "RunBackend",
        "RunContext",
        "ShellOptions",
        "SpawnOptions",
        "SpawnRequest",
        "StartOptions",
        "StreamReaderLike",
        "StreamWriterLike",
        "SubprocessStrategy",
        "ThreadedStrategy",
    ],
    "prismq_subprocess.testing": [
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
    ],
    "prismq_subprocess.exceptions": [
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
        "StreamBusyError",
        "StreamNotOpenError",
        "StrategyContractError",
        "SubprocessPolicyException",
        "TaskManagerClosedError",
        "TaskTimeoutError",
        "UnknownUserError",
        "UnscriptedCommandError",
        "WrapperClosedError",
    ],
}

#: Public data (constants and a union type) that cannot carry a docstring; docs/API.md
#: describes each (tests/test_api_docs.py checks it is mentioned there).
DATA = {
    "DEFAULT_GRACE_PERIOD",
    "DEFAULT_MAX_OUTPUT_BYTES",
    "DEVNULL",
    "ENV_VAR",
    "PIPE",
    "STDOUT",
    "SSE_HEADERS",
    "OutputItem",
}

#: Every class and function the PrismQ guides (the seed documents) use: they stay top-level.
GUIDE_NAMES = {
    "BackgroundTaskManager",
    "ConcurrentExecutor",
    "MemoryMonitor",
    "ModuleExecutionException",
    "ModuleRunner",
    "OutputCapture",
    "PeriodicTask",
    "ProcessManager",
    "ResourceLimitException",
    "ResourceManager",
    "ResourcePool",
    "Run",
    "RunMode",
    "RunRegistry",
    "RunStatus",
    "SubprocessPolicyException",
    "SubprocessWrapper",
    "execute_with_timeout",
    "terminate_gracefully",
}

#: Top-level names before 0.2 that now live only in a public sub-module.
MOVED = {
    "abc": [
        "AsyncStrategy",
        "BaseRunRegistry",
        "LocalStrategy",
        "ProcessLike",
        "StreamReaderLike",
        "StreamWriterLike",
        "SubprocessStrategy",
        "ThreadedStrategy",
    ],
    "testing": ["DryRunCall", "DryRunRecorder", "DryRunResponse", "DryRunStrategy"],
    "exceptions": [
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
    ],
}

#: Private types a public signature still mentions, and why that is acceptable for now.
PRIVATE_IN_SIGNATURES = {
    # ModuleRunner.prepare() returns an opaque validated launch; callers only pass it on.
    "_Launch",
    # LineStream is made by SubprocessWrapper.stream(), never by callers: its constructor takes
    # the run path's internal ChildRun starter.
    "ChildRun",
    # run(max_output_bytes=) defaults to a sentinel meaning "the wrapper's" (shown as such in
    # help()); callers never pass it, they leave the argument out.
    "_Default",
}

PUBLIC_MODULES = sorted(EXPECTED)


def public(module_name: str) -> ModuleType:
    return importlib.import_module(module_name)


def members(module_name: str) -> list[tuple[str, object]]:
    module = public(module_name)
    return [(name, getattr(module, name)) for name in module.__all__]


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_all_is_pinned(module_name: str) -> None:
    exported = public(module_name).__all__
    assert len(exported) == len(set(exported)), "duplicates in __all__"
    assert sorted(exported) == sorted(EXPECTED[module_name])


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_name_in_all_is_importable(module_name: str) -> None:
    for name in EXPECTED[module_name]:
        namespace: dict[str, object] = {}
        exec(f"from {module_name} import {name}", namespace)  # the spelling users write
        assert namespace[name] is getattr(public(module_name), name)


def test_public_modules_are_attributes_of_the_package() -> None:
    for module_name in PUBLIC_MODULES[1:]:
        assert getattr(pq, module_name.rsplit(".", 1)[1]) is sys.modules[module_name]


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_public_name_has_a_docstring(module_name: str) -> None:
    assert inspect.getdoc(public(module_name))
    for name, obj in members(module_name):
        if name in DATA:
            assert not (inspect.isclass(obj) or inspect.isfunction(obj)), name
            continue
        assert inspect.getdoc(obj), f"{module_name}.{name} has no docstring"


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_public_method_has_a_docstring(module_name: str) -> None:
    missing = []
    for name, cls in members(module_name):
        if not inspect.isclass(cls) or issubclass(cls, BaseException):
            continue
        for attr, value in vars(cls).items():
            if attr.startswith("_"):
                continue
            if isinstance(value, property):
                documented = inspect.getdoc(value)
            elif isinstance(value, staticmethod | classmethod) or inspect.isfunction(value):
                func = getattr(cls, attr)
                if not getattr(func, "__qualname__", "").startswith(cls.__qualname__ + "."):
                    continue  # a field whose default is a function, not a method
                documented = inspect.getdoc(func)
            else:
                continue
            if not documented:
                missing.append(f"{name}.{attr}")
    assert not missing


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_names_are_shown_under_a_public_module(module_name: str) -> None:
    """As anyio does: ``__module__`` names a public module where the object really is, so
    tracebacks, ``repr`` and pickling use the public path."""
    for name, obj in members(module_name):
        if name in DATA:
            continue
        home = obj.__module__  # type: ignore[attr-defined]
        assert home in EXPECTED, f"{module_name}.{name} is shown as {home}"
        assert name in EXPECTED[home]
        assert getattr(public(home), obj.__qualname__) is obj  # type: ignore[attr-defined]
    if module_name == "prismq_subprocess":
        assert repr(pq.RunMode.ASYNC) == "<RunMode.ASYNC: 'async'>"
        assert pq.SubprocessWrapper.__module__ == "prismq_subprocess"
        assert pq.testing.DryRunStrategy.__module__ == "prismq_subprocess.testing"


def test_the_guides_names_stay_at_the_top_level() -> None:
    assert not GUIDE_NAMES - set(pq.__all__)


def test_the_exceptions_module_lists_every_exception_once_in_order() -> None:
    # Its __all__ is written out for type checkers; it must not drift from the source list.
    from prismq_subprocess._core import _exceptions

    assert pq.exceptions.__all__ == sorted(_exceptions.__all__)


def test_every_exception_is_in_the_exceptions_module() -> None:
    def subclasses(cls: type) -> set[type]:
        found = {cls}
        for sub in cls.__subclasses__():
            found |= subclasses(sub)
        return found

    package_errors = {
        cls for cls in subclasses(pq.PrismQError) if cls.__module__.startswith("prismq_subprocess")
    }
    exported = {getattr(pq.exceptions, name) for name in pq.exceptions.__all__}
    assert package_errors == exported
    for module_name in PUBLIC_MODULES:
        for name, obj in members(module_name):
            if inspect.isclass(obj) and issubclass(obj, BaseException):
                assert obj in exported, f"{module_name}.{name}"


@pytest.mark.parametrize(
    ("name", "home"), [(name, home) for home, names in MOVED.items() for name in names]
)
def test_moved_names_still_work_from_the_top_level(name: str, home: str) -> None:
    module = getattr(pq, home)
    assert name in module.__all__ and name not in pq.__all__
    assert name not in dir(pq)
    with pytest.warns(DeprecationWarning, match=rf"prismq_subprocess\.{home}\.{name}") as caught:
        obj = getattr(pq, name)
    assert obj is getattr(module, name)
    assert caught[0].filename == __file__  # the warning points at the caller
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        namespace: dict[str, object] = {}
        exec(f"from prismq_subprocess.{home} import {name}", namespace)


def test_moved_names_are_listed_in_the_changelog() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    for home, names in MOVED.items():
        for name in names:
            assert re.search(rf"\b{name}\b", changelog), name
        assert f"prismq_subprocess.{home}" in changelog


def test_an_unknown_top_level_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="NoSuchThing"):
        pq.NoSuchThing  # type: ignore[attr-defined]  # noqa: B018


def test_public_signatures_only_mention_public_types() -> None:
    exported = {id(obj) for module_name in PUBLIC_MODULES for _, obj in members(module_name)}
    private: dict[str, set[str]] = {}

    def walk(tp: object, where: str) -> None:
        for arg in typing.get_args(tp):
            walk(arg, where)
        origin = typing.get_origin(tp)
        if origin is not None:
            walk(origin, where)
        if (
            isinstance(tp, type)
            and tp.__module__.startswith("prismq_subprocess")
            and id(tp) not in exported
        ):
            private.setdefault(tp.__qualname__, set()).add(where)

    # Names a module imports only for type checking (to avoid an import cycle) resolve among
    # the public names.
    public_names = {
        name: obj for module_name in PUBLIC_MODULES for name, obj in members(module_name)
    }

    def check(func: object, where: str) -> None:
        for hint in typing.get_type_hints(func, localns=public_names).values():
            walk(hint, where)

    for module_name in PUBLIC_MODULES:
        for name, obj in members(module_name):
            if inspect.isclass(obj):
                check(obj.__init__, f"{name}()")
                for attr in dir(obj):
                    if attr.startswith("_"):
                        continue
                    value = inspect.getattr_static(obj, attr)
                    if isinstance(value, property):
                        value = value.fget
                    if isinstance(value, staticmethod | classmethod):
                        value = value.__func__
                    if inspect.isfunction(value):
                        check(value, f"{name}.{attr}")
            elif inspect.isfunction(obj):
                check(obj, name)
    assert set(private) == PRIVATE_IN_SIGNATURES, private


def test_every_declared_dependency_is_used() -> None:
    """A runtime dependency the package never imports is dead weight (typing-extensions was)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    sources = "\n".join(
        path.read_text(encoding="utf-8") for path in (ROOT / "prismq_subprocess").rglob("*.py")
    )
    for requirement in project["dependencies"]:
        module = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].replace("-", "_")
        assert re.search(rf"^\s*(import|from) {module}\b", sources, re.M), requirement
