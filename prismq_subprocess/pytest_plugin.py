"""pytest plugin for applications built on prismq_subprocess.

pytest loads it through the ``pytest11`` entry point; a test that uses none of its fixtures or
markers is left alone. It works with any way of running async tests (pytest-asyncio, anyio's
plugin, ``asyncio.run`` in a plain test): every fixture is synchronous.

Fixtures:

- ``pq_dry_run``: a :class:`DryRunScript` every auto-detected wrapper (and the drop-ins) answers
  from while the test runs: nothing is started. Strict by default: a command nothing was
  registered for raises :class:`UnscriptedCommandError` and fails the test.
- ``pq_mode``: the test runs once per real mode (ini ``pq_modes``, marker ``pq_modes``); the
  host's auto-detected wrappers and drop-ins use that mode meanwhile.
- ``pq_wrapper``: a :class:`SubprocessWrapper` in ``pq_mode``, closed after the test.
- ``pq_no_leaks``: fails the test (at teardown) if it left a child process, a thread or a file
  descriptor behind; also as the marker ``@pytest.mark.pq_no_leaks(...)`` or, for every test,
  the ini option ``pq_no_leaks = true``.

See docs/TESTING.md.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Generator, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from ._core._modes import RunMode
    from ._core._wrapper import SubprocessWrapper
    from ._testing._leaks import LeakCheck, LeakReport
    from ._testing._script import DryRunScript, ScriptRule

    #: The modes that start real processes: what ``pq_mode`` runs a test in unless told
    #: otherwise (provided on first use, see ``__getattr__``).
    REAL_MODES: tuple[RunMode, ...]

# pytest loads this module in every session of every project that has the package installed,
# most of which never use it: it imports the package's parts only once a test uses them (the
# whole package took 0.2-0.45 s to import, which every such session paid).

__all__ = [
    "REAL_MODES",
    "DryRunScript",
    "LeakCheck",
    "LeakReport",
    "ScriptRule",
    "pq_dry_run",
    "pq_mode",
    "pq_no_leaks",
    "pq_wrapper",
]

# The values of REAL_MODES, checked against RunMode by the tests; what pq_modes defaults to.
_REAL_MODE_NAMES = ("async", "threaded", "local")

_LAZY = {
    "DryRunScript": "._testing._script",
    "ScriptRule": "._testing._script",
    "LeakCheck": "._testing._leaks",
    "LeakReport": "._testing._leaks",
}


def __getattr__(name: str) -> object:
    """The re-exported names, imported on first use (not listed by ``dir()``, so pytest's
    scan of this module for hooks and fixtures does not import them)."""
    if name == "REAL_MODES":
        from ._core._modes import RunMode

        return tuple(RunMode(value) for value in _REAL_MODE_NAMES)
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(where, __package__), name)


_SCRIPT: pytest.StashKey[DryRunScript] = pytest.StashKey()
_REPORTED: pytest.StashKey[int] = pytest.StashKey()
_LEAKS: pytest.StashKey[LeakCheck] = pytest.StashKey()
_MODE_USED: pytest.StashKey[str] = pytest.StashKey()
# On the config: the leak check of the test running now, once started (wider fixtures set up
# during the test see it there; their request's node is not the test).
_ACTIVE: pytest.StashKey[LeakCheck] = pytest.StashKey()

_LEAK_OPTIONS = {"processes", "threads", "fds", "ignore_threads", "timeout"}
# On the config: the message of each test function (node id without parameters) whose
# pq_modes marker is bad, reported for the tests a run selects (see _bad_modes_marker).
_BAD_MODES: pytest.StashKey[dict[str, str]] = pytest.StashKey()


# -- configuration ----------------------------------------------------------------------------
def pytest_addoption(parser: pytest.Parser) -> None:
    """Register the ini options ``pq_modes`` and ``pq_no_leaks``."""
    parser.addini(
        "pq_modes",
        "run modes the pq_mode fixture runs each test in (default: async threaded local)",
        type="args",
        default=list(_REAL_MODE_NAMES),
    )
    parser.addini(
        "pq_no_leaks",
        "fail every test that leaves a child process, thread or file descriptor behind",
        type="bool",
        default=False,
    )


def pytest_configure(config: pytest.Config) -> None:
    """Register the markers, and check ``pq_modes`` once."""
    config.addinivalue_line(
        "markers",
        "pq_no_leaks(processes=True, threads=True, fds=True, ignore_threads=(), timeout=5.0): "
        "fail the test if it leaves a child process, thread or file descriptor behind",
    )
    config.addinivalue_line(
        "markers", "pq_modes(*modes): the run modes the pq_mode fixture runs this test in"
    )
    modes = config.getini("pq_modes")
    if list(modes) != list(_REAL_MODE_NAMES):  # (the default needs no check, nor an import)
        _real_modes(modes, "the ini option pq_modes")
    try:
        config.getini("pq_no_leaks")
    except (ValueError, pytest.UsageError) as exc:  # "invalid truth value 'maybe'": name it
        raise pytest.UsageError(f"the ini option pq_no_leaks: {exc}") from None


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Check the ``pq_no_leaks`` markers of the tests selected to run (last: after ``-k`` and
    ``-m`` deselected theirs): a bad one is a usage error of the run (exit 4), not an error
    with the plugin's traceback at each test. In a pytest-xdist worker, where a usage error
    would crash the run, each such test fails at its setup instead, with the same message."""
    if hasattr(config, "workerinput"):
        return
    for item in items:
        message = _bad_modes_marker(item)
        if message is not None:
            raise pytest.UsageError(message)
        _leak_options(item)


def _bad_modes_marker(item: pytest.Item) -> str | None:
    """What is wrong with the ``pq_modes`` marker of ``item``'s test function, if anything."""
    bad = item.config.stash.get(_BAD_MODES, None)
    if not bad:
        return None
    return bad.get(item.nodeid.split("[", 1)[0])


def _real_modes(names: Iterable[Any], where: str) -> list[RunMode]:
    from ._core._exceptions import InvalidRunModeError
    from ._core._modes import RunMode

    modes: list[RunMode] = []
    for name in names:
        try:
            mode = RunMode.parse(name)
        except InvalidRunModeError as exc:
            raise pytest.UsageError(f"{where}: {exc}") from None
        if mode is RunMode.DRY_RUN:
            raise pytest.UsageError(
                f"{where}: pq_mode runs real modes; use the pq_dry_run fixture for DRY_RUN"
            )
        if mode not in modes:
            modes.append(mode)
    if not modes:
        raise pytest.UsageError(f"{where}: name at least one run mode")
    return modes


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """One test per mode for tests that use ``pq_mode`` (directly or through ``pq_wrapper``).

    A bad ``pq_modes`` marker is not raised here, where it stopped the whole collection with
    pytest's traceback even when ``-k`` deselected the test: it is noted, and reported as a
    usage error of the run once the selection is known (``pytest_collection_modifyitems``), or
    as that test's error in a pytest-xdist worker (``pytest_runtest_setup``)."""
    name = metafunc.definition.name
    if "pq_mode" not in metafunc.fixturenames:
        # Put on the test itself, it would be ignored: the test runs once, in no chosen mode.
        # (On a class or module it names the modes of those of their tests that use pq_mode.)
        if any(mark.name == "pq_modes" for mark in metafunc.definition.own_markers):
            _note_bad_marker(
                metafunc,
                f"@pytest.mark.pq_modes on {name} has no effect: the test uses neither the "
                "pq_mode fixture nor pq_wrapper",
            )
        return
    marker = metafunc.definition.get_closest_marker("pq_modes")
    try:
        if marker is not None:
            if marker.kwargs:
                raise pytest.UsageError(
                    f"@pytest.mark.pq_modes on {name}: name the modes as positional arguments, "
                    f"e.g. pq_modes('async', 'threaded'), not {sorted(marker.kwargs)}"
                )
            modes = _real_modes(marker.args, f"@pytest.mark.pq_modes on {name}")
        else:
            modes = _real_modes(metafunc.config.getini("pq_modes"), "the ini option pq_modes")
    except pytest.UsageError as exc:
        _note_bad_marker(metafunc, str(exc))
        # One instance, which is reported and never runs (pq_mode refuses None).
        metafunc.parametrize("pq_mode", [None], ids=["bad-pq_modes"], indirect=True)
        return
    metafunc.parametrize("pq_mode", modes, ids=[mode.value for mode in modes], indirect=True)


def _note_bad_marker(metafunc: pytest.Metafunc, message: str) -> None:
    bad = metafunc.config.stash.setdefault(_BAD_MODES, {})
    bad[metafunc.definition.nodeid.split("[", 1)[0]] = message


# -- DRY_RUN ----------------------------------------------------------------------------------
def _one_override(request: pytest.FixtureRequest, name: str) -> None:
    other = request.node.stash.get(_MODE_USED, None)
    if other is not None:
        pytest.fail(
            f"{name} and {other} both choose the mode of auto-detected wrappers; a test can use "
            "only one of them",
            pytrace=False,
        )
    request.node.stash[_MODE_USED] = name


def _forget_override(request: pytest.FixtureRequest, *keys: pytest.StashKey[Any]) -> None:
    """Forget what the test's override fixture kept on the item: a rerun of the same item
    (pytest-rerunfailures) runs its fixtures again, and was refused as using two of them."""
    for key in (_MODE_USED, *keys):
        with contextlib.suppress(KeyError):
            del request.node.stash[key]


@pytest.fixture
def pq_dry_run(request: pytest.FixtureRequest) -> Iterator[DryRunScript]:
    """A :class:`DryRunScript` that every auto-detected wrapper answers from during the test.

    ``SubprocessWrapper()`` (no mode), the wrappers a ``ModuleRunner``/``ResourcePool``/
    ``ConcurrentExecutor`` make without a mode, and the drop-ins (``pq.run``,
    ``pq.create_subprocess_exec``...) without ``mode=`` all run in DRY_RUN with this script; a
    wrapper given a mode or strategy explicitly is not affected. Script answers with
    ``pq_dry_run.register(...)``; assert on ``pq_dry_run.calls`` / ``calls_matching(...)``.

    Strict by default: a command no rule answers raises :class:`UnscriptedCommandError` where
    it is started, and the test fails listing every such command even if the code under test
    swallowed the error. ``pq_dry_run.strict = False`` answers them with ``default``
    (returncode 0, no output) instead.
    """
    from ._core._override import override_strategy
    from ._testing._script import DryRunScript

    _one_override(request, "pq_dry_run")
    try:
        script = DryRunScript()
        request.node.stash[_SCRIPT] = script
        with override_strategy(script.strategy, reason="pq_dry_run fixture"):
            yield script
        # Commands run by other fixtures' teardown, after the test body was checked.
        report = script.unscripted_report(request.node.stash.get(_REPORTED, 0))
        if report is not None:
            pytest.fail(report, pytrace=False)
    finally:
        _forget_override(request, _SCRIPT, _REPORTED)


# -- real modes -------------------------------------------------------------------------------
@pytest.fixture
def pq_mode(request: pytest.FixtureRequest) -> Iterator[RunMode]:
    """The run mode of this instance of the test: the test runs once per real mode.

    Meanwhile every auto-detected wrapper and the drop-ins use that mode (the host's code runs
    unchanged in each). The modes are ``async``, ``threaded``, ``local`` unless the ini option
    ``pq_modes`` or the marker ``@pytest.mark.pq_modes("async", ...)`` says otherwise.
    """
    mode: RunMode | None = getattr(request, "param", None)
    if mode is None:
        pytest.fail(
            "pq_mode is parametrised at collection: request it as a test or fixture argument, "
            "not through request.getfixturevalue()",
            pytrace=False,
        )
    from ._core._override import override_strategy

    _one_override(request, "pq_mode")
    try:
        with override_strategy(mode, reason=f"pq_mode fixture ({mode.value})"):
            yield mode
    finally:
        _forget_override(request)


@pytest.fixture
def pq_wrapper(pq_mode: RunMode) -> Iterator[SubprocessWrapper]:
    """A :class:`SubprocessWrapper` in ``pq_mode`` (so the test runs once per real mode).

    After the test, children it started that still run are killed and its threads released.
    """
    from ._core._wrapper import SubprocessWrapper

    wrapper = SubprocessWrapper(pq_mode, grace_period=2.0)
    try:
        yield wrapper
    finally:
        wrapper.cleanup()


# -- leaks ------------------------------------------------------------------------------------
def _leak_check(item: pytest.Item) -> LeakCheck | None:
    try:
        options = _leak_options(item)
    except pytest.UsageError as exc:  # (an xdist worker's: see pytest_collection_modifyitems)
        message = str(exc)
    else:
        if options is None:
            return None
        from ._testing._leaks import LeakCheck

        return LeakCheck(**options)
    pytest.fail(message, pytrace=False)  # (outside the except: no chained traceback)


def _leak_options(item: pytest.Item) -> dict[str, Any] | None:
    """The leak check ``item`` asks for (its marker's options), None if none.

    Raises:
        pytest.UsageError: a marker with bad options.
    """
    marker = item.get_closest_marker("pq_no_leaks")
    wanted = (
        marker is not None
        or "pq_no_leaks" in getattr(item, "fixturenames", ())
        or item.config.getini("pq_no_leaks")
    )
    if not wanted:
        return None
    options = dict(marker.kwargs) if marker is not None else {}
    where = f"@pytest.mark.pq_no_leaks on {item.name}"
    unknown = sorted(set(options) - _LEAK_OPTIONS)
    if marker is not None and (marker.args or unknown):
        raise pytest.UsageError(
            f"{where}: takes only the keywords {', '.join(sorted(_LEAK_OPTIONS))} "
            f"(got {', '.join(unknown) or 'positional arguments'})"
        )
    for flag in ("processes", "threads", "fds"):
        if not isinstance(options.get(flag, True), bool):
            raise pytest.UsageError(f"{where}: {flag} must be True or False")
    ignore = options.get("ignore_threads", ())
    if (
        isinstance(ignore, str)
        or not isinstance(ignore, Iterable)
        or not all(isinstance(p, str) for p in ignore)
    ):
        raise pytest.UsageError(f"{where}: ignore_threads must be a list of thread-name prefixes")
    timeout = options.get("timeout", 5.0)
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not (math.isfinite(timeout) and timeout >= 0)
    ):
        raise pytest.UsageError(f"{where}: timeout must be a number of seconds >= 0")
    return options


def _start_leak_check(item: pytest.Item) -> None:
    check = item.stash.get(_LEAKS, None)
    if check is not None and not check.started:
        check.start()
        item.config.stash[_ACTIVE] = check


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Prepare the leak check of a test that asked for one (it starts just before the test's
    first function-scoped fixture, after the fixtures of wider scope it shares with others)."""
    message = _bad_modes_marker(item)
    if message is not None:  # (a pytest-xdist worker's: see pytest_collection_modifyitems)
        pytest.fail(message, pytrace=False)
    check = _leak_check(item)
    if check is not None:
        item.stash[_LEAKS] = check


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_fixture_setup(
    fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest
) -> Generator[None, Any, Any]:
    """Start a pending leak check before the first function-scoped fixture is set up; leave
    out of it what a fixture of wider scope set up during the test opens (pytest-asyncio's
    module- or session-scoped loop is set up after the test's own fixtures)."""
    if fixturedef.scope == "function" and isinstance(request.node, pytest.Item):
        _start_leak_check(request.node)
        return (yield)
    check = request.config.stash.get(_ACTIVE, None)
    if check is None:
        return (yield)
    with check.exempt():
        return (yield)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, Any]:
    """Fail a ``pq_dry_run`` test that ran unscripted commands (strict mode)."""
    _start_leak_check(item)
    script = item.stash.get(_SCRIPT, None)
    if script is None:
        return (yield)
    try:
        result = yield
    except pytest.skip.Exception:
        # Skipped after running commands nobody scripted: pq_dry_run's teardown reports them
        # (left unmarked as reported; a skip has no failure to carry them).
        raise
    except BaseException as exc:  # (pytest.fail()'s outcome too, which is no Exception)
        item.stash[_REPORTED] = len(script.unscripted)
        report = script.unscripted_report()
        from ._core._exceptions import UnscriptedCommandError

        if report is not None and not isinstance(exc, UnscriptedCommandError):
            exc.add_note(report)
        raise
    item.stash[_REPORTED] = len(script.unscripted)
    report = script.unscripted_report()
    if report is not None:
        pytest.fail(report, pytrace=False)
    return result


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_teardown(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, Any, Any]:
    """Once every fixture is torn down, report what the test leaked."""
    check = item.stash.get(_LEAKS, None)
    if check is None or not check.started:
        return (yield)
    del item.stash[_LEAKS]
    # Teardown sets nothing up: the wider fixtures that stay are exempt already.
    del item.config.stash[_ACTIVE]
    try:
        result = yield
    except BaseException as exc:
        report = check.finish()
        if report:
            exc.add_note(str(report))
        raise
    report = check.finish()
    if report:
        pytest.fail(str(report), pytrace=False)
    return result


@pytest.fixture
def pq_no_leaks(request: pytest.FixtureRequest) -> LeakCheck:
    """Fail the test (at teardown) if it leaves a child process, thread or descriptor behind.

    The same as ``@pytest.mark.pq_no_leaks`` without arguments (use the marker to tune it:
    ``processes=``, ``threads=``, ``fds=`` to switch a check off, ``ignore_threads=`` name
    prefixes, ``timeout=`` seconds the leftovers get to go away, 5 by default). The baseline is
    taken before the test's function-scoped fixtures and compared after all are torn down;
    leaked processes are killed after being reported. Returns the :class:`LeakCheck`.
    """
    check: LeakCheck | None = request.node.stash.get(_LEAKS, None)
    if check is None:
        pytest.fail(
            "pq_no_leaks must be a test's argument (or its fixtures'), not requested through "
            "request.getfixturevalue(): the baseline is taken before the test's fixtures",
            pytrace=False,
        )
    return check
