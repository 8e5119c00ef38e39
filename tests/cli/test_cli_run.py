"""``run``: real commands through the real command line; exit codes, exact bytes, tree stops."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import select
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from cli_support import CLI, cli, cli_env, end_cli, kill_quietly, start_cli, wait_gone

PY = sys.executable
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and groups")

# A child that starts a grandchild (same group), prints both pids, then waits for a long time.
TREE = textwrap.dedent(
    """
    import os, subprocess, sys, time
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    print(os.getpid(), grandchild.pid, flush=True)
    time.sleep(60)
    """
)


def _py(code: str) -> list[str]:
    return ["--", PY, "-c", textwrap.dedent(code)]


@pytest.mark.parametrize("mode", ["async", "threaded", "local"])
def test_exit_code_and_exact_bytes(mode: str) -> None:
    code = r"""
    import sys
    sys.stdout.buffer.write(b"out\x00\xff\xfe no newline")
    sys.stdout.flush()
    sys.stderr.buffer.write(b"err\r\n\x80")
    sys.exit(3)
    """
    result = cli("run", "--mode", mode, *_py(code))
    assert result.returncode == 3
    assert result.stdout == b"out\x00\xff\xfe no newline"
    assert result.stderr == b"err\r\n\x80"


def test_large_output_arrives_intact() -> None:
    code = """
    import sys
    block = bytes(range(256)) * 4096          # 1 MiB, every byte value
    for _ in range(3):
        sys.stdout.buffer.write(block)
        sys.stderr.buffer.write(block[::-1])
    """
    result = cli("run", *_py(code))
    block = bytes(range(256)) * 4096
    assert result.returncode == 0
    assert result.stdout == block * 3
    assert result.stderr == block[::-1] * 3


def test_cwd_env_and_stdin_reach_the_child(tmp_path: Path) -> None:
    code = """
    import os, sys
    data = sys.stdin.buffer.read()
    print(os.getcwd(), os.environ["GREETING"], os.environ["EMPTY"] == "", data.decode())
    """
    result = cli(
        "run",
        "--cwd",
        str(tmp_path),
        "--env",
        "GREETING=a=b",
        "--env",
        "EMPTY=",
        *_py(code),
        input=b"piped in",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().split() == [str(tmp_path), "a=b", "True", "piped", "in"]


def test_shell_command_line() -> None:
    result = cli(
        "run",
        "--shell",
        "--",
        "echo",
        "hi",
        "|",
        PY,
        "-c",
        '"import sys; print(sys.stdin.read().upper()); sys.exit(4)"',
    )
    assert result.returncode == 4
    assert result.stdout.strip() == b"HI"


def test_command_without_dashes() -> None:
    result = cli("run", PY, "-c", "print('plain')")
    assert (result.returncode, result.stdout) == (0, b"plain\n")


@posix_only
@pytest.mark.parametrize("mode", ["async", "threaded", "local"])
def test_timeout_exits_124_and_stops_the_tree(mode: str) -> None:
    started = time.monotonic()
    result = cli("run", "--mode", mode, "--timeout", "1.5", "--grace", "2", *_py(TREE))
    elapsed = time.monotonic() - started
    assert result.returncode == 124, result.stderr
    child, grandchild = map(int, result.stdout.split())
    try:
        assert wait_gone([child, grandchild], timeout=5)
    finally:
        kill_quietly([child, grandchild])
    assert elapsed < 30


def test_timeout_zero_means_no_timeout() -> None:
    # As GNU timeout's 0.
    result = cli("run", "--timeout", "0", *_py("import time; time.sleep(0.2); print('done')"))
    assert (result.returncode, result.stdout) == (0, b"done\n"), result.stderr


@posix_only
def test_child_killed_by_signal_exits_128_plus_n() -> None:
    result = cli("run", *_py("import os, signal; os.kill(os.getpid(), signal.SIGKILL)"))
    assert result.returncode == 128 + signal.SIGKILL


@posix_only
@pytest.mark.parametrize(
    ("mode", "sig", "expected"),
    [
        ("async", signal.SIGINT, 130),
        ("threaded", signal.SIGINT, 130),
        ("async", signal.SIGTERM, 143),
        ("async", signal.SIGQUIT, 131),
        ("threaded", signal.SIGUSR1, 138),
        ("async", signal.SIGALRM, 142),
    ],
    ids=[
        "async-SIGINT",
        "threaded-SIGINT",
        "async-SIGTERM",
        "async-SIGQUIT",
        "threaded-SIGUSR1",
        "async-SIGALRM",
    ],
)
def test_signal_to_the_cli_stops_the_tree(mode: str, sig: int, expected: int) -> None:
    # The child starts its own session, so only the command line itself gets the signal, as
    # when Ctrl-C reaches the terminal's foreground group.
    proc = start_cli("run", "--mode", mode, "--grace", "2", *_py(TREE))
    pids: list[int] = []
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # forwarded live, while the child still runs
        pids = [int(p) for p in line.split()]
        assert len(pids) == 2 and proc.poll() is None
        proc.send_signal(sig)
        assert proc.wait(timeout=20) == expected
        assert wait_gone(pids, timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
        kill_quietly(pids)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG")
@pytest.mark.parametrize("mode", ["async", "threaded", "local"])
def test_sigkill_to_the_cli_takes_the_child_with_it(mode: str, tmp_path: Path) -> None:
    # SIGKILL cannot be caught: only die_with_host (PR_SET_PDEATHSIG) ends the direct child.
    # The pid goes through a file: LOCAL forwards output only once the child has exited.
    pid_file = tmp_path / "pid"
    code = f"""
    import os, time
    with open({str(pid_file)!r} + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace({str(pid_file)!r} + ".tmp", {str(pid_file)!r})
    time.sleep(60)
    """
    proc = start_cli("run", "--mode", mode, *_py(code))
    child = 0
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        child = int(pid_file.read_text())
        proc.kill()
        assert proc.wait(timeout=10) == -signal.SIGKILL
        assert wait_gone([child], timeout=5)
    finally:
        end_cli(proc, [child])


@posix_only
def test_second_interrupt_skips_the_grace_period() -> None:
    code = """
    import os, signal, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(os.getpid(), flush=True)
    time.sleep(60)
    """
    proc = start_cli("run", "--grace", "60", *_py(code))
    child = 0
    try:
        assert proc.stdout is not None
        child = int(proc.stdout.readline())
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert proc.poll() is None  # waiting out the grace period: the child ignores SIGTERM
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 130
        assert time.monotonic() - started < 10
        assert wait_gone([child], timeout=5)
    finally:
        end_cli(proc, [child])


@posix_only
def test_a_child_ignoring_sigterm_is_killed_after_the_grace_period() -> None:
    code = """
    import signal, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("ready", flush=True)
    time.sleep(60)
    """
    started = time.monotonic()
    result = cli("run", "--timeout", "1", "--grace", "0.5", *_py(code))
    assert result.returncode == 124
    assert result.stdout == b"ready\n"
    assert time.monotonic() - started < 20


@posix_only
def test_leftover_holding_the_output_is_stopped_after_exit() -> None:
    # The child exits at once; its grandchild keeps stdout open. The command line must not
    # wait 60 s for it: after a short drain the rest of the tree is stopped.
    code = """
    import subprocess, sys
    g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    print(g.pid, flush=True)
    """
    started = time.monotonic()
    result = cli("run", "--grace", "1", *_py(code))
    assert result.returncode == 0
    grandchild = int(result.stdout)
    try:
        assert wait_gone([grandchild], timeout=5)
    finally:
        kill_quietly([grandchild])
    assert time.monotonic() - started < 30


@posix_only
@pytest.mark.parametrize("mode", ["async", "threaded"])
def test_escaped_descendant_holding_the_output_is_abandoned_quietly(mode: str) -> None:
    # A grandchild in its own session outlives the child: nothing can reach it once the child
    # is gone (a documented limit), but the command line still ends, without noise.
    code = """
    import subprocess, sys
    g = subprocess.Popen([sys.executable, "-c", "import os, time; os.setsid(); time.sleep(60)"])
    print(g.pid, flush=True)
    """
    result = cli("run", "--mode", mode, "--grace", "0.5", *_py(code), timeout=60)
    escaped = int(result.stdout)
    kill_quietly([escaped])
    assert result.returncode == 0
    assert result.stderr == b""


@posix_only
def test_reader_going_away_stops_the_child() -> None:
    code = """
    import os, sys
    print(os.getpid(), flush=True)
    while True:
        sys.stdout.write("y" * 1000 + "\\n")
    """
    proc = start_cli("run", "--grace", "1", *_py(code))
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    try:
        proc.stdout.read(100_000)
        proc.stdout.close()  # like `| head`: the reader is gone
        assert proc.wait(timeout=20) == 128 + signal.SIGPIPE
        assert wait_gone([child], timeout=5)
    finally:
        end_cli(proc, [child])


@pytest.mark.parametrize("mode", ["async", "threaded", "local"])
def test_a_slow_reader_gets_the_whole_output_of_a_command_that_exited(mode: str) -> None:
    # `run -- git log | less`, read after a pause: the command has printed everything and
    # exited, and our forwarder waits on the reader. The drain took that wait for a descendant
    # holding the pipe, cancelled the forwarder after grace + 2 s and exited 0 with the rest
    # of the output dropped (131,072 of 1,500,000 bytes; probe).
    code = """
    import sys
    for _ in range(1000):
        sys.stdout.write("x" * 1499 + "\\n")
    """
    proc = start_cli("run", "--mode", mode, "--grace", "0", *_py(code))
    try:
        time.sleep(3.0)  # the reader is busy elsewhere (past the old cut: grace + 2 s)
        out, err = proc.communicate(timeout=60)
    finally:
        end_cli(proc, [])
    assert (len(out), err, proc.returncode) == (1_500_000, b"", 0)


# The command exits 0 at once; its background job writes a moment later, while the command
# line drains the output of a command that has already exited.
LATE_OUTPUT = ["--", "sh", "-c", "(sleep 0.3; printf 'important result\\n') & exit 0"]


def run_late_output(mode: str, stdout: Any) -> subprocess.CompletedProcess[bytes]:
    """The command line running LATE_OUTPUT in ``mode``, its stdout going to ``stdout``."""
    return subprocess.run(
        [*CLI, "run", "--mode", mode, *LATE_OUTPUT],
        stdout=stdout,
        stderr=subprocess.PIPE,
        env=cli_env(),
        timeout=60,
        check=False,
    )


def test_an_unknown_option_of_run_shows_runs_usage() -> None:
    # It printed the top level's usage ("prismq-subprocess [-h] [--version] COMMAND ...").
    result = cli("run", "--bogus", "--", "true")
    assert result.returncode == 2
    assert b"usage: prismq-subprocess run" in result.stderr, result.stderr
    assert b"unrecognized arguments: --bogus" in result.stderr


@posix_only
def test_a_script_without_a_shebang_line_is_not_executable_126(tmp_path: Path) -> None:
    # ENOEXEC exited 125 ("could not be started"); GNU env, whose codes we follow, says 126.
    script = tmp_path / "noshebang"
    script.write_text("echo hello\n")
    script.chmod(0o755)
    result = cli("run", "--", str(script))
    assert result.returncode == 126, result.stderr
    assert b"not a program this system can run" in result.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_stderr_that_cannot_be_written_exits_125_not_1() -> None:
    # The failure's own message could not be printed either: that OSError escaped main() and
    # the command line exited 1, which the docs give to nothing of ours (probe).
    with open("/dev/full", "wb") as full:
        result = subprocess.run(
            [*CLI, "run", "--", "sh", "-c", "echo to-stderr >&2"],
            stdout=subprocess.PIPE,
            stderr=full,
            env=cli_env(),
            timeout=60,
            check=False,
        )
    assert result.returncode == 125


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("mode", ["async", "threaded", "local"])
def test_output_that_cannot_be_written_after_the_exit_exits_125(mode: str) -> None:
    with open("/dev/full", "wb") as full:
        result = run_late_output(mode, full)
    assert result.returncode == 125, result.stderr
    assert b"forwarding the command's output failed" in result.stderr
    assert b"the command itself exited with status 0" in result.stderr


@posix_only
@pytest.mark.parametrize("mode", ["async", "threaded", "local"])
def test_reader_gone_after_the_exit_exits_141(mode: str) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = run_late_output(mode, write_end)
    finally:
        os.close(write_end)
    assert result.returncode == 128 + signal.SIGPIPE, result.stderr


@posix_only
@pytest.mark.parametrize(("closed", "kept"), [(1, 2), (2, 1)], ids=["stdout", "stderr"])
def test_a_closed_stream_is_discarded(closed: int, kept: int) -> None:
    # As cron or a daemon launcher may start us: fd 1 or 2 closed (`>&-`), sys.stdout or
    # sys.stderr None. The command still runs; what it writes to the closed stream is dropped.
    inner = shlex.join(["sh", "-c", "echo to-1; echo to-2 >&2; exit 3"])
    command = f"exec {shlex.join(CLI)} run -- {inner} {closed}>&-"
    result = subprocess.run(
        ["sh", "-c", command], capture_output=True, env=cli_env(), timeout=60, check=False
    )
    assert result.returncode == 3, result
    kept_output = result.stdout if kept == 1 else result.stderr
    assert kept_output == f"to-{kept}\n".encode()
    assert (result.stdout if closed == 1 else result.stderr) == b""


def test_dry_run_prints_and_starts_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "created"
    result = cli(
        "run",
        "--mode",
        "dry_run",
        "--cwd",
        str(tmp_path),
        "--env",
        "ANSWER=42",
        "--timeout",
        "5",
        "--",
        PY,
        "-c",
        f"open({str(marker)!r}, 'w')",
    )
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode()
    assert text.startswith("dry run: nothing was started\n")
    assert "mode    : dry-run (mode='dry-run' passed by the caller)" in text
    assert f"cwd     : {tmp_path}" in text
    assert "env     : ANSWER=42" in text
    assert "timeout : 5 s" in text
    assert "open(" in text and PY in text
    assert not marker.exists()


def test_dry_run_escapes_control_characters_it_prints() -> None:
    # A probe's find: the command and --env were printed raw, so an escape sequence reached
    # the terminal and a newline broke the `key : value` layout (`runs` escapes them).
    result = cli(
        "run", "--mode", "dry-run", "--env", "A=x\n\x1b[31mred", "--", "echo", "\x1b]0;title\x07"
    )
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode()
    assert "\x1b" not in text and "\x07" not in text
    assert "\\x1b]0;title\\x07" in text and "A=x\\n\\x1b[31mred" in text
    assert len(text.splitlines()) == 6  # the heading and five pairs, none broken


def test_dry_run_from_the_environment() -> None:
    result = cli("run", "--", "rm", "-rf", "/nonexistent-dir", env={"PRISMQ_RUN_MODE": "dry-run"})
    assert result.returncode == 0
    text = result.stdout.decode()
    assert "command : rm -rf /nonexistent-dir" in text
    assert "PRISMQ_RUN_MODE='dry-run'" in text
    assert "env     : (inherited, unchanged)" in text


def test_command_not_found_exits_127() -> None:
    result = cli("run", "--", "no-such-program-prismq")
    assert result.returncode == 127
    assert b"'no-such-program-prismq' was not found" in result.stderr


@posix_only
def test_not_executable_exits_126(tmp_path: Path) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    result = cli("run", "--", str(script))
    assert result.returncode == 126
    assert b"Permission denied" in result.stderr


def test_missing_cwd_exits_125(tmp_path: Path) -> None:
    result = cli("run", "--cwd", str(tmp_path / "nope"), "--", PY, "-c", "pass")
    assert result.returncode == 125
    assert b"does not exist" in result.stderr


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--mode", "turbo", "--", "true"], {}, b"'turbo' is not a run mode"),
        (["--", "true"], {"PRISMQ_RUN_MODE": "turbo"}, b"PRISMQ_RUN_MODE='turbo'"),
        ([], {}, b"a command is required"),
        (["--"], {}, b"a command is required"),
        (["--env", "NOEQUALS", "--", "true"], {}, b"expected KEY=VALUE"),
        (["--timeout", "-1", "--", "true"], {}, b"must be a finite number >= 0"),
    ],
    ids=["bad-mode", "bad-env-var", "no-command", "only-dashes", "bad-env", "bad-timeout"],
)
def test_usage_errors_exit_2(args: list[str], env: dict[str, str], message: bytes) -> None:
    result = cli("run", *args, env=env)
    assert result.returncode == 2
    assert message in result.stderr


def test_help() -> None:
    result = cli("run", "--help")
    assert result.returncode == 0
    assert b"124 after --timeout" in result.stdout


def test_script_entry_point_is_installed() -> None:
    script = os.path.join(os.path.dirname(sys.executable), "prismq-subprocess")
    if not os.path.exists(script):
        pytest.skip("package not installed with its scripts in this environment")
    result = subprocess.run(
        [script, "run", "--", PY, "-c", "print('via script')"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout) == (0, b"via script\n")


# The command line with its output readers failing after their first read (as LOCAL's did with
# a MemoryError buffering a `yes`): the failure must be reported, not dropped.
FAILING_READS = textwrap.dedent(
    """
    import sys
    from prismq_subprocess._cli import _run_cmd, main

    real = _run_cmd._forward

    class Failing:
        def __init__(self, stream):
            self.stream, self.reads = stream, 0

        async def read(self, n):
            self.reads += 1
            if self.reads > 1:
                raise MemoryError
            return await self.stream.read(n)

    async def forward(stream, write, on_error, pump=None):
        return await real(None if stream is None else Failing(stream), write, on_error, pump)

    _run_cmd._forward = forward
    sys.argv[0] = "prismq-subprocess"
    sys.exit(main())
    """
)


@pytest.mark.parametrize("mode", ["async", "threaded", "local"])
def test_a_failure_to_read_the_output_exits_125_and_stops_the_command(
    mode: str, tmp_path: Path
) -> None:
    # LOCAL forwards the output only once the command has exited (then the command is not
    # stopped, and the status says what it exited with): a short one there.
    lines = 100 if mode == "local" else 2000
    pid_file = tmp_path / "pid"
    chatty = (
        f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        f"for i in range({lines}): print(i, flush=True); time.sleep(0.01)"
    )
    started = time.monotonic()
    result = subprocess.run(
        [PY, "-c", FAILING_READS, "run", "--mode", mode, "--", PY, "-c", chatty],
        capture_output=True,
        env=cli_env(),
        timeout=60,
        check=False,
    )
    assert result.returncode == 125, result.stderr
    assert b"reading the command's output failed: MemoryError" in result.stderr
    assert b"Traceback" not in result.stderr
    if mode != "local":
        assert time.monotonic() - started < 15  # stopped, not left to print for 20 s
    assert wait_gone([int(pid_file.read_text())])


@posix_only
@pytest.mark.parametrize("mode", ["async", "threaded"])
def test_a_second_stop_signal_ends_the_command_line_though_its_reader_stalled(mode: str) -> None:
    # A probe's find: with whoever reads our stdout no longer reading (a hung log shipper),
    # two SIGTERMs stopped the command's tree but the command line hung until the reader
    # closed its end: a write blocked in a worker thread of the loop's default executor, which
    # asyncio.run() waits for on exit. The first signal still waits for the reader (a pager
    # read later gets the rest); a second one no longer does.
    read_end, write_end = os.pipe()  # never read: a stalled consumer
    try:
        proc = subprocess.Popen(
            [*CLI, "run", "--mode", mode, "--", "yes"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=cli_env(),
        )
        os.close(write_end)
        write_end = -1
        children: list[psutil.Process] = []
        try:
            # Our handlers are in place once the command runs (a loaded machine may take
            # seconds to get there: a signal before that ends us by its default action).
            deadline = time.monotonic() + 30
            while not children and time.monotonic() < deadline:
                time.sleep(0.05)
                children = psutil.Process(proc.pid).children(recursive=True)
            assert children
            time.sleep(0.5)  # the pipe is full and a write waits
            proc.send_signal(signal.SIGTERM)
            time.sleep(1.0)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 128 + signal.SIGTERM
            assert wait_gone([child.pid for child in children])
        finally:
            end_cli(proc, [child.pid for child in children])
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


def _read_until(master: int, marker: bytes, timeout: float = 30.0) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                seen += os.read(master, 4096)
            except OSError:
                break
    return seen


def _until_status(process: psutil.Process, wanted: set[str], timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    status = process.status()
    while status not in wanted and time.monotonic() < deadline:
        time.sleep(0.02)
        status = process.status()
    return status


@posix_only
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash for job control")
def test_ctrl_z_at_a_terminal_suspends_the_command_with_this_command_line() -> None:
    # A probe's find: the command ran in a session of its own, so Ctrl-Z stopped only this
    # command line: the command ran on and read the terminal, eating what was typed to the
    # shell (and, started with `&`, it read the terminal where `cat &` stops with SIGTTIN).
    # At a terminal the command now shares this command line's process group, as with any
    # command a shell runs: job control reaches both. An interactive bash on a pty is the
    # shell (a group the kernel stops must not be orphaned: its session has a leader).
    import termios

    master, slave = pty.openpty()

    def controlling_terminal() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    shell = subprocess.Popen(
        ["bash", "--norc", "--noprofile", "-i"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
        preexec_fn=controlling_terminal,
        env={**cli_env(), "PS1": "PROMPT$ "},
    )
    os.close(slave)
    command: list[psutil.Process] = []
    try:
        _read_until(master, b"PROMPT$ ")
        code = "import time; print('re' + 'ady', flush=True); time.sleep(60)"
        line = shlex.join([*CLI, "run", "--", sys.executable, "-c", code])
        os.write(master, line.encode() + b"\n")
        assert b"ready" in _read_until(master, b"ready")
        [cli_process] = psutil.Process(shell.pid).children()
        command = cli_process.children(recursive=True)
        assert command
        os.write(master, b"\x1a")  # Ctrl-Z
        assert _until_status(command[0], {psutil.STATUS_STOPPED}) == psutil.STATUS_STOPPED
        assert _until_status(cli_process, {psutil.STATUS_STOPPED}) == psutil.STATUS_STOPPED
        assert b"Stopped" in _read_until(master, b"PROMPT$ ")
        os.write(master, b"fg\n")
        awake = {psutil.STATUS_SLEEPING, psutil.STATUS_RUNNING}
        assert _until_status(command[0], awake) in awake
        time.sleep(0.3)
        os.write(master, b"\x03")  # Ctrl-C ends both, as before
        _read_until(master, b"PROMPT$ ")
        os.write(master, b"echo status=$?\n")
        assert b"status=130" in _read_until(master, b"status=130")
        assert wait_gone([cli_process.pid, *(p.pid for p in command)])
        os.write(master, b"exit\n")
        shell.wait(timeout=10)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shell.pid, signal.SIGKILL)
        kill_quietly([p.pid for p in command])
        shell.wait(timeout=10)
        os.close(master)


@pytest.mark.skipif(sys.platform == "win32", reason="O_NONBLOCK on a pipe")
def test_a_stdout_left_non_blocking_by_the_parent_still_gets_the_whole_output() -> None:
    # A probe's find: a pipe left in O_NONBLOCK mode by the parent (a node or Go process
    # sharing it) and read slowly: the forwarder's write failed with EAGAIN, the output was
    # cut at 65,536 of 1,000,000 bytes and the command line exited 125.
    import fcntl

    read_end, write_end = os.pipe()
    flags = fcntl.fcntl(write_end, fcntl.F_GETFL)
    fcntl.fcntl(write_end, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    code = "import sys; sys.stdout.buffer.write(b'x' * 1_000_000)"
    proc = subprocess.Popen(
        [*CLI, "run", *_py(code)],
        stdout=write_end,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=cli_env(),
    )
    os.close(write_end)
    try:
        time.sleep(1.5)  # the reader is slow to start
        got = 0
        while chunk := os.read(read_end, 65536):
            got += len(chunk)
        _, err = proc.communicate(timeout=60)
    finally:
        os.close(read_end)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (got, err, proc.returncode) == (1_000_000, b"", 0)
