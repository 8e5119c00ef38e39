"""The one thread that owns a SQLite registry's connection, with group commit.

Callers on the event loop queue jobs; the thread takes whatever is queued when it wakes. The
writes among them run in one transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``), each inside its
own savepoint, so a write that fails (a duplicate id, a refused status change) undoes only
itself and its error reaches only its caller. Every caller of the batch learns its result only
after ``COMMIT`` returned, and all callers on one loop are woken by a single
``call_soon_threadsafe``: with W tasks writing at once, one commit and one loop wake-up serve up
to W writes instead of W of each.

Why a hand-rolled thread and not a ``ThreadPoolExecutor``: an executor hands over (and wakes
the loop for) one job at a time, which is where most of the time per write went (see
docs/PERFORMANCE.md, registry).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

__all__ = ["GroupTarget", "SQLiteWorker"]

_T = TypeVar("_T")


class GroupTarget(Protocol):
    """What a write job groups on: the connection the transaction is opened on."""

    conn: sqlite3.Connection


class _Job(Generic[_T]):
    __slots__ = ("args", "error", "fn", "future", "group", "loop", "result")

    def __init__(
        self,
        fn: Callable[..., _T],
        args: tuple[Any, ...],
        group: GroupTarget | None,
        loop: asyncio.AbstractEventLoop | None,
        future: asyncio.Future[_T] | concurrent.futures.Future[_T],
    ) -> None:
        self.fn = fn
        self.args = args
        self.group = group
        self.loop = loop
        self.future = future
        self.result: Any = None
        self.error: BaseException | None = None


_STOP = object()


def _deliver(jobs: list[_Job[Any]]) -> None:
    # On the loop: a caller that was cancelled meanwhile gets nothing (its write happened).
    for job in jobs:
        future = job.future
        assert isinstance(future, asyncio.Future)
        if future.done():
            continue
        if job.error is not None:
            future.set_exception(job.error)
        else:
            future.set_result(job.result)


def _closed_worker() -> BaseException:
    return RuntimeError("this SQLite worker thread has stopped")


class SQLiteWorker:
    """A daemon thread running jobs in order; consecutive write jobs on one connection share
    a transaction (group commit). Use :meth:`call` from a loop, :meth:`submit` from anywhere,
    and :meth:`shutdown` once."""

    def __init__(self, name: str, *, closed: Callable[[], BaseException] = _closed_worker) -> None:
        """``closed`` makes the exception a call or submit raises once :meth:`shutdown` began
        (callers may be on other loops and threads than the one that shuts it down)."""
        self._queue: queue.SimpleQueue[_Job[Any] | object] = queue.SimpleQueue()
        self._closed_error = closed
        # Queueing and stopping under one lock: no job lands behind the stop, where no thread
        # would ever answer it.
        self._lock = threading.Lock()
        self._stopping = False
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _put(self, job: _Job[Any]) -> None:
        with self._lock:
            if self._stopping:
                raise self._closed_error()
            self._queue.put(job)

    async def call(self, fn: Callable[..., _T], *args: Any, group: GroupTarget | None = None) -> _T:
        """Run ``fn(*args)`` on the thread and return its result.

        ``group``: ``fn`` writes through ``group.conn`` (via a savepoint when a transaction is
        open) and may share one transaction with the other writes queued beside it; its result
        is returned only after that transaction committed.

        Cancellation: the job still runs (or already ran); only the wait ends.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        self._put(_Job(fn, args, group, loop, future))
        return await future

    def submit(self, fn: Callable[[], _T]) -> concurrent.futures.Future[_T]:
        """Run ``fn`` on the thread on its own (not grouped); for open and close."""
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()
        self._put(_Job(fn, (), None, None, future))
        return future

    def shutdown(self, *, wait: bool = True) -> None:
        """Let the queued jobs finish, then stop the thread; with ``wait``, join it. Idempotent;
        later calls and submits raise the ``closed`` exception."""
        with self._lock:
            if not self._stopping:
                self._stopping = True
                self._queue.put(_STOP)
        if wait and self._thread is not threading.current_thread():
            self._thread.join()

    # -- on the thread ------------------------------------------------------------------------
    def _main(self) -> None:
        get, get_nowait = self._queue.get, self._queue.get_nowait
        while True:
            batch = [get()]
            while True:  # take what else is waiting: it forms the group
                try:
                    batch.append(get_nowait())
                except queue.Empty:
                    break
            stop = _STOP in batch
            jobs = [job for job in batch if isinstance(job, _Job)]
            self._run_batch(jobs)
            if stop:
                return

    def _run_batch(self, jobs: list[_Job[Any]]) -> None:
        start = 0
        while start < len(jobs):
            group = jobs[start].group
            end = start + 1
            if group is not None:
                while end < len(jobs) and jobs[end].group is group:
                    end += 1
                self._run_group(group, jobs[start:end])
            else:
                self._run_one(jobs[start])
            start = end
        self._notify(jobs)

    @staticmethod
    def _run_one(job: _Job[Any]) -> None:
        try:
            job.result = job.fn(*job.args)
        except StopIteration as exc:
            # asyncio refuses StopIteration as a future's exception (set_exception raises, and
            # the rest of the batch's callers would never be answered): as a coroutine would.
            error = RuntimeError(
                f"{getattr(job.fn, '__qualname__', job.fn)!s} raised StopIteration"
            )
            error.__cause__ = exc
            job.error = error
        except BaseException as exc:  # handed to the caller; the thread keeps serving
            job.error = exc

    def _run_group(self, group: GroupTarget, jobs: list[_Job[Any]]) -> None:
        conn = group.conn
        if len(jobs) == 1:
            self._run_one(jobs[0])  # its own write() opens and commits its transaction
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
        except BaseException as exc:  # busy beyond busy_timeout, disk error: nobody ran
            for job in jobs:
                job.error = exc
            return
        done: list[_Job[Any]] = []  # ran inside the open transaction, not yet committed
        for job in jobs:
            self._run_one(job)
            if conn.in_transaction:
                done.append(job)
                continue
            # The failure ended the whole transaction (SQLite does so on some errors, e.g. a
            # full disk): the earlier writes of the group are gone, so they fail too; the rest
            # run on their own, each in its own transaction.
            lost = job.error or sqlite3.OperationalError("the group transaction ended early")
            for earlier in done:
                earlier.error = lost
                earlier.result = None
            done = []
        if not conn.in_transaction:
            return
        try:
            conn.execute("COMMIT")
        except BaseException as exc:
            # If even the rollback fails the connection is unusable; the callers learn of exc.
            with contextlib.suppress(sqlite3.Error):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            for job in done:
                job.error = exc
                job.result = None

    @staticmethod
    def _notify(jobs: list[_Job[Any]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[_Job[Any]]] = {}
        for job in jobs:
            if job.loop is None:
                future = job.future
                assert isinstance(future, concurrent.futures.Future)
                # A cancelled submitter (its job ran anyway) cleans up itself, see open(); the
                # cancel may race this, and must not end the thread.
                with contextlib.suppress(concurrent.futures.InvalidStateError):
                    if job.error is not None:
                        future.set_exception(job.error)
                    else:
                        future.set_result(job.result)
            else:
                by_loop.setdefault(job.loop, []).append(job)
        for loop, waiting in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, waiting)
            except RuntimeError:
                continue  # that loop is closed: nobody is waiting any more
