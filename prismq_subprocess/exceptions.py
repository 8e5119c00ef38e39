"""Every exception prismq_subprocess raises, in one hierarchy under :class:`PrismQError`.

``from prismq_subprocess.exceptions import InvalidTimeoutError``. The ones an application
usually catches are also available from the top-level package. Where callers already catch a
builtin, ours inherits it too: a timeout is a ``TimeoutError``, a missing program a
``FileNotFoundError``, bad input a ``ValueError`` or ``TypeError``, using a closed object a
``RuntimeError`` (every such error derives from :class:`ClosedError`).
"""

from __future__ import annotations

from . import _load_api

_load_api()  # first thing: see there

from ._core import _exceptions as _source
from ._core._exceptions import *  # noqa: F403 - every exception, listed once in _core/_exceptions.py
from ._core._public import publish

__all__ = sorted(_source.__all__)

publish(__name__, globals(), __all__)
