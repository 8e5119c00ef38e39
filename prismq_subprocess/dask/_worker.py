"""What runs on a Dask worker for one module run: :func:`run_module_on_worker`.

The module runs inside our own :class:`ModuleRunner`, in an event loop of the task's own thread,
so everything a local run guarantees holds on the worker too: the child in its own process group,
its whole tree stopped on timeout, memory limit and cancel, bounded output, the same statuses and
messages. Around it:

- the child's start (pid, mode) and its lines go to the host over the backend's event topic
  (see ``_channel.py``);
- a thread waits on the run's cancel ``distributed.Event`` (Dask cannot interrupt a running task)
  and cancels the module, which stops the child's tree and records the run CANCELLED; it does
  the same when the scheduler drops the task (the host's client went away);
- the run's "started" ``distributed.Event`` makes a retry (Dask re-runs the tasks of a worker
  that died) refuse to run the module a second time, unless the host allowed it;
- a worker plugin stops the modules still running when the worker closes (the cluster shut
  down, the worker retired): each child leads its own session, so nothing else would.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

import psutil
from distributed import Event, WorkerPlugin, get_client, get_worker
from distributed.comm.addressing import get_address_host
from distributed.core import Status
from distributed.utils import sync

from .._background._backend import ModuleJob
from .._background._memory_registry import RunRegistry
from .._background._module_runner import ModuleRunner
from .._background._run_record import Run, RunStatus
from .._background._start_options import StartOptions
from .._core._exceptions import PrismQError
from .._platform import platform_ops
from .._platform._orphans import OrphanCheck, ProcessIdentity, stop_orphans
from .._platform._start_time import same_start
from ._channel import CHILD, END, STARTED, ForwardedOutput, Message, OutputForwarder

__all__ = [
    "CANCELLED_BEFORE_START",
    "FINISHED",
    "NOT_RETRIED",
    "REFUSED",
    "WorkerJob",
    "WorkerOutcome",
    "run_module_on_worker",
    "stop_orphaned_tree",
]

logger = logging.getLogger(__name__)

FINISHED: Final = "finished"
"""Outcome: the module ran; ``run`` holds the worker's final record of it."""
CANCELLED_BEFORE_START: Final = "cancelled-before-start"
"""Outcome: the cancel event was already set when the task started; nothing ran."""
NOT_RETRIED: Final = "not-retried"
"""Outcome: an earlier attempt started the module on a worker that died; nothing ran again."""
REFUSED: Final = "refused"
"""Outcome: this worker refused the start before anything ran (e.g. the script is missing
here); ``detail`` says why."""


@dataclass(frozen=True, slots=True)
class WorkerJob:
    """Everything a worker needs for one run (pickled into the Dask task). ``execution``
    tells this execution of the run from earlier ones with the same run id (see
    ``_channel.py``); ``max_line_bytes`` is the host capture's (see :class:`ForwardedOutput`).
    """

    run_id: str
    execution: int
    job: ModuleJob
    topic: str
    cancel_event: str
    kill_event: str
    started_event: str
    run_mode: str | None
    grace_period: float
    sample_interval: float
    output_tail_lines: int
    rerun_after_worker_loss: bool
    cancel_poll: float
    orphan_timeout: float
    queue_lines: int
    max_line_bytes: int
    max_batch_lines: int
    max_batch_chars: int
    flush_interval: float


@dataclass(frozen=True, slots=True)
class WorkerOutcome:
    """What the task returns to the host: the outcome kind, the worker's address and, for a
    module that ran, the worker's final :meth:`Run.to_dict` and how many lines it printed."""

    kind: str
    worker: str
    run: dict[str, Any] | None = None
    detail: str | None = None
    lines: int = 0
    dropped: int = 0


class _StartReporter(RunRegistry):
    """The worker's run registry: calls ``on_start`` once, when the run is saved RUNNING with
    its child's pid (which the runner does right after spawning it), then ``on_child`` with
    the child's identity once the runner records it (pid, start time, containment cookie)."""

    def __init__(
        self, on_start: Callable[[Run], None], on_child: Callable[[ProcessIdentity], None]
    ) -> None:
        super().__init__()
        self._on_start = on_start
        self._on_child = on_child
        self._reported = False

    async def update_run(self, run: Run) -> None:
        await super().update_run(run)
        if not self._reported and run.status is RunStatus.RUNNING and run.pid is not None:
            self._reported = True
            self._on_start(run)

    async def record_child(self, run_id: str, identity: ProcessIdentity) -> bool:
        kept = await super().record_child(run_id, identity)
        self._on_child(identity)
        return kept


class _CancelWatch:
    """Waits on the run's cancel event in a thread of its own (each wait is one long poll on the
    scheduler, ``poll`` seconds at most) and cancels the module's task once it is set, or once
    ``dropped()`` says the scheduler released the task (the host's client left, or the task was
    cancelled), or once the scheduler stayed unreachable for ``orphan_timeout`` seconds: in
    each case nobody can follow the run any more. After that it waits on the run's kill event,
    which the host sets when the tree must die before its grace period is over.

    :meth:`stop` ends a poll in progress at once, unless ``closing()`` (it sets the event polled,
    waits for the poll's answer, and clears the event again), so the task's result is not held
    back by the poll and nothing of the run is left waiting on the scheduler once its task
    returned: a scheduler closed right after (a ``LocalCluster`` leaving its ``with`` block)
    would log the cancelled wait as an ERROR traceback.
    """

    def __init__(
        self,
        event: Any,
        kill_event: Any,
        poll: float,
        dropped: Callable[[], bool],
        orphan_timeout: float,
        closing: Callable[[], bool],
    ) -> None:
        self._event = event
        self._kill_event = kill_event
        self._poll = poll
        self._dropped = dropped
        self._orphan_timeout = orphan_timeout
        self._closing = closing
        self._lock = threading.Lock()
        self._target: (
            tuple[asyncio.AbstractEventLoop, asyncio.Task[Any], Callable[[], None]] | None
        ) = None
        self._fired = False
        self._killed = False
        # The event of the poll in progress, if any; None while not polling. Guarded by _lock
        # together with _stopped, so no poll starts once stop() looked for one to end.
        self._polling: Any = None
        # False from a failed poll to the next answered one: stop() then sends nothing.
        self._reachable = True
        self._stopped = threading.Event()
        self._ended = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="prismq-cancel-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def attach(self, task: asyncio.Task[Any], kill: Callable[[], None]) -> None:
        """Cancel ``task`` when the cancel event is set, and call ``kill`` when the kill event
        is (each at once if that happened already). Call it from the task's event loop."""
        with self._lock:
            self._target = (asyncio.get_running_loop(), task, kill)
            fired, killed = self._fired, self._killed
        if fired:
            task.cancel()
        if killed:
            kill()

    def fire(self) -> None:
        """Cancel the module's task (from any thread; once: a second cancel would cut its
        tree's graceful stop short)."""
        with self._lock:
            first, self._fired = not self._fired, True
            target = self._target
        if first and target is not None:
            self._on_loop(target[0], target[1].cancel)

    def kill(self) -> None:
        """Kill the module's tree at once (from any thread; after :meth:`fire`)."""
        with self._lock:
            first, self._killed = not self._killed, True
            target = self._target
        if first and target is not None:
            self._on_loop(target[0], target[2])

    @staticmethod
    def _on_loop(loop: asyncio.AbstractEventLoop, call: Callable[[], object]) -> None:
        # A closed loop (RuntimeError) means the module already ended.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(call)

    def _poll_on(self, event: Any) -> bool | None:
        """One long poll on ``event``: whether it is set; ``None`` (and no poll) once the run
        ended. Raises what the poll raises (the scheduler is unreachable)."""
        with self._lock:
            if self._stopped.is_set():
                return None
            self._polling = event
        try:
            answer = bool(event.wait(timeout=self._poll))
        except Exception:
            self._reachable = False
            raise
        finally:
            with self._lock:
                self._polling = None
        self._reachable = True
        # Set by stop() to end this poll: the run ended, there is nothing to stop.
        return None if self._stopped.is_set() else answer

    def _watch(self) -> None:
        unreachable_since: float | None = None
        while True:
            try:
                cancelled = self._poll_on(self._event)
                if cancelled is None:
                    return
                if cancelled or self._dropped():
                    break
                unreachable_since = None
            except Exception as exc:
                if self._stopped.is_set():
                    return  # the run ended; the worker may be closing its connections
                now = time.monotonic()
                if unreachable_since is None:
                    unreachable_since = now
                    logger.warning(
                        "the scheduler is unreachable (%s); the module is stopped if it stays"
                        " so for %g s",
                        exc,
                        self._orphan_timeout,
                    )
                elif now - unreachable_since >= self._orphan_timeout or self._dropped():
                    logger.warning("the scheduler stayed unreachable: stopping the module")
                    break
                self._stopped.wait(self._poll)
        self.fire()
        while True:
            try:
                killed = self._poll_on(self._kill_event)
                if killed is None:
                    return
                if killed:
                    self.kill()
                    return
            except Exception:
                # Unreachable, or the run ended meanwhile: the stop goes on with its grace.
                if self._stopped.is_set():
                    return
                self._stopped.wait(self._poll)

    def stop(self) -> None:
        """The run ended: end the watch, and its poll in progress at once (see the class).

        Setting the polled event answers the poll now rather than up to ``poll`` seconds
        later; the run's task is over, so nothing here acts on it, and clearing the event
        afterwards leaves nothing of it on the scheduler (the host releases the events it set
        itself once it has the run's result)."""
        try:
            with self._lock:
                self._stopped.set()
                polling = self._polling
            if polling is None or not self._reachable or self._closing():
                # Not polling, or polling a scheduler that does not answer (that poll fails by
                # itself, and a set would only wait for the same scheduler), or on a closing
                # worker: the scheduler may have removed it while it lived and Dask may run the
                # task again elsewhere (retry_on_worker_loss), whose watch polls the same events.
                return
            try:
                polling.set()
            except Exception as exc:
                logger.debug("could not end the cancel watch's poll: %s", exc)
                return
            try:
                self._thread.join(self._poll + _STOP_ANSWER_SECONDS)
            finally:
                try:
                    polling.clear()
                except Exception as exc:
                    logger.debug("could not release the cancel watch's event: %s", exc)
        finally:
            self._ended.set()

    @property
    def ended(self) -> bool:
        """Whether the run's task is over (:meth:`stop` returned)."""
        return self._ended.is_set()


# What stop() waits, beyond one poll, for the answer to the poll it ended.
_STOP_ANSWER_SECONDS: Final = 2.0
_CLOSE_PLUGIN: Final = "prismq-stop-runs-on-close"
# What a closing worker still waits for the runs it killed after their grace period.
_KILLED_SECONDS: Final = 2.0
_CLOSING: Final = (Status.closing, Status.closing_gracefully, Status.closed, Status.failed)
_running_lock = threading.Lock()
# Worker id -> the watch of each run it executes -> the run's grace period.
_running: dict[str, dict[_CancelWatch, float]] = {}


class _StopRunsOnClose(WorkerPlugin):
    """Stops the modules a worker runs when the worker closes, as a cancel from the host
    would (SIGTERM, the run's grace period, SIGKILL), and waits for them; what still runs after
    the grace period is killed. Whoever closes the worker may end its process sooner (a nanny
    gives it 80 % of its own close timeout: 4 s by default, 8 s when ``dask worker`` gets
    SIGTERM); the children then have had their SIGTERM at least.

    Dask calls ``teardown`` when the worker closes and also when the plugin is replaced (the
    runs then go on, tracked by the plugin that replaces it): only a closing worker stops them.
    """

    async def teardown(self, worker: Any) -> None:
        if worker.status not in _CLOSING:
            return
        with _running_lock:
            runs = dict(_running.get(worker.id, {}))
        if not runs:
            return
        logger.warning("the worker is closing: stopping the %d modules it runs", len(runs))
        for watch in runs:
            watch.fire()
        if await _ended(runs, max(runs.values())):
            return
        for watch in runs:
            watch.kill()
        await _ended(runs, _KILLED_SECONDS)


async def _ended(watches: Iterable[_CancelWatch], seconds: float) -> bool:
    """Whether every run of ``watches`` ended within ``seconds`` (their tasks run in other
    threads, which signal nothing to this loop)."""
    try:
        async with asyncio.timeout(seconds):
            while not all(watch.ended for watch in watches):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    except TimeoutError:
        return False
    return True


def _track(worker: Any, watch: _CancelWatch, grace: float) -> None:
    """Have ``watch``'s run stopped if ``worker`` closes while it runs."""
    with _running_lock:
        _running.setdefault(worker.id, {})[watch] = grace
        installed = isinstance(worker.plugins.get(_CLOSE_PLUGIN), _StopRunsOnClose)
    if not installed:
        try:
            sync(worker.loop, worker.plugin_add, _StopRunsOnClose(), name=_CLOSE_PLUGIN)
        except Exception as exc:
            logger.warning("modules of this worker may outlive it (no close hook): %s", exc)


def _untrack(worker: Any, watch: _CancelWatch) -> None:
    with _running_lock:
        runs = _running.get(worker.id, {})
        runs.pop(watch, None)
        if not runs:
            _running.pop(worker.id, None)


def _task_dropped(worker: Any, key: Any) -> bool:
    """True once the scheduler released this worker's task ``key`` (e.g. its client left)."""
    try:
        task = worker.state.tasks.get(key)
    except AttributeError:
        return False  # a worker without this state: the cancel event alone stops the run
    return task is None or task.state in ("cancelled", "released", "forgotten")


def _started_message(forwarder: OutputForwarder, worker_address: str, run: Run) -> Message:
    try:
        create_time: float | None = psutil.Process(run.pid).create_time()
    except (psutil.Error, ValueError):
        create_time = None  # already gone: the CHILD message brings what a stop needs
    return forwarder.message(
        STARTED,
        pid=run.pid,
        mode=run.mode,
        create_time=create_time,
        worker=worker_address,
        host=get_address_host(worker_address),
    )


async def _start(runner: ModuleRunner, spec: WorkerJob) -> Run:
    """Run the job's module (or command) to its end with ``runner``, as the host would."""
    job = spec.job
    options = StartOptions(
        timeout=job.timeout, memory_limit_bytes=job.memory_limit_bytes, cwd=job.cwd, env=job.env
    )
    if job.command:
        return await runner.execute_command(
            job.module_id,
            job.module_name,
            job.command[0] if job.shell else list(job.command),
            job.parameters,
            run_id=spec.run_id,
            shell=job.shell,
            **options,
        )
    return await runner.execute_module(
        job.module_id,
        job.module_name,
        job.script,
        job.parameters,
        run_id=spec.run_id,
        args=list(job.args),
        **options,
    )


async def _execute(spec: WorkerJob, address: str, watch: _CancelWatch) -> WorkerOutcome:
    send = functools.partial(get_worker().log_event, spec.topic)
    # The run's ring here is what the worker buffers for the host (the forwarder is its only
    # reader).
    capture = ForwardedOutput(spec.queue_lines, spec.max_line_bytes)
    capture.open_run(spec.run_id)
    forwarder = OutputForwarder(
        capture.subscribe(spec.run_id),
        send,
        {"run": spec.run_id, "execution": spec.execution, "attempt": uuid.uuid4().hex},
        max_batch_lines=spec.max_batch_lines,
        max_batch_chars=spec.max_batch_chars,
        flush_interval=spec.flush_interval,
    )
    registry = _StartReporter(
        lambda run: send(_started_message(forwarder, address, run)),
        lambda child: send(
            forwarder.message(
                CHILD, pid=child.pid, create_time=child.started_at, cookie=child.cookie
            )
        ),
    )
    forwarding = asyncio.create_task(forwarder.run())
    runner = ModuleRunner(
        registry,
        run_mode=spec.run_mode,
        output=capture,
        grace_period=spec.grace_period,
        output_tail_lines=spec.output_tail_lines,
        sample_interval=spec.sample_interval,
    )
    run: Run | None = None
    total = 0
    try:
        module = asyncio.create_task(_start(runner, spec))
        # The runner's host-shutdown kill: the whole tree of its run, at once.
        watch.attach(module, runner._host_kill)
        try:
            run = await module
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
            # The cancel event stopped it: the runner recorded the run CANCELLED.
            run = await registry.get_run(spec.run_id)
        except PrismQError as exc:
            return WorkerOutcome(REFUSED, address, detail=f"{type(exc).__name__}: {exc}")
    finally:
        try:
            await runner.aclose()
        finally:
            await capture.close_run(spec.run_id)  # ends the forwarder's subscription
            total = capture.line_count(spec.run_id)
            forwarder.finish()
            await forwarding
            await capture.aclose()
    if run is None:
        # Cancelled before the run was even stored here: nothing started.
        return WorkerOutcome(CANCELLED_BEFORE_START, address)
    send(forwarder.message(END, lines=total))
    return WorkerOutcome(
        FINISHED, address, run=run.to_dict(), lines=total, dropped=forwarder.dropped
    )


def run_module_on_worker(spec: WorkerJob) -> WorkerOutcome:
    """The Dask task of one run: run the module on this worker and return its outcome.

    Runs in one of the worker's task threads, with an event loop of its own (the worker's loop
    keeps serving the scheduler meanwhile).
    """
    worker = get_worker()
    client = get_client()
    cancel = Event(spec.cancel_event, client=client)
    kill = Event(spec.kill_event, client=client)
    started = Event(spec.started_event, client=client)
    if cancel.is_set():
        return WorkerOutcome(CANCELLED_BEFORE_START, worker.address)
    if started.is_set() and not spec.rerun_after_worker_loss:
        return WorkerOutcome(NOT_RETRIED, worker.address)
    started.set()
    key = worker.get_current_task()
    watch = _CancelWatch(
        cancel,
        kill,
        spec.cancel_poll,
        lambda: _task_dropped(worker, key),
        spec.orphan_timeout,
        closing=lambda: worker.status in _CLOSING,
    )
    _track(worker, watch, spec.grace_period)
    watch.start()
    try:
        return asyncio.run(_execute(spec, worker.address, watch))
    finally:
        watch.stop()
        _untrack(worker, watch)


async def stop_orphaned_tree(
    pid: int, create_time: float, cookie: str | None = None, grace: float = 0.0
) -> tuple[str, int]:
    """Stop what is left of a module's process tree after its worker died (run on a live
    worker of the same host, through ``Client.run``; the work is done in a thread, not on the
    worker's event loop). Returns what was found at ``pid`` (an :class:`OrphanCheck` value)
    and how many processes were signalled.

    With the run's containment ``cookie`` (``"PRISMQ_RUN_<token>=<n>"``): the tree of the
    child if ``pid`` is still it (same start, the cookie in its environment), else, if the
    child is gone, every process still holding the cookie and everything below them (a module
    that printed died of its broken pipe when its worker died; its children run on). SIGTERM,
    up to ``grace`` seconds, then SIGKILL. A reused pid is never touched. Without a cookie
    (containment off), or where the child's cookie cannot be read (a program that sets its
    process title overwrites its environment), only a child still running at ``pid`` with the
    recorded start is proof: its tree is killed; once it is gone nothing can be proven ours.
    """
    return await asyncio.to_thread(_stop_orphaned_tree, pid, create_time, cookie, grace)


def _stop_orphaned_tree(
    pid: int, create_time: float, cookie: str | None, grace: float
) -> tuple[str, int]:
    if cookie is not None:
        stop = stop_orphans([ProcessIdentity(pid, create_time, cookie)], grace)[0]
        if stop.check is not OrphanCheck.UNPROVEN:
            return stop.check.value, stop.stopped
        # The start matches but the cookie cannot be read: a program that sets its process
        # title (setproctitle) writes over the environment's memory. As without a cookie, the
        # start time alone is the proof, as it was before cookies were sent.
    try:
        leader = psutil.Process(pid)
        if not same_start(leader.create_time(), create_time):
            return OrphanCheck.REUSED.value, 0
    except psutil.Error:
        return OrphanCheck.GONE.value, 0
    ops = platform_ops()
    descendants = ops.snapshot_descendants(pid)
    # The child leads its own process group (a new session on POSIX): the group kill also
    # reaches descendants that were reparented away from it.
    ops.kill_tree(pid, ops.leads_own_group(pid), descendants)
    with contextlib.suppress(psutil.Error):
        leader.kill()
    victims = [leader, *descendants]
    psutil.wait_procs(victims, timeout=5)
    return OrphanCheck.VERIFIED.value, len(victims)
