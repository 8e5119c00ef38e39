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
import operator
import queue
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

__all__ = ["GroupTarget", "SQLiteWorker"]

_T = TypeVar("_T")


class GroupTarget(Protocol):
    """What a write job groups on: the connection the transaction is opened on."""

    conn: sqlite3.Connection


# A queued job: (fn, args, group, loop, future). A plain tuple, made in C: the loop makes one
# per registry write, and a class's __init__ was 4% of the loop's bytecodes per write.
# ``loop`` is None for a job from submit() (its future a concurrent.futures.Future).
_Job = tuple[
    Callable[..., Any],
    tuple[Any, ...],
    "GroupTarget | None",
    "asyncio.AbstractEventLoop | None",
    "asyncio.Future[Any] | concurrent.futures.Future[Any]",
]
# What a job came to: (error, result), error None for a result.
_Outcome = tuple["BaseException | None", Any]

_STOP = object()


_group_of = operator.itemgetter(2)
_loop_of = operator.itemgetter(3)


def _deliver(jobs: list[_Job], outcomes: list[_Outcome]) -> None:
    # On the loop, for jobs queued from it: a caller that was cancelled meanwhile gets nothing
    # (its write happened).
    for job, (error, result) in zip(jobs, outcomes, strict=True):
        future = job[4]
        if future.done():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


def _closed_worker() -> BaseException:
    return RuntimeError("this SQLite worker thread has stopped")


class SQLiteWorker:
    """A daemon thread running jobs in order; consecutive write jobs on one connection share
    a transaction (group commit). Use :meth:`call` from a loop, :meth:`submit` from anywhere,
    and :meth:`shutdown` once."""

    def __init__(self, name: str, *, closed: Callable[[], BaseException] = _closed_worker) -> None:
        """``closed`` makes the exception a call or submit raises once :meth:`shutdown` began
        (callers may be on other loops and threads than the one that shuts it down)."""
        self._queue: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        self._closed_error = closed
        # Queueing and stopping under one lock: no job lands behind the stop, where no thread
        # would ever answer it.
        self._lock = threading.Lock()
        self._stopping = False
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _put(self, job: _Job | object) -> None:
        with self._lock:
            if self._stopping:
                raise self._closed_error()
            self._queue.put(job)

    def enqueue(
        self, fn: Callable[..., _T], args: tuple[Any, ...], group: GroupTarget | None = None
    ) -> asyncio.Future[_T]:
        """Queue ``fn(*args)`` from a running loop and return the future of its result: what
        :meth:`call` awaits, for a caller that awaits it itself (one coroutine fewer per
        write). Raises the ``closed`` exception once :meth:`shutdown` began."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        self._put((fn, args, group, loop, future))
        return future

    async def call(self, fn: Callable[..., _T], *args: Any, group: GroupTarget | None = None) -> _T:
        """Run ``fn(*args)`` on the thread and return its result.

        ``group``: ``fn`` writes through ``group.conn`` (via a savepoint when a transaction is
        open) and may share one transaction with the other writes queued beside it; its result
        is returned only after that transaction committed.

        Cancellation: the job still runs (or already ran); only the wait ends.
        """
        return await self.enqueue(fn, args, group)

    def submit(self, fn: Callable[[], _T]) -> concurrent.futures.Future[_T]:
        """Run ``fn`` on the thread on its own (not grouped); for open and close."""
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()
        self._put((fn, (), None, None, future))
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
            if stop:
                batch.remove(_STOP)  # the only non-job; nothing is queued behind it
            jobs: list[_Job] = batch  # type: ignore[assignment]
            self._notify(jobs, self._run_batch(jobs))
            if stop:
                return
            # Not kept while the thread waits: a job's arguments may be what keeps its owner
            # (a registry dropped unclosed, whose finaliser stops this thread) alive.
            del batch, jobs

    def _run_batch(self, jobs: list[_Job]) -> list[_Outcome]:
        if len(jobs) > 1:
            groups = set(map(_group_of, jobs))
            if len(groups) == 1:  # the usual batch: writes to one registry
                group = groups.pop()
                if group is not None:
                    return self._run_group(group, jobs)
        outcomes: list[_Outcome] = []
        start = 0
        while start < len(jobs):
            group = jobs[start][2]
            end = start + 1
            if group is not None:
                while end < len(jobs) and jobs[end][2] is group:
                    end += 1
            if end - start > 1:
                assert group is not None
                outcomes += self._run_group(group, jobs[start:end])
            else:
                # One write alone: its own write() opens and commits its transaction.
                outcomes.append(self._run_one(jobs[start]))
            start = end
        return outcomes

    @staticmethod
    def _run_one(job: _Job) -> _Outcome:
        try:
            return None, job[0](*job[1])
        except StopIteration as exc:
            # asyncio refuses StopIteration as a future's exception (set_exception raises, and
            # the rest of the batch's callers would never be answered): as a coroutine would.
            fn = job[0]
            error = RuntimeError(f"{getattr(fn, '__qualname__', fn)!s} raised StopIteration")
            error.__cause__ = exc
            return error, None
        except BaseException as exc:  # handed to the caller; the thread keeps serving
            return exc, None

    def _run_group(self, group: GroupTarget, jobs: list[_Job]) -> list[_Outcome]:
        conn = group.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
        except BaseException as exc:  # busy beyond busy_timeout, disk error: nobody ran
            return [(exc, None)] * len(jobs)
        run_one = self._run_one
        outcomes: list[_Outcome] = []
        done = 0  # outcomes[done:] ran inside the open transaction, not yet committed
        for job in jobs:
            outcome = run_one(job)
            outcomes.append(outcome)
            if conn.in_transaction:
                continue
            # The failure ended the whole transaction (SQLite does so on some errors, e.g. a
            # full disk): the earlier writes of the group are gone, so they fail too; the rest
            # run on their own, each in its own transaction.
            lost = outcome[0] or sqlite3.OperationalError("the group transaction ended early")
            for index in range(done, len(outcomes) - 1):
                outcomes[index] = (lost, None)
            done = len(outcomes)
        if not conn.in_transaction:
            return outcomes
        try:
            conn.execute("COMMIT")
        except BaseException as exc:
            # If even the rollback fails the connection is unusable; the callers learn of exc.
            with contextlib.suppress(sqlite3.Error):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            for index in range(done, len(outcomes)):
                outcomes[index] = (exc, None)
        return outcomes

    @staticmethod
    def _notify(jobs: list[_Job], outcomes: list[_Outcome]) -> None:
        loops = set(map(_loop_of, jobs))
        if len(loops) == 1 and None not in loops:  # the usual batch: callers on one loop
            _call_soon(loops.pop(), jobs, outcomes)
            return
        by_loop: dict[asyncio.AbstractEventLoop, tuple[list[_Job], list[_Outcome]]] = {}
        for job, outcome in zip(jobs, outcomes, strict=True):
            loop, future = job[3], job[4]
            if loop is None:
                assert isinstance(future, concurrent.futures.Future)
                error, result = outcome
                # A cancelled submitter (its job ran anyway) cleans up itself, see open(); the
                # cancel may race this, and must not end the thread.
                with contextlib.suppress(concurrent.futures.InvalidStateError):
                    if error is not None:
                        future.set_exception(error)
                    else:
                        future.set_result(result)
            else:
                if loop not in by_loop:
                    by_loop[loop] = ([], [])
                on_loop = by_loop[loop]
                on_loop[0].append(job)
                on_loop[1].append(outcome)
        for loop, (loop_jobs, loop_outcomes) in by_loop.items():
            _call_soon(loop, loop_jobs, loop_outcomes)


def _call_soon(loop: asyncio.AbstractEventLoop, jobs: list[_Job], outcomes: list[_Outcome]) -> None:
    with contextlib.suppress(RuntimeError):  # that loop is closed: nobody is waiting any more
        loop.call_soon_threadsafe(_deliver, jobs, outcomes)
