"""`RunMode`: the four ways prismq_subprocess can run a command."""

from __future__ import annotations

import enum

from ._exceptions import InvalidRunModeError

__all__ = ["RunMode"]


class RunMode(enum.StrEnum):
    """How a :class:`SubprocessWrapper` runs commands.

    * ``ASYNC`` (``"async"``): the event loop's own subprocess support
      (``asyncio.create_subprocess_exec``). Fastest; needs a loop that can spawn (every loop on
      Linux/macOS, the Proactor loop on Windows).
    * ``THREADED`` (``"threaded"``): ``subprocess.Popen`` driven from threads, its pipes bridged
      into real asyncio streams. Works on any loop, including Windows' ``SelectorEventLoop``.
    * ``LOCAL`` (``"local"``): ``subprocess.run`` semantics in a worker thread: the loop stays free,
      output becomes available when the command has finished.
    * ``DRY_RUN`` (``"dry-run"``): never starts a process; records the command and answers with a
      scripted result (returncode 0 and no output unless told otherwise).

    Parsing text is forgiving about case, ``_`` versus ``-`` and surrounding spaces:
    ``RunMode("DRY_RUN")`` and ``RunMode.parse(" Threaded ")`` both work. Anything else raises
    :class:`InvalidRunModeError` (a ``ValueError``) listing the valid values.
    """

    ASYNC = "async"
    THREADED = "threaded"
    LOCAL = "local"
    DRY_RUN = "dry-run"

    @classmethod
    def parse(cls, value: RunMode | str) -> RunMode:
        """Return the mode named by ``value`` (a :class:`RunMode` or forgiving text).

        Raises:
            InvalidRunModeError: ``value`` names no mode (the message lists the valid values).
        """
        if isinstance(value, cls):
            return value
        return cls(value)

    @classmethod
    def _missing_(cls, value: object) -> RunMode:
        if isinstance(value, str):
            normal = value.strip().lower().replace("_", "-")
            for member in cls:
                if member.value == normal:
                    return member
        raise InvalidRunModeError(f"{value!r} is not a run mode; valid values: {valid_values()}")


def valid_values() -> str:
    """The valid spellings, for error messages."""
    return ", ".join(repr(member.value) for member in RunMode)
