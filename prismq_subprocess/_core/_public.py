"""Give re-exported names the public module they are documented in as their ``__module__``."""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["publish"]


def publish(module: str, namespace: Mapping[str, object], names: Iterable[str]) -> None:
    """Set ``__module__`` of each of ``names`` to ``module`` so tracebacks, ``repr`` and
    documentation tools show ``prismq_subprocess.X`` rather than the private module (as anyio
    does). A name already claimed by a public module keeps its first claim: the top level is
    published first, so a name available there is shown there. Data (``PIPE``, a union) has no
    ``__module__`` to set and is left alone.

    The annotations of what is published are resolved first (see :func:`_resolve`): every
    module of ours postpones them (``from __future__ import annotations``), and
    ``typing.get_type_hints`` and pydantic resolve a class's strings in the namespace its
    ``__module__`` names, the package's once published, which lacks the names the private
    module imported (a FastAPI endpoint annotated ``-> Run`` failed as it was defined).
    """
    try:
        for name in names:
            obj = namespace[name]
            if getattr(obj, "__module__", "").startswith("prismq_subprocess._"):
                _resolve(obj, namespace)
                with contextlib.suppress(AttributeError, TypeError):
                    obj.__module__ = module
    finally:
        _namespaces.clear()
        _compiled.clear()


def _resolve(obj: object, public: Mapping[str, object]) -> None:
    """Replace the string annotations of ``obj`` (a class: its own, its dataclass fields' and
    its methods'; a function: its own) with what they name, looked up in the module that
    defines it, then among the public names (for a name it imports only for type checkers).
    One that does not resolve stays a string."""
    if inspect.isclass(obj):
        defining = sys.modules.get(obj.__module__)
        if defining is None:
            return
        # The class's own dict, in place (inspect.get_annotations gives a copy).
        own = obj.__dict__.get("__annotations__")  # noqa: RUF063
        if isinstance(own, dict):
            _resolve_mapping(own, vars(defining), public)
            fields = obj.__dict__.get("__dataclass_fields__")
            for field in fields.values() if isinstance(fields, dict) else ():
                if field.name in own:
                    # What pydantic reads for a dataclass is the field's own ``type``.
                    field.type = own[field.name]
        for member in list(obj.__dict__.values()):
            function = member.__func__ if isinstance(member, classmethod | staticmethod) else member
            if inspect.isfunction(function):
                _resolve_function(function, public)
            elif isinstance(member, property):
                for accessor in (member.fget, member.fset):
                    if inspect.isfunction(accessor):
                        _resolve_function(accessor, public)
    elif inspect.isfunction(obj):
        _resolve_function(obj, public)


def _resolve_function(function: Any, public: Mapping[str, object]) -> None:
    # (A slot of functions, not in their __dict__.)
    annotations = getattr(function, "__annotations__", None)
    if isinstance(annotations, dict):
        _resolve_mapping(annotations, function.__globals__, public)


def _resolve_mapping(
    annotations: dict[str, Any], module_globals: dict[str, Any], public: Mapping[str, object]
) -> None:
    names = _namespaces.get(id(module_globals))
    if names is None or names[0] is not module_globals:
        # The module's own names first; builtins come from its globals' __builtins__.
        names = _namespaces[id(module_globals)] = (module_globals, {**public, **module_globals})
    for key, value in list(annotations.items()):
        if isinstance(value, str):
            code = _compiled.get(value)
            if code is None:
                code = _compiled[value] = compile(value, "<annotation>", "eval")
            try:
                annotations[key] = eval(code, module_globals, names[1])  # our own source
            except Exception:
                continue  # a name only a type checker sees: left as written


# Per publish() call: one merged namespace per module, and each annotation's text compiled once
# (most are "str", "int", "None"...): the resolving is part of the API's first use.
_namespaces: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}
_compiled: dict[str, Any] = {}
