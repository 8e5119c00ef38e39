"""Bad input is a specific PrismQError (also the builtin a caller would catch), raised before
anything starts, and the same in every mode, DRY_RUN included (issue 11 D13, D14)."""

from __future__ import annotations

import asyncio
import errno
import io
import math
import os
import stat
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import skip_if_async_on_uvloop
from helpers import py

import prismq_subprocess as pq

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions and accounts")


def threads() -> set[int | None]:
    return {t.ident for t in threading.enumerate()}


async def no_new_threads(before: set[int | None], settle: float = 2.0) -> bool:
    """True once no thread beyond ``before`` is alive. Threads of earlier tests come and go
    meanwhile (the containment worker lingers 0.25 s after a finalizer's job), so a new thread
    gets ``settle`` seconds to end; a leaked one does not."""
    deadline = time.monotonic() + settle
    while threads() - before:
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def no_such_user() -> str:
    import pwd

    name = "prismq-no-such-user"
    with pytest.raises(KeyError):
        pwd.getpwnam(name)
    return name


@pytest.fixture
def not_executable(tmp_path: Path) -> Path:
    path = tmp_path / "script.sh"
    path.write_text("#!/bin/sh\necho hi\n")
    path.chmod(stat.S_IRUSR | stat.S_IWUSR)
    return path


@pytest.fixture
def bad_binary(tmp_path: Path) -> Path:
    path = tmp_path / "garbage"
    path.write_bytes(b"\x00\x01\x02 this is not a program\n")
    path.chmod(stat.S_IRWXU)
    return path


# -- failures the spawn reports (every real mode, through run() and create_subprocess_exec) ----
@pytest.mark.parametrize("api", ["run", "exec"])
async def test_a_program_that_cannot_be_executed(
    wrapper: pq.SubprocessWrapper, not_executable: Path, tmp_path: Path, api: str
) -> None:
    for program, detail in ((not_executable, "not executable"), (tmp_path, "is a directory")):
        with pytest.raises(PermissionError) as info:
            if api == "run":
                await wrapper.run(program)
            else:
                await wrapper.create_subprocess_exec(program)
        assert isinstance(info.value, pq.exceptions.CommandNotExecutableError)
        assert isinstance(info.value, pq.exceptions.SpawnFailedError)
        assert detail in str(info.value)
        assert info.value.filename == str(program)
    assert wrapper.live_processes == []


@pytest.mark.parametrize("api", ["run", "exec"])
async def test_a_file_that_is_not_a_program(
    wrapper: pq.SubprocessWrapper, bad_binary: Path, api: str
) -> None:
    skip_if_async_on_uvloop(
        wrapper, "libuv runs execvp: a file without #! is run by /bin/sh, no ENOEXEC"
    )
    with pytest.raises(OSError) as info:
        if api == "run":
            await wrapper.run(bad_binary)
        else:
            await wrapper.create_subprocess_exec(bad_binary)
    assert isinstance(info.value, pq.exceptions.ExecutableFormatError)
    assert info.value.errno == errno.ENOEXEC
    assert "#!" in str(info.value)
    assert wrapper.live_processes == []


def _fails_in_the_child() -> None:
    raise ValueError("the host's set-up failed")


@pytest.mark.parametrize("api", ["run", "exec"])
async def test_a_preexec_fn_that_raises_is_a_spawn_failure(
    wrapper: pq.SubprocessWrapper, api: str
) -> None:
    # Popen's bare SubprocessError("Exception occurred in preexec_fn.") said neither which
    # spawn failed nor that nothing was started, and was no PrismQError (nor an OSError, as
    # every other spawn failure is). Still a SubprocessError, as asyncio raises.
    with pytest.raises(subprocess.SubprocessError) as info:
        if api == "run":
            await wrapper.run("/bin/true", preexec_fn=_fails_in_the_child)
        else:
            await wrapper.create_subprocess_exec("/bin/true", preexec_fn=_fails_in_the_child)
    assert isinstance(info.value, pq.exceptions.PreexecFnError)
    assert isinstance(info.value, pq.exceptions.SpawnFailedError)
    message = str(info.value)
    assert "preexec_fn" in message and "/bin/true" in message and "nothing" in message
    assert wrapper.live_processes == []


@pytest.mark.skipif(sys.platform == "win32", reason="process groups")
async def test_a_failure_in_the_child_before_exec_does_not_blame_the_program(
    wrapper: pq.SubprocessWrapper,
) -> None:
    # A probe's find: ASYNC said "cannot execute '/bin/true': it is not executable by this
    # user" for a setpgid refused in the child (process_group=1: EPERM before exec), where
    # THREADED and LOCAL said what happened. The program's name given for uvloop (whose errors
    # carry none) was given on asyncio's own loops too, where Popen leaves it out on purpose.
    skip_if_async_on_uvloop(wrapper, "it refuses process_group= (test_uvloop.py)")
    with pytest.raises(pq.exceptions.SpawnFailedError) as info:
        await wrapper.run("/bin/true", process_group=1)
    assert not isinstance(info.value, pq.exceptions.CommandNotExecutableError)
    assert "not executable" not in str(info.value)
    assert wrapper.live_processes == []


async def test_a_missing_executable_is_named(wrapper: pq.SubprocessWrapper) -> None:
    with pytest.raises(pq.CommandNotFoundError, match="/nonexistent/interpreter"):
        await wrapper.run(*py("pass"), executable="/nonexistent/interpreter")


# -- checks before anything starts, identical in every mode (DRY_RUN included) ----------------
BAD_OPTIONS: list[tuple[dict[str, Any], type[BaseException], type[BaseException]]] = [
    ({"foo": 1}, pq.exceptions.InvalidOptionError, TypeError),
    ({"limit": 5}, pq.exceptions.InvalidOptionError, TypeError),  # run() takes no limit=
    ({"pass_fds": 5}, pq.exceptions.InvalidOptionError, TypeError),
    ({"pass_fds": ["x"]}, pq.exceptions.InvalidOptionError, ValueError),
    ({"pass_fds": [-1]}, pq.exceptions.InvalidOptionError, ValueError),
    ({"pass_fds": [9999]}, pq.exceptions.InvalidOptionError, ValueError),  # not an open descriptor
    ({"user": -5}, pq.exceptions.InvalidOptionError, ValueError),
    ({"user": 1.5}, pq.exceptions.InvalidOptionError, TypeError),
    ({"extra_groups": 5}, pq.exceptions.InvalidOptionError, TypeError),
    ({"umask": "x"}, pq.exceptions.InvalidOptionError, TypeError),
    ({"pipesize": "x"}, pq.exceptions.InvalidOptionError, TypeError),
    ({"process_group": "x"}, pq.exceptions.InvalidOptionError, TypeError),
    ({"startupinfo": 1}, pq.exceptions.InvalidOptionError, ValueError),  # Windows only
    ({"creationflags": 4}, pq.exceptions.InvalidOptionError, ValueError),  # Windows only
    ({"preexec_fn": 5}, pq.exceptions.InvalidOptionError, TypeError),
    ({"executable": 5}, pq.exceptions.InvalidOptionError, TypeError),
    # Ints too big for the C types Popen converts them to: a bare OverflowError before (DRY_RUN
    # took the ids).
    ({"pass_fds": [10**20]}, pq.exceptions.InvalidOptionError, ValueError),
    ({"user": 2**32}, pq.exceptions.InvalidOptionError, ValueError),
    ({"group": 10**30}, pq.exceptions.InvalidOptionError, ValueError),
    ({"extra_groups": [2**32]}, pq.exceptions.InvalidOptionError, ValueError),
    # A probe's find (session 34): bare OverflowError / ValueError, and DRY_RUN took them.
    ({"umask": 2**31}, pq.exceptions.InvalidOptionError, ValueError),
    ({"process_group": 2**31}, pq.exceptions.InvalidOptionError, ValueError),
    ({"executable": "/bin/true\0"}, pq.exceptions.InvalidOptionError, ValueError),
    ({"executable": b"/bin/true\0"}, pq.exceptions.InvalidOptionError, ValueError),
]
if sys.platform != "win32":
    BAD_OPTIONS.append(({"executable": "/x\ud800"}, pq.exceptions.InvalidOptionError, ValueError))
if sys.version_info < (3, 12):
    # Python 3.11's Popen takes these two as C ints (a bare TypeError/OverflowError there, while
    # DRY_RUN accepted them); later versions take any object's truth value.
    BAD_OPTIONS += [
        ({"start_new_session": "x"}, pq.exceptions.InvalidOptionError, TypeError),
        ({"restore_signals": None}, pq.exceptions.InvalidOptionError, TypeError),
        ({"start_new_session": 10**30}, pq.exceptions.InvalidOptionError, ValueError),
    ]


@pytest.mark.parametrize(("kwargs", "error", "builtin"), BAD_OPTIONS)
async def test_bad_options_are_refused_in_every_mode(
    any_wrapper: pq.SubprocessWrapper,
    kwargs: dict[str, Any],
    error: type[BaseException],
    builtin: type[BaseException],
) -> None:
    before = threads()
    with pytest.raises(error) as info:
        await any_wrapper.run(*py("pass"), **kwargs)
    assert isinstance(info.value, builtin)
    assert isinstance(info.value, pq.PrismQError)
    assert any_wrapper.live_processes == []
    assert await no_new_threads(before)
    if "limit" not in kwargs:
        with pytest.raises(error):
            await any_wrapper.create_subprocess_exec(*py("pass"), **kwargs)


@pytest.mark.skipif(sys.platform == "win32", reason="Windows takes wide strings as they are")
@pytest.mark.parametrize("where", ["argument", "program", "shell", "env key", "env value"])
async def test_text_the_os_cannot_hold_is_refused_in_every_mode(
    any_wrapper: pq.SubprocessWrapper, where: str
) -> None:
    # An adversary's find: a lone surrogate reached the caller as a bare UnicodeEncodeError
    # from Popen in the real modes, and DRY_RUN accepted it. "\udcff" (an undecodable byte
    # carried by surrogateescape) stays fine: it is the byte 0xff.
    bad = "x\ud800"
    call: Any
    error: type[BaseException] = pq.exceptions.InvalidCommandError
    if where == "argument":
        call = any_wrapper.run("echo", bad)
    elif where == "program":
        call = any_wrapper.run(bad)
    elif where == "shell":
        call = any_wrapper.run(f"echo {bad}", shell=True)
    else:
        error = pq.exceptions.InvalidEnvironmentError
        env = {bad: "1"} if where == "env key" else {"A": bad}
        call = any_wrapper.run(*py("pass"), env={**os.environ, **env})
    with pytest.raises(error, match="surrogate"):
        await call
    assert any_wrapper.live_processes == []
    result = await any_wrapper.run("echo", "x\udcff")
    assert result.returncode == 0


@pytest.mark.parametrize("option", ["user", "group", "extra_groups"])
async def test_unknown_accounts_are_refused_in_every_mode(
    any_wrapper: pq.SubprocessWrapper, option: str
) -> None:
    name = no_such_user()
    value: Any = [name] if option == "extra_groups" else name
    with pytest.raises(KeyError) as info:
        await any_wrapper.run(*py("pass"), **{option: value})
    assert isinstance(info.value, pq.exceptions.UnknownUserError)
    assert name in str(info.value) and option in str(info.value)
    assert any_wrapper.live_processes == []


async def test_good_options_still_pass(any_wrapper: pq.SubprocessWrapper) -> None:
    skip_if_async_on_uvloop(any_wrapper, "it refuses umask= (test_uvloop.py)")
    read, write = os.pipe()
    try:
        result = await any_wrapper.run(
            *py("pass"), pass_fds=[write], umask=0o22, process_group=-1, close_fds=True
        )
        assert result.returncode == 0
    finally:
        os.close(read)
        os.close(write)


# Not a stream Popen takes: subprocess failed deep inside with a bare AttributeError (or EBADF
# after the fork), and DRY_RUN accepted each of them.
BAD_STDIO: list[dict[str, Any]] = [
    {"stdout": "junk"},
    {"stdin": object()},
    {"stderr": -7},
    {"stdout": 99999},  # not an open descriptor
    {"stdout": True},
    {"stdout": subprocess.STDOUT},  # for stderr only
    {"stdin": io.BytesIO()},  # no descriptor behind it
    {"stdout": 10**20},  # no C int: a bare OverflowError before
]


@pytest.mark.parametrize("kwargs", BAD_STDIO, ids=lambda kwargs: repr(kwargs)[:30])
async def test_bad_stdio_is_refused_in_every_mode(
    any_wrapper: pq.SubprocessWrapper, kwargs: dict[str, Any]
) -> None:
    with pytest.raises(pq.exceptions.InvalidOptionError) as info:
        await any_wrapper.create_subprocess_exec(*py("pass"), **kwargs)
    assert next(iter(kwargs)) in str(info.value)
    assert any_wrapper.live_processes == []


async def test_good_stdio_still_passes(any_wrapper: pq.SubprocessWrapper) -> None:
    read, write = os.pipe()
    try:
        with os.fdopen(os.dup(read), "rb") as reader:  # a file object
            proc = await any_wrapper.create_subprocess_exec(
                *py("pass"), stdin=reader, stdout=write, stderr=subprocess.STDOUT
            )
            assert await proc.wait() == 0
        proc = await any_wrapper.create_subprocess_exec(
            *py("pass"), stdin=subprocess.DEVNULL, stdout=None, stderr=subprocess.PIPE
        )
        await proc.communicate()
        assert proc.returncode == 0
    finally:
        os.close(read)
        os.close(write)


# -- stream() and iter_lines() arguments ------------------------------------------------------
@pytest.mark.parametrize("cap", ["x", 1.5, -1])
async def test_stream_checks_max_stderr_bytes_before_starting(
    any_wrapper: pq.SubprocessWrapper, cap: Any
) -> None:
    with pytest.raises(pq.exceptions.InvalidLimitError):
        any_wrapper.stream(*py("pass"), merge_stderr=False, max_stderr_bytes=cap)
    assert any_wrapper.live_processes == []


async def test_stream_checks_the_encoding_before_starting(
    any_wrapper: pq.SubprocessWrapper,
) -> None:
    with pytest.raises(LookupError) as info:
        any_wrapper.stream(*py("pass"), encoding="no-such-codec")
    assert isinstance(info.value, pq.exceptions.InvalidEncodingError)
    assert any_wrapper.live_processes == []


# Names codecs.lookup() refuses with a bare ValueError (NUL), codecs that do not turn bytes into
# text (they failed at the first line: TypeError or AssertionError, after the child started), and
# one that refuses stream()'s "replace" handler (UnicodeError at the first line), and one that
# ignores it where it does (punycode before Python 3.13: the first bad byte ended the stream with
# a UnicodeDecodeError, the lines before it lost; 3.13's honours the handler).
try:
    b"\xff".decode("punycode", "replace")
    PUNYCODE_IGNORES_REPLACE = False
except UnicodeError:
    PUNYCODE_IGNORES_REPLACE = True
BAD_ENCODINGS = [
    "utf-8\0",
    "rot13",
    "hex",
    "base64",
    "zlib",
    *(["punycode"] if PUNYCODE_IGNORES_REPLACE else []),
    "idna",
]


@pytest.mark.parametrize("encoding", BAD_ENCODINGS)
async def test_stream_refuses_an_encoding_it_cannot_decode_with_before_starting(
    any_wrapper: pq.SubprocessWrapper, encoding: str
) -> None:
    with pytest.raises(LookupError) as info:
        any_wrapper.stream(*py("print('x')"), encoding=encoding)
    assert isinstance(info.value, pq.exceptions.InvalidEncodingError)
    assert repr(encoding) in str(info.value)
    assert any_wrapper.live_processes == []


@pytest.mark.parametrize("encoding", BAD_ENCODINGS[:-1])
async def test_iter_lines_refuses_an_encoding_it_cannot_decode_with(encoding: str) -> None:
    with pytest.raises(pq.exceptions.InvalidEncodingError):
        pq.iter_lines(asyncio.StreamReader(), encoding=encoding)


async def test_iter_lines_checks_the_encoding_with_its_error_handler() -> None:
    reader = asyncio.StreamReader()
    with pytest.raises(pq.exceptions.InvalidEncodingError, match="idna"):
        pq.iter_lines(reader, encoding="idna")  # errors="replace" by default
    with pytest.raises(pq.exceptions.InvalidEncodingError):
        pq.iter_lines(reader, encoding="utf-8", errors="strict\0")
    lines = pq.iter_lines(reader, encoding="idna", errors="strict")  # the handler idna takes
    await lines.aclose()  # type: ignore[attr-defined]
    if PUNYCODE_IGNORES_REPLACE:
        with pytest.raises(pq.exceptions.InvalidEncodingError, match="does not honour"):
            pq.iter_lines(reader, encoding="punycode", errors="ignore")
    else:  # (3.13+: it honours the handler, and is taken)
        await pq.iter_lines(reader, encoding="punycode", errors="ignore").aclose()  # type: ignore[attr-defined]
    # Handlers that only encode were taken, then the first bad byte ended the stream with a bare
    # TypeError, the lines read with it lost (a probe, session 35).
    for handler in ("xmlcharrefreplace", "namereplace"):
        with pytest.raises(pq.exceptions.InvalidEncodingError, match="only encode"):
            pq.iter_lines(reader, encoding="utf-8", errors=handler)
        lines = pq.iter_lines(reader, encoding="latin-1", errors=handler)  # never needed
        await lines.aclose()  # type: ignore[attr-defined]
    lines = pq.iter_lines(reader, encoding="punycode", errors="strict")  # as asked: it fails
    await lines.aclose()  # type: ignore[attr-defined]


async def test_iter_lines_checks_its_arguments() -> None:
    reader = asyncio.StreamReader()
    with pytest.raises(LookupError) as bad_errors:
        pq.iter_lines(reader, encoding="utf-8", errors="no-such-handler")
    assert isinstance(bad_errors.value, pq.exceptions.InvalidEncodingError)
    with pytest.raises(pq.exceptions.InvalidEncodingError):
        pq.iter_lines(reader, encoding="no-such-codec")
    with pytest.raises(TypeError) as no_stream:
        pq.iter_lines(None)
    assert isinstance(no_stream.value, pq.exceptions.InvalidArgumentTypeError)
    with pytest.raises(ValueError) as bad_size:
        pq.iter_lines(reader, chunk_size=0)
    assert isinstance(bad_size.value, pq.exceptions.InvalidLimitError)


async def test_terminate_gracefully_needs_a_process() -> None:
    with pytest.raises(TypeError) as info:
        await pq.terminate_gracefully(None)  # type: ignore[arg-type]
    assert isinstance(info.value, pq.exceptions.InvalidArgumentTypeError)


async def test_terminate_gracefully_refuses_a_popen_without_blocking_the_loop() -> None:
    # Found by the session 22 review: a subprocess.Popen passed the process check (pid,
    # returncode, wait), then its blocking wait() ran on the event loop: the loop froze for the
    # child's whole life (the timeout's SIGKILL never came), then a bare TypeError "An
    # asyncio.Future, a coroutine or an awaitable is required".
    child = subprocess.Popen(  # noqa: ASYNC220 - the Popen is the point
        py("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(30)")
    )
    try:
        started = time.monotonic()
        with pytest.raises(TypeError, match="Popen") as info:
            await pq.terminate_gracefully(child, timeout=0.1)  # type: ignore[arg-type]
        assert isinstance(info.value, pq.exceptions.InvalidArgumentTypeError)
        with pytest.raises(pq.exceptions.InvalidArgumentTypeError, match="Popen"):
            await pq.terminate_many([child])  # type: ignore[list-item]
        assert time.monotonic() - started < 10
        assert child.poll() is None  # refused before anything was signalled
    finally:
        child.kill()
        child.wait()


async def test_terminate_many_needs_processes() -> None:
    # It raised a bare AttributeError ("'NoneType' object has no attribute 'returncode'").
    for bad in (None, "x", 123):
        with pytest.raises(pq.exceptions.InvalidArgumentTypeError):
            await pq.terminate_many([bad])  # type: ignore[list-item]


def test_a_spawn_that_fails_on_another_file_names_the_program_and_that_file() -> None:
    # Found by a review: out of descriptors while opening /dev/null for stdin, the error read
    # "could not start '/dev/null': Too many open files", for a command that was `sh`.
    from prismq_subprocess._core._validation import spawn_error

    error = spawn_error("sh", OSError(errno.EMFILE, "Too many open files", "/dev/null"))
    assert isinstance(error, pq.exceptions.SpawnFailedError)
    assert "could not start 'sh': Too many open files" in str(error)
    assert error.filename == "/dev/null"  # (str() shows it last)
    plain = spawn_error("sh", OSError(errno.EAGAIN, "Resource temporarily unavailable"))
    assert "could not start 'sh': Resource temporarily unavailable" in str(plain)


# -- a new user's walkthrough (session 26): habits from subprocess get a hint that fits -----------
async def test_yes_no_options_take_a_bool(any_wrapper: pq.SubprocessWrapper) -> None:
    # "yes"/"no" were accepted: die_with_host="no" is truthy and turned the option on.
    with pytest.raises(pq.exceptions.InvalidArgumentTypeError, match="check must be True or"):
        await any_wrapper.run("true", check="yes")  # type: ignore[arg-type]
    with pytest.raises(pq.exceptions.InvalidArgumentTypeError, match="shell must be True or"):
        await any_wrapper.run("true", shell="no")  # type: ignore[arg-type]
    with pytest.raises(pq.exceptions.InvalidArgumentTypeError, match="merge_stderr must be"):
        any_wrapper.stream("true", merge_stderr="yes")  # type: ignore[arg-type]
    for option in ("die_with_host", "new_process_group"):
        with pytest.raises(pq.exceptions.InvalidArgumentTypeError, match=f"{option} must be"):
            pq.SubprocessWrapper(pq.RunMode.DRY_RUN, **{option: "no"})
    assert any_wrapper.live_processes == []


async def test_hints_for_habits_from_subprocess(any_wrapper: pq.SubprocessWrapper) -> None:
    with pytest.raises(pq.exceptions.InvalidOptionError, match="run\\(\\) always captures"):
        await any_wrapper.run("true", capture_output=True)
    with pytest.raises(pq.exceptions.InvalidCommandError, match="encode"):
        await any_wrapper.run("cat", input="hello")  # type: ignore[arg-type]
    with pytest.raises(pq.exceptions.InvalidTimeoutError, match="total_seconds"):
        await any_wrapper.run("true", timeout=timedelta(seconds=1))  # type: ignore[arg-type]
    process = await any_wrapper.create_subprocess_exec("true", stdout=subprocess.PIPE)
    with pytest.raises(pq.exceptions.InvalidArgumentTypeError, match=r"process\.stdout"):
        pq.iter_lines(process)
    await process.wait()


async def test_a_command_line_given_as_a_program_names_both_ways(
    wrapper: pq.SubprocessWrapper,
) -> None:
    with pytest.raises(pq.CommandNotFoundError) as info:
        await wrapper.create_subprocess_exec("ls -l")
    assert "create_subprocess_shell" in str(info.value)
    assert "shell=True" in str(info.value)


async def test_odd_stop_arguments_are_refused_before_anything_is_stopped(
    wrapper: pq.SubprocessWrapper,
) -> None:
    # An adversary's finds: an infinite grace period was accepted (a stop of a child ignoring
    # SIGTERM then never ended), terminate_many(None) raised a bare TypeError, and a wrapper
    # took any object as its platform operations (failing at its first call).
    with pytest.raises(pq.exceptions.InvalidTimeoutError, match="finite"):
        pq.SubprocessWrapper(grace_period=math.inf)
    with pytest.raises(pq.exceptions.InvalidTimeoutError, match="finite"):
        await wrapper.run(*py("pass"), grace_period=math.inf)
    with pytest.raises(pq.exceptions.InvalidTimeoutError, match="finite"):
        pq.ModuleRunner(pq.RunRegistry(), grace_period=math.inf)
    process = await wrapper.create_subprocess_exec(*py("import time; time.sleep(30)"))
    with pytest.raises(pq.exceptions.InvalidTimeoutError, match="finite"):
        await pq.terminate_gracefully(process, math.inf)
    with pytest.raises(pq.exceptions.InvalidArgumentTypeError, match="sequence"):
        await pq.terminate_many(None)  # type: ignore[arg-type]
    assert process.returncode is None  # nothing was stopped by a refused call
    await pq.terminate_gracefully(process, 1.0)
    with pytest.raises(pq.exceptions.InvalidArgumentTypeError, match="PlatformOps"):
        pq.SubprocessWrapper(ops=object())  # type: ignore[arg-type]


async def test_another_subprocess_error_of_a_spawn_keeps_its_type() -> None:
    # A review's find: every SubprocessError out of a spawn became PreexecFnError, so a host
    # strategy whose spawn ran `subprocess.run(..., check=True)` got "its preexec_fn raised".
    class Checking(pq.abc.AsyncStrategy):
        async def spawn(self, request: Any) -> Any:
            subprocess.run(["false"], check=True)  # noqa: ASYNC221 - the host's own check
            return await super().spawn(request)

    async with pq.SubprocessWrapper(strategy=Checking()) as wrapper:
        with pytest.raises(subprocess.CalledProcessError) as caught:
            await wrapper.create_subprocess_exec("/bin/true")
    assert not isinstance(caught.value, pq.exceptions.PreexecFnError)
