"""The pytest plugin, exercised the way a host project uses it: small test files run in a pytest
sub-session (pytester), whose outcomes and messages are checked."""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import skip_on_uvloop
from helpers import HOST_PYTEST_ARGS, HOST_PYTEST_INI

pytest_plugins = ["pytester"]


HEADER = """
import asyncio, os, subprocess, sys, threading, time
from pathlib import Path
import psutil, pytest
import prismq_subprocess as pq
from prismq_subprocess import exceptions as errors
PY = sys.executable
"""


@pytest.fixture
def host(pytester: pytest.Pytester) -> pytest.Pytester:
    """A host project: an ini like ours, asyncio tests in auto mode."""
    pytester.makeini(HOST_PYTEST_INI)
    return pytester


def run(host: pytest.Pytester, source: str, *args: str) -> pytest.RunResult:
    host.makepyfile(test_host=HEADER + source)
    return host.runpytest(*HOST_PYTEST_ARGS, "-rA", *args)


def output(result: pytest.RunResult) -> str:
    return "\n".join(result.outlines + result.errlines)


# -- no effect on projects that do not use it --------------------------------------------------
def test_a_project_not_using_the_fixtures_is_unaffected(host: pytest.Pytester) -> None:
    source = """
from prismq_subprocess._core._override import active_override

def test_plain():
    assert active_override() is None
    assert "PRISMQ_PYTEST_COOKIE" not in os.environ

async def test_auto_detected_real_child():
    async with pq.SubprocessWrapper() as w:
        assert w.decision.source is pq.ModeSource.AUTO
        result = await w.run(PY, "-c", "print(1)")
    assert result.stdout.strip() == b"1"

@pytest.mark.parametrize("x", [1, 2])
def test_parametrised(x):
    assert x in (1, 2)
"""
    result = run(host, source, "--strict-markers")
    result.assert_outcomes(passed=4)
    plan = run(host, source, "--setup-plan")
    assert "pq_" not in output(plan)  # no fixture of ours is set up for them
    without = run(host, source, "-p", "no:prismq_subprocess")
    without.assert_outcomes(passed=4)


# -- pq_dry_run ---------------------------------------------------------------------------------
def test_dry_run_answers_host_code_from_the_script_and_records_calls(
    host: pytest.Pytester,
) -> None:
    result = run(
        host,
        """
class Host:
    '''Host code: makes its own wrapper and uses the drop-ins, knows nothing of tests.'''
    async def version(self):
        async with pq.SubprocessWrapper() as w:
            return (await w.run(PY, "-V")).stdout

    async def status(self):
        process = await pq.create_subprocess_exec(PY, "status.py", stdout=pq.PIPE)
        out, _ = await process.communicate()
        return process.returncode, out

async def test_scripted(pq_dry_run):
    pq_dry_run.register((PY, "-V"), stdout="Python 9\\n")
    pq_dry_run.register(prefix=(PY, "status.py"), returncode=3, stdout=b"dirty")
    host = Host()
    assert await host.version() == b"Python 9\\n"
    assert await host.status() == (3, b"dirty")
    assert pq_dry_run.commands == [(PY, "-V"), (PY, "status.py")]
    assert psutil.Process().children(recursive=True) == []

async def test_validated_as_in_the_real_modes(pq_dry_run):
    with pytest.raises(errors.InvalidArgumentTypeError):
        await pq.run(PY, 3)
    with pytest.raises(errors.CwdNotFoundError):
        await pq.run(PY, "-V", cwd="/no/such/dir")
    assert pq_dry_run.calls == [] and pq_dry_run.unscripted == []
""",
    )
    result.assert_outcomes(passed=2)


def test_strict_dry_run_fails_a_test_that_ran_an_unscripted_command(host: pytest.Pytester) -> None:
    result = run(
        host,
        """
async def test_swallowed(pq_dry_run):
    try:
        await pq.run(PY, "-c", "unexpected")
    except Exception:
        pass  # host code that logs and goes on must not hide it

async def test_raised(pq_dry_run):
    await pq.run(PY, "-c", "boom")

async def test_other_failure_gets_the_list(pq_dry_run):
    try:
        await pq.run(PY, "-c", "hidden")
    except Exception:
        pass
    assert 1 == 2

async def test_lenient(pq_dry_run):
    pq_dry_run.strict = False
    assert (await pq.run(PY, "-c", "anything")).returncode == 0

@pytest.fixture
def shuts_down(pq_dry_run):
    pq_dry_run.register((PY, "-V"))
    yield
    try:
        asyncio.run(pq.run(PY, "-c", "at teardown"))
    except errors.UnscriptedCommandError:
        pass  # swallowed by the host: the fixture still reports it

def test_teardown_command(shuts_down):
    pass

async def test_then_fail(pq_dry_run):
    try:
        await pq.run(PY, "-c", "before a fail")
    except Exception:
        pass
    pytest.fail("something else")  # (an outcome, no Exception: the list went missing)

async def test_then_skip(pq_dry_run):
    try:
        await pq.run(PY, "-c", "before a skip")
    except Exception:
        pass
    pytest.skip("feature flag off")  # (the command went unreported)
""",
    )
    result.assert_outcomes(passed=2, failed=4, errors=2, skipped=1)
    text = output(result)
    assert re.search(
        r"FAILED test_host.py::test_swallowed - (Failed: )?1 command\(s\) ran in DRY_RUN", text
    )
    assert "'-c', 'unexpected')" in text
    assert "nothing is scripted for" in text and "'-c', 'boom')" in text
    assert "'-c', 'hidden')" in text and "assert 1 == 2" in text
    assert re.search(r"ERROR test_host.py::test_teardown_command - (Failed: )?1 command", text)
    assert "'-c', 'at teardown')" in text and "(PY, '-V')" not in text
    assert "'-c', 'before a fail')" in text and "something else" in text
    assert re.search(r"ERROR test_host.py::test_then_skip - (Failed: )?1 command", text), text
    assert "'-c', 'before a skip')" in text


def test_dry_run_lines_stream_with_their_delays(host: pytest.Pytester) -> None:
    result = run(
        host,
        """
async def test_stream(pq_dry_run):
    pq_dry_run.register((PY, "job.py"), lines=["a", "b", "c"], line_delay=0.05)
    loop = asyncio.get_running_loop()
    start = loop.time()
    times = []
    async with pq.SubprocessWrapper() as w:
        async with w.stream(PY, "job.py", encoding="utf-8") as lines:
            async for line in lines:
                times.append((line, loop.time() - start))
    assert [line for line, _ in times] == ["a\\n", "b\\n", "c\\n"]
    assert all(at >= 0.05 * (k + 1) - 0.01 for k, (_, at) in enumerate(times))
""",
    )
    result.assert_outcomes(passed=1)


# -- pq_mode / pq_wrapper ---------------------------------------------------------------------
MODE_TEST = """
async def test_each_mode(pq_mode):
    async with pq.SubprocessWrapper() as w:  # the host's own, mode-less wrapper
        assert w.mode is pq_mode and w.decision.source is pq.ModeSource.OVERRIDE
        result = await w.run(PY, "-c", "print('hi')")
    assert result.mode is pq_mode and result.stdout.strip() == b"hi"
    assert (await pq.run(PY, "-c", "pass")).mode is pq_mode

async def test_wrapper(pq_wrapper, pq_mode):
    result = await pq_wrapper.run(PY, "-c", "import os; print(os.getpid())")
    assert pq_wrapper.mode is pq_mode and int(result.stdout) == result.pid
"""


def test_pq_mode_runs_a_test_once_per_real_mode(host: pytest.Pytester) -> None:
    result = run(host, MODE_TEST, "-v")
    result.assert_outcomes(passed=6)
    for mode in ("async", "threaded", "local"):
        result.stdout.fnmatch_lines([f"*test_each_mode?{mode}? PASSED*"])
        result.stdout.fnmatch_lines([f"*test_wrapper?{mode}? PASSED*"])


def test_pq_modes_ini_and_marker_choose_the_modes(host: pytest.Pytester) -> None:
    host.makeini(HOST_PYTEST_INI + "pq_modes = threaded\n")
    run(host, MODE_TEST).assert_outcomes(passed=2)
    marked = MODE_TEST.replace(
        "async def test_each_mode",
        "@pytest.mark.pq_modes('local', 'ASYNC')\nasync def test_each_mode",
    )
    result = run(host, marked, "-v")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(
        ["*test_each_mode?local? PASSED*", "*test_each_mode?async? PASSED*"]
    )


def test_pq_mode_misuse_is_reported_clearly(host: pytest.Pytester) -> None:
    result = run(
        host,
        """
@pytest.mark.pq_modes("dry-run")
def test_dry(pq_mode):
    pass
""",
    )
    assert "pq_mode runs real modes; use the pq_dry_run fixture" in output(result)
    result = run(
        host,
        """
def test_both(pq_dry_run, pq_mode):
    pass
""",
    )
    result.assert_outcomes(errors=3)
    assert "can use only one of them" in output(result)
    # A probe's finds: a marker on a test that does not use pq_mode was ignored (it ran once,
    # in no chosen mode), and keywords were answered "name at least one run mode".
    result = run(host, "@pytest.mark.pq_modes('async')\ndef test_plain():\n    pass\n")
    assert "pq_modes on test_plain has no effect" in output(result)
    result = run(host, "@pytest.mark.pq_modes(modes='async')\ndef test_k(pq_mode):\n    pass\n")
    assert "name the modes as positional arguments" in output(result)
    result = run(
        host,
        "pytestmark = pytest.mark.pq_modes('local')\n"
        "def test_plain():\n    pass\n"
        "def test_moded(pq_mode):\n    assert pq_mode == 'local'\n",
    )
    result.assert_outcomes(passed=2)  # (a module's marker names its pq_mode tests' modes)
    host.makeini(HOST_PYTEST_INI + "pq_modes = warp\n")
    result = run(host, "def test_x():\n    pass\n")
    assert "pq_modes: 'warp' is not a run mode" in output(result)


# -- pq_no_leaks ------------------------------------------------------------------------------
def _wait_gone(pid: int) -> bool:
    try:
        proc = psutil.Process(pid)
        proc.wait(5)
    except psutil.NoSuchProcess:
        return True
    except psutil.TimeoutExpired:
        return False
    return True


def test_a_leaked_child_and_an_escaped_grandchild_are_reported_and_killed(
    host: pytest.Pytester,
) -> None:
    result = run(
        host,
        """
KEEP = []
SLEEPER = [PY, "-c", "import time; time.sleep(60)"]
ESCAPE = (
    "import subprocess, sys; "
    "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
    "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True); "
    "print(p.pid)"
)

@pytest.mark.pq_no_leaks(timeout=0.5)
def test_child():
    KEEP.append(subprocess.Popen(SLEEPER))
    Path("child.pid").write_text(str(KEEP[-1].pid))

@pytest.mark.pq_no_leaks(timeout=0.5)
def test_grandchild():
    # The middle process exits at once: the grandchild is no descendant of ours any more
    # (unless PRISMQ_SUBREAPER=1 made this process a subreaper: then it comes back to us as an
    # orphan, and must be reported all the same).
    out = subprocess.run([PY, "-c", ESCAPE], capture_output=True, check=True).stdout
    Path("grandchild.pid").write_text(out.decode().strip())
    if "subreaper" not in pq.containment_report().mechanisms:
        assert int(out) not in [p.pid for p in psutil.Process().children(recursive=True)]
""",
    )
    result.assert_outcomes(passed=2, errors=2)
    text = output(result)
    assert text.count("the test leaked (still there") == 4  # the two reports + summary lines
    assert "child processes (killed now)" in text
    child = int((host.path / "child.pid").read_text())
    grandchild = int((host.path / "grandchild.pid").read_text())
    assert f"pid {child} " in text and f"pid {grandchild} " in text
    assert _wait_gone(child) and _wait_gone(grandchild)


def test_an_escaped_grandchild_without_the_test_cookie_is_found_by_the_run_cookie(
    host: pytest.Pytester,
) -> None:
    # The host gives its child an environment of its own (no PRISMQ_PYTEST_COOKIE in it); the
    # library still puts its containment cookie there, and the leak check looks for that too.
    result = run(
        host,
        """
ESCAPE = (
    "import subprocess, sys; "
    "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
    "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True); "
    "print(p.pid)"
)

@pytest.mark.pq_no_leaks(timeout=0.5)
async def test_grandchild():
    env = {"PATH": os.environ["PATH"]}
    async with pq.SubprocessWrapper("threaded") as wrapper:
        result = await wrapper.run(PY, "-c", ESCAPE, env=env, check=True)
    Path("grandchild.pid").write_text(result.stdout.decode().strip())
""",
    )
    grandchild = int((host.path / "grandchild.pid").read_text())
    try:
        result.assert_outcomes(passed=1, errors=1)
        assert f"pid {grandchild} " in output(result)
        assert _wait_gone(grandchild)
    finally:
        with contextlib.suppress(psutil.Error):
            psutil.Process(grandchild).kill()


def test_leaked_threads_and_descriptors_are_reported(host: pytest.Pytester) -> None:
    result = run(
        host,
        """
@pytest.mark.pq_no_leaks(timeout=0.2)
def test_thread():
    threading.Thread(target=time.sleep, args=(2.0,), name="left-behind", daemon=True).start()

@pytest.mark.pq_no_leaks(timeout=0.2, ignore_threads=["left-"])
def test_ignored_thread():
    threading.Thread(target=time.sleep, args=(2.0,), name="left-behind", daemon=True).start()

@pytest.mark.pq_no_leaks(timeout=0.2)
def test_fd():
    r, w = os.pipe()
    Path("fds").write_text(f"{r} {w}")
""",
    )
    try:
        result.assert_outcomes(passed=3, errors=2)
        text = output(result)
        assert "'left-behind' (daemon, runs sleep)" in text
        assert "file descriptors:" in text
        if os.path.isdir("/proc/self/fd"):
            assert re.search(r"fd \d+ -> pipe:", text)
    finally:
        for fd in map(int, (host.path / "fds").read_text().split()):
            os.close(fd)
        for thread in threading.enumerate():
            if thread.name == "left-behind":
                thread.join(5)


def test_clean_tests_pass_the_leak_check_in_every_mode(host: pytest.Pytester) -> None:
    result = run(
        host,
        """
@pytest.mark.pq_no_leaks
async def test_marker(pq_mode):
    async with pq.SubprocessWrapper() as w:
        await w.run(PY, "-c", "print(1)")
        async with w.stream(PY, "-c", "print(2)") as lines:
            assert [line async for line in lines] == [b"2\\n"]
    await pq.run(PY, "-c", "pass")  # the drop-ins' wrapper of the pq_mode override

async def test_fixture(pq_no_leaks, pq_wrapper):
    assert pq_no_leaks.started
    await pq_wrapper.run(PY, "-c", "pass")
""",
    )
    result.assert_outcomes(passed=6)


def test_a_short_leak_timeout_does_not_report_the_librarys_own_idle_pool_threads(
    host: pytest.Pytester,
) -> None:
    # The thread that moves ASYNC children into their cgroups lingers 0.25 s after its last
    # job, as asyncio's executor threads outlive a task: not the test's leak.
    result = run(
        host,
        """
@pytest.mark.pq_no_leaks(timeout=0.05)
async def test_marker(pq_mode):
    async with pq.SubprocessWrapper() as w:
        await w.run(PY, "-c", "pass")
""",
    )
    result.assert_outcomes(passed=3)


def test_the_idle_worker_threads_of_anyio_and_trio_are_not_leaks(host: pytest.Pytester) -> None:
    # trio's thread cache keeps an idle worker ("Trio thread N") for 10 s after its job, as
    # anyio's pool does on asyncio: the leak check reported it as the test's leaked thread.
    result = run(
        host,
        """
import anyio, trio

def test_trio():
    async def main():
        await trio.to_thread.run_sync(lambda: None)
    trio.run(main)

def test_anyio_on_asyncio():
    async def main():
        await anyio.to_thread.run_sync(lambda: None)
    anyio.run(main)
""",
        "-o",
        "pq_no_leaks=true",
    )
    result.assert_outcomes(passed=2)


def test_ini_option_checks_every_test_and_bad_marker_arguments_are_refused(
    host: pytest.Pytester,
) -> None:
    host.makeini(HOST_PYTEST_INI + "pq_no_leaks = true\n")
    result = run(
        host,
        """
KEEP = []

def test_leaks_a_child():
    KEEP.append(subprocess.Popen([PY, "-c", "import time; time.sleep(60)"]))
    Path("child.pid").write_text(str(KEEP[-1].pid))

def test_clean():
    pass
""",
    )
    result.assert_outcomes(passed=2, errors=1)
    assert "the test leaked" in output(result)
    assert _wait_gone(int((host.path / "child.pid").read_text()))


@pytest.mark.parametrize(
    ("marker", "says"),
    [
        ("bogus=1", "takes only the keywords"),
        ("True", "positional arguments"),
        ("ignore_threads=3", "ignore_threads must be a list of thread-name prefixes"),
        ('timeout="1"', "timeout must be a number of seconds >= 0"),
    ],
)
def test_a_bad_marker_is_a_usage_error_of_the_run(
    host: pytest.Pytester, marker: str, says: str
) -> None:
    # A probe's find: each test with a bad marker errored with the plugin's traceback (179
    # lines for four); like a bad pq_modes, it is now one usage error (exit 4), before any
    # test runs.
    result = run(
        host,
        f"""
@pytest.mark.pq_no_leaks({marker})
def test_bad_marker():
    pass

def test_clean():
    pass
""",
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    text = output(result)
    assert says in text and "test_bad_marker" in text
    assert "Traceback" not in text and "pytest_plugin.py" not in text


@pytest.mark.parametrize("how", ["deselected by -k", "under pytest-xdist"])
def test_a_bad_marker_stops_neither_a_run_that_deselects_it_nor_an_xdist_run(
    host: pytest.Pytester, how: str
) -> None:
    # A review's find: the collection-time check also refused a run whose -k deselected the
    # test, and under pytest-xdist a worker's usage error crashed the run (INTERNALERROR, the
    # message never shown). A worker now fails that test at its setup, with the message alone.
    host.makepyfile(
        test_host=HEADER
        + """
@pytest.mark.pq_no_leaks(timeout="soon")
def test_bad_marker():
    pass

def test_good():
    pass
"""
    )
    if how == "deselected by -k":
        result = host.runpytest(*HOST_PYTEST_ARGS, "-k", "test_good")
        result.assert_outcomes(passed=1, deselected=1)
        return
    result = host.runpytest(*HOST_PYTEST_ARGS, "-n", "2", "-p", "xdist")
    result.assert_outcomes(passed=1, errors=1)
    text = output(result)
    assert "timeout must be a number of seconds >= 0" in text
    assert "INTERNALERROR" not in text and "pytest_plugin.py" not in text


@pytest.mark.parametrize(
    ("marked", "says"),
    [
        ("@pytest.mark.pq_modes('async')\ndef test_bad():", "pq_modes on test_bad has no effect"),
        ("@pytest.mark.pq_modes('warp')\ndef test_bad(pq_mode):", "'warp' is not a run mode"),
        (
            "@pytest.mark.pq_modes(modes='async')\ndef test_bad(pq_mode):",
            "name the modes as positional arguments",
        ),
    ],
    ids=["no pq_mode", "bad mode", "keywords"],
)
@pytest.mark.parametrize("how", ["alone", "deselected by -k", "under pytest-xdist"])
def test_a_bad_pq_modes_marker_is_a_usage_error_of_the_tests_that_run(
    host: pytest.Pytester, marked: str, says: str, how: str
) -> None:
    # A new user's find: a misused pq_modes marker stopped the collection with some 35 lines
    # of pluggy traceback, even when -k deselected the test; as a bad pq_no_leaks marker, it
    # is one usage error (exit 4) of a run that selects it, and under xdist that test's error.
    host.makepyfile(test_host=HEADER + marked + "\n    pass\n\ndef test_good():\n    pass\n")
    if how == "deselected by -k":
        result = host.runpytest(*HOST_PYTEST_ARGS, "-k", "test_good")
        result.assert_outcomes(passed=1, deselected=1)
        return
    if how == "alone":
        result = host.runpytest(*HOST_PYTEST_ARGS)
        assert result.ret == pytest.ExitCode.USAGE_ERROR
    else:
        result = host.runpytest(*HOST_PYTEST_ARGS, "-n", "2", "-p", "xdist")
        result.assert_outcomes(passed=1, errors=1)
    text = output(result)
    assert says in text
    assert "Traceback" not in text and "pytest_plugin.py" not in text
    assert "INTERNALERROR" not in text


def test_a_bad_pq_no_leaks_ini_value_is_a_usage_error_naming_the_option(
    host: pytest.Pytester,
) -> None:
    host.makeini(HOST_PYTEST_INI + "pq_no_leaks = maybe\n")
    result = run(host, "def test_clean():\n    pass\n")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "the ini option pq_no_leaks" in output(result)


@skip_on_uvloop(
    "a uvloop loop opens /dev/null at its first spawns and keeps it until it closes; a "
    "module-scoped loop's is opened inside the first test's check, indistinguishable from the "
    "test's own descriptors (docs/RUN_MODES.md)"
)
def test_what_a_wider_fixture_opens_during_the_check_is_not_the_tests_leak(
    host: pytest.Pytester,
) -> None:
    # pytest-asyncio sets up a module- or session-scoped loop (its epoll descriptor, its
    # self-pipe) in the first test that runs on it, after that test's function-scoped fixtures:
    # inside the leak check. A session fixture requested through getfixturevalue is the same.
    # Neither is the test's: they outlive it by design. What the test itself leaks still counts.
    host.makeini(HOST_PYTEST_INI + "asyncio_default_test_loop_scope = module\n")
    result = run(
        host,
        """
@pytest.fixture(scope="session")
def session_resources():
    r, w = os.pipe()
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name="session-thread", daemon=True)
    thread.start()
    child = subprocess.Popen([PY, "-c", "import time; time.sleep(60)"])
    yield
    child.kill()
    child.wait()
    stop.set()
    thread.join()
    os.close(r)
    os.close(w)

@pytest.mark.pq_no_leaks  # (the library's own worker threads linger a moment: default timeout)
async def test_first_on_the_module_loop(pq_wrapper):
    await pq_wrapper.run(PY, "-c", "pass")

@pytest.mark.pq_no_leaks(timeout=0.2)
def test_lazy_session_fixture(request):
    request.getfixturevalue("session_resources")

@pytest.mark.pq_no_leaks(timeout=0.2)
async def test_own_leak_still_counts():
    r, w = os.pipe()
    Path("fds").write_text(f"{r} {w}")
""",
    )
    try:
        text = output(result)
        result.assert_outcomes(passed=5, errors=1)
        assert "ERROR at teardown of test_own_leak_still_counts" in text, text
        assert re.search(r"fd \d+ -> pipe:", text) or not os.path.isdir("/proc/self/fd")
    finally:
        for fd in map(int, (host.path / "fds").read_text().split()):
            os.close(fd)


def test_a_daemon_a_lazy_wider_fixture_starts_through_the_library_is_not_the_tests_leak(
    host: pytest.Pytester,
) -> None:
    # A probe's find: the same module fixture, requested through getfixturevalue, passed with a
    # daemon started by plain subprocess but not through the library: the daemon carried the
    # cookie of a run numbered during the test, so it was called the test's leak, and killed
    # (every later test of the fixture then failed). Runs numbered while such a fixture is set
    # up are not the test's.
    tag = f"prismq-lazy-daemon-{os.getpid()}-{time.monotonic_ns()}"
    result = run(
        host,
        f"""
TAG = {tag!r}

DAEMONIZE = (
    "import subprocess, sys; subprocess.Popen([sys.executable, '-c', "
    "'import time; time.sleep(60)', sys.argv[1]], start_new_session=True, "
    "stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)"
)

@pytest.fixture(scope="module")
def server():
    # (Popen returns once the daemon runs in its own session: it has left the run's group
    # before the run ends, which a shell's `setsid ... &` may not have, on a loaded machine.)
    async def start():
        async with pq.SubprocessWrapper() as wrapper:
            await wrapper.run(PY, "-c", DAEMONIZE, TAG, check=True)
    asyncio.run(start())
    yield

def up():
    return [p for p in psutil.process_iter(["cmdline"]) if TAG in (p.info["cmdline"] or [])]

@pytest.mark.pq_no_leaks(timeout=0.5)
def test_uses_the_server_lazily(request):
    request.getfixturevalue("server")
    assert up()

def test_the_server_is_still_up(server):
    assert up(), "the leak check killed the fixture's daemon"
""",
    )
    try:
        result.assert_outcomes(passed=2)
    finally:
        for proc in psutil.process_iter(["cmdline"]):
            if tag in (proc.info["cmdline"] or []):
                with contextlib.suppress(psutil.Error):
                    proc.kill()


def test_leak_check_waits_for_leftovers_that_go_away(host: pytest.Pytester) -> None:
    started = time.monotonic()
    result = run(
        host,
        """
@pytest.mark.pq_no_leaks(timeout=10)
def test_slow_to_end():
    threading.Thread(target=time.sleep, args=(0.3,), name="finishing", daemon=True).start()
""",
    )
    result.assert_outcomes(passed=1)
    assert time.monotonic() - started < 10  # returned once the thread ended, not at the limit


def test_plugin_module_is_the_entry_point_and_the_package_does_not_import_pytest() -> None:
    from importlib.metadata import entry_points

    [entry] = [ep for ep in entry_points(group="pytest11") if ep.name == "prismq_subprocess"]
    assert entry.value == "prismq_subprocess.pytest_plugin"
    code = "import sys, prismq_subprocess; print('pytest' in sys.modules)"
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, text=True)
    assert out.stdout.strip() == "False"
    assert Path(__file__).parent.name == "plugin"


def test_a_leaked_zombie_is_described_with_its_name() -> None:
    # A probe's find: an exited, unreaped child was listed as "pid N (ZombieProcess)" (its
    # command line is gone), not as "pid N [status, parent P]: command" like the others.
    import subprocess
    import sys

    from prismq_subprocess._testing._leaks import _describe_process

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 10
        while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        text = _describe_process(psutil.Process(child.pid))
        assert text.startswith(f"pid {child.pid} [zombie, parent {os.getpid()}]: "), text
    finally:
        child.wait()


def test_a_rerun_of_the_same_item_may_use_the_override_fixtures_again(
    host: pytest.Pytester,
) -> None:
    # A probe's find: with pytest-rerunfailures (which runs the same item object again), the
    # rerun of a pq_dry_run or pq_mode test was refused: "pq_dry_run and pq_dry_run both
    # choose the mode of auto-detected wrappers". This conftest reruns every test once, as
    # that plugin does.
    host.makeconftest(
        """
from _pytest.runner import runtestprotocol

def pytest_runtest_protocol(item, nextitem):
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    runtestprotocol(item, nextitem=None, log=True)
    item._initrequest()  # (what pytest-rerunfailures does before a rerun)
    runtestprotocol(item, nextitem=nextitem, log=True)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True
"""
    )
    result = run(
        host,
        """
def test_dry(pq_dry_run):
    pq_dry_run.register(("git", "status"), stdout="clean")

@pytest.mark.pq_modes("threaded")
def test_mode(pq_mode):
    assert pq_mode.value == "threaded"
""",
    )
    assert "both choose" not in output(result)
    result.assert_outcomes(passed=4)
