"""Module parameters -> command-line arguments: :func:`parameters_to_args`.

The rule (also in ``ModuleRunner``'s docstring and the docs), applied to each ``name: value``
in order:

========================  ============================================
value                     arguments
========================  ============================================
``True``                  ``--name``
``False`` / ``None``      nothing (the option is left out)
str, int, float           ``--name value`` (``str(value)``)
list / tuple              ``--name item`` once per item (empty: nothing)
dict                      ``--name <the dict as JSON>``
========================  ============================================

List items are mapped like single values, except that ``True``/``False`` become ``true``/
``false`` and ``None`` is refused, dicts and lists become JSON. A value text starting with ``-``
is passed as ``--name=value`` so argparse does not take it for an option. Names are used as
given (``dry_run`` stays ``--dry_run``) and must look like option names: letters, digits,
``_``, ``-``, ``.``, not starting with ``-``.

Parameters must also be JSON-serialisable (finite numbers, str keys), because runs store them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .._core._exceptions import (
    InvalidArgumentTypeError,
    InvalidCommandError,
    InvalidParametersError,
)
from .._core._validation import encodable
from ._run_checks import MAX_PARAMETER_DEPTH, check_nesting

__all__ = ["check_args", "check_parameters", "parameters_to_args"]

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def check_parameters(parameters: Mapping[str, Any] | None) -> dict[str, Any]:
    """Return a JSON-safe deep copy of ``parameters`` (``None``: ``{}``).

    Raises:
        InvalidParametersError: not a mapping, a key that is not an option name, or a value
            that cannot be stored as JSON (objects, NaN/infinity). Tuples come back as lists.
    """
    if parameters is None:
        return {}
    if not isinstance(parameters, Mapping):
        raise InvalidParametersError(
            f"parameters must be a mapping of option names to values, not "
            f"{type(parameters).__name__}"
        )
    for name in parameters:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidParametersError(
                f"parameter name {name!r} is not an option name (letters, digits, '_', '-', '.'; "
                "not starting with '-')"
            )
    try:
        text = json.dumps(dict(parameters), allow_nan=False)
    except RecursionError:
        text = None  # nested too deeply: said by the walk below, without this in its context
    except (TypeError, ValueError) as exc:  # (a value holding itself: "Circular reference")
        raise InvalidParametersError(f"parameters must be JSON-serialisable: {exc}") from None
    if text is None or text.count("[") + text.count("{") > MAX_PARAMETER_DEPTH:
        # Perhaps nested past the limit (brackets in strings count too: a look, C-fast,
        # before the walk most parameters never need).
        check_nesting("parameters", parameters)
        if text is None:  # (not nested past the limit by the walk's count: a values() liar)
            raise InvalidParametersError("parameters are nested too deeply to be encoded")
    copied: dict[str, Any] = json.loads(text)
    return copied


def _text(value: object, name: str, *, in_list: bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        if "\0" in value:
            # No program can receive it (the spawn would fail after the run was stored).
            raise InvalidParametersError(
                f"parameter {name!r}: {value!r} contains a NUL byte, which cannot be passed "
                "as a command-line argument"
            )
        if not encodable(value):
            # Nor this (a JSON body may carry "\ud800"): refused before the run is stored.
            raise InvalidParametersError(
                f"parameter {name!r}: {value!r} has a lone surrogate, which no encoding of the "
                "OS holds, so it cannot be passed as a command-line argument"
            )
        return value
    if isinstance(value, int | float):
        return str(value)
    if in_list and isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    if value is None:
        raise InvalidParametersError(f"parameter {name!r}: None is not allowed inside a list")
    raise InvalidParametersError(f"parameter {name!r}: cannot pass {type(value).__name__}")


def _option(name: str, text: str) -> list[str]:
    # argparse reads "--name -x" as two options; "--name=-x" is unambiguous.
    return [f"--{name}={text}"] if text.startswith("-") else [f"--{name}", text]


def parameters_to_args(parameters: Mapping[str, Any] | None) -> list[str]:
    """Map module ``parameters`` to command-line arguments by the rule in this module's doc.

    ``{"count": 3, "verbose": True, "tags": ["a", "b"], "skip": False, "x": None}`` gives
    ``["--count", "3", "--verbose", "--tags", "a", "--tags", "b"]``.

    Raises:
        InvalidParametersError: see :func:`check_parameters`; also a str value (or list item)
            holding a NUL byte or a lone surrogate, which no program can receive.
    """
    args: list[str] = []
    for name, value in check_parameters(parameters).items():
        if value is True:
            args.append(f"--{name}")
        elif value is False or value is None:
            continue
        elif isinstance(value, list):
            for item in value:
                args += _option(name, _text(item, name, in_list=True))
        elif isinstance(value, dict):
            args += _option(name, json.dumps(value, separators=(",", ":")))
        else:
            args += _option(name, _text(value, name, in_list=False))
    return args


def check_args(args: Sequence[str | os.PathLike[str]] | None) -> tuple[str, ...]:
    """Return raw command-line arguments (the PrismQ guide's ``args`` list) as a tuple of str.

    They are passed as given, after the arguments made from the parameters.

    Raises:
        InvalidArgumentTypeError: ``args`` is a single str (a list is needed, one item per
            argument) or not a list/tuple, or an item is not a str or ``os.PathLike``.
        InvalidCommandError: an item holds a NUL byte or a lone surrogate (no program can
            receive it).
    """
    if args is None:
        return ()
    if not isinstance(args, list | tuple):
        raise InvalidArgumentTypeError(
            f"args must be a list of str, one item per argument, got {type(args).__name__} {args!r}"
        )
    checked: list[str] = []
    for index, item in enumerate(args):
        text = os.fspath(item) if isinstance(item, os.PathLike) else item
        if not isinstance(text, str):
            raise InvalidArgumentTypeError(
                f"args[{index}] must be a str or os.PathLike, got {type(item).__name__} {item!r}"
            )
        if "\0" in text:
            raise InvalidCommandError(f"args[{index}] {text!r} contains a NUL byte")
        if not encodable(text):
            raise InvalidCommandError(
                f"args[{index}] {text!r} has a lone surrogate, which no encoding of the OS holds "
                "(decode bytes with errors='surrogateescape' to pass them through)"
            )
        checked.append(text)
    return tuple(checked)
