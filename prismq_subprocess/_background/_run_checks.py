"""What every registry refuses to store: a run whose fields a registry file could not hold.

``SQLiteRunRegistry`` refuses them as it builds its row (a field of the wrong type would be
stored, then quarantined by the first read). The in-memory registry stores Python objects and
took them all, so an application tested against it met the errors only in production, against a
file: it makes the same checks here, with the same errors.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from .._core._exceptions import InvalidParametersError, InvalidRunError
from . import _run_record
from ._run_record import Run, RunOwner

__all__ = [
    "FIELD_TYPES",
    "MAX_PARAMETER_DEPTH",
    "check_nesting",
    "check_run_fields",
    "check_storable",
    "check_text_keys",
]

# The exact classes of a field's usual values (a subclass, e.g. an IntEnum exit code, takes the
# slower isinstance test below).
_OPTIONAL_INT = frozenset({int, type(None)})
_OPTIONAL_TEXT = frozenset({str, type(None)})
_OPTIONAL_REAL = frozenset({float, int, type(None)})
#: The types a registry file holds for each plain field of a run (bool never, though an int):
#: the one table both registries check against (SQLite derives its column checks from it).
FIELD_TYPES: tuple[tuple[str, tuple[type, ...]], ...] = (
    ("module_id", (str,)),
    ("module_name", (str,)),
    ("exit_code", (int, type(None))),
    ("error_message", (str, type(None))),
    ("pid", (int, type(None))),
    ("mode", (str,)),
    ("peak_rss_bytes", (int, type(None))),
    ("cpu_time_seconds", (float, int, type(None))),
    ("worker", (str, type(None))),
)
_INT_FIELDS = ("exit_code", "pid", "peak_rss_bytes")
# SQLite's integers are 64-bit.
_LOWEST, _HIGHEST = -(2**63), 2**63 - 1
# Strict JSON, as SQLite stores a new run's parameters (NaN and the infinities are no JSON).
_ENCODER = json.JSONEncoder(allow_nan=False)
_LENIENT_ENCODER = json.JSONEncoder()


def check_storable(run: Run, *, adding: bool) -> None:
    """Raise what ``SQLiteRunRegistry`` raises for ``run`` before storing anything.

    ``adding``: a new run, whose parameters must be strict JSON (an update keeps what an older
    release may have stored).

    Raises:
        InvalidRunError: a field of a type a registry file cannot hold as given (a str
            ``exit_code``, an int ``module_id``...), an integer beyond 64 bits, an output tail
            that is not a list of str.
        InvalidParametersError: parameters that are not a dict, or not JSON.
    """
    if (
        run.module_id.__class__ is str
        and run.module_name.__class__ is str
        and run.mode.__class__ is str
        and run.exit_code.__class__ in _OPTIONAL_INT
        and run.pid.__class__ in _OPTIONAL_INT
        and run.error_message.__class__ in _OPTIONAL_TEXT
        and run.peak_rss_bytes.__class__ in _OPTIONAL_INT
        and run.cpu_time_seconds.__class__ in _OPTIONAL_REAL
        and run.worker.__class__ in _OPTIONAL_TEXT
    ):
        pass
    else:
        _refuse_field(run)
    check_run_fields(run)
    # Written out, not looped over: this runs on every write of the task manager's per-run
    # path. isascii() is a flag test; only text that is not ASCII can hold a lone surrogate.
    if not (
        run.run_id.isascii()
        and run.module_id.isascii()
        and run.module_name.isascii()
        and run.mode.isascii()
        and (run.error_message is None or run.error_message.isascii())
        and (run.worker is None or run.worker.isascii())
    ):
        for text in (run.run_id, run.module_id, run.module_name, run.mode):
            _check_utf8(run, text)
        for optional in (run.error_message, run.worker):
            if optional is not None:
                _check_utf8(run, optional)
    if not (
        (run.exit_code is None or _LOWEST <= run.exit_code <= _HIGHEST)
        and (run.pid is None or _LOWEST <= run.pid <= _HIGHEST)
        and (run.peak_rss_bytes is None or _LOWEST <= run.peak_rss_bytes <= _HIGHEST)
    ):
        _refuse_wide_int(run)
    parameters, tail = run.parameters, run.output_tail
    if parameters.__class__ is not dict:
        if not isinstance(parameters, dict):
            raise InvalidParametersError(
                f"run {run.run_id!r}: parameters must be a dict, got {type(parameters).__name__}"
            )
        _json("parameters", parameters, strict=adding)
    elif parameters:
        _json("parameters", parameters, strict=adding)
    if tail.__class__ is not list and not isinstance(tail, list):
        raise InvalidRunError(
            f"run {run.run_id!r}: output_tail must be a list of lines, got {type(tail).__name__}"
        )
    if tail and not all(line.__class__ is str or isinstance(line, str) for line in tail):
        bad = next(line for line in tail if not isinstance(line, str))
        raise InvalidRunError(
            f"run {run.run_id!r}: output_tail must be a list of str lines, got a "
            f"{type(bad).__name__} in it"
        )


def check_run_fields(run: Run) -> None:
    """Raise what neither registry can store of ``run``'s id, owner, times and CPU time (both
    check it first): the constructor checks these, but a run's fields may be assigned later.

    Raises:
        InvalidRunError: ``run_id`` not a non-empty str; an owner that is not a
            :class:`RunOwner` of a str host (UTF-8), an int pid and a number start time; a
            time that is not a timezone-aware datetime (a naive one, stored in memory, broke
            every later ``list_runs()``); a NaN CPU time or owner start time (SQLite stores
            NaN as NULL: the owner was lost, and its live run marked INTERRUPTED).
    """
    run_id = run.run_id
    if not run_id or not isinstance(run_id, str):
        raise InvalidRunError(f"run_id must be a non-empty str, got {run_id!r:.80}")
    owner = run.owner
    if owner is not None and owner is not _run_record._current_owner:
        _check_owner(run, owner)
    created, started, finished = run.created_at, run.started_at, run.finished_at
    if not (
        (created.__class__ is datetime and created.tzinfo is UTC)
        and (started is None or (started.__class__ is datetime and started.tzinfo is UTC))
        and (finished is None or (finished.__class__ is datetime and finished.tzinfo is UTC))
    ):
        _check_times(run)
    cpu = run.cpu_time_seconds
    if cpu.__class__ is float and cpu != cpu:
        raise InvalidRunError(f"run {run_id!r}: cpu_time_seconds is NaN, which cannot be stored")


def _check_owner(run: Run, owner: object) -> None:
    if not isinstance(owner, RunOwner) or not (
        owner.host.__class__ is str
        and owner.pid.__class__ is int
        and owner.started_at.__class__ in _OPTIONAL_REAL
        and owner.started_at is not None
        and owner.started_at == owner.started_at  # (not NaN)
    ):
        raise InvalidRunError(
            f"run {run.run_id!r}: its owner must be a RunOwner with a str host (owner_host), "
            f"an int pid (owner_pid) and a number started_at (owner_started_at) to be stored, "
            f"got {owner!r}"
        )
    if not owner.host.isascii():
        _check_utf8(run, owner.host)


def _check_times(run: Run) -> None:
    for name in ("created_at", "started_at", "finished_at"):
        value = getattr(run, name)
        if value is None and name != "created_at":
            continue
        if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
            raise InvalidRunError(
                f"run {run.run_id!r}: {name} must be a timezone-aware datetime to be stored, "
                f"got {value!r:.80}"
            )


def _check_utf8(run: Run, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        # A registry file keeps text as UTF-8, which a lone surrogate (from bytes decoded with
        # errors="surrogateescape") is not.
        raise InvalidRunError(
            f"run {run.run_id!r:.80}: text with a lone surrogate cannot be stored "
            f"({exc.object[exc.start : exc.end]!r} in {exc.object!r:.80})"
        ) from None


def _refuse_wide_int(run: Run) -> None:
    for name in _INT_FIELDS:
        value = getattr(run, name)
        if value is not None and not _LOWEST <= value <= _HIGHEST:
            raise InvalidRunError(
                f"run {run.run_id!r}: {name} {value} does not fit in 64 bits, as a registry "
                "file stores integers"
            )


def _refuse_field(run: Run) -> None:
    for name, types in FIELD_TYPES:
        value = getattr(run, name)
        if not isinstance(value, types) or value.__class__ is bool:
            wanted = " or ".join("None" if t is type(None) else t.__name__ for t in types)
            raise InvalidRunError(
                f"run {run.run_id!r}: {name} must be {wanted} to be stored, got {value!r}"
            )


def _json(field: str, value: Any, *, strict: bool) -> None:
    check_text_keys(field, value)
    try:
        (_ENCODER if strict else _LENIENT_ENCODER).encode(value)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidParametersError(
            f"{field} must be JSON-serialisable to be stored: {exc}"
        ) from None


#: How deep containers (dicts, lists, tuples) may nest inside a run's parameters: JSON takes
#: about 980 levels, but copying a run (what every registry read hands out) recursed about 3
#: frames a level, so SQLite stored runs at 500-980 levels that then failed every to_dict()
#: and copy() with a bare RecursionError, and the memory registry refused them. 100 leaves
#: room for the caller's own stack; real parameters (forms, JSON bodies) nest a few levels.
#: (SQLite's recovery rewrites what an older release stored, deeper or not: see deep_ok.)
MAX_PARAMETER_DEPTH = 100


def check_text_keys(field: str, value: Any, *, deep_ok: bool = False) -> None:
    """Refuse a dict key that is not a ``str`` anywhere in ``value`` and, unless ``deep_ok``,
    containers nested more than :data:`MAX_PARAMETER_DEPTH` deep: JSON keys are text, so
    SQLite gave ``1`` back as ``"1"``, and stored ``{1: "a", "1": "b"}`` as one key, losing a
    value, where the memory registry kept the dict as given.

    Raises:
        InvalidParametersError: such a key, named with its path; nesting past the limit (a
            value that contains itself included).
    """
    try:
        # One walk for both, its depth bounded (the encoder, which runs after, recurses as
        # deep as the value goes).
        bad = _non_text_key(value, field, -1 if deep_ok else MAX_PARAMETER_DEPTH)
    except RecursionError:  # (a rewrite of what an older release stored, nested that deep)
        raise InvalidParametersError(f"{field} is nested too deeply to be stored") from None
    if bad is not None:
        path, key = bad
        raise InvalidParametersError(
            f"{field} must have str keys to be stored (JSON keys are text; 1 and '1' would be "
            f"one key): {key!r} ({type(key).__name__}) at {path}"
        )


def check_nesting(field: str, value: Any) -> None:
    """Refuse containers nested more than :data:`MAX_PARAMETER_DEPTH` deep in ``value``.

    Raises:
        InvalidParametersError: nesting past the limit (a value that contains itself included).
    """
    # Level by level, without recursion or paths (this runs on every start_module); each
    # container once a level, so one that holds itself twice does not double every level.
    level = {id(value): value}
    for _ in range(MAX_PARAMETER_DEPTH + 1):
        inner: dict[int, Any] = {}
        for container in level.values():
            is_map = container.__class__ is dict or isinstance(container, Mapping)
            for item in container.values() if is_map else container:
                if item.__class__ in _CONTAINERS or isinstance(item, _CONTAINERS):
                    inner[id(item)] = item
        if not inner:
            return
        level = inner
    _refuse_nesting(field, field)


def _refuse_nesting(field: str, path: str) -> None:
    raise InvalidParametersError(
        f"{field} nested more than {MAX_PARAMETER_DEPTH} levels deep (dicts and lists inside "
        f"them), or containing itself, cannot be stored: at {path[:200]}"
    )


def _non_text_key(value: Any, path: str, levels: int) -> tuple[str, object] | None:
    """The first non-``str`` key in ``value``, with its path; containers nesting more than
    ``levels`` deep below ``value`` are refused (``levels < 0``: not checked)."""
    if value.__class__ is dict or isinstance(value, dict):
        for key, item in value.items():
            if key.__class__ is not str and not isinstance(key, str):
                return path, key
            if item.__class__ in _CONTAINERS or isinstance(item, _CONTAINERS):
                if levels == 0:
                    _refuse_nesting(path.partition("[")[0], f"{path}[{key!r}]")
                found = _non_text_key(item, f"{path}[{key!r}]", levels - 1)
                if found is not None:
                    return found
    elif value.__class__ in _CONTAINERS or isinstance(value, _CONTAINERS):
        for index, item in enumerate(value):
            if item.__class__ in _CONTAINERS or isinstance(item, _CONTAINERS):
                if levels == 0:
                    _refuse_nesting(path.partition("[")[0], f"{path}[{index}]")
                found = _non_text_key(item, f"{path}[{index}]", levels - 1)
                if found is not None:
                    return found
    return None


_CONTAINERS = (dict, list, tuple)
