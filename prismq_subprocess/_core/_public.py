"""Give re-exported names the public module they are documented in as their ``__module__``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping

__all__ = ["publish"]


def publish(module: str, namespace: Mapping[str, object], names: Iterable[str]) -> None:
    """Set ``__module__`` of each of ``names`` to ``module`` so tracebacks, ``repr`` and
    documentation tools show ``prismq_subprocess.X`` rather than the private module (as anyio
    does). A name already claimed by a public module keeps its first claim: the top level is
    published first, so a name available there is shown there. Data (``PIPE``, a union) has no
    ``__module__`` to set and is left alone."""
    for name in names:
        obj = namespace[name]
        if getattr(obj, "__module__", "").startswith("prismq_subprocess._"):
            with contextlib.suppress(AttributeError, TypeError):
                obj.__module__ = module
