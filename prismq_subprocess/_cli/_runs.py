"""``runs``: list, show and tail the runs recorded in a :class:`SQLiteRunRegistry` file."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sqlite3
import sys
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import prismq_subprocess as pq

from .._background._run_record import owner_alive
from .._background._sqlite_registry import open_read_only
from .._core._daemon_thread import call_in_daemon_thread
from .._platform import IS_WINDOWS
from ._common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    byte_writer,
    format_pairs,
    print_json,
    shown,
)

__all__ = ["add_parser", "check_registry_file"]

_CHUNK = 256 * 1024
#: How many runs `runs` lists without --limit.
_DEFAULT_LIMIT = 20
# How long to wait for another process's lock on the registry before saying it is locked
# (SQLite's own default; in WAL mode only an exclusive lock keeps a reader out that long).
_BUSY_SECONDS = 5.0


def _is_locked(exc: BaseException | None) -> bool:
    """Whether ``exc`` is SQLite's BUSY or LOCKED: another connection held its lock longer than
    the busy timeout. The file is fine; a later try may succeed."""
    name = getattr(exc, "sqlite_errorname", None)
    return isinstance(name, str) and name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED"))


def _locked_error(path: str) -> CliError:
    return CliError(f"{path!r} is locked by another process; try again", EXIT_FAILURE)


def check_registry_file(path: str) -> None:
    """Refuse (exit 2) anything but an existing prismq_subprocess run registry, *before* the
    library opens it: opening creates a missing file and adds the schema to any SQLite file.

    The check itself opens the file read-only. It lets through files at a newer schema version:
    the library refuses those itself, without changing them.

    Raises:
        CliError: the file is missing, not SQLite, or SQLite without a ``runs`` table (exit 2);
            another process holds its lock for longer than ``_BUSY_SECONDS`` (exit 1).
    """
    file = Path(path)
    try:
        exists, is_file = file.exists(), file.is_file()
    except PermissionError as exc:  # a folder on the way this user may not search
        raise CliError(f"cannot reach {path!r}: {exc.strerror}", EXIT_USAGE) from None
    if not exists:
        raise CliError(f"no registry file {path!r} (runs never creates one)", EXIT_USAGE)
    if not is_file:
        raise CliError(f"{path!r} is not a file", EXIT_USAGE)
    if not os.access(file, os.R_OK):
        raise CliError(f"cannot read {path!r}: permission denied", EXIT_USAGE)
    try:
        conn = open_read_only(str(file.resolve()), _BUSY_SECONDS)
        try:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            has_runs = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'runs'"
            ).fetchone()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        if _is_locked(exc):
            raise _locked_error(path) from None
        folder = file.resolve().parent
        if not os.access(folder, os.W_OK) and _cannot_open_or_write(exc):
            # A WAL file's reader makes its -shm file beside it: another user's registry, in
            # their folder, is then unreadable here (it was called "not a SQLite registry").
            raise CliError(
                f"cannot read {path!r}: this user may not write its folder {str(folder)!r}, "
                "where SQLite keeps a registry's shared-memory file (-shm) while reading it; "
                f"run as the registry's owner, or copy the file elsewhere ({exc})",
                EXIT_USAGE,
            ) from None
        raise CliError(f"{path!r} is not a SQLite run registry: {exc}", EXIT_USAGE) from None
    if version < 1 or has_runs is None:
        raise CliError(
            f"{path!r} is a SQLite database but not a prismq_subprocess run registry "
            "(no runs table); it was left untouched",
            EXIT_USAGE,
        )


def _cannot_open_or_write(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY)


def _when(value: datetime | None, suffix: str = "") -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S") + suffix


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, rest = divmod(seconds, 60)
    if minutes < 60:
        return f"{int(minutes)}m{int(rest):02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{int(hours)}h{int(minutes):02d}m"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _owner_gone(run: pq.Run, db: str) -> bool:
    """Whether ``run`` is unfinished with no living owner: what the library's recovery marks
    interrupted on a read-write open, which this read-only viewer never does (blocking)."""
    if run.is_finished:
        return False
    # As recovery judges it (a renamed host, a step of the clock: see owner_alive).
    return run.owner is None or not owner_alive(run.owner, db)


def _status_text(run: pq.Run, gone: bool) -> str:
    return f"{run.status.value} (owner gone)" if gone else run.status.value


def _render_list(runs: list[pq.Run], total: int, gone: set[str], unreadable: int = 0) -> str:
    rows = [["RUN_ID", "STATUS", "MODULE", "CREATED (UTC)", "DURATION", "EXIT"]]
    for run in runs:
        rows.append(
            [
                shown(run.run_id),
                _status_text(run, run.run_id in gone),
                shown(run.module_name or run.module_id or "-"),
                _when(run.created_at),
                _duration(run.duration),
                "-" if run.exit_code is None else str(run.exit_code),
            ]
        )
    summary = f"{len(runs)} of {total} run(s), newest first"
    if unreadable:
        summary += (
            f"; {unreadable} stored run(s) could not be read (damaged rows: opening the "
            "registry read-write sets them aside)"
        )
    return f"{_table(rows)}\n{summary}"


def _owner_text(run: pq.Run, gone: bool) -> str:
    owner = run.owner
    if owner is None:
        return "-"
    if run.is_finished:
        return f"pid {owner.pid} on {owner.host}"
    state = "gone" if gone else "alive"
    return f"pid {owner.pid} on {owner.host} ({state})"


def _render_run(run: pq.Run, gone: bool) -> str:
    mib = 1024 * 1024
    pairs = [
        ("run_id", run.run_id),
        ("status", _status_text(run, gone)),
        ("module", f"{run.module_name or '-'} (id {run.module_id or '-'})"),
        ("parameters", json.dumps(run.parameters)),
        ("mode", run.mode),
        ("pid", "-" if run.pid is None else str(run.pid)),
        ("exit code", "-" if run.exit_code is None else str(run.exit_code)),
        ("error", run.error_message or "-"),
        ("created", _when(run.created_at, " UTC")),
        ("started", _when(run.started_at, " UTC")),
        ("finished", _when(run.finished_at, " UTC")),
        ("duration", _duration(run.duration)),
        (
            "peak rss",
            "-" if run.peak_rss_bytes is None else f"{run.peak_rss_bytes / mib:.1f} MiB",
        ),
        ("cpu time", "-" if run.cpu_time_seconds is None else f"{run.cpu_time_seconds:.2f}s"),
        ("owner", _owner_text(run, gone)),
    ]
    pairs = [(key, shown(value)) for key, value in pairs]
    lines = [format_pairs(pairs), f"output tail ({len(run.output_tail)} line(s)):"]
    lines.extend(f"  {shown(line)}" for line in run.output_tail)
    return "\n".join(lines)


async def _get(registry: pq.SQLiteRunRegistry, run_id: str, db: str) -> pq.Run:
    run = await registry.get_run(run_id)
    if run is None:
        if await asyncio.to_thread(_stored_rows, db, run_id):
            raise CliError(
                f"run {run_id!r} is in {db!r} but cannot be read (a damaged row: opening the "
                "registry read-write sets it aside)",
                EXIT_FAILURE,
            )
        raise CliError(f"no run {run_id!r} in {db!r}", EXIT_FAILURE)
    return run


def _stored_rows(db: str, run_id: str) -> int:
    """How many rows of ``run_id`` the file's runs table holds, read or not: a damaged row
    the library skips still counts (blocking)."""
    try:
        run_id.encode("utf-8")
    except UnicodeEncodeError:
        return 0  # (bytes that are not UTF-8 on the command line: no stored id can hold them)
    conn = open_read_only(db, _BUSY_SECONDS)
    try:
        query = "SELECT count(*) FROM runs WHERE run_id = ?"
        return int(conn.execute(query, (run_id,)).fetchone()[0])
    finally:
        conn.close()


async def _log_path(log_dir: str, run_id: str) -> Path:
    """Where OutputCapture(log_dir=...) writes ``run_id``'s lines (asked, not re-derived)."""
    try:
        capture = pq.OutputCapture(log_dir=log_dir)
    except pq.exceptions.InvalidLogDirError as exc:
        raise CliError(f"--log-dir: {exc}", EXIT_USAGE) from None
    try:
        path = capture.log_path(run_id)
    except pq.exceptions.InvalidRunIdError as exc:
        # A run id too long to name a file: its run (of an app that keeps no logs) has none.
        raise CliError(f"run {run_id!r:.80} has no output log: {exc}", EXIT_FAILURE) from None
    finally:
        await capture.aclose()
    assert path is not None  # a capture with a log_dir always has one
    return path


def _copy_new(path: Path, offset: int, write: Callable[[bytes], None]) -> int:
    """Write what ``path`` holds past ``offset``; return the new offset (blocking)."""
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        return offset
    with handle:
        size = handle.seek(0, 2)
        if size < offset:
            offset = 0  # truncated or re-created: start over
        handle.seek(offset)
        while chunk := handle.read(_CHUNK):
            write(chunk)
            offset += len(chunk)
    return offset


def _write_buffered(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.flush()


async def _copy_to_stdout(path: Path, offset: int) -> int:
    """:func:`_copy_new` to our stdout, in a daemon thread of its own.

    Not the loop's default executor (``asyncio.to_thread``): a write blocked on a reader that
    stopped reading (a paused pager) would hold up ``asyncio.run()``'s end, which waits for that
    executor, and Ctrl-C could not end the command line. Written to the descriptor, unbuffered:
    a write left blocked there holds no lock that Python's flush at exit would wait for.
    """
    sys.stdout.flush()
    write: Callable[[bytes], None]
    if IS_WINDOWS and sys.stdout is not None and sys.stdout.isatty():
        # A console takes text through Python's console writer (UTF-8 decoded), not raw bytes.
        write = _write_buffered
    else:
        write = byte_writer(sys.stdout)
    done = await call_in_daemon_thread(_copy_new, (path, offset, write), {}, "prismq-cli-tail")
    assert isinstance(done, int)
    return done


async def _follow(
    registry: pq.SQLiteRunRegistry, run_id: str, db: str, path: Path, interval: float
) -> int:
    offset = 0
    while True:
        # The status first, then the log: the task manager closes a run's log (complete, on
        # disk) before it records the final status, and a recorded status is committed; so a
        # log read after seeing the run finished holds all of it, with no quiet wait.
        run = await registry.get_run(run_id)
        if run is None:
            raise CliError(f"run {run_id!r} disappeared from {db!r}", EXIT_FAILURE)
        offset = await _copy_to_stdout(path, offset)
        if run.is_finished:
            finished = run
            break
        if await asyncio.to_thread(_owner_gone, run, db):
            owner = "owner process" if run.owner is None else f"owner process {run.owner.pid}"
            raise CliError(
                f"run {run_id!r} is {run.status.value} but its {owner} is gone; the library "
                "marks it interrupted when it next opens the registry read-write (this "
                "viewer opens it read-only)",
                EXIT_FAILURE,
            )
        await asyncio.sleep(interval)
    if not offset and not await asyncio.to_thread(path.exists):
        # Finished, and no log ever came: as without --follow (a mistyped --log-dir printed
        # nothing and exited 0, so a script could not tell the output was not shown).
        raise _no_log_error(path)
    code = "" if finished.exit_code is None else f", exit code {finished.exit_code}"
    print(f"run {run_id} {finished.status.value}{code}", file=sys.stderr)
    return EXIT_OK


def _no_log_error(path: Path) -> CliError:
    return CliError(
        f"no output log {str(path)!r} (the run printed nothing yet, or its log directory is "
        "another one)",
        EXIT_FAILURE,
    )


async def _tail(args: argparse.Namespace, registry: pq.SQLiteRunRegistry) -> int:
    run = await _get(registry, args.run_id, args.db)
    if args.log_dir is None:
        # Only the registry's copy exists: the last lines, stored when the run ended.
        print(
            f"(the last {len(run.output_tail)} line(s) kept in the registry; "
            "--log-dir gives the whole log)",
            file=sys.stderr,
        )
        for line in run.output_tail:
            print(line)
        return EXIT_OK
    path = await _log_path(args.log_dir, args.run_id)
    if args.follow:
        return await _follow(registry, args.run_id, args.db, path, args.interval)
    if not path.exists():
        raise _no_log_error(path)
    await _copy_to_stdout(path, 0)
    return EXIT_OK


async def _list(args: argparse.Namespace, registry: pq.SQLiteRunRegistry) -> int:
    status = None if args.status is None else pq.RunStatus(args.status)
    runs = await registry.list_runs(status=status, module_id=args.module, limit=args.limit)
    total = await registry.count_runs(status=status, module_id=args.module)
    if args.json:
        print_json({"db": args.db, "total": total, "runs": [run.to_dict() for run in runs]})
    else:
        gone = await asyncio.to_thread(lambda: {r.run_id for r in runs if _owner_gone(r, args.db)})
        unreadable = 0
        if len(runs) < min(total, args.limit):
            # Fewer than there are: rows the library could not read were skipped.
            unreadable = min(total, args.limit) - len(runs)
        print(_render_list(runs, total, gone, unreadable))
    return EXIT_OK


async def _show(args: argparse.Namespace, registry: pq.SQLiteRunRegistry) -> int:
    run = await _get(registry, args.run_id, args.db)
    if args.json:
        print_json(run.to_dict())
    else:
        print(_render_run(run, await asyncio.to_thread(_owner_gone, run, args.db)))
    return EXIT_OK


async def _with_registry(args: argparse.Namespace) -> int:
    try:
        # read_only: a viewer never migrates, recovers or quarantines the file it watches.
        async with pq.SQLiteRunRegistry(
            args.db, read_only=True, busy_timeout=_BUSY_SECONDS
        ) as registry:
            return int(await args.runs_action(args, registry))
    except pq.RegistrySchemaError as exc:
        # The library's open reports a lock taken after our check as an unusable file.
        if _is_locked(exc.__cause__):
            raise _locked_error(args.db) from None
        raise CliError(str(exc), EXIT_USAGE) from None
    except sqlite3.Error as exc:
        if _is_locked(exc):
            raise _locked_error(args.db) from None
        # A file that passed the check but whose pages SQLite cannot read ("database disk image
        # is malformed"): a problem with the file, as a file that is not SQLite at all is.
        raise CliError(f"{args.db!r} cannot be read as a run registry: {exc}", EXIT_USAGE) from None


def _run(args: argparse.Namespace) -> int:
    if args.db is None:
        args.parser.error("--db FILE is required")
    if args.runs_action is not _list:
        for option, value in (("--status", args.status), ("--module", args.module)):
            if value is not None:
                _list_only(args, option)
        if args.limit is not None:
            _list_only(args, "--limit")
    elif args.limit is None:
        args.limit = _DEFAULT_LIMIT
    if args.runs_action is _tail and args.follow and args.log_dir is None:
        args.parser.error("--follow needs --log-dir (the registry keeps only the last lines)")
    _interruptibly(check_registry_file, args.db)
    return asyncio.run(_with_registry(args))


def _list_only(args: argparse.Namespace, option: str) -> NoReturn:
    # (It was ignored without a word.)
    parser: argparse.ArgumentParser = args.parser
    parser.error(
        f"{option} filters the list; 'runs {args.runs_command}' shows one run: "
        f"drop {option}, or leave out '{args.runs_command} RUN_ID' to list"
    )


def _interruptibly(func: Callable[[str], None], path: str) -> None:
    """``func(path)`` in a daemon thread, waited for here: SQLite's wait for a locked file
    (up to ``_BUSY_SECONDS``) holds the thread that runs it, and Ctrl-C took effect only once
    it returned (4-5 s); this wait is cut short by the signal at once."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            func(path)
        except BaseException as exc:  # raised in the caller's thread below
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=target, name="prismq-cli-check", daemon=True)
    thread.start()
    thread.join()
    error = outcome[0]
    if error is not None:
        raise error


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _add_db(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "--db", default=default, metavar="FILE", help="the SQLiteRunRegistry file (required)"
    )


def add_parser(subparsers: Any) -> None:
    """Register the ``runs`` command and its ``show`` and ``tail`` sub-commands."""
    statuses = [status.value for status in pq.RunStatus]
    parser = subparsers.add_parser(
        "runs",
        help="list, show and tail runs of a SQLiteRunRegistry file",
        description=(
            "List the runs in a SQLiteRunRegistry file, newest first (or see 'runs show' and "
            "'runs tail'). The file must exist and be a registry: runs never creates one. It is "
            "opened read-only and never changed: an unfinished run whose owner process is gone "
            "is shown as such ('running (owner gone)') and stays so until the library opens "
            "the file read-write (which marks it interrupted); a registry of an older schema "
            "needs such an open first."
        ),
    )
    _add_db(parser, None)
    parser.add_argument("--status", choices=statuses, help="only runs with this status")
    parser.add_argument("--module", metavar="ID", help="only runs of this module_id")
    parser.add_argument(
        "--limit",
        type=_limit,
        default=None,  # (_DEFAULT_LIMIT: None tells it was not given, see _run)
        metavar="N",
        help=f"at most N runs (default: {_DEFAULT_LIMIT})",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=_run, runs_action=_list, parser=parser)

    # The shared options use SUPPRESS below so a sub-command does not overwrite a value given
    # before it (`runs --db F show ID`) with its own default.
    actions = parser.add_subparsers(dest="runs_command", metavar="{show,tail}")
    show = actions.add_parser(
        "show", help="print one run's record", description="Print one run's record."
    )
    show.add_argument("run_id", metavar="RUN_ID")
    _add_db(show, argparse.SUPPRESS)
    show.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print one JSON object"
    )
    show.set_defaults(runs_action=_show, parser=show)

    tail = actions.add_parser(
        "tail",
        help="print a run's output log, optionally following it",
        description=(
            "Print a run's output log: LOG_DIR/<run_id>.log as written by "
            "OutputCapture(log_dir=LOG_DIR). Without --log-dir, print the last lines the "
            "registry keeps. With -f, follow the log as it grows until the run has finished."
        ),
    )
    tail.add_argument("run_id", metavar="RUN_ID")
    _add_db(tail, argparse.SUPPRESS)
    tail.add_argument("--log-dir", metavar="DIR", help="the OutputCapture log directory")
    tail.add_argument(
        "-f", "--follow", action="store_true", help="follow until the run has finished"
    )
    tail.add_argument(
        "--interval",
        type=_interval,
        default=0.2,
        metavar="S",
        help="seconds between looks when following (default: %(default)s)",
    )
    tail.set_defaults(runs_action=_tail, parser=tail)
