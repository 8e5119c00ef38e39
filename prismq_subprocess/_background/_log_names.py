"""Log file names for run ids: :func:`run_log_path` and its inverse :func:`run_id_from_log_path`.

The name is the run id percent-encoded: lower-case ASCII letters, digits, ``-`` and ``_`` stay,
every other character becomes ``%XX`` per UTF-8 byte (upper-case hex), then ``.log``. So:

- distinct run ids always get distinct names (``job.1``, ``job_1``, ``job/1``, ``job 1`` and
  ``Job_1`` are ``job%2E1``, ``job_1``, ``job%2F1``, ``job%201``, ``%4Aob_1``), also on
  case-insensitive file systems, because upper-case letters are encoded too;
- a name never contains a path separator, ``.``, or ``..`` and is never a Windows device name
  (``con``, ``nul``, ``com1`` ...: their first letter is encoded), so it cannot leave the log
  directory or name a device;
- the run id can be read back from the name (:func:`run_id_from_log_path`).

Uuid-hex run ids (the default) are their own names, unchanged from earlier versions.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .._core._exceptions import InvalidArgumentTypeError, InvalidRunIdError

__all__ = ["log_file_name", "run_id_from_log_path", "run_log_path"]

_SUFFIX = ".log"
# Most file systems allow 255 bytes per name component.
_MAX_NAME_BYTES = 255
_KEEP = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-_")
_WINDOWS_DEVICES = frozenset(
    ["con", "prn", "aux", "nul"] + [f"{prefix}{n}" for prefix in ("com", "lpt") for n in range(10)]
)
_CANONICAL = re.compile(r"(?:[a-z0-9_-]|%[0-9A-F]{2})+")


def _encode(run_id: str) -> str:
    parts = [
        chr(byte) if byte in _KEEP else f"%{byte:02X}"
        for byte in run_id.encode("utf-8", "surrogatepass")
    ]
    if "".join(parts) in _WINDOWS_DEVICES:
        # "nul.log" is still the device on Windows: encode the first letter.
        parts[0] = f"%{ord(parts[0]):02X}"
    return "".join(parts)


def log_file_name(run_id: str) -> str:
    """Return the log file name (``<encoded run id>.log``) of ``run_id``.

    Raises:
        InvalidRunIdError: ``run_id`` is not a non-empty str, or its name would be longer than
            255 bytes.
    """
    if not isinstance(run_id, str) or not run_id:
        raise InvalidRunIdError(f"a run id must be a non-empty str, got {run_id!r}")
    name = _encode(run_id) + _SUFFIX
    if len(name) > _MAX_NAME_BYTES:
        raise InvalidRunIdError(
            f"run id {run_id[:40]!r}... is too long to name a log file "
            f"({len(name)} bytes encoded, at most {_MAX_NAME_BYTES})"
        )
    return name


def run_log_path(log_dir: str | os.PathLike[str], run_id: str) -> Path:
    """Return the path of ``run_id``'s output log in ``log_dir`` (as ``OutputCapture(log_dir=...)``
    writes it): ``log_dir / <encoded run id>.log``, always directly inside ``log_dir``.

    Raises:
        InvalidRunIdError: see :func:`log_file_name`.
    """
    return Path(log_dir) / log_file_name(run_id)


def run_id_from_log_path(path: str | os.PathLike[str]) -> str:
    """Return the run id whose log file is ``path`` (the inverse of :func:`run_log_path`).

    Raises:
        InvalidRunIdError: the file name is not one :func:`run_log_path` makes.
        InvalidArgumentTypeError: ``path`` is not a str or ``os.PathLike``.
    """
    if not isinstance(path, str | os.PathLike):
        raise InvalidArgumentTypeError(
            f"path must be a str or os.PathLike, not {type(path).__name__}"
        )
    name = Path(path).name
    stem = name[: -len(_SUFFIX)] if name.endswith(_SUFFIX) else ""
    if not _CANONICAL.fullmatch(stem):
        raise InvalidRunIdError(f"{name!r} is not an output log file name")
    raw = bytearray()
    i = 0
    while i < len(stem):
        if stem[i] == "%":
            raw.append(int(stem[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.append(ord(stem[i]))
            i += 1
    try:
        run_id = raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        raise InvalidRunIdError(f"{name!r} is not an output log file name") from None
    if _encode(run_id) != stem:
        # Only one spelling per run id is valid, so names and ids match one to one.
        raise InvalidRunIdError(f"{name!r} is not an output log file name")
    return run_id
