"""``run``: run one command through a :class:`SubprocessWrapper`, forwarding its output live.

Exit codes follow GNU ``timeout``/``env`` and the shells: the child's own status, 124 after a
timeout, 125 when it could not be started, 126 not executable, 127 not found, 128 + N when it
(or we, on SIGINT/SIGTERM/SIGHUP/SIGQUIT/SIGUSR1/SIGUSR2/SIGALRM) ended by signal N.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import queue
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import prismq_subprocess as pq

from .._platform import IS_WINDOWS
from .._platform._host import SIGPIPE
from ._common import (
    EXIT_CANNOT_RUN,
    EXIT_NOT_EXECUTABLE,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    CliError,
    byte_writer,
    format_pairs,
    shown,
    signal_exit_code,
)

__all__ = ["add_parser"]

_CHUNK = 64 * 1024
# After the child exited, how long its output may keep arriving before we conclude that a
# descendant holds the pipe open and stop what is left of its tree (as ModuleRunner does).
_DRAIN_SECONDS = 1.0
# The signals that end the command line itself. Each stops the child's tree first: the child
# runs in its own session (unless we are a terminal's job, see _at_a_terminal), so a signal
# sent to our process group (Ctrl-C, Ctrl-\) may never reach it, and left to its default
# action the signal would end us and orphan the child. These are
# the signals whose default action ends a process and that we can catch and do not use
# ourselves (GNU timeout takes INT, QUIT, HUP, TERM and ALRM the same way); SIGKILL cannot be
# caught: die_with_host covers the direct child there.
_STOP_SIGNALS = tuple(
    getattr(signal, name)
    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM")
    if hasattr(signal, name)
)
_SIGPIPE = SIGPIPE


def _run_mode(text: str) -> pq.RunMode:
    try:
        return pq.RunMode.parse(text)
    except pq.InvalidRunModeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _timeout(text: str) -> float | None:
    # 0 disables the timeout, as in GNU timeout (whose exit codes run follows).
    value = _seconds(text)
    return None if value == 0 else value


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _message(exc: Exception) -> str:
    # An OSError's str() starts with "[Errno N]"; its strerror is the readable part.
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def _exit_code(returncode: int) -> int:
    # asyncio reports death by signal N as -N; shells report 128 + N.
    return signal_exit_code(-returncode) if returncode < 0 else returncode


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():  # its waiter was cancelled
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


class _DaemonWriter:
    """Does one stream's blocking writes in a daemon thread of its own, one at a time.

    Not the loop's default executor (``asyncio.to_thread``): a write blocked on a reader that
    stopped reading would hold up ``asyncio.run()``'s end, which waits for that executor, and
    even a second stop signal could not end the command line. One thread for all the stream's
    writes (a thread per chunk made a large output's forwarding ~20 % slower).
    """

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self._write = write
        self._queue: queue.SimpleQueue[
            tuple[bytes, asyncio.Future[None], asyncio.AbstractEventLoop] | None
        ] = queue.SimpleQueue()
        self._started = False

    async def write(self, chunk: bytes) -> None:
        """Write ``chunk``; raise what the write raised. Cancellation: stops waiting (the
        write goes on in the thread)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        if not self._started:
            self._started = True
            threading.Thread(target=self._work, name="prismq-cli-output", daemon=True).start()
        self._queue.put((chunk, done, loop))
        await done

    def close(self) -> None:
        """End the thread once the writes queued before are done."""
        if self._started:
            self._queue.put(None)

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            chunk, done, loop = item
            error: BaseException | None = None
            try:
                self._write(chunk)
            except BaseException as exc:  # handed to the awaiting task
                error = exc
            # RuntimeError: the loop is closed; nobody waits any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, done, error)
            del error


class _Pump:
    """One stream's forwarder (:func:`_forward`, started at once): its task, and whether it is
    writing to our side right now."""

    __slots__ = ("task", "writing")

    def __init__(
        self, stream: Any, write: Callable[[bytes], None], on_error: Callable[[Exception], None]
    ) -> None:
        self.writing = False
        self.task = asyncio.ensure_future(_forward(stream, write, on_error, self))


async def _forward(
    stream: Any,
    write: Callable[[bytes], None],
    on_error: Callable[[Exception], None],
    pump: _Pump | None = None,
) -> None:
    """Copy ``stream`` to ``write`` chunk by chunk until end of file.

    Writes happen in a daemon thread: a reader of our stdout that stops reading must not stall
    the event loop, where the timeout and the signal handling live. When a write fails (the
    reader went away), ``on_error`` is told and the rest is read and dropped: a pipe nobody
    reads would never reach end of file. When reading fails, ``on_error`` is told too (as a
    :class:`_ReadFailed`) and forwarding ends: the rest of the output is lost.
    """
    if stream is None:
        return
    writer = _DaemonWriter(write)
    try:
        await _copy(stream, writer, on_error, pump)
    finally:
        writer.close()


async def _copy(
    stream: Any,
    writer: _DaemonWriter,
    on_error: Callable[[Exception], None],
    pump: _Pump | None,
) -> None:
    failed = False
    while True:
        try:
            chunk = await stream.read(_CHUNK)
        except Exception as exc:  # e.g. MemoryError: LOCAL buffers the whole output
            on_error(_ReadFailed(exc))
            return
        if not chunk:
            return
        if failed:
            continue
        if pump is not None:
            pump.writing = True
        try:
            await writer.write(chunk)
        except OSError as exc:
            failed = True
            on_error(exc)
        finally:
            if pump is not None:
                pump.writing = False


async def _settled(
    tasks: dict[asyncio.Task[None], _Pump], timeout: float, *, patient: bool
) -> set[asyncio.Task[None]]:
    """Wait until ``tasks`` are done or ``timeout`` s passed; return those not done.

    ``patient`` (the tree is stopped, so what is left in the pipes is all there will be): a
    forwarder still writing to our side then gets another ``timeout``, as long as it keeps
    writing; that wait is on whoever reads our output, not on a descendant holding a pipe.
    """
    pending = {t for t in tasks if not t.done()}
    while pending:
        _, pending = await asyncio.wait(pending, timeout=timeout)
        if not patient or not any(tasks[t].writing for t in pending):
            break
    return pending


class _ReadFailed(Exception):
    """Reading the command's output failed (the error is the cause)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error) or type(error).__name__)
        self.error = error


async def _wait_for_exit(process: pq.abc.ProcessLike) -> None:
    """Return once the child has exited, even if a descendant still holds its pipes open
    (asyncio's ``wait()`` on 3.11 returns only once every pipe is closed)."""
    waiter = asyncio.ensure_future(process.wait())
    delay = 0.002
    try:
        while process.returncode is None and not waiter.done():
            await asyncio.wait({waiter}, timeout=delay)
            delay = min(delay * 2, 0.05)
    finally:
        if not waiter.done():
            waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)


def _close_abandoned_pipes(process: pq.abc.ProcessLike) -> None:
    """Close the pipes of an exited child that a descendant which escaped the tree still holds.

    Only ASYNC mode needs it: its process is asyncio's own, whose pipe transports stay open and
    registered with the loop, and are finalised after the loop is closed (a traceback on
    stderr). Nothing public releases an exited child's pipes (``SubprocessWrapper.aclose()``
    does it for running children only), so this closes asyncio's transport the way the wrapper
    does. THREADED and LOCAL pipes belong to their threads and need nothing.
    """
    transport = getattr(process, "_transport", None)
    if transport is not None:
        with contextlib.suppress(Exception):
            transport.close()


def _child_env(pairs: list[tuple[str, str]]) -> dict[str, str] | None:
    return {**os.environ, **dict(pairs)} if pairs else None


def _env_changes(env: Mapping[str, str] | None) -> list[str]:
    if env is None:
        return []
    return [f"{k}={v}" for k, v in env.items() if os.environ.get(k) != v]


def _at_a_terminal() -> bool:
    """Whether this command line runs as a job of a terminal (POSIX): one of its standard
    streams is its controlling terminal.

    The command then shares our process group, as any command a shell runs does, so job
    control reaches it with us: Ctrl-Z suspends both (in a session of its own it ran on, and
    read the terminal under the shell's nose), and a background job reading the terminal stops
    (SIGTTIN). Ctrl-C reaches both as well; we stop its tree as always. Elsewhere (a service,
    a pipeline, CI) it runs in its own session, out of reach of signals sent to our group.
    """
    if IS_WINDOWS:
        return False
    for fd in (0, 1, 2):
        try:
            os.tcgetpgrp(fd)  # ENOTTY unless it is our controlling terminal
        except OSError:
            continue
        return True
    return False


class _Runner:
    """One ``run`` invocation: start the child, forward its output, map the outcome to a code."""

    def __init__(self, args: argparse.Namespace, command: list[str]) -> None:
        self.args = args
        self.command = command
        self.env = _child_env(args.env)
        self.signalled: int | None = None
        self.task: asyncio.Task[Any] | None = None
        self.output_error: Exception | None = None
        self.output_failed = asyncio.Event()

    # -- starting ------------------------------------------------------------------------------
    async def _start(self, wrapper: pq.SubprocessWrapper) -> pq.abc.ProcessLike:
        kwargs: dict[str, Any] = {"stdout": pq.PIPE, "stderr": pq.PIPE}
        # stdin stays ours (None = inherited), so interactive and piped input both reach it.
        if self.args.cwd is not None:
            kwargs["cwd"] = self.args.cwd
        if self.env is not None:
            kwargs["env"] = self.env
        name = self.command[0]
        try:
            if self.args.shell:
                return await wrapper.create_subprocess_shell(" ".join(self.command), **kwargs)
            return await wrapper.create_subprocess_exec(*self.command, **kwargs)
        except pq.CommandNotFoundError as exc:
            raise CliError(_message(exc), EXIT_NOT_FOUND) from None
        except pq.InvalidCwdError as exc:
            raise CliError(_message(exc), EXIT_CANNOT_RUN) from None
        except (PermissionError, pq.exceptions.ExecutableFormatError) as exc:
            # (ENOEXEC too: a script without a #! line is "not executable", 126, as GNU env.)
            raise CliError(f"{name}: {_message(exc)}", EXIT_NOT_EXECUTABLE) from None
        except (pq.PrismQError, OSError, ValueError) as exc:
            raise CliError(f"cannot run {name!r}: {_message(exc)}", EXIT_CANNOT_RUN) from None

    # -- signals -------------------------------------------------------------------------------
    def _on_signal(self, signum: int) -> None:
        # First signal: stop the tree gracefully. A second one cancels that stop, which then
        # kills the tree at once (see _stop).
        if self.signalled is None:
            self.signalled = signum
        if self.task is not None:
            self.task.cancel()

    @contextlib.contextmanager
    def _signal_handlers(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        installed = []
        for signum in _STOP_SIGNALS:
            try:
                loop.add_signal_handler(signum, self._on_signal, signum)
            except (NotImplementedError, RuntimeError, ValueError):
                # Windows: asyncio.Runner still turns Ctrl-C into a cancellation (exit 130).
                continue
            installed.append(signum)
        try:
            yield
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)

    # -- stopping ------------------------------------------------------------------------------
    async def _stop(self, process: pq.abc.ProcessLike) -> None:
        """Stop the child's whole tree: SIGTERM, ``--grace`` seconds, SIGKILL."""
        stopper = asyncio.ensure_future(pq.terminate_gracefully(process, self.args.grace))
        try:
            await asyncio.shield(stopper)
        except asyncio.CancelledError:
            # Interrupted again while waiting out the grace period: no more grace.
            await pq.terminate_gracefully(process, 0)
            with contextlib.suppress(BaseException):
                await stopper
            raise

    async def _drain(
        self, process: pq.abc.ProcessLike, pumps: list[_Pump], stop_leftovers: bool
    ) -> None:
        """Let the forwarders reach end of file after the child ended.

        With ``stop_leftovers``, a descendant still holding a pipe after ``_DRAIN_SECONDS`` has
        its tree stopped (so the command line can end); either way a pipe still open after that
        is abandoned. Once the tree is stopped, a forwarder busy writing to our side is not cut
        off: it waits for whoever reads our output (a pager read later), and what it forwards
        is the command's output.
        """
        tasks = {p.task: p for p in pumps if not p.task.done()}
        # Without stop_leftovers the tree was stopped already (a timeout, a signal).
        pending = await _settled(tasks, _DRAIN_SECONDS, patient=not stop_leftovers)
        if pending and stop_leftovers:
            await self._stop(process)
            pending = await _settled(tasks, self.args.grace + 1.0, patient=True)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if pending:
            _close_abandoned_pipes(process)

    def _on_output_error(self, exc: Exception) -> None:
        if self.output_error is None:
            self.output_error = exc
        self.output_failed.set()

    # -- running -------------------------------------------------------------------------------
    async def _until_exit_or_output_failure(self, process: pq.abc.ProcessLike) -> None:
        exited = asyncio.ensure_future(_wait_for_exit(process))
        failed = asyncio.ensure_future(self.output_failed.wait())
        try:
            await asyncio.wait({exited, failed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (exited, failed):
                if not task.done():
                    task.cancel()
            await asyncio.gather(exited, failed, return_exceptions=True)

    def _output_failure_code(self, exited_with: int | None = None) -> int:
        """The code for a failed forward; ``exited_with``: the command had already exited so.

        A failure after the exit still counts: output was lost, which must not read as the
        command's success (a shell's `cmd | cat > full` fails in `cat` the same way).
        """
        exc = self.output_error
        if isinstance(exc, BrokenPipeError) and _SIGPIPE is not None:
            # Whoever read our output is gone (`... | head`): in a shell pipeline the child
            # would now die of SIGPIPE (or, had it exited, the forwarder between them would,
            # as `pipefail` reports); we stopped its tree and report just that.
            return signal_exit_code(_SIGPIPE)
        if isinstance(exc, _ReadFailed):
            message = f"reading the command's output failed: {exc}"
        else:
            message = f"forwarding the command's output failed: {exc}"
        if exited_with is not None:
            message += f" (the command itself exited with status {exited_with})"
        raise CliError(message, EXIT_CANNOT_RUN)

    async def _supervise(self, process: pq.abc.ProcessLike) -> int:
        out, err = byte_writer(sys.stdout), byte_writer(sys.stderr)
        pumps = [
            _Pump(process.stdout, out, self._on_output_error),
            _Pump(process.stderr, err, self._on_output_error),
        ]
        tasks = [pump.task for pump in pumps]
        try:
            scope = asyncio.timeout(self.args.timeout)
            try:
                async with scope:
                    await self._until_exit_or_output_failure(process)
            except TimeoutError:
                if not scope.expired():
                    raise
                await self._stop(process)
                await self._drain(process, pumps, stop_leftovers=False)
                return EXIT_TIMEOUT
            if self.output_error is not None:
                await self._stop(process)
                await self._drain(process, pumps, stop_leftovers=False)
                return self._output_failure_code()
            await self._drain(process, pumps, stop_leftovers=True)
            if self.output_error is not None:
                assert process.returncode is not None
                return self._output_failure_code(_exit_code(process.returncode))
        except asyncio.CancelledError:
            # A stop signal (see _on_signal), or Ctrl-C through asyncio.Runner on Windows.
            await self._stop(process)
            await self._drain(process, pumps, stop_leftovers=False)
            raise
        finally:
            for task in tasks:
                if not task.done():
                    task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        returncode = process.returncode
        assert returncode is not None
        return _exit_code(returncode)

    async def _dry_run(self, wrapper: pq.SubprocessWrapper) -> int:
        process = await self._start(wrapper)
        await process.wait()
        strategy = wrapper.strategy
        assert isinstance(strategy, pq.testing.DryRunStrategy)
        call = strategy.recorder.calls[-1]
        command = call.args if isinstance(call.args, str) else shlex.join(call.args)
        changes = _env_changes(call.env)
        pairs = [
            ("mode", f"{wrapper.mode} ({wrapper.mode_reason})"),
            ("command", command),
            ("shell", "yes" if call.shell else "no"),
            ("cwd", call.cwd if call.cwd is not None else f"{os.getcwd()} (inherited)"),
            ("env", "; ".join(changes) if changes else "(inherited, unchanged)"),
        ]
        if self.args.timeout is not None:
            pairs.append(("timeout", f"{self.args.timeout:g} s"))
        print("dry run: nothing was started")
        print(format_pairs((key, shown(value)) for key, value in pairs))
        return EXIT_OK

    async def main(self) -> int:
        """Run the command; return the exit code for the command line."""
        self.task = asyncio.current_task()
        try:
            # die_with_host: a SIGKILL of the command line takes the child with it (Linux:
            # PR_SET_PDEATHSIG, Windows: a kill-on-close Job Object; elsewhere nothing). Its
            # cost, a slower spawn, is paid once here.
            wrapper = pq.SubprocessWrapper(
                self.args.mode,
                grace_period=self.args.grace,
                die_with_host=True,
                new_process_group=not _at_a_terminal(),
            )
        except pq.InvalidRunModeError as exc:  # from PRISMQ_RUN_MODE
            raise CliError(str(exc), EXIT_USAGE) from None
        try:
            async with wrapper:
                if wrapper.mode is pq.RunMode.DRY_RUN:
                    return await self._dry_run(wrapper)
                with self._signal_handlers():
                    process = await self._start(wrapper)
                    return await self._supervise(process)
        except asyncio.CancelledError:
            if self.signalled is None or self.task is None:
                raise  # not ours: Ctrl-C through asyncio.Runner becomes KeyboardInterrupt (130)
            # Our own signal handler cancelled us, and the tree is stopped: end normally.
            while self.task.cancelling():
                self.task.uncancel()
            return signal_exit_code(self.signalled)


def _run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        args.parser.error("a command is required (after --)")
    return asyncio.run(_Runner(args, command).main())


def add_parser(subparsers: Any) -> None:
    """Register the ``run`` command."""
    parser = subparsers.add_parser(
        "run",
        help="run a command through the library, forwarding its output",
        description=(
            "Run CMD through a SubprocessWrapper, forwarding its stdout and stderr live (bytes, "
            "unbuffered). The exit status is the command's; 124 after --timeout, 125 when it "
            "could not be started, 126 not executable, 127 not found, 128+N when it died of "
            "signal N. Ctrl-C (or SIGTERM, SIGHUP, Ctrl-\\ SIGQUIT, SIGUSR1/2, SIGALRM) stops the "
            "command's whole process tree and exits 130 (128+N). With --mode dry-run nothing "
            "starts: what would run is printed."
        ),
        epilog="example: prismq-subprocess run --timeout 30 --env DEBUG=1 -- python job.py -v",
    )
    parser.add_argument(
        "--mode",
        type=_run_mode,
        default=None,
        help="async, threaded, local or dry-run (default: auto-detect, see PRISMQ_RUN_MODE)",
    )
    parser.add_argument(
        "--timeout",
        type=_timeout,
        default=None,
        metavar="S",
        help="stop the tree after S seconds (0: no timeout)",
    )
    parser.add_argument(
        "--grace",
        type=_seconds,
        default=pq.DEFAULT_GRACE_PERIOD,
        metavar="S",
        help="seconds between SIGTERM and SIGKILL when stopping (default: %(default)s)",
    )
    parser.add_argument("--cwd", default=None, metavar="DIR", help="working directory")
    parser.add_argument(
        "--env",
        type=_env_pair,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set an environment variable for the command (repeatable)",
    )
    parser.add_argument(
        "--shell",
        action="store_true",
        help="run CMD through the shell (its words are joined with spaces)",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD...")
    parser.set_defaults(handler=_run, parser=parser)
