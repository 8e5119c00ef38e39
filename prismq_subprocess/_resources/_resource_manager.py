"""ResourceManager: admission control for new work based on memory and CPU readings."""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

from .._core._durations import interval_seconds, timeout_seconds
from .._core._exceptions import (
    InvalidArgumentTypeError,
    InvalidLimitError,
    ResourceLimitException,
    ResourceWaitTimeoutError,
)
from .._core._validation import check_flag
from ._readings import (
    PsutilResourceReader,
    ResourceReader,
    ResourceSnapshot,
    check_percent,
    check_reader,
    check_snapshot,
    checked_reader,
    read_in_thread,
)

__all__ = [
    "LimitViolation",
    "ResourceCheck",
    "ResourceManager",
    "admission",
    "check_resource_manager",
]

logger = logging.getLogger(__name__)

LimitName = Literal["memory_percent", "cpu_percent", "available_bytes"]


@dataclass(frozen=True, slots=True)
class LimitViolation:
    """One limit a reading failed.

    Attributes:
        limit: which limit: ``"memory_percent"``, ``"cpu_percent"`` (maxima) or
            ``"available_bytes"`` (a minimum).
        threshold: the configured limit.
        actual: the reading.
        excess: how far past the limit, always positive: ``actual - threshold`` for maxima,
            ``threshold - actual`` for the minimum.
    """

    limit: LimitName
    threshold: float
    actual: float
    excess: float

    def describe(self) -> str:
        """A one-line human description, e.g. ``memory_percent 93.0 > 90.0 (by 3.0)``."""
        if self.limit == "available_bytes":
            return (
                f"available_bytes {self.actual:.0f} < {self.threshold:.0f} "
                f"(short by {self.excess:.0f})"
            )
        return f"{self.limit} {self.actual:.1f} > {self.threshold:.1f} (by {self.excess:.1f})"


@dataclass(frozen=True, slots=True)
class ResourceCheck:
    """The outcome of :meth:`ResourceManager.check_resources_detailed`.

    Attributes:
        ok: True when every limit is met.
        snapshot: the reading the decision was made on.
        violations: the limits that failed (empty when ``ok``).
    """

    ok: bool
    snapshot: ResourceSnapshot
    violations: tuple[LimitViolation, ...] = ()

    def __bool__(self) -> bool:
        return self.ok

    @property
    def reason(self) -> str:
        """The violations joined into one line; empty when ``ok``."""
        return "; ".join(v.describe() for v in self.violations)


class ResourceManager:
    """Decide whether there is room to start more work, from memory and CPU readings.

    A check is advisory, not a reservation: tasks admitted at the same moment all see the same
    free memory. Pair it with a concurrency limit (e.g. ``ConcurrentExecutor(max_concurrent=...)``).

    Args:
        max_memory_percent: refuse when system memory use is at or above this, in (0, 100].
        max_cpu_percent: refuse when system CPU use is at or above this; ``None`` (default)
            ignores CPU, which is spiky on busy hosts.
        min_available_bytes: refuse when less memory than this is available; ``None`` ignores it.
        reader: returns a :class:`ResourceSnapshot`; defaults to psutil (CPU measured only when
            ``max_cpu_percent`` is set). Called in a worker thread.
        poll_interval: seconds between readings while :meth:`admit` waits.

    Raises:
        InvalidLimitError: a percentage outside (0, 100] or a negative byte count.
        InvalidIntervalError: ``poll_interval`` is not a positive, finite duration.
        InvalidTaskError: ``reader`` is not callable.
    """

    def __init__(
        self,
        max_memory_percent: float = 90.0,
        max_cpu_percent: float | None = None,
        min_available_bytes: int | None = None,
        *,
        reader: ResourceReader | None = None,
        poll_interval: float | timedelta = 0.5,
    ) -> None:
        self.max_memory_percent = check_percent(max_memory_percent, "max_memory_percent")
        self.max_cpu_percent = (
            None if max_cpu_percent is None else check_percent(max_cpu_percent, "max_cpu_percent")
        )
        if min_available_bytes is not None and (
            isinstance(min_available_bytes, bool)
            or not isinstance(min_available_bytes, int | float)
            or not math.isfinite(min_available_bytes)
            or min_available_bytes < 0
        ):
            raise InvalidLimitError(
                "min_available_bytes must be a byte count >= 0 or None, "
                f"got {min_available_bytes!r}"
            )
        self.min_available_bytes = min_available_bytes
        self.poll_interval = interval_seconds(poll_interval, what="poll_interval")
        check_reader(reader)
        self._reader: ResourceReader = (
            checked_reader(reader)
            if reader is not None
            else PsutilResourceReader(
                measure_cpu=max_cpu_percent is not None, include_children=False
            )
        )
        self._warned_no_cpu = False

    def evaluate(self, snapshot: ResourceSnapshot) -> ResourceCheck:
        """Judge ``snapshot`` against the limits (pure; no reading is taken).

        Raises:
            InvalidReadingError: ``snapshot`` is not a :class:`ResourceSnapshot` of real
                numbers (a NaN would pass every limit).
        """
        check_snapshot(snapshot, "ResourceManager.evaluate()")
        violations: list[LimitViolation] = []
        if snapshot.memory_percent >= self.max_memory_percent:
            violations.append(
                LimitViolation(
                    "memory_percent",
                    self.max_memory_percent,
                    snapshot.memory_percent,
                    snapshot.memory_percent - self.max_memory_percent,
                )
            )
        cpu = snapshot.cpu_percent
        if self.max_cpu_percent is not None and cpu is None and not self._warned_no_cpu:
            # Said once: the limit is not checked while the readings carry no CPU figure (a
            # reader of the host's that leaves it out), and silence hid that.
            self._warned_no_cpu = True
            logger.warning(
                "max_cpu_percent=%s is not checked: the resource readings carry no "
                "cpu_percent (the reader leaves it out)",
                self.max_cpu_percent,
            )
        if self.max_cpu_percent is not None and cpu is not None and cpu >= self.max_cpu_percent:
            violations.append(
                LimitViolation("cpu_percent", self.max_cpu_percent, cpu, cpu - self.max_cpu_percent)
            )
        floor = self.min_available_bytes
        if floor is not None and snapshot.available_bytes < floor:
            violations.append(
                LimitViolation(
                    "available_bytes",
                    float(floor),
                    float(snapshot.available_bytes),
                    float(floor - snapshot.available_bytes),
                )
            )
        return ResourceCheck(not violations, snapshot, tuple(violations))

    async def check_resources_detailed(self) -> ResourceCheck:
        """Take a reading (in a worker thread) and say which limits, if any, it fails.

        Reader errors propagate. Cancelling abandons the wait; the short reading finishes in its
        thread and is dropped.
        """
        return self.evaluate(await read_in_thread(self._reader))

    async def check_resources(self) -> bool:
        """True when every limit is met now (see :meth:`check_resources_detailed`)."""
        return (await self.check_resources_detailed()).ok

    async def admit(
        self,
        *,
        wait: bool = True,
        timeout: float | timedelta | None = None,
    ) -> ResourceCheck:
        """Admission control: return once there is room to start, or raise.

        When resources are short the caller chooses what happens:

        - ``wait=False``: raise :class:`ResourceLimitException` at once;
        - ``wait=True`` (default): re-check every ``poll_interval`` seconds until the limits are
          met, for at most ``timeout`` seconds (``None``: as long as it takes), then raise
          :class:`ResourceWaitTimeoutError` (a ``ResourceLimitException`` and a ``TimeoutError``).

        ``timeout`` bounds the wait for room, which starts after the first reading: that one is
        always taken (``timeout=0`` checks once), however long the reader takes. To bound a
        reader that may hang, wrap the call in ``asyncio.timeout``: the reading is abandoned in
        its thread. Returns the passing :class:`ResourceCheck`. Nothing is held, so there is
        nothing to release. Cancelling while waiting just stops waiting. The reader's errors
        propagate as they are (its own ``TimeoutError`` included: only ``timeout`` elapsing is
        ``ResourceWaitTimeoutError``).

        Raises:
            ResourceLimitException: resources short and ``wait=False``.
            ResourceWaitTimeoutError: still short after ``timeout`` seconds.
            InvalidTimeoutError: ``timeout`` is negative or not a number.
            InvalidArgumentTypeError: ``wait`` is not a bool.
        """
        wait = check_flag(wait, "wait")  # ("no" would be true: waiting, not refusing)
        limit = timeout_seconds(timeout)
        check = await self.check_resources_detailed()
        if check.ok:
            return check
        if not wait:
            raise ResourceLimitException(f"not enough resources to start: {check.reason}")
        logger.info("waiting for resources: %s", check.reason)
        deadline = asyncio.timeout(limit)
        try:
            async with deadline:
                while True:
                    await asyncio.sleep(self.poll_interval)
                    check = await self.check_resources_detailed()
                    if check.ok:
                        return check
        except TimeoutError:
            if not deadline.expired():
                raise  # the reader's own (a host's metrics endpoint timing out, say)
            raise ResourceWaitTimeoutError(
                f"resources still short after waiting {limit} s: {check.reason}"
            ) from None


def check_resource_manager(value: object, owner: str) -> ResourceManager | None:
    """``value`` if it can serve as ``owner``'s admission control (a :class:`ResourceManager`,
    or anything with an ``admit()`` of its signature), or None.

    Raises:
        InvalidArgumentTypeError: anything else (it used to fail each later start instead,
            with a bare ``AttributeError``).
    """
    if value is None or isinstance(value, ResourceManager):
        return value
    if isinstance(value, type):
        # Its admit is a plain function: every start failed with a bare TypeError about self.
        raise InvalidArgumentTypeError(
            f"{owner}: resource_manager must be an instance (ResourceManager(...)), not the "
            f"class {value.__name__}"
        )
    if callable(getattr(value, "admit", None)):
        return value  # type: ignore[return-value]  # (a host's own admission control)
    raise InvalidArgumentTypeError(
        f"{owner}: resource_manager must be a ResourceManager (or have its admit()) or None, "
        f"got {value!r}"
    )


def admission(
    manager: ResourceManager, wait: bool, timeout: float | timedelta | None
) -> Awaitable[ResourceCheck]:
    """``manager.admit(wait=wait, timeout=timeout)``, checked to be awaitable (a host's own
    admission control whose ``admit()`` is synchronous failed each start with asyncio's bare
    ``TypeError``).

    Raises:
        InvalidArgumentTypeError: ``admit()`` returned something that cannot be awaited.
    """
    pending = manager.admit(wait=wait, timeout=timeout)
    if not inspect.isawaitable(pending):
        raise InvalidArgumentTypeError(
            f"resource_manager.admit() must be asynchronous (awaitable), got "
            f"{type(pending).__name__} from {type(manager).__name__}.admit()"
        )
    return pending
