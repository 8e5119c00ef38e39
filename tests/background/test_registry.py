"""Behaviour tests of the run registry interface, run against every store through one fixture."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from prismq_subprocess._background._memory_registry import BaseRunRegistry, RunRegistry
from prismq_subprocess._background._run_checks import MAX_PARAMETER_DEPTH
from prismq_subprocess._background._run_record import Run, RunOwner, RunStatus
from prismq_subprocess._background._sqlite_registry import SQLiteRunRegistry
from prismq_subprocess._core._exceptions import (
    DuplicateRunError,
    InvalidArgumentTypeError,
    InvalidIntervalError,
    InvalidParametersError,
    InvalidQueryError,
    InvalidRunError,
    InvalidRunIdError,
    InvalidTimeoutError,
    PrismQError,
    RegistryClosedError,
    RunClaimedError,
    RunNotFoundError,
    RunStateError,
)
from prismq_subprocess._platform._orphans import ProcessIdentity

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def make_store(kind: str, tmp_path: Path, **kwargs: object) -> BaseRunRegistry:
    if kind == "memory":
        return RunRegistry(**kwargs)  # type: ignore[arg-type]
    return SQLiteRunRegistry(tmp_path / "runs.db", **kwargs)  # type: ignore[arg-type]


@pytest.fixture(params=["memory", "sqlite"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def registry(kind: str, tmp_path: Path) -> AsyncIterator[BaseRunRegistry]:
    async with make_store(kind, tmp_path) as store:
        yield store


def at(minutes: int) -> datetime:
    return T0 + timedelta(minutes=minutes)


def finished(module_id: str, minute: int, status: RunStatus = RunStatus.COMPLETED) -> Run:
    run = Run(module_id=module_id, created_at=at(minute))
    run.mark_running()
    if status is RunStatus.COMPLETED:
        run.mark_completed(0)
    else:
        run.mark_failed("boom", exit_code=1)
    return run


async def test_add_get_update_round_trip(registry: BaseRunRegistry) -> None:
    run = Run(module_id="m1", module_name="Module 1", parameters={"n": 3, "tags": ["a", "b"]})
    await registry.add_run(run)
    assert run.owner == RunOwner.current()
    stored = await registry.get_run(run.run_id)
    assert stored == run
    run.mark_running(pid=42)
    run.output_tail = ["line 1", "line 2"]
    run.peak_rss_bytes = 1024
    run.cpu_time_seconds = 0.25
    await registry.update_run(run)
    stored = await registry.get_run(run.run_id)
    assert stored == run
    assert stored is not None and stored.status is RunStatus.RUNNING and stored.pid == 42
    assert await registry.get_run("nope") is None


async def test_returned_runs_are_copies(registry: BaseRunRegistry) -> None:
    run = Run(parameters={"k": [1]})
    await registry.add_run(run)
    run.parameters["k"].append(2)  # the caller's object is not the stored one
    got = await registry.get_run(run.run_id)
    assert got is not None and got.parameters == {"k": [1]}
    got.parameters["k"].append(3)
    got.mark_running()
    listed = await registry.list_runs()
    assert listed[0].parameters == {"k": [1]} and listed[0].status is RunStatus.PENDING
    listed[0].output_tail.append("x")
    again = await registry.get_run(run.run_id)
    assert again is not None and again.output_tail == [] and again.status is RunStatus.PENDING


async def test_returned_runs_never_share_their_lists(registry: BaseRunRegistry) -> None:
    # Runs stored with no output tail (the usual case) hand out a fresh list each time.
    first, second = Run(), Run()
    await registry.add_run(first)
    await registry.add_run(second)
    got = await registry.get_run(first.run_id)
    assert got is not None
    got.output_tail.append("mine")
    for listed in await registry.list_runs():
        assert listed.output_tail == []
        listed.output_tail.append("also mine")
    first.mark_running()
    await registry.update_run(first)
    first.output_tail.append("the caller's")
    for run_id in (first.run_id, second.run_id):
        again = await registry.get_run(run_id)
        assert again is not None and again.output_tail == []
    first.output_tail = ["saved"]
    await registry.update_run(first)
    first.output_tail.append("not saved")
    again = await registry.get_run(first.run_id)
    assert again is not None and again.output_tail == ["saved"]


async def test_every_field_survives_each_write(registry: BaseRunRegistry) -> None:
    started = datetime(2024, 1, 1, 12, tzinfo=UTC)
    run = Run(
        module_id="m",
        module_name="Module",
        parameters={"a": [1]},
        created_at=started - timedelta(seconds=1),
        mode="threaded",
        owner=RunOwner("host", 42, 1.0),
        worker="tcp://worker:1",
    )
    await registry.add_run(run)
    assert await registry.get_run(run.run_id) == run
    run.mark_running(pid=7)
    run.parameters = {"b": {"c": 2}}
    run.output_tail = ["x"]
    run.peak_rss_bytes = 1024
    run.cpu_time_seconds = 0.5
    await registry.update_run(run)
    assert await registry.get_run(run.run_id) == run
    run.mark_failed("boom", exit_code=3)
    run.module_name = "Renamed"
    await registry.update_run(run)
    assert await registry.get_run(run.run_id) == run


class _NoCopies:
    def __deepcopy__(self, memo: object) -> object:
        raise TypeError("cannot be copied")


async def test_a_failed_memory_write_leaves_the_stored_run_alone() -> None:
    registry = RunRegistry()
    run = Run(parameters={"k": 1})
    await registry.add_run(run)
    run.mark_running(pid=5)
    run.parameters = {"k": _NoCopies()}
    # (Refused before the copy now: no registry file could store it.)
    with pytest.raises((TypeError, InvalidParametersError)):
        await registry.update_run(run)
    stored = await registry.get_run(run.run_id)
    assert stored is not None and stored.status is RunStatus.PENDING
    assert stored.parameters == {"k": 1} and stored.pid is None
    with pytest.raises((TypeError, InvalidParametersError)):
        await registry.add_run(Run(parameters={"k": _NoCopies()}))
    assert await registry.count_runs() == 1


async def test_bad_input_raises_clear_errors(registry: BaseRunRegistry) -> None:
    run = Run()
    await registry.add_run(run)
    with pytest.raises(DuplicateRunError):
        await registry.add_run(Run(run_id=run.run_id))
    with pytest.raises(RunNotFoundError) as info:
        await registry.update_run(Run(run_id="missing"))
    assert isinstance(info.value, PrismQError) and isinstance(info.value, KeyError)
    assert "missing" in str(info.value)
    for kwargs in ({"limit": -1}, {"offset": -1}, {"limit": 1.5}):
        with pytest.raises(InvalidQueryError):
            await registry.list_runs(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(InvalidQueryError):
        await registry.delete_older_than(timedelta(seconds=-1))
    with pytest.raises(InvalidQueryError):
        await registry.delete_older_than(datetime(2024, 1, 1))
    assert await registry.count_runs() == 1


async def test_queries_agree_between_registries_on_odd_input(registry: BaseRunRegistry) -> None:
    # An adversary's find: SQLite raised OverflowError for a huge offset (a web API's query
    # string: the example app answered 500) and ValueError for an unknown status, while the
    # memory registry answered [] / 0. Both now read huge numbers as "no more" / "no limit"
    # and refuse an unknown status or a non-str module_id with InvalidQueryError.
    run = Run(module_id="m")
    await registry.add_run(run)
    assert await registry.list_runs(offset=2**63) == []
    assert await registry.list_runs(offset=10**30) == []
    assert [r.run_id for r in await registry.list_runs(limit=2**64)] == [run.run_id]
    assert [r.run_id for r in await registry.list_runs(status="pending")] == [run.run_id]  # type: ignore[arg-type]
    assert await registry.count_runs(status=RunStatus.PENDING) == 1
    for call in (registry.list_runs, registry.count_runs):
        with pytest.raises(InvalidQueryError, match="status"):
            await call(status="bogus")  # type: ignore[arg-type]
        with pytest.raises(InvalidQueryError, match="status"):
            await call(status=3)  # type: ignore[arg-type]
        with pytest.raises(InvalidQueryError, match="module_id"):
            await call(module_id=7)  # type: ignore[arg-type]


async def test_list_newest_first_filters_and_paging(registry: BaseRunRegistry) -> None:
    runs = [Run(module_id=f"m{i % 2}", created_at=at(i)) for i in range(7)]
    for run in reversed(runs):  # insertion order must not matter
        await registry.add_run(run)
    ids = [r.run_id for r in await registry.list_runs()]
    assert ids == [r.run_id for r in reversed(runs)]
    page = await registry.list_runs(limit=2, offset=1)
    assert [r.run_id for r in page] == [runs[5].run_id, runs[4].run_id]
    assert await registry.list_runs(limit=0) == []
    assert await registry.list_runs(offset=100) == []
    m1 = await registry.list_runs(module_id="m1")
    assert [r.run_id for r in m1] == [runs[5].run_id, runs[3].run_id, runs[1].run_id]
    assert await registry.count_runs() == 7
    assert await registry.count_runs(module_id="m0") == 4

    runs[2].mark_running()
    await registry.update_run(runs[2])
    running = await registry.list_runs(status=RunStatus.RUNNING)
    assert [r.run_id for r in running] == [runs[2].run_id]
    assert await registry.count_runs(status=RunStatus.PENDING, module_id="m0") == 3
    assert await registry.count_runs(status=RunStatus.RUNNING, module_id="m1") == 0


async def test_equal_created_at_newest_added_first(registry: BaseRunRegistry) -> None:
    same = [Run(created_at=T0) for _ in range(3)]
    for run in same:
        await registry.add_run(run)
    assert [r.run_id for r in await registry.list_runs()] == [r.run_id for r in reversed(same)]


async def test_delete_older_than_keeps_unfinished(registry: BaseRunRegistry) -> None:
    old_done = finished("m", 0)
    old_failed = finished("m", 1, RunStatus.FAILED)
    old_running = Run(created_at=at(0))
    old_running.mark_running()
    recent = Run()
    for run in (old_done, old_failed, old_running, recent):
        await registry.add_run(run)
    assert await registry.delete_older_than(datetime(2000, 1, 1, tzinfo=UTC)) == 0
    # The finished runs finished "now" (mark_* stamps real time), so an age cutoff keeps them.
    assert await registry.delete_older_than(timedelta(hours=1)) == 0
    assert await registry.delete_older_than(timedelta(0)) == 2
    left = {r.run_id for r in await registry.list_runs()}
    assert left == {old_running.run_id, recent.run_id}


async def test_delete_uses_finish_time(registry: BaseRunRegistry) -> None:
    long_run = Run(created_at=at(0))
    long_run.mark_running()
    long_run.mark_completed()
    long_run.finished_at = at(100)
    await registry.add_run(long_run)
    assert await registry.delete_older_than(at(50)) == 0
    assert await registry.delete_older_than(at(101)) == 1


async def test_max_runs_keeps_newest_finished(kind: str, tmp_path: Path) -> None:
    async with make_store(kind, tmp_path, max_runs=3) as store:
        active = Run(created_at=at(-10))
        await store.add_run(active)
        done = [finished("m", i) for i in range(6)]
        for run in done:
            await store.add_run(run)
        left = await store.list_runs()
        assert [r.run_id for r in left] == [r.run_id for r in reversed(done[3:])] + [active.run_id]
        assert await store.apply_retention() == 0


async def test_max_age_on_add_and_on_demand(kind: str, tmp_path: Path) -> None:
    async with make_store(kind, tmp_path, max_age=timedelta(days=1)) as store:
        old = finished("m", 0)
        old.finished_at = datetime(2000, 1, 1, tzinfo=UTC)
        await store.add_run(old)  # retention runs right after the insert
        assert await store.get_run(old.run_id) is None
        keep = finished("m", 1)
        await store.add_run(keep)
        keep.finished_at = datetime(2000, 1, 2, tzinfo=UTC)
        await store.update_run(keep)
        assert await store.count_runs() == 1
        assert await store.apply_retention() == 1
        assert await store.count_runs() == 0


@pytest.mark.parametrize("forever", [timedelta.max, timedelta(days=10**6)])
async def test_an_age_older_than_any_date_keeps_everything(
    kind: str, tmp_path: Path, forever: timedelta
) -> None:
    # A probe's find: ``max_age=timedelta.max`` ("keep for ever") was accepted, then every
    # add_run failed (SQLite: InvalidRunError about 64-bit integers, nothing stored; memory:
    # a bare OverflowError, the run stored all the same), as did delete_older_than(it).
    async with make_store(kind, tmp_path, max_age=forever) as store:
        old = finished("m", 0)
        old.finished_at = datetime(1, 1, 2, tzinfo=UTC)
        await store.add_run(old)
        assert await store.get_run(old.run_id) is not None
        assert await store.apply_retention() == 0
        assert await store.delete_older_than(forever) == 0
        assert await store.count_runs() == 1


@pytest.mark.parametrize("bad", [{"max_runs": 0}, {"max_runs": -1}, {"max_age": timedelta(0)}])
def test_bad_retention_settings(kind: str, tmp_path: Path, bad: dict[str, object]) -> None:
    with pytest.raises(InvalidQueryError):
        make_store(kind, tmp_path, **bad)


async def test_closed_registry_refuses_use(kind: str, tmp_path: Path) -> None:
    store = make_store(kind, tmp_path)
    async with store:
        await store.add_run(Run())
    await store.close()  # idempotent
    assert store.closed
    with pytest.raises(RegistryClosedError):
        await store.list_runs()
    with pytest.raises(RegistryClosedError):
        await store.add_run(Run())
    with pytest.raises(RegistryClosedError):
        await store.open()


async def test_many_concurrent_writers(registry: BaseRunRegistry) -> None:
    async def life(i: int) -> None:
        run = Run(module_id=f"m{i % 3}")
        await registry.add_run(run)
        run.mark_running()
        await registry.update_run(run)
        if i % 2:
            run.mark_completed()
        else:
            run.mark_failed("odd", exit_code=1)
        await registry.update_run(run)

    await asyncio.gather(*(life(i) for i in range(60)))
    assert await registry.count_runs() == 60
    assert await registry.count_runs(status=RunStatus.COMPLETED) == 30
    assert await registry.count_runs(status=RunStatus.FAILED) == 30


async def test_update_refuses_an_impossible_status_change(registry: BaseRunRegistry) -> None:
    # Issue 11, D16: a stale copy must not move a finished run back, and a pending run cannot
    # be stored COMPLETED without having run.
    run = Run()
    await registry.add_run(run)
    skipped = Run(run_id=run.run_id, status=RunStatus.COMPLETED, exit_code=0)
    with pytest.raises(RunStateError):
        await registry.update_run(skipped)
    stale = run.copy()
    run.mark_running()
    await registry.update_run(run)
    run.mark_completed()
    await registry.update_run(run)
    stale.mark_running()
    with pytest.raises(RunStateError):
        await registry.update_run(stale)
    stored = await registry.get_run(run.run_id)
    assert stored is not None and stored.status is RunStatus.COMPLETED
    run.output_tail = ["late line"]
    await registry.update_run(run)  # same status: other fields may still change


async def test_update_of_a_run_never_added_names_the_fix(registry: BaseRunRegistry) -> None:
    with pytest.raises(RunNotFoundError, match="add_run"):
        await registry.update_run(Run(run_id="never-added"))


async def test_memory_cancel_requests_do_not_outlive_their_runs() -> None:
    # A host that cancels runs through the registry (request_cancel, as another worker would)
    # for weeks: each request stayed in the store's dict after its run was cancelled (the owner
    # stops polling a run once it acts on its request), one entry per request for good.
    from prismq_subprocess import BackgroundTaskManager

    registry = RunRegistry(max_runs=10)
    async with registry, BackgroundTaskManager(registry) as manager:
        for _ in range(10):
            runs = [Run(module_id="m") for _ in range(30)]
            for run in runs:
                await manager.start_task(run, asyncio.sleep(30))
            for run in runs:
                assert await registry.request_cancel(run.run_id, "asked")
            await manager.wait_all(timeout=10)
            assert all(run.status is RunStatus.CANCELLED for run in runs)
        assert registry._cancel_requests == {}
        # A request for a live run is still kept and heard.
        run = Run(module_id="m")
        await manager.start_task(run, asyncio.sleep(30))
        assert await registry.request_cancel(run.run_id, "last")
        final = await registry.wait_finished(run.run_id, timeout=10)
        assert final is not None and final.error_message == "last"


class _OwnStore(RunRegistry):
    """A store of a user's that writes through its own ``update_run`` (not the fast path)."""

    async def update_run(self, run: Run) -> None:
        await asyncio.sleep(0)
        self._update_run_now(run)


async def test_cancel_requests_of_finished_runs_are_swept_in_any_store() -> None:
    # BaseRunRegistry keeps requests for stores that hold them in memory; whatever a store
    # does on its writes, the requests of runs finished or gone do not pile up.
    registry = _OwnStore()
    for _ in range(500):
        run = Run(module_id="m")
        await registry.add_run(run)
        assert await registry.request_cancel(run.run_id)
        run.mark_running()
        run.mark_cancelled("asked")
        registry._runs[run.run_id] = run  # (finished behind the store's back)
    assert len(registry._cancel_requests) <= 64


# -- claim_run: one of several pick-ups becomes the run's driver ------------------------------


class _DelegatingStore(BaseRunRegistry):
    """A store of one's own: only the abstract methods (claim_run is the base's default), and
    an update_run that replaces the run as it is (its owner too)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = RunRegistry()

    async def add_run(self, run: Run) -> None:
        await self.inner.add_run(run)

    async def update_run(self, run: Run) -> None:
        if run.run_id not in self.inner._runs:
            raise RunNotFoundError(run.run_id)
        self.inner._runs[run.run_id] = run.copy()

    async def get_run(self, run_id: str) -> Run | None:
        return await self.inner.get_run(run_id)

    async def list_runs(
        self,
        status: RunStatus | None = None,
        module_id: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Run]:
        return await self.inner.list_runs(status, module_id, limit, offset)

    async def count_runs(
        self, status: RunStatus | None = None, module_id: str | None = None
    ) -> int:
        return await self.inner.count_runs(status, module_id)

    async def delete_older_than(self, age: timedelta | datetime) -> int:
        return await self.inner.delete_older_than(age)

    async def apply_retention(self) -> int:
        return await self.inner.apply_retention()

    async def aclose(self) -> None:
        await self.inner.aclose()
        await super().aclose()


@pytest.fixture(params=["memory", "sqlite", "own store"])
async def claiming(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[BaseRunRegistry]:
    kind = request.param
    store = _DelegatingStore() if kind == "own store" else make_store(kind, tmp_path)
    async with store:
        yield store


ELSEWHERE = RunOwner("another-host", 4242, 1_700_000_000.25)


async def test_claim_run_stores_the_run_only_while_pending_with_the_owner_read(
    claiming: BaseRunRegistry,
) -> None:
    await claiming.add_run(Run(run_id="r", module_id="m", owner=ELSEWHERE))
    picked = await claiming.get_run("r")
    assert picked is not None and picked.owner == ELSEWHERE
    picked.owner = RunOwner.current()
    assert await claiming.claim_run(picked, ELSEWHERE)
    stored = await claiming.get_run("r")
    assert stored is not None and stored.owner == RunOwner.current()
    assert stored.status is RunStatus.PENDING
    # A second claim with the owner read before the first one landed: refused, nothing changed.
    late = Run.from_dict({**picked.to_dict(), "owner": None})
    late.owner = RunOwner("a-third-host", 7, 1.5)
    assert not await claiming.claim_run(late, ELSEWHERE)
    again = await claiming.get_run("r")
    assert again is not None and again.owner == RunOwner.current()
    # No longer pending: refused; an unknown run: refused.
    again.mark_running(pid=1)
    await claiming.update_run(again)
    fresh = Run(run_id="r", module_id="m", owner=RunOwner("x", 1, 2.0))
    assert not await claiming.claim_run(fresh, RunOwner.current())
    assert not await claiming.claim_run(Run(run_id="nobody"), None)


async def test_claim_run_of_a_run_without_owner_matches_none(claiming: BaseRunRegistry) -> None:
    run = Run(run_id="r", module_id="m")
    await claiming.add_run(run)  # the store stamps this process as owner
    assert not await claiming.claim_run(run, None)
    assert await claiming.claim_run(run, RunOwner.current())


async def test_claim_run_refuses_bad_arguments(claiming: BaseRunRegistry) -> None:
    running = Run(run_id="r")
    running.mark_running(pid=1)
    with pytest.raises(RunStateError, match="PENDING"):
        await claiming.claim_run(running, None)
    with pytest.raises(PrismQError, match="takes a Run"):
        await claiming.claim_run("r", None)  # type: ignore[arg-type]
    with pytest.raises(PrismQError, match="RunOwner or None"):
        await claiming.claim_run(Run(run_id="r"), "me")  # type: ignore[arg-type]
    await claiming.aclose()
    with pytest.raises(RegistryClosedError):
        await claiming.claim_run(Run(run_id="r"), None)


async def test_of_two_sqlite_claims_with_one_owner_read_exactly_one_wins(tmp_path: Path) -> None:
    # Two registries on one file (two server workers): each its own connection and thread.
    path = tmp_path / "runs.db"
    async with SQLiteRunRegistry(path) as first, SQLiteRunRegistry(path) as second:
        for n in range(20):
            await first.add_run(Run(run_id=f"r{n}", module_id="m", owner=ELSEWHERE))
        for n in range(20):
            mine = Run(run_id=f"r{n}", module_id="m", owner=RunOwner("one", 1, 1.0))
            theirs = Run(run_id=f"r{n}", module_id="m", owner=RunOwner("two", 2, 2.0))
            won = await asyncio.gather(
                first.claim_run(mine, ELSEWHERE), second.claim_run(theirs, ELSEWHERE)
            )
            assert sorted(won) == [False, True], won
            stored = await second.get_run(f"r{n}")
            assert stored is not None
            assert stored.owner == (mine.owner if won[0] else theirs.owner)


async def test_update_run_never_changes_the_owner(registry: BaseRunRegistry) -> None:
    # Only add_run and claim_run set a run's owner: a copy read before another process claimed
    # the run changes nothing (its start would have run the job twice: probe), and a copy
    # without owner keeps the stored one (it was written as "no owner", so recovery took the
    # run of a live process for an orphan).
    run = Run(run_id="r", module_id="m")
    await registry.add_run(run)
    stale = await registry.get_run("r")
    assert stale is not None
    claimed = await registry.get_run("r")
    assert claimed is not None
    claimed.owner = ELSEWHERE
    assert await registry.claim_run(claimed, RunOwner.current())
    stale.mark_running(pid=1)
    with pytest.raises(RunClaimedError, match="pid 4242 on another-host"):
        await registry.update_run(stale)
    unchanged = await registry.get_run("r")
    assert unchanged is not None
    assert (unchanged.status, unchanged.owner) == (RunStatus.PENDING, ELSEWHERE)
    anonymous = Run.from_dict({**unchanged.to_dict(), "owner": None})
    anonymous.mark_running(pid=2)
    await registry.update_run(anonymous)
    kept = await registry.get_run("r")
    assert kept is not None
    assert (kept.status, kept.pid, kept.owner) == (RunStatus.RUNNING, 2, ELSEWHERE)


async def test_claim_run_stamps_this_process_on_a_run_without_owner(
    claiming: BaseRunRegistry,
) -> None:
    await claiming.add_run(Run(run_id="r", module_id="m", owner=ELSEWHERE))
    read = await claiming.get_run("r")
    assert read is not None
    copy = Run.from_dict({**read.to_dict(), "owner": None})
    assert await claiming.claim_run(copy, ELSEWHERE)
    assert copy.owner == RunOwner.current()
    stored = await claiming.get_run("r")
    assert stored is not None and stored.owner == RunOwner.current()


@pytest.mark.parametrize("bad", [[1], {}, 7, None, b"r"])
async def test_a_run_id_that_is_not_a_str_is_refused_with_the_documented_error(
    registry: BaseRunRegistry, bad: object
) -> None:
    # sqlite3.ProgrammingError, a bare TypeError ("unhashable") or AttributeError before (probe).
    identity = ProcessIdentity(1, 1.0, None)
    calls = [
        lambda: registry.get_run(bad),  # type: ignore[arg-type]
        lambda: registry.request_cancel(bad),  # type: ignore[arg-type]
        lambda: registry.cancel_requests([bad]),  # type: ignore[list-item]
        lambda: registry.record_child(bad, identity),  # type: ignore[arg-type]
        lambda: registry.wait_finished(bad, timeout=1),  # type: ignore[arg-type]
    ]
    for call in calls:
        with pytest.raises(InvalidRunIdError):
            await call()


async def test_bad_cancel_reasons_identities_and_owners_are_refused(
    registry: BaseRunRegistry,
) -> None:
    await registry.add_run(Run(run_id="r"))
    with pytest.raises(InvalidArgumentTypeError, match="reason"):
        await registry.request_cancel("r", None)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentTypeError, match="ProcessIdentity"):
        await registry.record_child("r", "junk")  # type: ignore[arg-type]
    with pytest.raises(InvalidRunIdError):
        await registry.cancel_requests("r")
    with pytest.raises(InvalidRunError, match="owner"):
        Run(owner="bogus")  # type: ignore[arg-type]
    assert await registry.cancel_requests(["r"]) == {}


# What a registry file cannot hold as given. The in-memory registry took all of these (a
# probe's find): an application tested against it met the errors only against a file.
UNSTORABLE: dict[str, tuple[dict[str, object], type[Exception]]] = {
    "module_id int": ({"module_id": 5}, InvalidRunError),
    "exit_code str": ({"exit_code": "3"}, InvalidRunError),
    "pid str": ({"pid": "12"}, InvalidRunError),
    "pid past 64 bits": ({"pid": 2**70}, InvalidRunError),
    "peak float": ({"peak_rss_bytes": 1.5}, InvalidRunError),
    "cpu str": ({"cpu_time_seconds": "1"}, InvalidRunError),
    "mode int": ({"mode": 3}, InvalidRunError),
    "error_message int": ({"error_message": 5}, InvalidRunError),
    "worker int": ({"worker": 5}, InvalidRunError),
    "exit_code bool": ({"exit_code": True}, InvalidRunError),
    "lone surrogate": ({"module_name": "caf\udce9"}, InvalidRunError),
    "lone surrogate in module_id": ({"module_id": "\udce9"}, InvalidRunError),
    "lone surrogate in mode": ({"mode": "a\udce9"}, InvalidRunError),
    "lone surrogate in error_message": ({"error_message": "\udce9!"}, InvalidRunError),
    "lone surrogate in worker": ({"worker": "w\udce9"}, InvalidRunError),
    "exit_code past 64 bits": ({"exit_code": -(2**63) - 1}, InvalidRunError),
    # A probe's finds (session 36), each assigned after construction, which checks them:
    # a naive created_at was stored in memory, then list_runs()/delete_older_than() failed
    # for every caller ("can't compare offset-naive and offset-aware datetimes"); SQLite gave
    # a bare TypeError; NaN became NULL in SQLite (a NaN owner start time dropped the owner,
    # and the next open marked a live owner's run INTERRUPTED); an empty run_id was stored,
    # then quarantined by the first read; an int run_id or a tuple owner gave a bare
    # AttributeError.
    "naive created_at": ({"created_at": datetime(2026, 1, 1)}, InvalidRunError),
    "str finished_at": ({"finished_at": "2026-01-01"}, InvalidRunError),
    "None created_at": ({"created_at": None}, InvalidRunError),
    "naive started_at": ({"started_at": datetime(2026, 1, 1)}, InvalidRunError),
    "NaN cpu time": ({"cpu_time_seconds": float("nan")}, InvalidRunError),
    "NaN owner start": ({"owner": RunOwner("h", 1, float("nan"))}, InvalidRunError),
    "owner tuple": ({"owner": ("h", 1, 0.0)}, InvalidRunError),
    "lone surrogate in owner host": ({"owner": RunOwner("h\udc80", 1, 1.0)}, InvalidRunError),
    "peak past 64 bits": ({"peak_rss_bytes": 2**63}, InvalidRunError),
    "tail of bytes": ({"output_tail": [b"x"]}, InvalidRunError),
    "parameters object": ({"parameters": {"a": object()}}, InvalidParametersError),
    "parameters NaN": ({"parameters": {"a": float("nan")}}, InvalidParametersError),
    "parameters bytes": ({"parameters": {"a": b"x"}}, InvalidParametersError),
    # JSON keys are text: SQLite stored {1: "a", "1": "b"} as one key (a value lost) and gave
    # back "1" for 1, where the memory registry kept both as given.
    "parameters int key": ({"parameters": {1: "a"}}, InvalidParametersError),
    "parameters colliding keys": ({"parameters": {1: "a", "1": "b"}}, InvalidParametersError),
    "parameters nested None key": (
        {"parameters": {"a": [{"b": {None: 1}}]}},
        InvalidParametersError,
    ),
}


@pytest.mark.parametrize("case", list(UNSTORABLE))
async def test_every_registry_refuses_what_a_file_cannot_hold(
    registry: BaseRunRegistry, case: str
) -> None:
    fields, error = UNSTORABLE[case]
    fresh = Run(module_id="m")
    for name, value in fields.items():
        setattr(fresh, name, value)  # (after construction: the constructor checks some)
    with pytest.raises(error):
        await registry.add_run(fresh)
    assert await registry.count_runs() == 0
    assert await registry.list_runs() == []
    assert await registry.delete_older_than(timedelta(days=1)) == 0
    if case == "parameters NaN":
        return  # (an update keeps what an older release may have stored with NaN in it)
    stored = Run(module_id="m")
    await registry.add_run(stored)
    for name, value in fields.items():
        setattr(stored, name, value)
    with pytest.raises(error):
        await registry.update_run(stored)
    again = await registry.get_run(stored.run_id)
    assert again is not None and again.module_id == "m" and again.parameters == {}


async def test_every_registry_refuses_an_owner_a_file_cannot_hold(
    registry: BaseRunRegistry,
) -> None:
    odd = Run(module_id="m")
    odd.owner = RunOwner("host", "abc", 1.0)  # type: ignore[arg-type]
    with pytest.raises(InvalidRunError, match="owner"):
        await registry.add_run(odd)
    assert await registry.count_runs() == 0


@pytest.mark.parametrize("run_id", ["", 123])
async def test_every_registry_refuses_a_run_id_set_after_construction_that_is_no_id(
    registry: BaseRunRegistry, run_id: object
) -> None:
    run = Run(module_id="m")
    run.run_id = run_id  # type: ignore[assignment]
    with pytest.raises((InvalidRunError, InvalidRunIdError)):
        await registry.add_run(run)
    assert await registry.count_runs() == 0


async def test_every_registry_answers_a_wait_with_no_time_for_a_finished_or_unknown_run(
    registry: BaseRunRegistry,
) -> None:
    # A probe's find: SQLite's wait_finished(timeout=0) (or shorter than one trip to its
    # thread) raised TimeoutError for a run that had already finished, and for an unknown one;
    # the memory registry returned the run and None.
    run = Run(module_id="m")
    await registry.add_run(run)
    run.mark_running(pid=None)
    await registry.update_run(run)
    run.mark_failed("boom")
    await registry.update_run(run)
    for timeout in (0, 1e-6):
        done = await registry.wait_finished(run.run_id, timeout=timeout)
        assert done is not None and done.status is RunStatus.FAILED
        assert await registry.wait_finished("never-added", timeout=timeout) is None
    waiting = Run(module_id="m")
    await registry.add_run(waiting)
    with pytest.raises(TimeoutError):
        await registry.wait_finished(waiting.run_id, timeout=0)


@pytest.mark.parametrize("option", ["timeout", "poll_interval"])
async def test_every_registry_refuses_a_wait_of_an_int_too_large_for_a_float(
    registry: BaseRunRegistry, option: str
) -> None:
    # A bare OverflowError ("int too large to convert to float") in both.
    error = InvalidTimeoutError if option == "timeout" else InvalidIntervalError
    with pytest.raises(error):
        await registry.wait_finished("r", **{option: 10**400})  # type: ignore[arg-type]


async def test_every_registry_refuses_a_cancel_reason_with_a_lone_surrogate(
    registry: BaseRunRegistry,
) -> None:
    # The memory registry stored it; SQLite refused it, worded as if the run could not be
    # stored, even for an unknown run.
    run = Run(module_id="m")
    await registry.add_run(run)
    for run_id in (run.run_id, "unknown"):
        with pytest.raises(InvalidArgumentTypeError, match="surrogate"):
            await registry.request_cancel(run_id, "stop \udcff")
    assert await registry.cancel_requests([run.run_id]) == {}


async def test_a_refused_add_or_claim_leaves_the_callers_run_as_it_was(
    registry: BaseRunRegistry,
) -> None:
    # A probe's find: SQLite stamped run.owner on a refused duplicate add_run, and on a
    # claim_run of a closed registry; the memory registry left the run alone.
    first = Run(module_id="m")
    await registry.add_run(first)
    again = Run(module_id="m", run_id=first.run_id)
    with pytest.raises(DuplicateRunError):
        await registry.add_run(again)
    assert again.owner is None
    await registry.aclose()
    unclaimed = Run(module_id="m")
    with pytest.raises(RegistryClosedError):
        await registry.claim_run(unclaimed, None)
    assert unclaimed.owner is None


def _nested(levels: int) -> dict[str, object]:
    """Parameters whose value holds ``levels`` containers, one inside the other."""
    value: object = 0
    for level in range(levels):
        value = {"a": value} if level % 2 else [value]
    return {"x": value}


async def test_parameters_nested_past_the_limit_are_refused_alike_by_every_registry(
    registry: BaseRunRegistry,
) -> None:
    # Probes' finds: parameters nested 600-700 deep were stored by SQLite (JSON takes them) and
    # refused by the memory registry (its copy failed); a stored run's to_dict() (an app's list
    # endpoint, `prismq runs --json`) then raised a bare RecursionError for every reader.
    run = Run(module_id="m", parameters=_nested(MAX_PARAMETER_DEPTH + 1))
    with pytest.raises(InvalidParametersError, match="nested"):
        await registry.add_run(run)
    assert await registry.count_runs() == 0
    deepest = Run(module_id="m", parameters=_nested(MAX_PARAMETER_DEPTH))
    await registry.add_run(deepest)
    stored = await registry.get_run(deepest.run_id)
    assert stored is not None and stored.parameters == _nested(MAX_PARAMETER_DEPTH)
    data = stored.to_dict()
    assert Run.from_dict(data) == stored and stored.copy() == stored
    assert [r.to_dict() for r in await registry.list_runs()] == [data]
    # An update is held to it too (reviews' finds: unchecked, SQLite stored 600 levels that
    # then broke every listing, where the memory registry refused them).
    deepest.mark_running(pid=1)
    deepest.parameters = _nested(600)
    with pytest.raises(InvalidParametersError, match="nested"):
        await registry.update_run(deepest)
    again = await registry.get_run(deepest.run_id)
    assert again is not None and again.parameters == _nested(MAX_PARAMETER_DEPTH)


def test_a_run_too_deep_to_copy_says_so_from_to_dict_copy_and_from_dict() -> None:
    # Made directly (no registry would store it): a clear error, not a bare RecursionError.
    run = Run(module_id="m", parameters=_nested(5000))
    with pytest.raises(InvalidParametersError, match="cannot be copied"):
        run.to_dict()
    with pytest.raises(InvalidParametersError, match="cannot be copied"):
        run.copy()
    data = Run(module_id="m").to_dict() | {"parameters": _nested(5000)}
    with pytest.raises(InvalidParametersError, match="cannot be copied"):
        Run.from_dict(data)


async def test_a_file_with_deeper_parameters_from_an_older_release_opens_and_recovers(
    tmp_path: Path,
) -> None:
    # A review's find: the previous release stored parameters up to ~980 levels deep; with the
    # limit applied to recovery's rewrite of such a file's orphaned runs, the registry did not
    # open at all.
    path = tmp_path / "old.db"
    me = RunOwner.current()
    gone = RunOwner(me.host, me.pid, me.started_at - 500.37)  # a reused pid: its owner is gone
    deep, shallow = Run(module_id="deep", owner=gone), Run(module_id="shallow", owner=gone)
    deepest = Run(module_id="deepest", owner=gone)
    async with SQLiteRunRegistry(path) as registry:
        for run in (deep, shallow, deepest):
            await registry.add_run(run)
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        text = json.dumps(_nested(MAX_PARAMETER_DEPTH + 50))
        db.execute("UPDATE runs SET parameters = ? WHERE run_id = ?", (text, deep.run_id))
        # Deeper than json.loads can read here (that release stored up to 983 levels): a row
        # the registry cannot read is set aside as damaged; it made the whole open fail.
        text = '{"x": ' + "[" * 2000 + "0" + "]" * 2000 + "}"
        db.execute("UPDATE runs SET parameters = ? WHERE run_id = ?", (text, deepest.run_id))
    async with SQLiteRunRegistry(path) as registry:
        interrupted = set(registry.interrupted_run_ids)
        assert {deep.run_id, shallow.run_id} <= interrupted
        # Set aside where json.loads cannot read it (3.11, 3.12), recovered where it can (3.13).
        if sys.version_info < (3, 13):
            assert registry.quarantined_run_ids == [deepest.run_id]
        else:
            assert registry.quarantined_run_ids == [] and deepest.run_id in interrupted
        got = await registry.get_run(deep.run_id)
        assert got is not None and got.status is RunStatus.INTERRUPTED
        assert got.parameters == _nested(MAX_PARAMETER_DEPTH + 50)
