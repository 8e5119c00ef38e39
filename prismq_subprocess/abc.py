"""Contracts for extending prismq_subprocess: the interfaces you implement and the built-in
implementations you can wrap.

- :class:`SubprocessStrategy` and its :class:`SpawnRequest`: a new way to start children.
  Implement ``async def spawn(self, request) -> ProcessLike`` and set ``mode``; pass an instance
  as ``SubprocessWrapper(strategy=...)``, and ``create_subprocess_exec``, ``run()`` and
  ``stream()`` all go through it (one run path takes every child to its end, whatever the
  strategy). Two optional hooks, ``wait_exit(process)`` and ``release_pipes(process)``, answer
  what only a strategy knows about its process objects; their defaults fit
  ``asyncio.subprocess.Process`` and the built-in process objects. The built-in
  :class:`AsyncStrategy`, :class:`ThreadedStrategy` and :class:`LocalStrategy` are here to wrap
  or subclass (DRY_RUN's is in ``prismq_subprocess.testing``).
- :class:`ProcessLike`, :class:`StreamReaderLike`, :class:`StreamWriterLike`: what a process
  object and its streams must offer (``asyncio.subprocess.Process`` satisfies them).
- :class:`BaseRunRegistry`: a run store of your own (a database, a cache).
- :class:`RunBackend`, with the :class:`ModuleJob` and :class:`RunContext` it receives: where
  ``ModuleRunner`` runs modules (``ModuleRunner(..., backend=...)``; the Dask cluster backend is
  ``prismq_subprocess.dask.DaskBackend``).
- :class:`AsyncResource`: the closing protocol every closable object follows.
- :class:`PopenOptions`, :class:`SpawnOptions`, :class:`ExecOptions`, :class:`ShellOptions`:
  the typed ``**kwds`` of ``run()``, ``stream()``, ``create_subprocess_exec`` and
  ``create_subprocess_shell``, for pass-through wrappers of your own
  (``**kwds: Unpack[PopenOptions]``).
- :class:`MemoryCallback`, :class:`LimitCallback`, :class:`ResourceReader`: the callables the
  resource watchers accept.
"""

from __future__ import annotations

from . import _load_api

_load_api()  # first thing: see there

from ._background._backend import ModuleJob, RunBackend, RunContext
from ._background._memory_registry import BaseRunRegistry
from ._background._start_options import CommandStartOptions, ModuleStartOptions, StartOptions
from ._core._closing import AsyncResource
from ._core._options import ExecOptions, PopenOptions, ShellOptions, SpawnOptions
from ._core._process import ProcessLike, StreamReaderLike, StreamWriterLike
from ._core._public import publish
from ._resources._memory_monitor import MemoryCallback
from ._resources._readings import ResourceReader
from ._resources._tree_sampler import LimitCallback
from ._strategies import AsyncStrategy, LocalStrategy, SubprocessStrategy, ThreadedStrategy
from ._strategies._base import SpawnRequest

__all__ = [
    "AsyncResource",
    "AsyncStrategy",
    "BaseRunRegistry",
    "CommandStartOptions",
    "ExecOptions",
    "LimitCallback",
    "LocalStrategy",
    "MemoryCallback",
    "ModuleJob",
    "ModuleStartOptions",
    "PopenOptions",
    "ProcessLike",
    "ResourceReader",
    "RunBackend",
    "RunContext",
    "ShellOptions",
    "SpawnOptions",
    "SpawnRequest",
    "StartOptions",
    "StreamReaderLike",
    "StreamWriterLike",
    "SubprocessStrategy",
    "ThreadedStrategy",
]

publish(__name__, globals(), __all__)
