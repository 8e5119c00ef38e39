"""Run :class:`~prismq_subprocess.ModuleRunner` modules on a Dask distributed cluster.

Install the extra (``pip install "prismq_subprocess[dask]"``) on the host and on every worker,
then give the runner a backend; nothing else in the host changes::

    from prismq_subprocess.dask import DaskBackend

    runner = ModuleRunner(registry, output=capture, backend=DaskBackend("tls://scheduler:8786"))

This is the only part of prismq_subprocess that imports ``distributed``; ``import
prismq_subprocess`` never does. See docs/DISTRIBUTED.md.
"""

from __future__ import annotations

import contextlib as _contextlib

try:
    import distributed as _distributed  # noqa: F401
except ImportError as _exc:
    raise ImportError(
        "prismq_subprocess.dask needs Dask distributed: install the extra with"
        " pip install 'prismq_subprocess[dask]' (on the host and on every worker)"
    ) from _exc

from ._dask_backend import DaskBackend
from ._worker import run_module_on_worker, stop_orphaned_tree

__all__ = ["DaskBackend", "run_module_on_worker", "stop_orphaned_tree"]

# Show public names as prismq_subprocess.dask.X in tracebacks and docs.
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("prismq_subprocess.dask._"):
        with _contextlib.suppress(AttributeError, TypeError):
            _obj.__module__ = __name__
del _name, _obj
