"""Shared fixtures: one wrapper per mode, so a new mode is tested by adding it to one list."""

from __future__ import annotations

import asyncio
import faulthandler
import functools
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import pytest

import prismq_subprocess as pq
from prismq_subprocess import RunMode

# A test still running after this long is hung: dump every thread's stack and end the run, so a
# hang costs CI minutes and says where it is, instead of holding the job until its time limit.
HUNG_TEST_SECONDS = 240
_REAL_STDERR: list[int] = []


#: ``PRISMQ_TEST_LOOP=uvloop`` runs every test's loop (pytest-asyncio's, and asyncio.run's) on
#: uvloop, the loop ``uvicorn[standard]`` picks: ``PRISMQ_TEST_LOOP=uvloop pytest tests/core``.
TEST_LOOP_VAR = "PRISMQ_TEST_LOOP"
#: Whether this run's loops are uvloop's.
ON_UVLOOP = os.environ.get(TEST_LOOP_VAR, "") == "uvloop"

_Test = TypeVar("_Test", bound=Callable[..., Any])


def skip_on_uvloop(reason: str) -> pytest.MarkDecorator:
    """Skip a test under ``PRISMQ_TEST_LOOP=uvloop``, saying why: it checks asyncio's own
    internals, or a difference that is uvloop's (docs/RUN_MODES.md lists those)."""
    return pytest.mark.skipif(ON_UVLOOP, reason=f"on uvloop: {reason}")


def skip_if_async_on_uvloop(wrapper: pq.SubprocessWrapper, reason: str) -> None:
    """Inside a test parametrised over the modes: skip its ASYNC case under
    ``PRISMQ_TEST_LOOP=uvloop`` (the other modes still run on uvloop), saying why."""
    if ON_UVLOOP and wrapper.mode is RunMode.ASYNC:
        pytest.skip(f"on uvloop: {reason}")


async def open_the_loops_own_descriptors() -> None:
    """Before counting descriptors in a test: on uvloop, the first spawns in a loop (one with a
    ``DEVNULL`` stream, one with a stdin pipe in a new session) open ``/dev/null`` and keep it
    until the loop closes (uvloop's own, with ``asyncio.create_subprocess_exec`` alike); those
    are not the test's. Nothing elsewhere."""
    if ON_UVLOOP:
        for options in (
            {"stdin": asyncio.subprocess.DEVNULL},
            {"stdin": asyncio.subprocess.PIPE, "start_new_session": True},
        ):
            process = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass", **options)
            await process.communicate()


def ends_a_loop_with_children_running(test: _Test) -> _Test:
    """For a test whose event loop ends while its children run, on purpose. uvloop warns of
    every handle still open when its loop closes (the child's, its pipes'), and under
    ``error::ResourceWarning`` the warning keeps it from closing them: ``loop.close()`` then
    waits for the children to exit and fails with ``OSError: [Errno 16] EBUSY``. The same with
    ``asyncio.create_subprocess_exec`` alone: uvloop's, not ours."""
    if ON_UVLOOP:
        return pytest.mark.filterwarnings("ignore::ResourceWarning")(test)  # type: ignore[no-any-return]
    return test


#: The environment variables behind ``_share_child_bytecode``.
DONT_WRITE_BYTECODE_VAR = "PYTHONDONTWRITEBYTECODE"
PYCACHE_PREFIX_VAR = "PYTHONPYCACHEPREFIX"
_CHILD_BYTECODE: list[tuple[str, str]] = []  # (folder, the variable's value it replaced)


def _share_child_bytecode(config: pytest.Config) -> None:
    """Let the tests' child Pythons share one bytecode cache in a temporary folder.

    Hundreds of tests start a Python that imports the package (the command line, pytester runs,
    cluster workers, the docs' examples). With ``PYTHONDONTWRITEBYTECODE`` set (CI sets it, so
    nothing is written into the clone) each child compiled the package's hundred-odd modules
    again: about 0.2 s of CPU a child on 2 shared cores. ``PYTHONPYCACHEPREFIX`` sends their
    bytecode to a folder of this session's instead, so the source tree still gets none; the
    folder goes when the session ends. A prefix the user set is left alone, and so is a run
    that writes bytecode anyway. Set by the xdist controller (or a plain run) before the
    workers start: they inherit it.
    """
    if hasattr(config, "workerinput") or not os.environ.get(DONT_WRITE_BYTECODE_VAR):
        return
    if os.environ.get(PYCACHE_PREFIX_VAR):
        return
    folder = tempfile.mkdtemp(prefix="prismq-test-bytecode-")
    _CHILD_BYTECODE.append((folder, os.environ.pop(DONT_WRITE_BYTECODE_VAR)))
    os.environ[PYCACHE_PREFIX_VAR] = folder


def pytest_configure(config: pytest.Config) -> None:
    # Output capture is suspended while plugins configure: descriptor 2 is the terminal here.
    _REAL_STDERR.append(os.dup(2))
    _share_child_bytecode(config)
    loop = os.environ.get(TEST_LOOP_VAR, "")
    if loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise pytest.UsageError(f"{TEST_LOOP_VAR}=uvloop: uvloop is not installed") from None
        # pytest-asyncio's event_loop_policy fixture returns the policy current at its start.
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    elif loop not in ("", "asyncio"):
        raise pytest.UsageError(f"{TEST_LOOP_VAR}={loop!r}: expected 'asyncio' or 'uvloop'")


def pytest_unconfigure(config: pytest.Config) -> None:
    for folder, dont_write in _CHILD_BYTECODE:
        shutil.rmtree(folder, ignore_errors=True)
        if os.environ.get(PYCACHE_PREFIX_VAR) == folder:
            del os.environ[PYCACHE_PREFIX_VAR]
            os.environ[DONT_WRITE_BYTECODE_VAR] = dont_write
    _CHILD_BYTECODE.clear()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    faulthandler.dump_traceback_later(HUNG_TEST_SECONDS, exit=True, file=_REAL_STDERR[0])
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


# Each entry builds a wrapper. "threaded-waiter" is THREADED without pidfd: the route macOS takes
# (one waiter thread per child). "threaded-threads" is the Windows route (a thread per pipe, a
# waiter per child), exercised here on Linux.
_STRATEGIES: dict[str, Callable[[], RunMode | pq.abc.SubprocessStrategy]] = {
    "async": lambda: RunMode.ASYNC,
    "threaded": lambda: RunMode.THREADED,
    "threaded-waiter": lambda: pq.abc.ThreadedStrategy(use_pidfd=False),
    "threaded-threads": lambda: pq.abc.ThreadedStrategy(io="threads", use_pidfd=False),
    "local": lambda: RunMode.LOCAL,
    "dry-run": lambda: RunMode.DRY_RUN,
}


def wrapper_for(mode: str, grace_period: float = 2.0) -> pq.SubprocessWrapper:
    """A wrapper of ``mode`` (a key of :data:`WRAPPER_FACTORIES`). A test that checks a child
    got its polite stop gives a long grace: a loaded machine may not run a child's SIGTERM
    handler within 2 s (CI on Python 3.13, four workers on 2 cores: the child was killed)."""
    return pq.SubprocessWrapper(_STRATEGIES[mode](), grace_period=grace_period)


WRAPPER_FACTORIES: dict[str, Callable[[], pq.SubprocessWrapper]] = {
    mode: functools.partial(wrapper_for, mode) for mode in _STRATEGIES
}
REAL = ["async", "threaded", "threaded-waiter", "threaded-threads", "local"]
# Output visible while the child runs:
STREAMING = ["async", "threaded", "threaded-waiter", "threaded-threads"]


@pytest.fixture(params=REAL)
async def wrapper(request: pytest.FixtureRequest) -> AsyncIterator[pq.SubprocessWrapper]:
    """A wrapper for each mode that starts real processes."""
    async with WRAPPER_FACTORIES[request.param]() as w:
        yield w


@pytest.fixture(params=STREAMING)
async def streaming_wrapper(request: pytest.FixtureRequest) -> AsyncIterator[pq.SubprocessWrapper]:
    """A wrapper for each mode whose output streams while the child runs."""
    async with WRAPPER_FACTORIES[request.param]() as w:
        yield w


@pytest.fixture(params=list(WRAPPER_FACTORIES))
async def any_wrapper(request: pytest.FixtureRequest) -> AsyncIterator[pq.SubprocessWrapper]:
    """A wrapper for every mode, DRY_RUN included."""
    async with WRAPPER_FACTORIES[request.param]() as w:
        yield w
