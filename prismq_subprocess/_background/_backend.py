"""Where a :class:`ModuleRunner` run executes: the :class:`RunBackend` seam.

A backend receives one validated module start (:class:`ModuleJob`, plain picklable data) and the
host's side of the run (:class:`RunContext`: where lines go, how the run is saved), executes the
module and leaves the :class:`Run` in its final state. The runner does everything else the same
way for every backend: validation, the registry, background tasks, cancellation requests, the
output capture. The default backend runs the module here, in a child process of this host
(:class:`LocalBackend`); ``prismq_subprocess.dask.DaskBackend`` runs it on a Dask cluster.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .._core._closing import AsyncResource
from .._core._exceptions import InvalidLimitError
from ._output_capture import OutputCapture
from ._run_record import Run

__all__ = ["ModuleJob", "RunBackend", "RunContext", "check_resources"]


def check_resources(
    resources: Mapping[str, float] | None, what: str = "resources"
) -> dict[str, float]:
    """Validate resource hints (``{"name": amount}``, amounts finite and > 0) and copy them.

    Raises:
        InvalidLimitError: not a mapping of non-empty str to a positive finite number.
    """
    if resources is None:
        return {}
    if not isinstance(resources, Mapping):
        raise InvalidLimitError(f"{what} must be a mapping of name to amount, got {resources!r}")
    checked: dict[str, float] = {}
    for name, amount in resources.items():
        if not isinstance(name, str) or not name:
            raise InvalidLimitError(f"{what}: names must be non-empty str, got {name!r}")
        if (
            isinstance(amount, bool)
            or not isinstance(amount, int | float)
            or not math.isfinite(amount)
            or amount <= 0
        ):
            raise InvalidLimitError(
                f"{what}[{name!r}] must be a positive finite number, got {amount!r}"
            )
        checked[name] = float(amount)
    return checked


@dataclass(frozen=True, slots=True)
class ModuleJob:
    """One validated start, as a backend receives it: a module or (``command``) any command.

    For a module, ``script`` is the absolute path the host validated; ``parameters`` are the
    JSON-ready parameters (turned into arguments by the same rule everywhere), followed by the
    raw ``args``. For a command, ``script`` is empty and ``command`` is the program and its
    arguments, or with ``shell`` the one command line (``parameters`` are then only recorded).
    ``env`` holds only the
    variables the caller passed (each backend adds them to the environment of the machine the
    child runs on, never the host's whole environment to another machine); ``resources`` are
    the run's resource hints (a cluster backend reserves them on a worker; the local backend
    does not use them: local admission is the task manager's ``ResourceManager``).
    """

    module_id: str
    module_name: str
    script: str
    parameters: dict[str, Any] = field(default_factory=dict)
    args: tuple[str, ...] = ()
    command: tuple[str, ...] = ()
    shell: bool = False
    cwd: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    timeout: float | None = None
    memory_limit_bytes: int | None = None
    resources: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RunContext:
    """The host's side of one run, lent by the runner to the backend executing it.

    Attributes:
        output: receives the run's lines as they arrive (``None``: only ``output_tail``).
        save: records the run's current state in the host's registry (never raises). It
            returns ``False`` when the registry refused the record because another process
            claimed the run (``claim_run``: a pick-up while it was PENDING here): the backend
            then stops what it started for the run, records nothing more, and :meth:`execute`
            raises :class:`RunClaimedError`.
        finish: records the run's final state: closes its output first (so a process that
            follows the run's log until the registry says it finished gets every line), then
            saves it (never raises).
        cancel_reason: the reason a stop was asked for this run, or ``None``.
        background: the run belongs to a task manager, which records a cancelled run itself.
        grace_period: seconds between SIGTERM and SIGKILL when the tree is stopped.
        sample_interval: seconds between process-tree samples.
        output_tail_lines: how many last lines ``Run.output_tail`` keeps.
    """

    output: OutputCapture | None
    save: Callable[[Run], Awaitable[bool | None]]
    finish: Callable[[Run], Awaitable[None]]
    cancel_reason: Callable[[], str | None]
    background: bool
    grace_period: float
    sample_interval: float
    output_tail_lines: int


class RunBackend(AsyncResource):
    """Executes module runs for a :class:`ModuleRunner` (see the module docstring).

    ``mode`` is what runs of this backend record in ``Run.mode``, or ``None`` to keep the
    runner's own (the local run mode).
    """

    mode: str | None = None

    @abc.abstractmethod
    async def execute(self, run: Run, job: ModuleJob, context: RunContext) -> Run:
        """Execute ``job`` for ``run`` (stored PENDING) and return it in its final state, saved.

        The run becomes RUNNING (with its pid) once its child started, and FAILED, COMPLETED,
        CANCELLED or INTERRUPTED with the same messages a local run would get. A failing module
        is not an exception.

        Cancellation: the child's tree is stopped and, for a foreground run
        (``context.background`` false), the run recorded CANCELLED; then ``CancelledError``
        propagates.

        Raises:
            RunClaimedError: ``context.save`` returned ``False`` (another process claimed the
                run); what was started for it has been stopped.
        """

    @abc.abstractmethod
    async def cancel(self, run_id: str) -> bool:
        """Ask this backend to stop ``run_id`` (queued or running); :meth:`execute` then ends
        it CANCELLED with ``context.cancel_reason()``. Returns ``False`` if the run is not
        executing here. Returns once the request is sent, not when the run ended."""

    def kill_now(self) -> None:
        """Kill the trees of the runs executing here at once, without waiting out the rest of
        their grace period: the host shutdown calls it once its own grace is over, after it
        cancelled the runs (:func:`stop_for_host_shutdown`). The runs still end through
        :meth:`execute`. Called from the runner's event loop or from any other thread; must
        return at once. The default does nothing: override it for runs whose processes the
        runner's wrapper does not hold."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release what the backend holds (connections, threads). Idempotent. The runner
        calls it after its runs ended."""
