"""Host side of running modules on a Dask distributed cluster: :class:`DaskBackend`."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import math
import uuid
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

from distributed import Client, Event
from distributed.comm.addressing import get_address_host
from distributed.scheduler import KilledWorker

from .._background._backend import ModuleJob, RunBackend, RunContext, check_resources
from .._background._memory_registry import stopped_for_claim
from .._background._module_runner import _LINE_PIECE_BYTES
from .._background._run_record import Run, RunStatus
from .._core._cancel_shield import shielded_if_cancelled
from .._core._exceptions import (
    BackendClosedError,
    DuplicateRunError,
    InvalidBackendError,
    InvalidIntervalError,
    InvalidLimitError,
    OutputClosedError,
)
from .._core._modes import RunMode
from .._core._validation import check_flag
from .._platform._orphans import OrphanCheck, well_formed_cookie
from ._channel import (
    CHILD,
    END,
    LINES,
    STARTED,
    Message,
    cancel_event_name,
    kill_event_name,
    started_event_name,
    task_key,
)
from ._worker import (
    CANCELLED_BEFORE_START,
    FINISHED,
    NOT_RETRIED,
    WorkerJob,
    WorkerOutcome,
    run_module_on_worker,
    stop_orphaned_tree,
)

__all__ = ["DaskBackend"]

logger = logging.getLogger(__name__)

# How long the host looks for a live worker on a dead worker's machine to stop the orphaned
# tree of its module (a nanny usually restarts the worker within seconds).
_REAP_SECONDS = 30.0
# How long one worker is given to run the stop: one that does not answer (the lost worker,
# still listed for a moment, or another dying) must not use up the whole _REAP_SECONDS.
_REAP_TRY_SECONDS = 10.0
# How long releasing a finished run's events on the scheduler may take (it is housekeeping).
_RELEASE_SECONDS = 10.0
_MAX_BATCH_LINES = 1000
_MAX_BATCH_CHARS = 256 * 1024


def _positive(name: str, value: float) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise InvalidIntervalError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def lost_by_outcome(result: WorkerOutcome | BaseException | None) -> bool:
    """Whether the task's outcome alone shows that the worker which started the child died:
    Dask gave up on the task (``KilledWorker``), or ran it again, which found the run started
    before (NOT_RETRIED) or cancelled by the host meanwhile (CANCELLED_BEFORE_START)."""
    if isinstance(result, KilledWorker):
        return True
    return isinstance(result, WorkerOutcome) and result.kind in (
        NOT_RETRIED,
        CANCELLED_BEFORE_START,
    )


def cookie_or_none(value: object) -> str | None:
    """A reported containment cookie if it is one (``PRISMQ_RUN_<token>=<n>``), else None
    (then only a child still running at its pid proves the tree the run's)."""
    return value if isinstance(value, str) and well_formed_cookie(value) else None


@dataclass(slots=True)
class _Child:
    """The child of one attempt of a run, as its worker reported it: what a reaper needs to
    stop its tree if the worker dies. ``cookie`` comes in a later message (CHILD) than the
    rest (STARTED); the reaper reads it when it acts."""

    pid: int
    create_time: float | None
    host: str | None
    worker: str | None
    cookie: str | None = None


class _Remote:
    """The host's view of one run executing on the cluster: execution number ``execution`` of
    the backend with ``token``, which names its task and events on the scheduler."""

    def __init__(self, run: Run, context: RunContext, token: str, execution: int) -> None:
        self.run = run
        self.context = context
        self.execution = execution
        self.key = task_key(token, execution, run.run_id)
        self.cancel_event = cancel_event_name(token, execution, run.run_id)
        self.kill_event = kill_event_name(token, execution, run.run_id)
        self.started_event = started_event_name(token, execution, run.run_id)
        self.output = context.output
        self.client: Any = None  # the client its task was submitted through
        self.future: Any = None
        self.attempt: str | None = None
        self.start: Message | None = None  # the latest start message, not yet recorded
        # Clear from a start message until the run's supervisor has recorded it: its lines wait
        # for that (see _handle). Set again when the supervisor ends, whatever happened.
        self.start_recorded = asyncio.Event()
        self.start_recorded.set()
        self.worker: str | None = None
        self.host: str | None = None
        self.pid: int | None = None
        self.create_time: float | None = None
        self.child: _Child | None = None  # what the reaper needs of the latest attempt's child
        self.next_seq = 0
        # The pieces so far of line ``piece_seq``, which comes in several messages (LINES).
        self.pieces: list[str] = []
        self.piece_seq = -1
        self.missing = 0
        self.ended = asyncio.Event()
        self.lost: str | None = None
        self.cancel_requested = False
        self.cancel_sent_at: float | None = None
        self.kill_requested = False
        self.kill_sent = False
        self.withdrawn = False  # taken off the cluster by client.cancel, result unknown
        self.unconfirmed = False
        # Another process claimed the run while its job waited in the cluster's queue: the
        # host's RUNNING record was refused; the job is stopped and nothing more recorded.
        self.claimed = False
        self.wake = asyncio.Event()


class DaskBackend(RunBackend):
    """Run :class:`ModuleRunner` modules (and ``execute_command``/``start_command`` commands) on
    a Dask distributed cluster.

    ``ModuleRunner(registry, output=capture, backend=DaskBackend("tls://scheduler:8786"))``
    starts, streams, cancels and lists runs exactly like a local runner; only where the child
    runs changes. On the worker the module runs inside our own ``ModuleRunner`` (same process
    group, timeout, memory limit, output bounds and statuses as locally), its lines stream back
    live into ``capture`` through a Dask event topic, and its status goes PENDING (queued on the
    cluster) -> RUNNING (``Run.worker`` is the worker's address, ``Run.pid`` the child's pid on
    that machine) -> the final state, recorded in the host's registry. ``Run.mode`` is
    ``"dask"``.

    Guarantees and limits (docs/DISTRIBUTED.md has the details):

    - cancel: a queued run is removed from the cluster without starting; a running one is
      stopped by the worker itself (it watches the run's ``distributed.Event``), whole tree, and
      recorded CANCELLED once the worker confirms (after ``cancel_timeout`` seconds without
      confirmation it is recorded CANCELLED anyway, saying so);
    - a worker that dies (or leaves) while running a module: the run is recorded INTERRUPTED
      with the reason within about ``worker_check_interval`` seconds, the module is not run again
      (Dask re-runs the tasks of dead workers; the task refuses) unless
      ``retry_on_worker_loss``, and what is left of its process tree is killed from another
      worker on the same machine if there is one within 30 s;
    - admission: each run reserves ``resources``, merged name by name with its own hints
      (``resources=`` of ``start_module``/``execute_module``), on a worker; a worker runs at
      most as many runs as its resources allow (start workers with e.g. ``--resources
      "slots=4"``). A run needing more than any worker offers stays PENDING until such a
      worker joins or it is cancelled;
    - the child's environment is the worker's plus the run's ``env``: the host's environment
      is never sent to the cluster.

    Args:
        cluster: a scheduler address (``"tcp://..."``, ``"tls://..."``; the backend connects on
            first use, again on the next run once its client closed itself after losing the
            scheduler, and closes its client in :meth:`aclose`) or a ``distributed.Client``
            made with ``asynchronous=True`` in the host's event loop (yours to close).
        security: a ``distributed.Security`` for an address (TLS); ``None``: Dask's
            configuration (``DASK_DISTRIBUTED__COMM__TLS__...`` variables) applies.
        resources: what each run reserves on a worker unless it gives its own hints.
        retry_on_worker_loss: let Dask run a module again on another worker when the one
            running it died (only for modules safe to run twice).
        run_mode: the run mode of the children on the workers (``None``: detected there).
        worker_check_interval: seconds between checks that workers running modules are alive.
        cancel_timeout: seconds to wait for a worker to confirm a stop.
        orphan_timeout: how long a worker keeps a module running while it cannot reach the
            scheduler (the host has then recorded the run FAILED and nobody can follow it).
        stream_queue_lines: lines a worker buffers for the host (its ring of the run's output)
            before dropping the oldest.
        flush_interval: seconds between two batches of lines from one run (the first line after
            a quiet spell goes at once).

    Raises:
        InvalidBackendError: ``cluster`` is neither a non-empty address nor a Client, or is a
            synchronous Client.
        InvalidLimitError: bad ``resources`` or ``stream_queue_lines``.
        InvalidIntervalError: a non-positive interval or timeout.
        InvalidRunModeError: an unknown ``run_mode``.
        InvalidArgumentTypeError: ``retry_on_worker_loss`` is not a bool.
    """

    mode: str = "dask"

    def __init__(
        self,
        cluster: Client | str,
        *,
        security: Any = None,
        resources: Mapping[str, float] | None = None,
        retry_on_worker_loss: bool = False,
        run_mode: RunMode | str | None = None,
        worker_check_interval: float = 1.0,
        cancel_timeout: float = 30.0,
        orphan_timeout: float = 30.0,
        stream_queue_lines: int = 10_000,
        flush_interval: float = 0.01,
    ) -> None:
        if isinstance(cluster, str):
            if not cluster.strip():
                raise InvalidBackendError("the scheduler address must not be empty")
            self._address: str | None = cluster
            self._client: Any = None
        elif isinstance(cluster, Client):
            if getattr(cluster, "_asynchronous", False) is not True:
                raise InvalidBackendError(
                    "DaskBackend needs an asynchronous Client (Client(..., asynchronous=True),"
                    " awaited in the host's event loop): a synchronous one blocks the loop"
                )
            self._address = None
            self._client = cluster
        else:
            raise InvalidBackendError(
                f"cluster must be a scheduler address or a distributed.Client, got {cluster!r}"
            )
        if (
            isinstance(stream_queue_lines, bool)
            or not isinstance(stream_queue_lines, int)
            or stream_queue_lines < 1
        ):
            raise InvalidLimitError(
                f"stream_queue_lines must be an int >= 1, got {stream_queue_lines!r}"
            )
        self._owns_client = self._address is not None
        self.security = security
        self.resources = check_resources(resources)
        self.retry_on_worker_loss = check_flag(retry_on_worker_loss, "retry_on_worker_loss")
        self.run_mode = None if run_mode is None else RunMode.parse(run_mode).value
        self.worker_check_interval = _positive("worker_check_interval", worker_check_interval)
        self.cancel_timeout = _positive("cancel_timeout", cancel_timeout)
        self.orphan_timeout = _positive("orphan_timeout", orphan_timeout)
        self.stream_queue_lines = stream_queue_lines
        self.flush_interval = _positive("flush_interval", flush_interval)
        # Names on the shared scheduler (topic, events, task keys) carry this token, so two
        # hosts on one cluster never see each other's runs even with equal run ids.
        self._token = uuid.uuid4().hex[:12]
        self.topic = f"prismq-output-{self._token}"
        self._remotes: dict[str, _Remote] = {}
        self._executions = itertools.count(1)
        self._idle = asyncio.Event()  # set while no run executes here
        self._idle.set()
        self._connect_lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None  # where the runs execute
        self._ready = False
        self._watcher: asyncio.Task[None] | None = None
        self._reapers: set[asyncio.Task[None]] = set()
        self._reapers_until = 0.0  # (loop time) when the last reaper must have ended
        self._chores: set[asyncio.Future[None]] = set()
        # Events kept set until aclose(): the cancel events of runs taken off the cluster while
        # queued, and the events of runs lost or stopped unconfirmed (see _forget).
        self._held: list[str] = []
        self._closed = False

    # -- connection ---------------------------------------------------------------------------
    @property
    def client(self) -> Any:
        """The ``distributed.Client`` in use (``None`` before the first run of an address)."""
        return self._client

    def _check_open(self) -> None:
        if self._closed:
            raise BackendClosedError("this DaskBackend is closed; create a new one")

    async def _connect(self) -> Any:
        async with self._connect_lock:
            self._check_open()
            if self._owns_client and self._client is not None and _gone(self._client):
                await self._drop_client()
            if self._client is None:
                self._client = await Client(
                    self._address, asynchronous=True, security=self.security, set_as_default=False
                )
            client = self._client
            if not self._ready:
                if not client.asynchronous:
                    raise InvalidBackendError(
                        "the Client is not asynchronous in this event loop; make it with"
                        " Client(..., asynchronous=True) inside the host's loop"
                    )
                client.subscribe_topic(self.topic, self._on_event)
                self._watcher = asyncio.create_task(
                    self._watch_workers(), name=f"prismq-dask-workers-{self._token}"
                )
                self._ready = True
            return client

    async def _drop_client(self) -> None:
        """Forget our own client once it closed itself (it gave up on a lost scheduler), so the
        next run connects again instead of failing on it for good."""
        client, self._client = self._client, None
        logger.warning("the connection to the Dask cluster was closed; reconnecting")
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.wait({self._watcher})
            self._watcher = None
        if self._ready:
            with contextlib.suppress(Exception):
                client.unsubscribe_topic(self.topic)
            self._ready = False
        # They lived on the scheduler that went away.
        self._held.clear()

    # -- messages from the workers ------------------------------------------------------------
    async def _on_event(self, event: tuple[float, Message]) -> None:
        try:
            message = event[1]
            remote = self._remotes.get(message.get("run", ""))
            # (A late message of an earlier execution with this run id is not this run's.)
            if remote is not None and message.get("execution") == remote.execution:
                await self._handle(remote, message)
        except Exception:
            # Never let a bad message break the client's stream handling.
            logger.exception("handling a message on %s failed", self.topic)

    async def _handle(self, remote: _Remote, message: Message) -> None:
        kind = message.get("kind")
        attempt = message.get("attempt")
        if kind == STARTED:
            if remote.attempt is not None and attempt != remote.attempt:
                # Dask ran it again (retry_on_worker_loss), so the first worker died: stop what
                # is left of the first attempt's tree, and follow the new attempt.
                self._reap_later(remote)
                remote.next_seq = 0
                remote.pieces = []
                remote.ended.clear()
            remote.attempt = attempt
            remote.start = message
            remote.start_recorded.clear()
            remote.worker = message.get("worker")
            remote.host = message.get("host")
            remote.pid = message.get("pid")
            remote.create_time = message.get("create_time")
            pid = remote.pid
            remote.child = (
                None
                if not isinstance(pid, int)
                else _Child(pid, remote.create_time, remote.host, remote.worker)
            )
            remote.wake.set()
            return
        if kind == CHILD:
            # Not output: no need to wait for the start to be recorded. (A late one of an
            # attempt no longer followed is dropped.)
            child = remote.child
            if attempt == remote.attempt and child is not None and message.get("pid") == child.pid:
                child.cookie = cookie_or_none(message.get("cookie"))
                started = message.get("create_time")
                if isinstance(started, float):
                    child.create_time = started
            return
        if remote.attempt is None:
            remote.attempt = attempt
        elif attempt != remote.attempt:
            return  # a late message of an attempt we no longer follow
        if not remote.start_recorded.is_set():
            # The start and the first lines travel separately: no line of a run shows before
            # the run is recorded RUNNING (a viewer would see output of a PENDING run).
            await remote.start_recorded.wait()
        if kind == LINES:
            seq = int(message["seq"])
            lines: list[str] = message["lines"]
            if remote.pieces and remote.piece_seq != seq:
                remote.pieces = []  # (never: the pieces of a line travel back to back)
            if message.get("more"):
                remote.piece_seq = seq
                remote.pieces += lines
                return
            if remote.pieces:
                lines = ["".join([*remote.pieces, lines[0]]), *lines[1:]]
                remote.pieces = []
            batch = lines[max(0, remote.next_seq - seq) :]
            if seq > remote.next_seq:
                batch = [self._gap_note(remote, seq - remote.next_seq), *batch]
            remote.next_seq = max(remote.next_seq, seq + len(lines))
            await self._deliver(remote, batch)
        elif kind == END:
            total = int(message["lines"])
            if total > remote.next_seq:
                note = self._gap_note(remote, total - remote.next_seq)
                remote.next_seq = total
                await self._deliver(remote, [note])
            remote.ended.set()

    @staticmethod
    def _gap_note(remote: _Remote, count: int) -> str:
        """The line that stands for ``count`` lines the worker dropped (it printed faster than
        they could be sent), in the style of the capture's own truncation note."""
        remote.missing += count
        return f"… [{count} lines dropped on the way from the worker]"

    async def _deliver(self, remote: _Remote, lines: list[str]) -> None:
        output = remote.output
        if output is None or not lines:
            return
        try:
            await output.append_lines(remote.run.run_id, lines)
        except OutputClosedError:
            remote.output = None  # the host closed this run's output; keep the run going

    # -- one run ------------------------------------------------------------------------------
    async def execute(self, run: Run, job: ModuleJob, context: RunContext) -> Run:
        """Run ``job`` on the cluster for ``run`` (see :class:`RunBackend` and the class
        docstring). A cluster that cannot be reached makes the run FAILED with the reason.

        Cancellation: a queued run is removed from the cluster; a running one is stopped by its
        worker (up to ``cancel_timeout`` seconds are waited for the confirmation; a second
        cancellation stops waiting). A foreground run is recorded CANCELLED; then
        ``CancelledError`` propagates.

        Raises:
            BackendClosedError: after :meth:`aclose`.
            DuplicateRunError: a run with this id is already executing on this backend.
            RunClaimedError: another process claimed the run while its job waited in the
                cluster's queue (its RUNNING record was refused); the job was stopped.
        """
        self._check_open()
        if run.run_id in self._remotes:
            raise DuplicateRunError(f"run {run.run_id!r} is already executing on this backend")
        run.mode = self.mode
        self._loop = asyncio.get_running_loop()
        remote = _Remote(run, context, self._token, next(self._executions))
        self._remotes[run.run_id] = remote
        self._idle.clear()
        outcome: asyncio.Future[WorkerOutcome | BaseException] | None = None
        try:
            try:
                client = await self._connect()
                remote.client = client
                # A closed client raises here rather than in connecting (one given to us, or
                # ours closing meanwhile): the run must still end FAILED, not stay PENDING.
                remote.future = client.submit(
                    run_module_on_worker,
                    self._worker_job(remote, job),
                    key=remote.key,
                    pure=False,
                    retries=0,
                    resources={**self.resources, **job.resources} or None,
                )
            except asyncio.CancelledError:
                if not context.background:
                    run.mark_cancelled(context.cancel_reason() or "cancelled")
                    await context.finish(run)
                raise
            except (BackendClosedError, InvalidBackendError):
                raise
            except Exception as exc:
                run.mark_failed(f"could not reach the Dask cluster: {type(exc).__name__}: {exc}")
                await context.finish(run)
                return run
            outcome = asyncio.ensure_future(_outcome_of(remote.future))
            try:
                await self._follow(remote, outcome)
            except asyncio.CancelledError:
                remote.cancel_requested = True
                await self._follow(remote, outcome)  # a second cancellation stops waiting
                await self._conclude(remote, outcome, host_cancelled=True)
                raise
            await self._conclude(remote, outcome, host_cancelled=False)
            return run
        finally:
            remote.start_recorded.set()  # no line waits for a record nobody will write
            del self._remotes[run.run_id]
            if not self._remotes:
                self._idle.set()
            if outcome is not None and not outcome.done():
                outcome.cancel()
            if remote.future is not None:
                # Off the run's path: it is recorded already; aclose() waits for these.
                self._background(self._forget(remote))

    def _worker_job(self, remote: _Remote, job: ModuleJob) -> WorkerJob:
        context = remote.context
        output = context.output
        return WorkerJob(
            run_id=remote.run.run_id,
            execution=remote.execution,
            job=job,
            topic=self.topic,
            cancel_event=remote.cancel_event,
            kill_event=remote.kill_event,
            started_event=remote.started_event,
            run_mode=self.run_mode,
            grace_period=context.grace_period,
            sample_interval=context.sample_interval,
            output_tail_lines=context.output_tail_lines,
            rerun_after_worker_loss=self.retry_on_worker_loss,
            cancel_poll=0.5,
            orphan_timeout=self.orphan_timeout,
            queue_lines=self.stream_queue_lines,
            # The worker reads the child's lines in the pieces the host's runner would, and
            # sends them whole: the host's capture bounds them (see ForwardedOutput).
            max_line_bytes=_LINE_PIECE_BYTES if output is None else output.max_line_bytes,
            max_batch_lines=_MAX_BATCH_LINES,
            max_batch_chars=_MAX_BATCH_CHARS,
            flush_interval=self.flush_interval,
        )

    async def _follow(
        self, remote: _Remote, outcome: asyncio.Future[WorkerOutcome | BaseException]
    ) -> None:
        """Record the start, pass on a cancel request, and return once the task ended, the
        worker was lost, or a requested stop went unconfirmed for ``cancel_timeout`` s."""
        loop = asyncio.get_running_loop()
        while True:
            remote.wake.clear()
            if remote.start is not None:
                await self._record_start(remote)
            if remote.cancel_requested and remote.cancel_sent_at is None:
                await self._send_cancel(remote)
            if remote.kill_requested and not remote.kill_sent:
                await self._send_kill(remote)
            if remote.lost is not None and remote.cancel_sent_at is None:
                await self._send_cancel(remote)  # keep a Dask retry from running it again
            if outcome.done() or remote.lost is not None:
                return
            timeout = None
            if remote.cancel_sent_at is not None:
                timeout = remote.cancel_sent_at + self.cancel_timeout - loop.time()
                if timeout <= 0:
                    remote.unconfirmed = True
                    return
            waiter = asyncio.ensure_future(remote.wake.wait())
            watched: set[asyncio.Future[Any]] = {outcome, waiter}
            try:
                await asyncio.wait(watched, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()

    def _apply_start(self, remote: _Remote) -> bool:
        message, remote.start = remote.start, None
        if message is None:
            return False
        run = remote.run
        if run.status is RunStatus.PENDING:
            run.mark_running(remote.pid)
        else:
            run.pid = remote.pid
        run.worker = remote.worker
        return True

    async def _record_start(self, remote: _Remote) -> None:
        try:
            if (
                self._apply_start(remote)
                and not remote.run.is_finished
                and not remote.claimed
                and await remote.context.save(remote.run) is False
            ):
                # Picked up by another process (claim_run) while the job waited in the
                # cluster's queue: that process runs the run now; its job here is stopped at
                # once (the _follow loop sends the cancel next).
                remote.claimed = True
                remote.cancel_requested = True
                # Its lines are not this run's: the run's output (and a log directory shared
                # with the claimer) is the other process's now.
                remote.output = None
        finally:
            if remote.start is None:  # (a newer start that came meanwhile is recorded next)
                remote.start_recorded.set()

    async def _send_cancel(self, remote: _Remote) -> None:
        remote.cancel_sent_at = asyncio.get_running_loop().time()
        client = remote.client
        try:
            await Event(remote.cancel_event, client=client).set()
            if remote.attempt is None or remote.lost is not None:
                # Still queued (as far as we know), or its worker is gone: take it off the
                # cluster. Had a worker just picked it up, it sees the event before or right
                # after spawning and stops.
                remote.withdrawn = True
                await client.cancel([remote.future], reason="cancelled by the host")
        except Exception as exc:
            logger.warning("cancelling run %s on the cluster failed: %s", remote.run.run_id, exc)

    async def _send_kill(self, remote: _Remote) -> None:
        remote.kill_sent = True
        if remote.withdrawn:
            return  # taken off the cluster: no tree to kill
        try:
            await Event(remote.kill_event, client=remote.client).set()
        except Exception as exc:
            logger.warning("killing run %s on the cluster failed: %s", remote.run.run_id, exc)

    async def _conclude(
        self,
        remote: _Remote,
        outcome: asyncio.Future[WorkerOutcome | BaseException],
        *,
        host_cancelled: bool,
    ) -> None:
        run = remote.run
        result = outcome.result() if outcome.done() else None
        if isinstance(result, WorkerOutcome) and result.kind == FINISHED:
            try:
                await asyncio.wait_for(remote.ended.wait(), timeout=5.0)
            except TimeoutError:
                logger.warning("run %s: the end of its output never arrived", run.run_id)
        self._apply_start(remote)
        if remote.missing:
            logger.warning(
                "run %s: %d output lines were dropped on the way from the worker",
                run.run_id,
                remote.missing,
            )
        if isinstance(result, WorkerOutcome) and result.kind == FINISHED:
            run.worker = result.worker
        finished = (
            None
            if not isinstance(result, WorkerOutcome) or result.run is None
            else Run.from_dict(result.run)
        )
        if finished is not None:
            if run.status is RunStatus.PENDING:
                run.mark_running(finished.pid)
            run.pid = finished.pid
            run.exit_code = finished.exit_code
            run.output_tail = finished.output_tail
            run.peak_rss_bytes = finished.peak_rss_bytes
            run.cpu_time_seconds = finished.cpu_time_seconds
        if finished is None and await self._worker_lost(remote, result):
            # Whatever the run is recorded as (a host's cancel may have come meanwhile), the
            # tree its dead worker left running is stopped from another worker.
            self._reap_later(remote)
        if remote.claimed:
            if host_cancelled:
                return  # (the cancellation propagates; nothing is recorded either way)
            raise stopped_for_claim(run.run_id, remote.pid)
        if host_cancelled:
            if remote.context.background:
                return  # the task manager records the cancelled run with its own reason
            if not run.is_finished:
                run.mark_cancelled(remote.context.cancel_reason() or "cancelled")
        elif not run.is_finished:
            self._apply_outcome(remote, result, finished)
        await remote.context.finish(run)

    async def _worker_lost(
        self, remote: _Remote, result: WorkerOutcome | BaseException | None
    ) -> bool:
        """Whether the worker that ran ``remote``'s child (it had started one) is gone."""
        if remote.child is None:
            return False  # nothing started, as far as the host knows
        if remote.lost is not None or lost_by_outcome(result):
            return True
        if isinstance(result, WorkerOutcome) and result.kind != FINISHED:
            # REFUSED by another worker: the task ran again, which takes a worker's death.
            return result.worker != remote.child.worker
        if remote.unconfirmed:
            # A stop with no answer: a worker that is alive is still stopping the tree (within
            # the run's grace period); only a worker that left the cluster needs a reaper.
            try:
                async with asyncio.timeout(_REAP_TRY_SECONDS):
                    live = await self._client.nthreads()
            except Exception as exc:
                logger.info("asking the scheduler for its workers failed: %s", exc)
                return False
            return remote.child.worker not in live
        return False

    def _apply_outcome(
        self,
        remote: _Remote,
        result: WorkerOutcome | BaseException | None,
        finished: Run | None,
    ) -> None:
        run = remote.run
        reason = remote.context.cancel_reason() or "cancelled"
        if remote.lost is not None:
            run.mark_interrupted(remote.lost)
        elif finished is not None:
            exit_code = finished.exit_code
            if finished.status is RunStatus.COMPLETED:
                run.mark_completed(exit_code)
            elif finished.status is RunStatus.CANCELLED:
                run.mark_cancelled(
                    reason if remote.cancel_requested else finished.error_message or "cancelled"
                )
            elif finished.status is RunStatus.INTERRUPTED:
                run.mark_interrupted(finished.error_message or "interrupted on the worker")
            else:
                run.mark_failed(finished.error_message or "failed", exit_code=exit_code)
            run.exit_code = exit_code
        elif isinstance(result, WorkerOutcome):
            if result.kind == CANCELLED_BEFORE_START:
                run.mark_cancelled(f"{reason} (before it started on the cluster)")
            elif result.kind == NOT_RETRIED:
                run.mark_interrupted(self._lost_reason(remote))
            else:
                run.mark_failed(f"could not start the module on {result.worker}: {result.detail}")
        elif isinstance(result, KilledWorker):
            run.mark_interrupted(self._lost_reason(remote))
        elif isinstance(result, concurrent.futures.CancelledError):
            if remote.cancel_requested:
                run.mark_cancelled(f"{reason} (before it started on the cluster)")
            elif getattr(remote.client, "status", "running") != "running":
                run.mark_failed(
                    f"the connection to the Dask cluster ended before the run did ({result})"
                )
            else:
                run.mark_failed(f"the cluster dropped the task: {result}")
        elif isinstance(result, BaseException):
            run.mark_failed(f"could not run on the cluster: {type(result).__name__}: {result}")
        else:
            # No result: a requested stop the worker never confirmed.
            run.mark_cancelled(
                f"{reason} (worker {remote.worker or '?'} did not confirm the stop within"
                f" {self.cancel_timeout:g} s)"
            )

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    async def _forget(self, remote: _Remote) -> None:
        """Release the task and, once it ended normally, the run's events on the scheduler
        (the cancel and kill events only exist there once set).

        Some stay set until :meth:`aclose`, which releases them: the events of a run that was
        lost or cancelled unconfirmed, so an attempt Dask may still start runs nothing; and the
        cancel event of a run taken off the cluster while queued: the scheduler may have placed
        the task on a worker already, which learns of the cancel a moment later and starts the
        task if slots free up meanwhile; the task then finds the event set and runs nothing.
        (Their names are this execution's alone: a later run with the same id is not stopped
        by them.)"""
        client = remote.client
        try:
            remote.future.release()
            if client is not self._client or client.status != "running":
                # A client dropped since (its scheduler is gone), or no scheduler: nothing
                # there to release.
                return
            names = [remote.started_event]
            if remote.cancel_sent_at is not None:
                names.append(remote.cancel_event)
            if remote.kill_sent and not remote.withdrawn:
                names.append(remote.kill_event)
            if remote.lost is not None or remote.unconfirmed or not remote.future.done():
                self._held += names
                return
            if remote.withdrawn:
                if remote.cancel_event in names:
                    names.remove(remote.cancel_event)
                self._held.append(remote.cancel_event)
            async with asyncio.timeout(_RELEASE_SECONDS):
                for name in names:
                    await Event(name, client=client).clear()
        except Exception as exc:
            logger.info("releasing run %s on the cluster failed: %s", remote.run.run_id, exc)

    async def cancel(self, run_id: str) -> bool:
        """Ask for ``run_id`` to be stopped (see :meth:`execute`); ``False`` if it is not
        executing here."""
        remote = self._remotes.get(run_id)
        if remote is None:
            return False
        remote.cancel_requested = True
        remote.wake.set()
        return True

    def kill_now(self) -> None:
        """Have the workers kill the trees of every run executing here at once, without the
        rest of their grace period (see :meth:`RunBackend.kill_now`); a run not yet asked to
        stop is cancelled too. Safe from any thread; returns at once."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            here = asyncio.get_running_loop() is loop
        except RuntimeError:
            here = False
        if here:
            self._kill_all()
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._kill_all)

    def _kill_all(self) -> None:
        for remote in self._remotes.values():
            remote.cancel_requested = True
            remote.kill_requested = True
            remote.wake.set()

    # -- lost workers -------------------------------------------------------------------------
    async def _watch_workers(self) -> None:
        while True:
            await asyncio.sleep(self.worker_check_interval)
            watched = [r for r in self._remotes.values() if r.worker is not None and r.lost is None]
            if not watched:
                continue
            try:
                live = set(await self._client.nthreads())
            except Exception as exc:
                logger.warning("asking the scheduler for its workers failed: %s", exc)
                continue
            for remote in watched:
                if remote.worker not in live:
                    self._lose(remote)

    def _lose(self, remote: _Remote) -> None:
        if self.retry_on_worker_loss:
            logger.warning(
                "run %s: worker %s left the cluster; waiting for Dask to run it again",
                remote.run.run_id,
                remote.worker,
            )
            self._reap_later(remote)
            remote.worker = None
            remote.pid = None
            remote.child = None
            return
        remote.lost = self._lost_reason(remote)
        remote.wake.set()

    @staticmethod
    def _lost_reason(remote: _Remote) -> str:
        where = "its worker" if remote.worker is None else f"worker {remote.worker}"
        pid = "" if remote.pid is None else f" (pid {remote.pid})"
        return (
            f"{where} died or left the cluster while running the module{pid};"
            " not run again (retry_on_worker_loss is off)"
        )

    def _reap_later(self, remote: _Remote) -> None:
        """Stop what is left of the tree of a module whose worker died, in the background."""
        child = remote.child
        if child is None:
            return  # it never started, as far as the host knows
        if child.create_time is None or child.host is None:
            logger.warning(
                "run %s: its worker died and what it left running cannot be stopped: the "
                "worker did not report the start time of pid %d",
                remote.run.run_id,
                child.pid,
            )
            return
        # A run whose tree the host wanted killed at once (kill_now) gets no grace here either.
        grace = 0.0 if remote.kill_requested else remote.context.grace_period
        reaper = asyncio.create_task(self._reap(child, grace))
        # Its budget: the search, two tries' worth of stop (the last may start at the end).
        until = asyncio.get_running_loop().time() + _REAP_SECONDS + _REAP_TRY_SECONDS + 2 * grace
        self._reapers_until = max(self._reapers_until, until)
        self._reapers.add(reaper)
        reaper.add_done_callback(self._reapers.discard)

    async def _reap(self, child: _Child, grace: float = 0.0) -> None:
        """Have a live worker of the child's host run :func:`stop_orphaned_tree` for it; tried
        for ``_REAP_SECONDS``, each worker for ``_REAP_TRY_SECONDS`` plus the ``grace`` the
        stop may wait."""
        pid, host, create_time = child.pid, child.host, child.create_time
        assert host is not None and create_time is not None  # (checked by _reap_later)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _REAP_SECONDS + grace
        while loop.time() < deadline:
            client = self._client
            if client is None or client.status != "running":
                break
            try:
                live = await client.nthreads()
            except Exception as exc:
                logger.info("stopping the orphaned tree of pid %d failed: %s", pid, exc)
                live = {}
            # The dead worker's address last: it may still be listed for a moment (a try there
            # waits in vain), or be its restart by the nanny on a fixed port (which can stop it).
            here = sorted(
                (a for a in live if get_address_host(a) == host), key=lambda a: a == child.worker
            )
            for address in here:
                try:
                    answers = await asyncio.wait_for(
                        client.run(
                            stop_orphaned_tree,
                            pid,
                            create_time,
                            child.cookie,  # read now: its message may have come late
                            grace,
                            workers=[address],
                        ),
                        _REAP_TRY_SECONDS + grace,
                    )
                    check, stopped = answers[address]
                except Exception as exc:  # (TimeoutError included: try the next one)
                    logger.info(
                        "stopping the orphaned tree of pid %d on %s failed: %r", pid, address, exc
                    )
                    continue
                level = logging.WARNING if check == OrphanCheck.UNPROVEN.value else logging.INFO
                logger.log(
                    level,
                    "orphaned tree of pid %d on %s (stopped from %s): %s, %d process(es) stopped",
                    pid,
                    host,
                    address,
                    check,
                    stopped,
                )
                return
            await asyncio.sleep(0.5)
        logger.warning(
            "no live worker on %s to stop the orphaned tree of pid %d; it may still run",
            host,
            pid,
        )

    # -- closing ------------------------------------------------------------------------------
    async def aclose(self) -> None:
        """Stop the runs still executing here (they end CANCELLED), stop watching workers,
        release the events of runs withdrawn while queued, lost or stopped unconfirmed (see
        :meth:`_forget`), unsubscribe, and close the client if the backend made it. Idempotent.

        Cancellation: stops waiting; the client may be left open. Called inside an anyio scope
        that is already cancelled (a ``finally`` block after ``move_on_after``), the close runs
        in full, shielded from that scope; each of its waits is bounded (the runs' stop by
        ``cancel_timeout``, the releases and the client's close by their own timeouts).
        """
        if self._closed:
            return
        self._closed = True
        with shielded_if_cancelled():
            await self._aclose()

    async def _aclose(self) -> None:
        for remote in self._remotes.values():
            remote.cancel_requested = True
            remote.wake.set()
        await self._idle.wait()
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.wait({self._watcher})
        if self._chores:
            await asyncio.wait(self._chores)
        if self._reapers:
            # Each reaper ends within its own bounds (_REAP_SECONDS and its grace, plus one
            # try); what is still running then is given up (with a warning), not left behind.
            reapers = set(self._reapers)
            left = self._reapers_until - asyncio.get_running_loop().time()
            _, late = await asyncio.wait(reapers, timeout=max(0.0, left))
            for reaper in late:
                reaper.cancel()
            if late:
                logger.warning("%d orphan stop(s) did not end in time; given up", len(late))
                await asyncio.wait(late)
        client = self._client
        if self._held and client is not None and client.status == "running":
            try:
                async with asyncio.timeout(_RELEASE_SECONDS):
                    for name in self._held:
                        await Event(name, client=client).clear()
            except Exception as exc:
                logger.info("releasing the events of withdrawn or lost runs failed: %s", exc)
            self._held.clear()
        if client is not None and self._ready:
            try:
                client.unsubscribe_topic(self.topic)
            except Exception as exc:
                logger.info("unsubscribing from %s failed: %s", self.topic, exc)
        if client is not None and self._owns_client:
            await client.close()


def _gone(client: Any) -> bool:
    """Whether ``client`` closed (it does so by itself once the scheduler stayed away for
    ``distributed.comm.timeouts.connect``); a reconnecting one is still ``"connecting"``."""
    return getattr(client, "status", "running") in ("closing", "closed", "failed")


async def _outcome_of(future: Any) -> WorkerOutcome | BaseException:
    """The task's result, or the exception it ended with (as a value, so the host decides)."""
    try:
        result = await future
    except Exception as exc:
        return exc
    return result if isinstance(result, WorkerOutcome) else TypeError(repr(result))
