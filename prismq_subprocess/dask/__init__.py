"""Run :class:`~prismq_subprocess.ModuleRunner` modules on a Dask distributed cluster.

Install the extra (``pip install "prismq_subprocess[dask]"``) on the host and on every worker,
then give the runner a backend; nothing else in the host changes::

    from prismq_subprocess.dask import DaskBackend

    runner = ModuleRunner(registry, output=capture, backend=DaskBackend("tls://scheduler:8786"))

This is the only part of prismq_subprocess that imports ``distributed``; ``import
prismq_subprocess`` never does. See docs/DISTRIBUTED.md.
"""

from __future__ import annotations

try:
    import distributed as _distributed  # noqa: F401
except ImportError as _exc:
    raise ImportError(
        "prismq_subprocess.dask needs Dask distributed: install the extra with"
        " pip install 'prismq_subprocess[dask]' (on the host and on every worker)"
    ) from _exc

from .._core._public import publish as _publish
from ._dask_backend import DaskBackend

__all__ = ["DaskBackend"]

_publish(__name__, globals(), __all__)
