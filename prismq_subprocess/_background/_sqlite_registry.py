"""A run registry kept in a SQLite file: :class:`SQLiteRunRegistry`.

Design notes:

- All database work runs on one dedicated worker thread per registry (``SQLiteWorker``), so
  the event loop never blocks on disk and the connection is only ever used by the thread that
  created it. Writes queued at the same moment share one transaction (group commit), each in a
  savepoint of its own, so one failing write never undoes or fails the others.
- WAL mode lets readers and one writer work at once, also across processes (several uvicorn
  workers on one file). WAL needs shared memory, so every process sharing the file is on the same
  host; crash recovery relies on that (see :meth:`RunOwner.is_alive`).
- Writes use ``BEGIN IMMEDIATE`` so two processes never both hold a read snapshot and then fail
  to upgrade it; ``busy_timeout`` makes a writer wait for the other instead of failing at once.
- Durability, exactly: a write call returns only after the transaction holding it committed.
  With WAL and ``synchronous=NORMAL`` the commit is in the WAL file (in the OS page cache, not yet
  fsynced), so a returned write survives the process being killed (SIGKILL, a crash) and is seen
  by every other process; a power cut or OS crash may lose the last transactions (never corrupts
  the file). Group commit does not change this: it only lets several writes share one commit.
- ``read_only=True`` opens the file with the ``mode=ro`` URI: no schema change, no journal mode
  change, no recovery, no quarantine; every write raises :class:`RegistryReadOnlyError`.
- Datetimes are stored as integer microseconds since the epoch (exact and sortable); parameters
  and the output tail as JSON, so parameters must be JSON-serialisable.
- The file says it is ours: ``PRAGMA application_id`` is :data:`APPLICATION_ID` and
  ``PRAGMA user_version`` the schema version. A new or empty file is initialised; a file written
  by the first version of this library (user_version 1, our ``runs`` table, no application id) is
  upgraded; anything else is a foreign database and is refused before anything in it changes
  (not even its journal mode).
- A row that cannot be read back (bad JSON, an unknown status, a value of the wrong type: only
  someone else's writes make one) is moved to the ``runs_quarantine`` table with the reason the
  first time a read meets it, logged, and listed in ``quarantined_run_ids``; the other runs are
  served as usual.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import logging
import math
import operator
import os
import socket
import sqlite3
import threading
import time
import urllib.parse
import warnings
from collections.abc import Callable, Collection
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from .._core._cancel_shield import shielded_if_cancelled
from .._core._exceptions import (
    DuplicateRunError,
    InvalidArgumentTypeError,
    InvalidParametersError,
    InvalidRunError,
    InvalidTimeoutError,
    PrismQError,
    RegistryBusyError,
    RegistryClosedError,
    RegistryDatabaseError,
    RegistryFullError,
    RegistryOpenError,
    RegistryReadOnlyError,
    RegistrySchemaError,
    RunStateError,
)
from .._platform import platform_ops
from .._platform._host import on_read_only_file_system
from .._platform._orphans import OrphanCheck, ProcessIdentity, stop_left_behind
from ._memory_registry import (
    BaseRunRegistry,
    _check_claim,
    _check_paging,
    age_cutoff,
    check_filters,
    check_identity,
    claimed_by_another,
    cutoff_from,
    not_a_run,
    not_registered,
    orphan_reason,
    reason_text,
    refused_status,
    run_id_of,
    run_ids_of,
    stored_statuses_for,
    unstorable,
)
from ._run_checks import FIELD_TYPES, check_run_fields, check_text_keys
from ._run_record import (
    ACTIVE_STATUSES,
    FINISHED_STATUSES,
    Run,
    RunOwner,
    RunStatus,
    owner_alive,
    utc_now,
)
from ._sqlite_worker import SQLiteWorker

__all__ = ["APPLICATION_ID", "SCHEMA_VERSION", "SQLiteRunRegistry", "open_read_only"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

SCHEMA_VERSION = 6
"""The schema version this library writes (stored in ``PRAGMA user_version``)."""

APPLICATION_ID = 0x50725153
"""``PRAGMA application_id`` of our registry files (the bytes ``PrQS``): how a file says it is a
prismq_subprocess run registry and not someone else's SQLite database."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SQL_INT_MAX = 2**63 - 1
_MICRO = timedelta(microseconds=1)

# The runs table as version 1 (the first version of this library) created it: how a version 1
# file, which has no application_id yet, is told from someone else's database.
_V1_COLUMNS = (
    "run_id",
    "module_id",
    "module_name",
    "parameters",
    "status",
    "exit_code",
    "error_message",
    "created_at",
    "started_at",
    "finished_at",
    "pid",
    "mode",
    "output_tail",
    "peak_rss_bytes",
    "cpu_time_seconds",
    "owner_host",
    "owner_pid",
    "owner_started_at",
)
_COLUMNS = (*_V1_COLUMNS, "worker")
# rowid first: a row that cannot be decoded is quarantined by its rowid (its run_id may be the
# damaged value).
_SELECT = f"SELECT rowid, {', '.join(_COLUMNS)} FROM runs"
_INSERT = f"INSERT INTO runs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
_UPDATE = f"UPDATE runs SET {', '.join(f'{c} = ?' for c in _COLUMNS[1:])} WHERE run_id = ?"
# The update of a run to status S only matches a stored row whose status may become S. Keyed
# by the status's value (a row's own item), not the member: an enum member's hash is a Python
# call, and the writer thread looks one up per update.
_STATUS_MAY_BECOME = {
    target.value: (
        f"status IN ({', '.join(repr(s.value) for s in sorted(stored_statuses_for(target)))})"
    )
    for target in RunStatus
}
# An update never changes a run's owner (only add_run and claim_run set it): the owner
# columns are matched, not set, so a copy read before another process claimed the run changes
# nothing (RunClaimedError); a copy without owner keeps the stored one.
_OWNER_COLUMNS = ("owner_host", "owner_pid", "owner_started_at")
_UPDATE_CHECKED = {
    target: f"UPDATE runs SET "
    f"{', '.join(f'{c} = ?' for c in _COLUMNS[1:] if c not in _OWNER_COLUMNS)} WHERE run_id = ? "
    + "".join(f"AND {c} IS COALESCE(?, {c}) " for c in _OWNER_COLUMNS)
    + f"AND {where}"
    for target, where in _STATUS_MAY_BECOME.items()
}
# claim_run: the row only if it is still PENDING with the owner read before (IS: NULL-safe).
_CLAIM = (
    f"{_UPDATE} AND status = '{RunStatus.PENDING.value}' "
    "AND owner_host IS ? AND owner_pid IS ? AND owner_started_at IS ?"
)
# The usual update: module_id and created_at as stored. Setting an indexed column rewrites its
# index entries even to the same value (runs_created and runs_module_created: about 40% of an
# update's time), so this form leaves them out of SET and matches them in WHERE instead; a run
# whose caller changed either falls back to _UPDATE_CHECKED. Its parameters: _keeping_keys().
# (Plain "?" placeholders: numbered ones, which would take the row as it is, may not be bound
# from a sequence from Python 3.14 on, and warn from 3.12.)
_KEPT = frozenset(("run_id", "module_id", "created_at", *_OWNER_COLUMNS))
_UPDATE_KEEPING_KEYS = {
    target: f"UPDATE runs SET {', '.join(f'{c} = ?' for c in _COLUMNS if c not in _KEPT)} "
    "WHERE run_id = ? AND module_id = ? AND created_at = ? "
    + "".join(f"AND {c} IS ? " for c in _OWNER_COLUMNS)
    + f"AND {where}"
    for target, where in _STATUS_MAY_BECOME.items()
}
_MODULE_ID, _CREATED_AT = _COLUMNS.index("module_id"), _COLUMNS.index("created_at")
_STATUS = _COLUMNS.index("status")
_OWNER_AT = tuple(_COLUMNS.index(c) for c in _OWNER_COLUMNS)
assert _COLUMNS[0] == "run_id"
# The parameters of the two updates, picked from a row's values (_COLUMNS order) in C.
_KEEPING_AT = (
    *(i for i, c in enumerate(_COLUMNS) if c not in _KEPT),
    0,
    _MODULE_ID,
    _CREATED_AT,
    *_OWNER_AT,
)
_CHECKED_AT = (*(i for i, c in enumerate(_COLUMNS) if i and c not in _OWNER_COLUMNS), 0, *_OWNER_AT)
_keeping_keys: Callable[[tuple[Any, ...]], tuple[Any, ...]] = operator.itemgetter(*_KEEPING_AT)
_checked: Callable[[tuple[Any, ...]], tuple[Any, ...]] = operator.itemgetter(*_CHECKED_AT)
_FINISHED_SQL = ", ".join(f"'{s.value}'" for s in sorted(FINISHED_STATUSES))
_ACTIVE_SQL = ", ".join(f"'{s.value}'" for s in sorted(ACTIVE_STATUSES))


def _migrate_0_to_1(conn: sqlite3.Connection) -> None:
    conn.execute(
        """
        CREATE TABLE runs (
            run_id TEXT PRIMARY KEY NOT NULL,
            module_id TEXT NOT NULL,
            module_name TEXT NOT NULL,
            parameters TEXT NOT NULL,
            status TEXT NOT NULL,
            exit_code INTEGER,
            error_message TEXT,
            created_at INTEGER NOT NULL,
            started_at INTEGER,
            finished_at INTEGER,
            pid INTEGER,
            mode TEXT NOT NULL,
            output_tail TEXT NOT NULL,
            peak_rss_bytes INTEGER,
            cpu_time_seconds REAL,
            owner_host TEXT,
            owner_pid INTEGER,
            owner_started_at REAL
        )
        """
    )
    conn.execute("CREATE INDEX runs_created ON runs (created_at)")
    conn.execute("CREATE INDEX runs_status_created ON runs (status, created_at)")
    conn.execute("CREATE INDEX runs_module_created ON runs (module_id, created_at)")


def _migrate_1_to_2(conn: sqlite3.Connection) -> None:
    # Rows that cannot be read back, kept as they were (no constraints) with the reason.
    conn.execute(
        f"CREATE TABLE runs_quarantine ({', '.join(_V1_COLUMNS)}, reason TEXT NOT NULL, "
        "quarantined_at INTEGER NOT NULL)"
    )


# Only unfinished runs with a request are in this index, so an owner's poll reads nothing when
# nobody asked for a cancel; a query must repeat these WHERE terms for SQLite to use it.
_REQUESTED_WHERE = f"cancel_requested_at IS NOT NULL AND status IN ({_ACTIVE_SQL})"


def _migrate_2_to_3(conn: sqlite3.Connection) -> None:
    # Cancel requests from any process sharing the file (request_cancel); not in _COLUMNS, so
    # the owner's update_run never overwrites them.
    conn.execute("ALTER TABLE runs ADD COLUMN cancel_requested_at INTEGER")
    conn.execute("ALTER TABLE runs ADD COLUMN cancel_reason TEXT")
    conn.execute(f"CREATE INDEX runs_cancel_requested ON runs (run_id) WHERE {_REQUESTED_WHERE}")


def _migrate_3_to_4(conn: sqlite3.Connection) -> None:
    # The cluster worker a run executed on (prismq_subprocess.dask); NULL for local runs.
    conn.execute("ALTER TABLE runs ADD COLUMN worker TEXT")
    conn.execute("ALTER TABLE runs_quarantine ADD COLUMN worker")


def _migrate_4_to_5(conn: sqlite3.Connection) -> None:
    # The child's start time and containment cookie (record_child): with pid, they prove a live
    # process is the run's child, so recovery may stop its tree. Not in _COLUMNS, like the
    # cancel request: update_run never overwrites them.
    conn.execute("ALTER TABLE runs ADD COLUMN child_started_at REAL")
    conn.execute("ALTER TABLE runs ADD COLUMN child_cookie TEXT")


def _migrate_5_to_6(conn: sqlite3.Connection) -> None:
    # The containment cookie variable (PRISMQ_RUN_<token>) every child of an owner process
    # carries, noted with that owner's first run: recovery stops what still carries a dead
    # owner's variable when one of its runs has no child on record (the owner died between the
    # spawn and record_child, or a coroutine run started children of its own). The variable is
    # part of the key: a process that exec()s itself keeps its pid and start time but has a
    # new variable.
    conn.execute(
        "CREATE TABLE run_owners (owner_host TEXT NOT NULL, owner_pid INTEGER NOT NULL, "
        "owner_started_at REAL NOT NULL, cookie_variable TEXT NOT NULL, "
        "PRIMARY KEY (owner_host, owner_pid, owner_started_at, cookie_variable))"
    )


# _MIGRATIONS[n] upgrades a file at user_version n to n + 1. Add an entry (and bump
# SCHEMA_VERSION) to change the schema; every step runs inside one write transaction.
_MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {
    0: _migrate_0_to_1,
    1: _migrate_1_to_2,
    2: _migrate_2_to_3,
    3: _migrate_3_to_4,
    4: _migrate_4_to_5,
    5: _migrate_5_to_6,
}

_NOTE_OWNER = "INSERT OR IGNORE INTO run_owners VALUES (?, ?, ?, ?)"
# The oldest schema a read-only registry reads as it is: 6 added only run_owners, which
# readers never look at (a viewer must not be refused a file no writer has upgraded yet).
_READ_ONLY_FROM = 5
# An owner's key in the runs and run_owners tables: host, pid, start time.
_OwnerKey = tuple[Any, Any, Any]


def _own_cookie_variable(owner: RunOwner) -> str | None:
    """The cookie variable this process's children carry, if ``owner`` is this process and
    its children carry one."""
    if owner != RunOwner.current():
        return None
    return platform_ops().cookie_variable()


# Seconds a recovered orphan's tree gets between SIGTERM and SIGKILL.
_ORPHAN_GRACE = 5.0

_V1_TABLES = ["runs"]

# What decoding a damaged row can raise (JSONDecodeError and InvalidRunError are ValueErrors).
# RecursionError: JSON nested deeper than json.loads reads (an older release stored parameters
# up to its encoder's depth, which is the decoder's too, less the frames below the call).
_BAD_ROW_ERRORS = (ValueError, TypeError, KeyError, OverflowError, RecursionError)


def _foreign(path: str, why: str) -> RegistrySchemaError:
    return RegistrySchemaError(
        f"{path!r} is not a prismq_subprocess run registry ({why}); it was left untouched. "
        "Use another file for the registry."
    )


def _newer(path: str, version: int) -> RegistrySchemaError:
    return RegistrySchemaError(
        f"{path!r} has registry schema version {version}, newer than this library supports "
        f"({SCHEMA_VERSION}); it was left untouched. Upgrade prismq_subprocess to use it."
    )


def _file_kind(conn: sqlite3.Connection, path: str) -> str:
    """``"ours"``, ``"new"`` (empty: ours to initialise) or ``"version1"`` (written by the first
    version of this library); raise :class:`RegistrySchemaError` for anything else. Reads only.

    Every look is at one snapshot of the file: another process may be setting it up meanwhile,
    and reading its ids, version and tables in separate transactions could mix a state from
    before that set-up with one from after it (a file of ours taken for a foreign one).
    """
    if conn.in_transaction:
        return _file_kind_now(conn, path)
    conn.execute("BEGIN")  # deferred: a read transaction, one snapshot for all the reads below
    try:
        return _file_kind_now(conn, path)
    finally:
        if conn.in_transaction:  # (an error may already have ended it)
            conn.execute("ROLLBACK")


def _file_kind_now(conn: sqlite3.Connection, path: str) -> str:
    application_id = int(conn.execute("PRAGMA application_id").fetchone()[0])
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if application_id == APPLICATION_ID:
        return "ours"
    if application_id != 0:
        raise _foreign(path, f"its application_id is {application_id:#x}")
    tables = sorted(
        str(row[0])
        for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
    )
    has_objects = conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone() is not None
    if not has_objects and version == 0:
        return "new"
    if version == 1 and tables == _V1_TABLES:
        columns = tuple(str(row[1]) for row in conn.execute("PRAGMA table_info(runs)"))
        if columns == _V1_COLUMNS:
            return "version1"
    found = f"user_version {version}, tables: {', '.join(tables) or 'none'}"
    raise _foreign(path, f"no prismq_subprocess application_id; {found}")


# SQLite's longest busy wait: a 32-bit count of milliseconds. A longer one overflowed, and
# SQLite took it as no wait at all.
_LONGEST_BUSY_WAIT = (2**31 - 1) / 1000


def _busy_seconds(busy_timeout: float) -> float:
    """``busy_timeout`` as SQLite can wait it (at most about 24.8 days)."""
    return min(busy_timeout, _LONGEST_BUSY_WAIT)


def _busy_pragma(busy_timeout: float) -> str:
    return f"PRAGMA busy_timeout = {int(_busy_seconds(busy_timeout) * 1000)}"


def _enter_wal(conn: sqlite3.Connection, busy_timeout: float) -> str:
    """Switch ``conn``'s file to WAL and return the journal mode it has then. SQLite answers a
    switch that meets another connection's lock with SQLITE_BUSY at once (no busy handler), as
    when several processes open a new file together: retried until ``busy_timeout``."""
    deadline = time.monotonic() + busy_timeout
    while True:
        try:
            return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            busy = getattr(exc, "sqlite_errorname", "") in ("SQLITE_BUSY", "SQLITE_LOCKED")
            if not busy or time.monotonic() >= deadline:
                raise
        time.sleep(0.005)


def _explained(exc: sqlite3.DatabaseError, path: str, busy_timeout: float) -> BaseException:
    """Our error for SQLite's ``exc`` under a call to the registry at ``path``: what happened,
    in words, with the file's name and SQLite's own codes."""
    name = str(getattr(exc, "sqlite_errorname", None) or "")
    error: RegistryDatabaseError
    if name == "SQLITE_FULL":
        error = RegistryFullError(
            f"SQLiteRunRegistry({path!r}): the disk is full ({_free_space(path)} free where "
            "the file is); this write is not in the file, every write acknowledged before it is"
        )
    elif name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        error = RegistryBusyError(
            f"SQLiteRunRegistry({path!r}): another connection held the database's lock for "
            f"longer than busy_timeout ({busy_timeout:g} s); this call did nothing. Retry later, "
            "or give busy_timeout more time if writers hold the lock that long by design"
        )
    elif name in ("SQLITE_CORRUPT", "SQLITE_NOTADB") or type(exc) is sqlite3.DatabaseError:
        code = f" ({name})" if name else ""
        error = RegistryDatabaseError(
            f"SQLiteRunRegistry({path!r}): {exc}{code}: the file is damaged; restore it from a "
            "backup, or move it aside (a new file is made in its place)"
        )
    else:
        code = f" ({name})" if name else ""
        error = RegistryDatabaseError(f"SQLiteRunRegistry({path!r}): {exc}{code}")
    # SQLite's codes, as sqlite3 sets them on the exceptions it raises (one made in Python, as
    # the worker's "group transaction ended early", has none).
    number: Any = getattr(exc, "sqlite_errorcode", None)
    error.sqlite_errorcode = number
    error.sqlite_errorname = name or None  # type: ignore[assignment]
    return error


def _utf8(text: str) -> bool:
    """Whether ``text`` can be stored as UTF-8 (no lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _free_space(path: str) -> str:
    try:
        stat = os.statvfs(os.path.dirname(os.path.abspath(path)))
    except (OSError, AttributeError):  # (no statvfs on Windows)
        return "little or no space"
    free = stat.f_bavail * stat.f_frsize
    if free < 1024:
        return f"{free} bytes"
    if free < 1024**2:
        return f"{free / 1024:.1f} KiB"
    return f"{free / 1024**2:.1f} MiB"


def _raise_if_unopenable(
    path: str, cause: BaseException | None = None, *, read_only: bool = False
) -> None:
    """Raise :class:`RegistryOpenError` naming why ``path`` cannot be opened, when the file
    system tells (SQLite's own error says only "unable to open database file"). Read-only, a
    missing file in a folder that exists is left to the caller (not a permission problem)."""
    if path == ":memory:" or path.startswith("file:"):
        return
    folder = os.path.dirname(os.path.abspath(path))
    tilde = " (a leading ~ is not expanded: os.path.expanduser())" if path[:1] == "~" else ""
    if os.path.isdir(path):
        why = "it is a directory"
    elif os.path.exists(folder) and not os.path.isdir(folder):
        why = f"{folder!r} is a file, not a folder"
    elif not os.path.isdir(folder):
        why = f"its folder {folder!r} does not exist (create it first){tilde}"
    elif read_only:
        if not os.access(folder, os.X_OK) or (
            os.path.exists(path) and not os.access(path, os.R_OK)
        ):
            why = "permission denied"
        else:
            return
    elif not os.access(folder, os.W_OK | os.X_OK) or (
        os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK)
    ):
        why = "permission denied"
    elif cause is not None:
        why = str(cause)
    else:
        return
    raise RegistryOpenError(f"cannot open the run registry {path!r}: {why}") from cause


def open_read_only(path: str, timeout: float) -> sqlite3.Connection:
    """Connect to the existing SQLite file ``path`` for reading only (the ``mode=ro`` URI),
    also where it lies on read-only storage; its first read is made here.

    A reader of a WAL file creates the ``-shm`` file beside it, which read-only storage (a
    snapshot, a read-only mount) refuses: "unable to open database file". On a file system
    mounted read-only no writer can be live, so the file cannot change: it is then opened as
    immutable. Only there: a folder this process may not write (another user's) can still
    have a writer, which an immutable reader would not see (it read pages the writer was
    moving: "malformed", for good).

    Raises:
        sqlite3.Error: what SQLite raises (not a database, locked...).
    """
    # Quoted from the path's bytes: a folder name that is not UTF-8 (a Latin-1 one, decoded
    # with surrogate escapes) failed the quoting of its text with a UnicodeEncodeError.
    uri = "file:" + urllib.parse.quote(os.fsencode(os.path.abspath(path))) + "?mode=ro"
    timeout = _busy_seconds(timeout)
    conn = sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None)
    try:
        conn.execute("PRAGMA user_version").fetchone()
        return conn
    except sqlite3.OperationalError as exc:
        conn.close()
        if getattr(exc, "sqlite_errorcode", None) != sqlite3.SQLITE_CANTOPEN or not (
            on_read_only_file_system(path)
        ):
            raise
    except BaseException:
        conn.close()
        raise
    conn = sqlite3.connect(uri + "&immutable=1", uri=True, timeout=timeout, isolation_level=None)
    try:
        conn.execute("PRAGMA user_version").fetchone()
    except BaseException:
        conn.close()
        raise
    return conn


def _connect_read_only(path: str, busy_timeout: float) -> sqlite3.Connection:
    """Open ``path`` with the ``mode=ro`` URI and check it is a current registry of ours.

    Raises:
        RegistrySchemaError: missing file, not ours, or a schema other than SCHEMA_VERSION (a
            reader cannot migrate; opening it once read-write does).
    """
    if path == ":memory:" or not os.path.isfile(path):
        _raise_if_unopenable(path, read_only=True)
        raise RegistrySchemaError(
            f"{path!r} is not an existing registry file; read_only=True needs one"
        )
    try:
        conn = open_read_only(path, busy_timeout)
    except sqlite3.DatabaseError as exc:
        raise RegistrySchemaError(f"{path!r} is not a usable registry: {exc}") from exc
    try:
        conn.execute(_busy_pragma(busy_timeout))
        kind = _file_kind(conn, path)
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if kind == "ours" and version > SCHEMA_VERSION:
            raise _newer(path, version)
        if kind != "ours" or version < _READ_ONLY_FROM:
            raise RegistrySchemaError(
                f"{path!r} has registry schema version {version if kind == 'ours' else 0}, "
                f"this library reads version {SCHEMA_VERSION}; a read-only registry cannot "
                "migrate it (open it once without read_only=True)"
            )
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise RegistrySchemaError(f"{path!r} is not a usable registry: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    return conn


def _to_micros(value: datetime | None) -> int | None:
    return None if value is None else (value - _EPOCH) // _MICRO


def _from_micros(value: int | None) -> datetime | None:
    return None if value is None else _EPOCH + value * _MICRO


# Strict JSON: NaN and the infinities are no JSON values, and stored as Python's bare tokens
# they broke every strict reader of the run afterwards (a browser's JSON.parse of to_dict()).
# One encoder for all writes: json.dumps with an option builds a new one per call.
# A run an older release stored with NaN in it is still updated as it was written (a strict
# encoder would refuse its every update, and its recovery would fail the registry's open).
_ENCODER = json.JSONEncoder(allow_nan=False)
_LENIENT_ENCODER = json.JSONEncoder()


def _json_text(field: str, value: Any, *, strict: bool = True, deep_ok: bool = False) -> str:
    """``value`` as the JSON stored in the ``field`` column; the documented error if JSON
    cannot hold it (a bare TypeError or ValueError from the encoder said neither which field
    nor that it was the caller's input). ``strict``: NaN and the infinities refused too."""
    if field == "parameters" and value and not deep_ok:
        # (First: it bounds the depth the encoder recurses to. A row rewritten as read came
        # from JSON, keys and all, however deep: 3.13's json reads 2,000 levels, which this
        # walk, in Python, could not go through.)
        check_text_keys(field, value)
    try:
        text = (_ENCODER if strict else _LENIENT_ENCODER).encode(value)
    except (TypeError, ValueError, RecursionError) as exc:
        error = InvalidParametersError if field == "parameters" else InvalidRunError
        raise error(f"{field} must be JSON-serialisable to be stored in SQLite: {exc}") from None
    return text


def _row_values(run: Run, *, adding: bool = False, deep_ok: bool = False) -> tuple[Any, ...]:
    """The row of ``run``, as the statements bind it (``adding``: a new run, whose parameters
    must be strict JSON; an update keeps what an older release may have stored; ``deep_ok``:
    parameters nested deeper than the limit kept too, for a row rewritten as read).

    Raises:
        InvalidRunError, InvalidParametersError: a field SQLite could not hold as a read gives
            it back (the run would be stored, then quarantined by the first read).
    """
    # Made on the loop for every write: _to_micros written out, and the status's value read
    # from its member (``_value_``) rather than through the enum's ``value`` property.
    check_run_fields(run)
    owner = run.owner
    parameters, tail = run.parameters, run.output_tail
    if type(parameters) is not dict and not isinstance(parameters, dict):
        raise InvalidParametersError(
            f"run {run.run_id!r}: parameters must be a dict, got {type(parameters).__name__}"
        )
    if type(tail) is not list and not isinstance(tail, list):
        raise InvalidRunError(
            f"run {run.run_id!r}: output_tail must be a list of lines, got {type(tail).__name__}"
        )
    if tail and not all(isinstance(line, str) for line in tail):
        bad = next(line for line in tail if not isinstance(line, str))
        raise InvalidRunError(
            f"run {run.run_id!r}: output_tail must be a list of str lines, got a "
            f"{type(bad).__name__} in it"
        )
    created, started, finished = run.created_at, run.started_at, run.finished_at
    values = (
        run.run_id,
        run.module_id,
        run.module_name,
        # Most runs have neither parameters nor an output tail: skip the encoder for those.
        _json_text("parameters", parameters, strict=adding, deep_ok=deep_ok)
        if parameters or type(parameters) is not dict
        else "{}",
        run._status._value_,
        run.exit_code,
        run.error_message,
        None if created is None else (created - _EPOCH) // _MICRO,
        None if started is None else (started - _EPOCH) // _MICRO,
        None if finished is None else (finished - _EPOCH) // _MICRO,
        run.pid,
        run.mode,
        _json_text("output_tail", tail) if tail or type(tail) is not list else "[]",
        run.peak_rss_bytes,
        run.cpu_time_seconds,
        None if owner is None else owner.host,
        None if owner is None else owner.pid,
        None if owner is None else owner.started_at,
        run.worker,
    )
    # The usual run: every checked column of the types a read accepts (a few type tests).
    if (
        type(values[1]) is str
        and type(values[2]) is str
        and type(values[_MODE]) is str
        and values[_EXIT_CODE].__class__ in _PLAIN_OPTIONAL_INT
        and values[_PID].__class__ in _PLAIN_OPTIONAL_INT
        and values[_ERROR].__class__ in _PLAIN_OPTIONAL_TEXT
        and values[_PEAK_RSS].__class__ in _PLAIN_OPTIONAL_INT
        and values[_CPU_TIME].__class__ in _PLAIN_OPTIONAL_REAL
        and values[_WORKER].__class__ in _PLAIN_OPTIONAL_TEXT
        and values[_OWNER_HOST].__class__ in _PLAIN_OPTIONAL_TEXT
        and values[_OWNER_PID].__class__ in _PLAIN_OPTIONAL_INT
        and values[_OWNER_STARTED].__class__ in _PLAIN_OPTIONAL_REAL
    ):
        return values
    for index, name, types in _COLUMN_TYPES:
        value = values[index - 1]  # (the checks count rowid first)
        if not isinstance(value, types) or value.__class__ is bool:
            wanted = " or ".join("None" if t is type(None) else t.__name__ for t in types)
            raise InvalidRunError(
                f"run {run.run_id!r}: {name} must be {wanted} to be stored, got {value!r}"
            )
    return values


# The types a column may hold in a row this library wrote (what sqlite3 hands back for it):
# anything else is damage, and the row is quarantined rather than served (a bytes module_id
# breaks a host's json.dumps(run.to_dict()); a text owner_pid broke recovery, so the open).
# (The run's own fields as _run_checks.FIELD_TYPES gives them for both registries; the owner's
# three columns besides.)
_COLUMN_TYPES: tuple[tuple[int, str, tuple[type, ...]], ...] = tuple(
    (_COLUMNS.index(name) + 1, name, types)  # + 1: rowid comes first in a _SELECT row
    for name, types in (
        *FIELD_TYPES,
        ("owner_host", (str, type(None))),
        ("owner_pid", (int, type(None))),
        ("owner_started_at", (float, int, type(None))),
    )
)


# Positions in a _row_values tuple, and the exact classes of its usual values (a subclass, e.g.
# an IntEnum exit code, takes the slower isinstance test above).
_EXIT_CODE, _ERROR, _PID, _MODE = (
    _COLUMNS.index(n) for n in ("exit_code", "error_message", "pid", "mode")
)
_PEAK_RSS, _CPU_TIME, _WORKER = (
    _COLUMNS.index(n) for n in ("peak_rss_bytes", "cpu_time_seconds", "worker")
)
_OWNER_HOST, _OWNER_PID, _OWNER_STARTED = (
    _COLUMNS.index(n) for n in ("owner_host", "owner_pid", "owner_started_at")
)
_PLAIN_OPTIONAL_INT = frozenset({int, type(None)})
_PLAIN_OPTIONAL_TEXT = frozenset({str, type(None)})
_PLAIN_OPTIONAL_REAL = frozenset({float, int, type(None)})


def _owner_of(host: Any, pid: Any, started_at: Any) -> RunOwner | None:
    """The owner stored in a row's three owner columns (None unless all three are set)."""
    if host is None or pid is None or started_at is None:
        return None
    return RunOwner(host, pid, float(started_at))


def _check_types(row: tuple[Any, ...]) -> None:
    for index, name, types in _COLUMN_TYPES:
        value = row[index]
        # bool is an int, but sqlite3 never returns one: no need to refuse it here.
        if not isinstance(value, types):
            raise InvalidRunError(f"{name} has the wrong type: {value!r}")


def _json_column(name: str, text: Any, kind: type) -> Any:
    value = json.loads(text)
    if value is not None and not isinstance(value, kind):
        raise InvalidRunError(f"{name} is not a JSON {kind.__name__}: {text!r}")
    return value


def _run_from_row(row: tuple[Any, ...]) -> Run:
    """Decode a row of ``_SELECT`` (rowid first).

    Raises:
        ValueError, TypeError, KeyError, OverflowError, RecursionError: a damaged row (see
            _BAD_ROW_ERRORS).
    """
    _check_types(row)
    (
        _rowid,
        run_id,
        module_id,
        module_name,
        parameters,
        status,
        exit_code,
        error_message,
        created_at,
        started_at,
        finished_at,
        pid,
        mode,
        output_tail,
        peak_rss_bytes,
        cpu_time_seconds,
        owner_host,
        owner_pid,
        owner_started_at,
        worker,
    ) = row
    owner = _owner_of(owner_host, owner_pid, owner_started_at)
    created = _from_micros(created_at)
    if created is None:
        raise InvalidRunError("created_at is NULL")
    if not isinstance(run_id, str):
        raise InvalidRunError(f"run_id is not text: {run_id!r}")
    try:
        status = RunStatus(status)
    except ValueError:
        raise InvalidRunError(f"unknown status {status!r}") from None
    tail = _json_column("output_tail", output_tail, list)
    if tail and not all(isinstance(line, str) for line in tail):
        raise InvalidRunError(f"output_tail is not a JSON list of strings: {output_tail!r}")
    return Run(
        run_id=run_id,
        module_id=module_id,
        module_name=module_name,
        parameters=_json_column("parameters", parameters, dict),
        status=status,
        exit_code=exit_code,
        error_message=error_message,
        created_at=created,
        started_at=_from_micros(started_at),
        finished_at=_from_micros(finished_at),
        pid=pid,
        mode=mode,
        output_tail=tail,
        peak_rss_bytes=peak_rss_bytes,
        cpu_time_seconds=None if cpu_time_seconds is None else float(cpu_time_seconds),
        owner=owner,
        worker=worker,
    )


def _where(status: RunStatus | None, module_id: str | None) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    args: list[Any] = []
    if status is not None:
        clauses.append("status = ?")
        args.append(RunStatus(status).value)
    if module_id is not None:
        clauses.append("module_id = ?")
        args.append(module_id)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), args


def _seen(future: asyncio.Future[_T]) -> asyncio.Future[_T]:
    """``future``, its outcome marked as seen: a caller that stops waiting on it (through a
    shield) must not leave asyncio reporting "exception was never retrieved" later."""
    future.add_done_callback(_retrieve)
    return future


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _registry_closed(path: str) -> RegistryClosedError:
    return RegistryClosedError(f"SQLiteRunRegistry({path!r}) is closed")


class _Database:
    """The connection and every statement; used only from the registry's worker thread."""

    def __init__(self, path: str, busy_timeout: float, read_only: bool = False) -> None:
        self.path = path
        self.read_only = read_only
        self.quarantined: list[str] = []
        if read_only:
            self.conn = _connect_read_only(path, busy_timeout)
            self.journal_mode = str(self.conn.execute("PRAGMA journal_mode").fetchone()[0])
            return
        # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves.
        try:
            self.conn = sqlite3.connect(
                path, timeout=_busy_seconds(busy_timeout), isolation_level=None
            )
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorname", "") == "SQLITE_CANTOPEN":
                _raise_if_unopenable(path, exc)
                # Nothing the file system tells (a ``file:`` URI, a race): SQLite's words.
                raise RegistryOpenError(f"cannot open the registry file {path!r}: {exc}") from exc
            raise
        try:
            self.conn.execute(_busy_pragma(busy_timeout))
            # Before anything that writes (the journal mode is stored in the file): a foreign
            # database, or one of ours from a newer version, must be left exactly as it was.
            if _file_kind(self.conn, path) == "ours":
                version = int(self.conn.execute("PRAGMA user_version").fetchone()[0])
                if version > SCHEMA_VERSION:
                    raise _newer(path, version)
            self.journal_mode = _enter_wal(self.conn, busy_timeout)
            self.conn.execute("PRAGMA synchronous = NORMAL")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            self.conn.close()
            if getattr(exc, "sqlite_errorname", "") in ("SQLITE_NOTADB", "SQLITE_CORRUPT"):
                raise RegistrySchemaError(f"{path!r} is not a usable registry: {exc}") from exc
            raise
        except BaseException:
            self.conn.close()
            raise

    def write(self, fn: Callable[[sqlite3.Connection], _T], atomic: bool = False) -> _T:
        """Run ``fn`` as one write: its own transaction, or a savepoint in a group's.

        ``atomic``: ``fn`` changes the database with at most one statement (others it runs
        only read or change nothing), so SQLite's own statement rollback already undoes a
        failure, and inside a group no savepoint is needed.
        """
        if self.read_only:
            raise RegistryReadOnlyError(
                f"the registry {self.path!r} was opened read-only; it cannot be written"
            )
        if self.conn.in_transaction:
            if atomic:
                return fn(self.conn)
            # Inside a group transaction (SQLiteWorker): a savepoint, so a failing write undoes
            # only itself and the group's other writes still commit.
            self.conn.execute("SAVEPOINT write")
            try:
                result = fn(self.conn)
            except BaseException:
                if self.conn.in_transaction:  # some errors end the whole transaction
                    self.conn.execute("ROLLBACK TO write")
                    self.conn.execute("RELEASE write")
                raise
            self.conn.execute("RELEASE write")
            return result
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(self.conn)
        except BaseException:
            # Some errors (a full disk) end the transaction themselves; a ROLLBACK then would
            # replace the caller's error with "no transaction is active".
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")
        return result

    def _migrate(self) -> None:
        def step(conn: sqlite3.Connection) -> None:
            # Re-read inside the write lock: another process may have set the file up meanwhile.
            kind = _file_kind(conn, self.path)
            version = 0 if kind == "new" else int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise _newer(self.path, version)
            while version < SCHEMA_VERSION:
                _MIGRATIONS[version](conn)
                version += 1
                conn.execute(f"PRAGMA user_version = {version}")
            if kind != "ours":
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")

        current = (
            int(self.conn.execute("PRAGMA application_id").fetchone()[0]),
            int(self.conn.execute("PRAGMA user_version").fetchone()[0]),
        )
        if current != (APPLICATION_ID, SCHEMA_VERSION):
            self.write(step)

    # -- rows that cannot be read back ------------------------------------------------------
    def _decode(self, rows: list[tuple[Any, ...]]) -> tuple[list[Run], list[tuple[int, str]]]:
        """Split rows into runs and ``(rowid, reason)`` of the damaged ones."""
        runs: list[Run] = []
        bad: list[tuple[int, str]] = []
        for row in rows:
            try:
                runs.append(_run_from_row(row))
            except _BAD_ROW_ERRORS as exc:
                bad.append((int(row[0]), f"{type(exc).__name__}: {exc}"))
        return runs, bad

    def _move_to_quarantine(self, conn: sqlite3.Connection, bad: list[tuple[int, str]]) -> None:
        now = _to_micros(utc_now())
        for rowid, reason in bad:
            found = conn.execute("SELECT run_id FROM runs WHERE rowid = ?", (rowid,)).fetchone()
            if found is None:
                continue  # another reader quarantined it first
            conn.execute(
                f"INSERT INTO runs_quarantine ({', '.join(_COLUMNS)}, reason, quarantined_at) "
                f"SELECT {', '.join(_COLUMNS)}, ?, ? FROM runs WHERE rowid = ?",
                (reason, now, rowid),
            )
            conn.execute("DELETE FROM runs WHERE rowid = ?", (rowid,))
            logger.warning(
                "run %r in %s cannot be read (%s); moved to the runs_quarantine table",
                found[0],
                self.path,
                reason,
            )
            self.quarantined.append(str(found[0]))

    def _quarantine(self, bad: list[tuple[int, str]]) -> bool:
        """Quarantine damaged rows in their own transaction; ``False`` if that failed."""
        if self.read_only:
            return False  # a reader never writes: the damaged rows are just skipped
        try:
            self.write(lambda conn: self._move_to_quarantine(conn, bad))
        except sqlite3.Error:
            logger.exception("could not quarantine %d unreadable run(s) in %s", len(bad), self.path)
            return False
        return True

    def _read(self, sql: str, args: tuple[Any, ...]) -> list[Run]:
        """Run a SELECT of runs; damaged rows are quarantined and the query repeated, so the
        answer holds only readable runs (and a page stays full)."""
        for _ in range(5):
            runs, bad = self._decode(self.conn.execute(sql, args).fetchall())
            if not bad:
                return runs
            if not self._quarantine(bad):
                return runs  # read-only file, say: serve the readable rows, skip the others
        return runs

    def _stop_orphans(self) -> tuple[dict[str, str], set[_OwnerKey]]:
        """Stop the trees that dead owners' runs left running; return what was stopped, by
        run id, and the owners found dead (only their runs are recovered: an owner that dies
        after this look is left for the next recovery, whose look stops its tree first).

        A run's recorded child must be proven the run's (pid, start time, cookie); for a run
        without one (its owner died before recording it, or a coroutine run), what still
        carries its dead owner's cookie variable is stopped, if that owner ran on this host,
        sparing what is alive for a live host (see :func:`stop_left_behind`). Outside any
        transaction: a stop takes up to the grace period."""
        rows = self.conn.execute(
            "SELECT run_id, pid, child_started_at, child_cookie, owner_host, owner_pid, "
            f"owner_started_at, worker FROM runs WHERE status IN ({_ACTIVE_SQL})"
        ).fetchall()
        notes: dict[_OwnerKey, list[str]] = {}
        for host, pid, started, variable in self.conn.execute(
            "SELECT owner_host, owner_pid, owner_started_at, cookie_variable FROM run_owners"
        ):
            notes.setdefault((host, pid, started), []).append(str(variable))
        alive: dict[_OwnerKey, bool] = {}

        def is_alive(key: _OwnerKey) -> bool:
            if key not in alive:
                try:
                    owner = _owner_of(*key)
                    alive[key] = owner is not None and owner_alive(owner, self.path)
                except (TypeError, ValueError, ArithmeticError):
                    alive[key] = False  # a damaged row: recover() quarantines it
            return alive[key]

        here = socket.gethostname()
        orphans: dict[str, ProcessIdentity] = {}
        unrecorded: dict[str, list[str]] = {}  # run id -> its dead owner's cookie variables
        for run_id, pid, started, cookie, host, owner_pid, owner_started, worker in rows:
            key = (host, owner_pid, owner_started)
            if is_alive(key) or worker is not None:
                continue
            try:
                if started is not None and pid is not None:
                    # (Another host name: an owner of this host renamed since was found alive
                    # above; what is verified the run's (pid, start, cookie) is stopped.)
                    orphans[str(run_id)] = ProcessIdentity(int(pid), float(started), cookie)
                elif key in notes and host == here:
                    unrecorded[str(run_id)] = notes[key]
            except (TypeError, ValueError):
                continue  # a damaged row: recover() quarantines it
        dead = {key for key, live in alive.items() if not live}
        if not orphans and not unrecorded:
            return {}, dead
        owners_variables = sorted({v for variables in unrecorded.values() for v in variables})
        own = platform_ops().cookie_variable()
        live_notes = [key for key in notes if is_alive(key)]
        stops, by_variable = stop_left_behind(
            list(orphans.values()),
            owners_variables,
            _ORPHAN_GRACE,
            spare_variables={
                *(v for key in live_notes for v in notes[key]),
                *((own,) if own is not None else ()),
            },
            spare_pids={
                int(key[1])
                for key, live in alive.items()
                if live and key[0] == here and isinstance(key[1], int)
            },
        )
        stopped: dict[str, str] = {}
        for (run_id, identity), stop in zip(orphans.items(), stops, strict=True):
            if stop.check is OrphanCheck.VERIFIED:
                logger.warning(
                    "run %s: its child (pid %d) outlived its owner; its process tree was stopped",
                    run_id,
                    identity.pid,
                )
                stopped[run_id] = (
                    f"; its process tree (pid {identity.pid}) was still running and was stopped"
                )
            elif stop.stopped:
                # The child died (of the broken pipe its dead owner left, typically), its
                # descendants did not.
                logger.warning(
                    "run %s: %d descendant(s) of its exited child (pid %d) outlived its owner; "
                    "they were stopped",
                    run_id,
                    stop.stopped,
                    identity.pid,
                )
                stopped[run_id] = (
                    f"; its child (pid {identity.pid}) had exited, but {stop.stopped} process(es)"
                    " of its tree were still running and were stopped"
                )
        count_of = dict(zip(owners_variables, by_variable, strict=True))
        for run_id, variables in unrecorded.items():
            count = sum(count_of[variable] for variable in variables)
            if count:
                logger.warning(
                    "run %s: its owner died with no child of the run on record; %d process(es) "
                    "it had started (cookie variable %s) were still running and were stopped",
                    run_id,
                    count,
                    ", ".join(variables),
                )
                stopped[run_id] = (
                    f"; {count} process(es) its owner had started (for this run or another) "
                    "were still running and were stopped (no child of the run was on record)"
                )
        return stopped, dead

    @staticmethod
    def _forget_dead_owners(conn: sqlite3.Connection, dead: set[_OwnerKey]) -> None:
        """Drop the cookie variables of the owners found dead that have no unfinished run left
        (recovery has just marked theirs INTERRUPTED). A live owner's note must stay: it is
        written only once; so does one of another host name, which cannot be told from a live
        process of this host renamed since (its variable is never used from here)."""
        here = socket.gethostname()
        active = {
            tuple(row)
            for row in conn.execute(
                "SELECT DISTINCT owner_host, owner_pid, owner_started_at FROM runs "
                f"WHERE status IN ({_ACTIVE_SQL})"
            )
        }
        for key in dead - active:
            if key[0] != here:
                continue
            conn.execute(
                "DELETE FROM run_owners WHERE owner_host IS ? AND owner_pid IS ? "
                "AND owner_started_at IS ?",
                key,
            )

    def record_child(self, run_id: str, identity: ProcessIdentity) -> bool:
        return self.write(
            lambda conn: (
                conn.execute(
                    "UPDATE runs SET child_started_at = ?, child_cookie = ? "
                    f"WHERE run_id = ? AND pid = ? AND status IN ({_ACTIVE_SQL})",
                    (identity.started_at, identity.cookie, run_id, identity.pid),
                ).rowcount
                == 1
            )
        )

    def recover(self) -> list[str]:
        """Mark active runs whose owner is gone INTERRUPTED (first stopping the trees they
        provably left running); return their run_ids."""
        stopped, dead = self._stop_orphans()

        def step(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(f"{_SELECT} WHERE status IN ({_ACTIVE_SQL})").fetchall()
            runs, bad = self._decode(rows)
            if bad:
                self._move_to_quarantine(conn, bad)
            recovered: list[str] = []
            for run in runs:
                owner = run.owner
                # Only owners the look above found dead (whose trees it stopped): one that
                # died since is the next recovery's, which stops its tree first.
                if owner is not None and (owner.host, owner.pid, owner.started_at) not in dead:
                    continue
                run.mark_interrupted(orphan_reason(run) + stopped.get(run.run_id, ""))
                # Its row as read, status aside: what an older release stored is kept (its
                # parameters nested past today's limit, say).
                values = _row_values(run, deep_ok=True)
                conn.execute(_UPDATE, (*values[1:], run.run_id))
                recovered.append(run.run_id)
            self._forget_dead_owners(conn, dead)
            return recovered

        return self.write(step)

    # add and update take the run as its row (_row_values, made by the caller on its loop):
    # the snapshot a write needs, taken without copying the Run and its containers first.
    def add(
        self,
        values: tuple[Any, ...],
        max_runs: int | None,
        max_age: timedelta | None,
        variable: str | None = None,
    ) -> None:
        """Insert a run's row; ``variable``: note it as the run's owner's cookie variable in the
        same transaction (see _migrate_5_to_6)."""

        def step(conn: sqlite3.Connection) -> None:
            if variable is not None:
                # (Kept even if the insert fails: a true fact, harmless, and it spares a
                # savepoint inside a group.)
                conn.execute(_NOTE_OWNER, (*(values[i] for i in _OWNER_AT), variable))
            try:
                conn.execute(_INSERT, values)
            except sqlite3.IntegrityError as exc:
                name = str(getattr(exc, "sqlite_errorname", ""))
                if name in ("SQLITE_CONSTRAINT_PRIMARYKEY", "SQLITE_CONSTRAINT_UNIQUE"):
                    raise DuplicateRunError(
                        f"a run with run_id {values[0]!r} is already registered"
                    ) from None
                # (Another constraint: a None where the table wants a value, say.)
                raise InvalidRunError(f"run {values[0]!r} cannot be stored: {exc}") from None
            if not atomic:
                self._retain(conn, max_runs, max_age)

        atomic = max_runs is None and max_age is None
        self.write(step, atomic=atomic)

    def update(self, values: tuple[Any, ...], status: RunStatus) -> None:
        """Store the row of a run whose status is ``status``; the caller checked
        :func:`unstorable` already."""
        run_id = values[0]

        def step(conn: sqlite3.Connection) -> None:
            # At most one of the two UPDATEs changes the row: the second only runs when the
            # first matched nothing.
            target = values[_STATUS]
            if conn.execute(_UPDATE_KEEPING_KEYS[target], _keeping_keys(values)).rowcount:
                return
            if conn.execute(_UPDATE_CHECKED[target], _checked(values)).rowcount:
                return
            row = conn.execute(
                f"SELECT status, {', '.join(_OWNER_COLUMNS)} FROM runs WHERE run_id = ?",
                (run_id,),
            ).fetchone()
            if row is None:
                raise not_registered(run_id)
            owner = tuple(values[i] for i in _OWNER_AT)
            if owner[0] is not None and owner != tuple(row[1:]):
                raise claimed_by_another(run_id, _owner_of(*row[1:]))
            try:
                stored = RunStatus(row[0])
            except ValueError:
                raise RunStateError(
                    f"cannot store run {run_id}: the stored run has an unknown status {row[0]!r}"
                ) from None
            refused = refused_status(run_id, stored, status)
            assert refused is not None  # the checked UPDATE matched nothing for a reason
            raise refused

        self.write(step, atomic=True)

    def claim(
        self, values: tuple[Any, ...], owner: RunOwner | None, variable: str | None = None
    ) -> bool:
        """Store a PENDING run's row if the stored one is PENDING with ``owner``: one
        statement, so two processes cannot both see the old owner and both write.
        ``variable``: as for :meth:`add`."""
        expected = (
            (None, None, None) if owner is None else (owner.host, owner.pid, owner.started_at)
        )

        def step(conn: sqlite3.Connection) -> bool:
            if variable is not None:
                conn.execute(_NOTE_OWNER, (*(values[i] for i in _OWNER_AT), variable))
            return conn.execute(_CLAIM, (*values[1:], values[0], *expected)).rowcount == 1

        return self.write(step, atomic=True)

    def request_cancel(self, run_id: str, reason: str) -> bool:
        def step(conn: sqlite3.Connection) -> bool:
            # The first request's moment and reason stay.
            return (
                conn.execute(
                    "UPDATE runs SET cancel_requested_at = COALESCE(cancel_requested_at, ?), "
                    "cancel_reason = COALESCE(cancel_reason, ?) "
                    f"WHERE run_id = ? AND status IN ({_ACTIVE_SQL})",
                    (_to_micros(utc_now()), reason, run_id),
                ).rowcount
                == 1
            )

        return self.write(step)

    def cancel_requests(self, run_ids: frozenset[str]) -> dict[str, str]:
        # INDEXED BY: the planner would rather scan every active run by status; this index
        # holds only the requested ones (and SQLite refuses the query if it cannot use it).
        rows = self.conn.execute(
            "SELECT run_id, cancel_reason FROM runs INDEXED BY runs_cancel_requested "
            f"WHERE {_REQUESTED_WHERE}"
        ).fetchall()
        return {run_id: reason for run_id, reason in rows if run_id in run_ids}

    def get(self, run_id: str) -> Run | None:
        runs = self._read(f"{_SELECT} WHERE run_id = ?", (run_id,))
        return runs[0] if runs else None

    def list_runs(
        self, status: RunStatus | None, module_id: str | None, limit: int, offset: int
    ) -> list[Run]:
        where, args = _where(status, module_id)
        return self._read(
            f"{_SELECT}{where} ORDER BY created_at DESC, rowid DESC LIMIT ? OFFSET ?",
            (*args, limit, offset),
        )

    def count(self, status: RunStatus | None, module_id: str | None) -> int:
        where, args = _where(status, module_id)
        return int(self.conn.execute(f"SELECT COUNT(*) FROM runs{where}", args).fetchone()[0])

    @staticmethod
    def _delete_finished_before(conn: sqlite3.Connection, cutoff: datetime) -> int:
        return conn.execute(
            f"DELETE FROM runs WHERE status IN ({_FINISHED_SQL}) "
            "AND COALESCE(finished_at, created_at) < ?",
            (_to_micros(cutoff),),
        ).rowcount

    def delete_before(self, cutoff: datetime) -> int:
        return self.write(lambda conn: self._delete_finished_before(conn, cutoff))

    def _retain(
        self, conn: sqlite3.Connection, max_runs: int | None, max_age: timedelta | None
    ) -> int:
        deleted = 0
        cutoff = None if max_age is None else age_cutoff(max_age)
        if cutoff is not None:
            deleted += self._delete_finished_before(conn, cutoff)
        if max_runs is not None:
            deleted += conn.execute(
                f"DELETE FROM runs WHERE rowid IN (SELECT rowid FROM runs "
                f"WHERE status IN ({_FINISHED_SQL}) ORDER BY created_at DESC, rowid DESC "
                "LIMIT -1 OFFSET ?)",
                (max_runs,),
            ).rowcount
        return deleted

    def retain(self, max_runs: int | None, max_age: timedelta | None) -> int:
        return self.write(lambda conn: self._retain(conn, max_runs, max_age))


class SQLiteRunRegistry(BaseRunRegistry):
    """Run registry in a SQLite file: history survives restarts and is shared between processes.

    Opening (``await open()`` or ``async with``; the first call opens it too) creates or migrates
    the schema, switches to WAL and then recovers after crashes: PENDING/RUNNING runs whose owner
    process is gone (dead, or its pid now belongs to another process) become INTERRUPTED with the
    reason in ``error_message``; runs owned by a live process are left alone. A run whose child
    is still running (its dead owner was killed before it could stop it) has that child's tree
    stopped first (SIGTERM, up to 5 s, SIGKILL), but only when the child is proven to be the
    run's: the pid recorded with :meth:`record_child`, the same start time and the run's
    containment cookie in its environment. A pid now used by another process is never touched.
    The ids recovered by this instance are in :attr:`interrupted_run_ids`.

    Many tasks may call it at once: all statements run in order on one worker thread, and the
    writes queued at the same moment share one transaction (group commit; a failing write fails
    only its own caller). A write returns once committed: it then survives this process being
    killed, but not necessarily a power cut (WAL with ``synchronous=NORMAL``, see the module
    notes). Several processes may share the file; a writer waits up to ``busy_timeout`` seconds
    for another.

    The file must be ours: a new or empty file is initialised, one written by an earlier
    version of this library is upgraded, and any other SQLite database (or a non-database file)
    is refused with :class:`RegistrySchemaError` and left untouched. A row that cannot be read
    back is moved to the ``runs_quarantine`` table and reported (logged, and its id added to
    :attr:`quarantined_run_ids`), never failing the read of the others.

    Args:
        path: file path (``":memory:"`` gives a private, non-persistent database without WAL).
        max_runs, max_age: retention, see :class:`BaseRunRegistry`.
        busy_timeout: seconds (or a ``timedelta``) to wait for another process's write lock
            before failing; finite and >= 0. SQLite waits at most about 24.8 days
            (2**31 - 1 ms): a longer one waits that long.
        read_only: open an existing registry for reading only (``mode=ro``): no migration, no
            recovery on open, no quarantine of damaged rows (they are skipped); for tools
            that watch a file other processes write, such as ``prismq runs``.

    Raises:
        InvalidTimeoutError: ``busy_timeout`` is not a finite number >= 0 (at construction).
        RegistryOpenError: ``path`` holds a NUL byte (at construction).
        InvalidQueryError: bad ``max_runs`` / ``max_age`` (at construction).
        RegistrySchemaError: (on open) the file is not a registry of ours or has a newer schema;
            with ``read_only``, also a missing file or an older schema.
        RegistryReadOnlyError: (on a write) the registry was opened with ``read_only=True``.
        RegistryOpenError: (on open) the file cannot be opened or created: its folder does not
            exist, the path is a directory, or access is denied.
        RegistryFullError: (on any call) the disk is full; the write is not in the file.
        RegistryBusyError: (on any call, open included) another connection held the lock for
            longer than ``busy_timeout``; the call did nothing.
        RegistryDatabaseError: (on any call) another failure of SQLite's (a disk I/O error...).
            The three are ``sqlite3.OperationalError`` too, as raised before.
        sqlite3.DatabaseError: (on any call) a file damaged under the registry.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_runs: int | None = None,
        max_age: timedelta | None = None,
        busy_timeout: float | timedelta = 10.0,
        read_only: bool = False,
    ) -> None:
        super().__init__(max_runs=max_runs, max_age=max_age)
        try:
            self.path = os.fspath(path)
        except TypeError:
            raise InvalidArgumentTypeError(
                f"path must be a str or os.PathLike, got {type(path).__name__} {path!r:.60}"
            ) from None
        if ("\0" if isinstance(self.path, str) else b"\0") in self.path:
            # (A bare ValueError from the first open, in the worker thread.)
            raise RegistryOpenError(f"a registry path cannot hold a NUL byte: {self.path!r:.80}")
        # Checked now: a bad value used to fail only inside open(), in the worker thread.
        seconds: float | None = None
        if isinstance(busy_timeout, timedelta):
            seconds = busy_timeout.total_seconds()
        elif isinstance(busy_timeout, int | float) and not isinstance(busy_timeout, bool):
            seconds = float(busy_timeout)
        if seconds is None or not math.isfinite(seconds) or seconds < 0:
            raise InvalidTimeoutError(
                "busy_timeout must be a finite number of seconds >= 0 or a timedelta, "
                f"got {busy_timeout!r}"
            )
        self.busy_timeout = seconds
        self.read_only = bool(read_only)
        self.interrupted_run_ids: list[str] = []
        # The owner (this process's RunOwner) whose cookie variable is on file (see add_run).
        self._noted_owner: RunOwner | None = None
        self._executor: SQLiteWorker | None = None
        self._db: _Database | None = None
        # Opening and closing may be asked for by several event loops (threads) at once: their
        # state changes under a thread lock (an asyncio.Lock serves one loop), and the opening
        # itself is one job on the worker that every caller waits for.
        self._state = threading.Lock()
        self._opening: concurrent.futures.Future[tuple[_Database, list[str]]] | None = None
        # What the opening job opened, as soon as it did: a close queued right behind it may run
        # in the same batch, before the opening's future is resolved.
        self._opened: list[_Database] = []
        self._openers = 0

    @property
    def quarantined_run_ids(self) -> list[str]:
        """Run ids of the unreadable rows this instance moved to ``runs_quarantine``."""
        return [] if self._db is None else list(self._db.quarantined)

    @property
    def journal_mode(self) -> str | None:
        """The journal mode SQLite reported after open (``"wal"`` for a file), or ``None``."""
        return None if self._db is None else self._db.journal_mode

    def _closed_error(self) -> RegistryClosedError:
        return _registry_closed(self.path)

    def _worker(self) -> SQLiteWorker:
        executor = self._executor
        if executor is None:  # closed meanwhile, from another loop
            raise self._closed_error()
        return executor

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        try:
            return await self._worker().call(fn, *args)
        except (sqlite3.Error, UnicodeEncodeError, OverflowError) as exc:
            self._raise_explained(exc)
            raise

    async def _write(self, db: _Database, fn: Callable[..., _T], *args: Any) -> _T:
        """Like _run, for a method that writes through ``db.write``: it may share a group
        transaction, and returns after that committed."""
        self._check_writable(db)
        try:
            return await self._worker().call(fn, *args, group=db)
        except (sqlite3.Error, UnicodeEncodeError, OverflowError) as exc:
            self._raise_explained(exc)
            raise

    def _raise_explained(self, exc: sqlite3.Error | UnicodeEncodeError | OverflowError) -> None:
        """Raise what a call whose job failed with ``exc`` raises instead of SQLite's own error,
        if anything (called in the ``except`` block; the caller re-raises ``exc`` otherwise)."""
        if isinstance(exc, sqlite3.ProgrammingError) and self._closed:
            # A call that took the worker just before aclose() from another thread cleared
            # it queues its job behind the close job, and SQLite refuses the closed
            # connection: the caller learns what happened, not SQLite's wording.
            raise self._closed_error() from None
        if (
            isinstance(exc, sqlite3.OperationalError) or type(exc) is sqlite3.DatabaseError
        ) and not isinstance(exc, PrismQError):
            # (A plain DatabaseError: SQLite found the file damaged, SQLITE_CORRUPT/NOTADB.)
            raise _explained(exc, self.path, self.busy_timeout) from exc
        if isinstance(exc, OverflowError):
            raise InvalidRunError(
                f"SQLiteRunRegistry({self.path!r}) stores integers in 64 bits: {exc}"
            ) from None
        if isinstance(exc, UnicodeEncodeError):
            # sqlite3 binds text as UTF-8, which a lone surrogate (e.g. from decoding bytes
            # with errors="surrogateescape") is not.
            raise InvalidRunError(
                f"SQLiteRunRegistry({self.path!r}) stores text as UTF-8: a run whose text has "
                f"a lone surrogate cannot be stored ({exc.object[exc.start : exc.end]!r} in "
                f"{exc.object!r:.80})"
            ) from None

    def _check_writable(self, db: _Database) -> None:
        if db.read_only:
            raise RegistryReadOnlyError(
                f"SQLiteRunRegistry({self.path!r}) was opened read-only; it cannot be written"
            )

    async def _database(self) -> _Database:
        self._check_open()
        if self._db is None:
            await self.open()
        db = self._db
        if db is None:  # closed from another thread right after it opened
            raise self._closed_error()
        return db

    async def open(self) -> None:
        """Open the file, migrate the schema and recover orphaned runs. Idempotent; callers on
        several event loops share one opening.

        Cancellation: only the wait ends; an opening nobody waits for any more finishes in the
        worker thread and is then closed again (the next call opens afresh).

        Raises:
            RegistryClosedError: the registry was closed (also while it was opening).
            RegistrySchemaError: the file is not a registry or has a newer schema.
            RegistryOpenError: the file cannot be opened or created (see the class).
        """
        self._check_open()
        with self._state:
            self._check_open()
            if self._db is not None:
                return
            opening = self._opening
            if opening is None:
                # (Not a bound method: the thread must not keep the registry alive, see __del__.)
                worker = SQLiteWorker(
                    "prismq-sqlite", closed=functools.partial(_registry_closed, self.path)
                )
                opened: list[_Database] = []
                opening = worker.submit(functools.partial(self._open_now, opened))
                self._executor, self._opening, self._opened = worker, opening, opened
            self._openers += 1
        try:
            # Shielded: one caller's cancellation must not cancel the job the others wait for.
            db, recovered = await asyncio.shield(_seen(asyncio.wrap_future(opening)))
        except BaseException:
            with self._state:
                self._openers -= 1
                failed = opening.done() and opening.exception() is not None
                # A failed opening is over for every waiter; a cancelled wait gives it up only
                # when nobody else waits.
                give_up = self._opening is opening and (failed or self._openers == 0)
                executor, opened = self._executor, self._opened
                if give_up:
                    self._opening = self._executor = None
                    self._opened = []
            if give_up and executor is not None:
                await self._close_worker(executor, opened)
            raise
        taken = False
        with self._state:
            self._openers -= 1
            if self._opening is opening:  # the first waiter back takes it
                self._opening = None
                self._opened = []
                self._db = db
                self._noted_owner = None
                self.interrupted_run_ids = recovered
                taken = True
        if taken and recovered:
            logger.warning("marked %d orphaned run(s) INTERRUPTED in %s", len(recovered), self.path)
        self._check_open()  # closed while it opened: aclose() closed what was opened

    def _open_now(self, opened: list[_Database]) -> tuple[_Database, list[str]]:
        try:
            db = _Database(self.path, self.busy_timeout, self.read_only)
        except sqlite3.DatabaseError as exc:
            self._raise_explained(exc)
            raise
        opened.append(db)
        try:
            return db, ([] if db.read_only else db.recover())
        except BaseException as exc:
            db.conn.close()
            if isinstance(exc, sqlite3.DatabaseError):
                self._raise_explained(exc)
            raise

    @staticmethod
    async def _close_worker(executor: SQLiteWorker, dbs: list[_Database]) -> None:
        """Close ``dbs`` (an opening still running adds to its list before this job runs, in
        the worker's order), then stop the thread. Cancellation: the closing still happens, in
        the worker thread, which then ends by itself (the loop is not held up by a job in
        progress, e.g. an open waiting for another process's write lock). Inside a cancelled
        anyio scope the caller shields this wait (see ``aclose``), so there it does wait for the
        jobs already queued, each bounded by ``busy_timeout``."""

        def close() -> None:
            for db in dbs:
                db.conn.close()  # (again, for one the opening closed itself: harmless)

        try:
            await asyncio.shield(_seen(asyncio.wrap_future(executor.submit(close))))
        except BaseException:
            executor.shutdown(wait=False)
            raise
        executor.shutdown()  # the close job has run, so this join is short

    async def aclose(self) -> None:
        """Close the connection and stop the worker thread (alias: :meth:`close`). Idempotent;
        safe from any event loop, also while another loop opens or writes (those calls then
        raise :class:`RegistryClosedError`).

        Cancellation: the connection is still closed and the thread stopped, by the worker
        thread once its job in progress is done. Called inside an anyio scope that is already
        cancelled (a ``finally`` block after ``move_on_after``), it waits for that, shielded
        from the scope: a write in progress is bounded by ``busy_timeout``.
        """
        with self._state:
            if self._closed:
                return
            self._closed = True
            dbs = [self._db] if self._db is not None else self._opened
            executor = self._executor
            self._db = self._executor = self._opening = None
            self._opened = []
        if executor is not None:
            with shielded_if_cancelled():
                await self._close_worker(executor, dbs)

    def __del__(self) -> None:
        # As an unclosed file or transport: say so, and let the thread and the connection go
        # (a registry dropped without aclose() kept both, and the database's three descriptors,
        # for the life of the process). The writes already queued still run first.
        executor = getattr(self, "_executor", None)
        if executor is None or getattr(self, "_closed", True):
            return
        self._closed = True
        dbs = [self._db] if self._db is not None else self._opened
        self._db = self._executor = self._opening = None
        warnings.warn(
            f"unclosed SQLiteRunRegistry({self.path!r}): close it with aclose() or 'async with'",
            ResourceWarning,
            stacklevel=1,
            source=self,
        )

        def close() -> None:
            for db in dbs:  # (an opening still running adds to the list before this runs)
                db.conn.close()

        with contextlib.suppress(RegistryClosedError):  # shut down meanwhile by another path
            executor.submit(close)
        executor.shutdown(wait=False)

    async def add_run(self, run: Run) -> None:
        if run.__class__ is not Run and not isinstance(run, Run):
            raise not_a_run("add_run", run)
        db = self._db
        if db is None or self._closed:  # the open registry's writes skip a coroutine
            db = await self._database()
        if db.read_only:  # before the caller's run is touched
            self._check_writable(db)
        stamped = run.owner is None
        owner = run.owner = RunOwner.current() if run.owner is None else run.owner
        try:
            variable = None if owner is self._noted_owner else self._owner_note(owner)
            executor = self._executor
            if executor is None:  # closed meanwhile, from another loop
                raise self._closed_error()
            # enqueue, not call: one coroutine fewer per write (the loop's share of a write is
            # mostly such bookkeeping, see docs/PERFORMANCE.md, registry).
            try:
                await executor.enqueue(
                    db.add,
                    (_row_values(run, adding=True), self.max_runs, self.max_age, variable),
                    db,
                )
            except (sqlite3.Error, UnicodeEncodeError, OverflowError) as exc:
                self._raise_explained(exc)
                raise
        except Exception:
            if stamped:  # refused: the caller's run is left as it was, as in memory
                run.owner = None
            raise
        if variable is not None:
            self._noted_owner = owner

    async def update_run(self, run: Run) -> None:
        if run.__class__ is not Run and not isinstance(run, Run):
            raise not_a_run("update_run", run)
        db = self._db
        if db is None or self._closed:
            db = await self._database()
        if db.read_only:
            self._check_writable(db)
        error = unstorable(run)
        if error is not None:
            raise error
        executor = self._executor
        if executor is None:
            raise self._closed_error()
        try:
            await executor.enqueue(db.update, (_row_values(run), run._status), db)
        except (sqlite3.Error, UnicodeEncodeError, OverflowError) as exc:
            self._raise_explained(exc)
            raise

    async def claim_run(self, run: Run, owner: RunOwner | None) -> bool:
        """:meth:`BaseRunRegistry.claim_run` in one conditional ``UPDATE``: of several
        processes claiming one PENDING run with the owner they all read, one gets it."""
        _check_claim(run, owner)
        db = await self._database()
        if db.read_only:
            self._check_writable(db)
        if run.owner is None:
            run.owner = RunOwner.current()  # as add_run stamps it
        new_owner = run.owner
        variable = None if new_owner is self._noted_owner else self._owner_note(new_owner)
        executor = self._executor
        if executor is None:
            raise self._closed_error()
        try:
            claimed = await executor.enqueue(db.claim, (_row_values(run), owner, variable), db)
        except (sqlite3.Error, UnicodeEncodeError, OverflowError) as exc:
            self._raise_explained(exc)
            raise
        if variable is not None:
            self._noted_owner = new_owner
        return claimed

    def _owner_note(self, owner: RunOwner) -> str | None:
        """The cookie variable to note with a run of ``owner`` (its children carry it) before
        the run can start a child; None when there is nothing to note (another process's
        owner, no cookies here)."""
        variable = _own_cookie_variable(owner)
        if variable is None and owner == RunOwner.current():
            self._noted_owner = owner  # nothing to note for this process, ever
        return variable

    async def get_run(self, run_id: str) -> Run | None:
        run_id = run_id_of(run_id)
        db = await self._database()
        if not run_id.isascii() and not _utf8(run_id):
            return None  # (no run can have such an id here: see _raise_explained)
        return await self._run(db.get, run_id)

    async def list_runs(
        self,
        status: RunStatus | None = None,
        module_id: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Run]:
        _check_paging(limit, offset)
        status = check_filters(status, module_id)
        if module_id is not None and not module_id.isascii() and not _utf8(module_id):
            return []  # (no run can have it here: SQLite's text is UTF-8)
        # SQLite's integers stop at 2**63 - 1: more is "no limit" / "past the end", as in a list.
        limit, offset = min(limit, _SQL_INT_MAX), min(offset, _SQL_INT_MAX)
        db = await self._database()
        return await self._run(db.list_runs, status, module_id, limit, offset)

    async def count_runs(
        self, status: RunStatus | None = None, module_id: str | None = None
    ) -> int:
        status = check_filters(status, module_id)
        if module_id is not None and not module_id.isascii() and not _utf8(module_id):
            return 0
        db = await self._database()
        return await self._run(db.count, status, module_id)

    async def delete_older_than(self, age: timedelta | datetime) -> int:
        cutoff = cutoff_from(age)
        db = await self._database()
        if cutoff is None:
            return 0  # (opened all the same: a closed registry still refuses)
        return await self._write(db, db.delete_before, cutoff)

    async def apply_retention(self) -> int:
        db = await self._database()
        return await self._write(db, db.retain, self.max_runs, self.max_age)

    async def request_cancel(self, run_id: str, reason: str = "cancelled by request") -> bool:
        """Record a cancel request for ``run_id`` in the file (see
        :meth:`BaseRunRegistry.request_cancel`): every process sharing it sees the request, and
        the owner acts on it. It stays in the file with the run.
        """
        run_id, reason = run_id_of(run_id), reason_text(reason)
        db = await self._database()
        if not run_id.isascii() and not _utf8(run_id):
            return False  # no such run (as get_run)
        return await self._write(db, db.request_cancel, run_id, reason)

    async def cancel_requests(self, run_ids: Collection[str]) -> dict[str, str]:
        """One indexed query: the requests for unfinished runs among ``run_ids`` (see
        :meth:`BaseRunRegistry.cancel_requests`)."""
        ids = run_ids_of(run_ids)
        db = await self._database()
        if not ids:
            return {}
        return await self._run(db.cancel_requests, frozenset(ids))

    async def recover_orphans(self) -> list[str]:
        """As on open: in one write transaction, unfinished runs whose owner is gone become
        INTERRUPTED (see :meth:`BaseRunRegistry.recover_orphans`)."""
        db = await self._database()
        self._check_writable(db)
        # Not grouped: recover() stops orphan trees first (up to a grace period each), which
        # must not happen inside a group's transaction, holding the file's write lock.
        recovered = await self._run(db.recover)
        if recovered:
            logger.warning("marked %d orphaned run(s) INTERRUPTED in %s", len(recovered), self.path)
        return recovered

    async def record_child(self, run_id: str, identity: ProcessIdentity) -> bool:
        """Keep the identity of ``run_id``'s child with the run (see
        :meth:`BaseRunRegistry.record_child`); recovery uses it to stop a tree a dead owner
        left running. Returns False when the run is not active or has another pid."""
        run_id = run_id_of(run_id)
        check_identity(identity)
        db = await self._database()
        return await self._run(db.record_child, run_id, identity)

    def _check_open(self) -> None:
        if self._closed:
            raise self._closed_error()
