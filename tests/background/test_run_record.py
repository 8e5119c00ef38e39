"""Tests of the run model (prismq_subprocess/_background/_run_record.py)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import pickle
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta, timezone

import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st

from prismq_subprocess._background import _run_record
from prismq_subprocess._background._run_record import (
    Run,
    RunOwner,
    RunStatus,
    new_run_id,
    transition_error,
)
from prismq_subprocess._core._exceptions import InvalidRunError, PrismQError, RunStateError


def test_status_is_str_enum_and_finished_flags() -> None:
    assert RunStatus("running") is RunStatus.RUNNING
    assert RunStatus.COMPLETED == "completed"
    assert not RunStatus.PENDING.is_finished
    assert not RunStatus.RUNNING.is_finished
    for status in ("completed", "failed", "cancelled", "interrupted"):
        assert RunStatus(status).is_finished


def test_defaults() -> None:
    run = Run(module_id="m", module_name="Module")
    assert len(run.run_id) == 32
    assert run.status is RunStatus.PENDING
    assert run.created_at.tzinfo is UTC
    assert run.duration is None
    assert run.owner is None
    assert run.output_tail == []
    assert Run().run_id != Run().run_id


def test_happy_path_stamps_times() -> None:
    run = Run()
    run.mark_running(pid=1234)
    assert run.status is RunStatus.RUNNING and run.pid == 1234
    assert run.started_at is not None and run.finished_at is None
    assert run.duration is not None and run.duration >= 0
    run.mark_completed(0)
    assert run.status is RunStatus.COMPLETED and run.exit_code == 0
    assert run.finished_at is not None and run.finished_at >= run.started_at
    assert run.duration == (run.finished_at - run.started_at).total_seconds()


@pytest.mark.parametrize(
    "finish",
    [
        lambda r: r.mark_completed(0),
        lambda r: r.mark_failed("boom", exit_code=2),
        lambda r: r.mark_cancelled("user"),
        lambda r: r.mark_interrupted("crash"),
    ],
)
def test_finished_run_cannot_move(finish) -> None:  # type: ignore[no-untyped-def]
    run = Run()
    run.mark_running()
    finish(run)
    before = run.to_dict()
    for again in (
        lambda: run.mark_running(),
        lambda: run.mark_completed(),
        lambda: run.mark_failed("x"),
        lambda: run.mark_cancelled(),
        lambda: run.mark_interrupted("x"),
    ):
        with pytest.raises(RunStateError) as info:
            again()
        assert isinstance(info.value, PrismQError)
    assert run.to_dict()["status"] == before["status"]


def test_pending_transitions() -> None:
    with pytest.raises(RunStateError):
        Run().mark_completed()
    for finish in ("mark_cancelled", "mark_interrupted", "mark_failed"):
        run = Run()
        getattr(run, finish)("why")
        assert run.is_finished and run.error_message == "why" and run.started_at is None
    running = Run()
    running.mark_running()
    with pytest.raises(RunStateError):
        running.mark_running()


def test_completed_refuses_nonzero_exit() -> None:
    run = Run()
    run.mark_running()
    with pytest.raises(RunStateError):
        run.mark_completed(3)
    assert run.status is RunStatus.RUNNING
    run.mark_failed("exit 3", exit_code=3)
    assert (run.status, run.exit_code) == (RunStatus.FAILED, 3)


def test_naive_datetime_rejected_and_aware_normalised() -> None:
    with pytest.raises(InvalidRunError):
        Run(created_at=datetime(2024, 1, 1))
    plus2 = timezone(timedelta(hours=2))
    run = Run(created_at=datetime(2024, 1, 1, 12, tzinfo=plus2))
    assert run.created_at == datetime(2024, 1, 1, 10, tzinfo=UTC)
    assert run.created_at.tzinfo is UTC


def test_bad_status_and_run_id() -> None:
    with pytest.raises(InvalidRunError):
        Run(status="sleeping")  # type: ignore[arg-type]
    with pytest.raises(InvalidRunError):
        Run(run_id="")
    assert Run(status="failed").status is RunStatus.FAILED  # type: ignore[arg-type]


def test_copy_is_deep() -> None:
    run = Run(parameters={"a": [1]}, output_tail=["x"])
    other = run.copy()
    other.parameters["a"].append(2)
    other.output_tail.append("y")
    assert run.parameters == {"a": [1]} and run.output_tail == ["x"]
    assert other == Run.from_dict(other.to_dict())


def test_copy_covers_every_field() -> None:
    # Run.copy() lists the fields one by one (for speed): a field added to Run must be added
    # there too, or copies would lose it.
    started = datetime(2024, 1, 1, 12, tzinfo=UTC)
    run = Run(
        module_id="m",
        module_name="Module",
        parameters={"a": [1]},
        run_id="r1",
        status=RunStatus.FAILED,
        exit_code=3,
        error_message="boom",
        created_at=started - timedelta(seconds=1),
        started_at=started,
        finished_at=started + timedelta(seconds=1),
        pid=42,
        mode="threaded",
        output_tail=["x"],
        peak_rss_bytes=1024,
        cpu_time_seconds=0.5,
        owner=RunOwner("host", 42, 1.0),
        worker="tcp://worker:1",
    )
    defaults = Run()
    other = run.copy()
    for field in dataclasses.fields(Run):
        value = getattr(run, field.name)
        assert value != getattr(defaults, field.name), field.name  # every field is exercised
        assert getattr(other, field.name) == value, field.name
    assert other == run


def test_constructor_matches_fields() -> None:
    # Run.__init__ is written out (for speed): its parameters are the fields, in field order,
    # with the same defaults (None standing for a default factory's fresh value).
    params = list(inspect.signature(Run).parameters.values())
    assert [p.name for p in params] == [f.name for f in dataclasses.fields(Run)]
    defaults = Run(run_id="r")
    for param, field in zip(params, dataclasses.fields(Run), strict=True):
        if field.default is not dataclasses.MISSING:
            assert param.default == field.default, field.name
        else:
            assert param.default is None, field.name
            assert field.default_factory is not dataclasses.MISSING, field.name
            if field.name in ("parameters", "output_tail"):
                assert getattr(defaults, field.name) == field.default_factory(), field.name
    assert Run(parameters=None, output_tail=None).parameters == {}
    a, b = Run(), Run()
    assert a.parameters is not b.parameters and a.output_tail is not b.output_tail
    assert Run("m", "Module", {"k": 1}, "r2").run_id == "r2"
    assert dataclasses.replace(defaults, module_id="x") == Run(
        module_id="x", run_id="r", created_at=defaults.created_at
    )
    with pytest.raises(InvalidRunError):
        Run(created_at="2024-01-01")  # type: ignore[arg-type]


def test_run_pickles() -> None:
    run = Run(module_id="m", parameters={"a": 1}, output_tail=["x"])
    run.mark_running(pid=5)
    again = pickle.loads(pickle.dumps(run))
    assert again == run
    again.mark_completed(0)
    assert again.status is RunStatus.COMPLETED


def test_default_run_ids_are_time_ordered_uuid7_hex() -> None:
    # Version 7 (RFC 9562): the creation time in milliseconds first, so new ids land at one end
    # of an index (SQLite's run_id index, a host's own) instead of at random places in it.
    before_ms = time.time_ns() // 1_000_000
    ids = [Run().run_id for _ in range(1000)]
    after_ms = time.time_ns() // 1_000_000
    assert len(set(ids)) == 1000
    assert ids == sorted(ids)  # one process's ids only grow
    for run_id in ids:
        parsed = uuid.UUID(run_id)
        assert (parsed.version, parsed.variant) == (7, uuid.RFC_4122)
        assert parsed.hex == run_id
        assert before_ms <= int(run_id[:12], 16) <= after_ms


def test_run_ids_stay_unguessable_next_to_a_known_one() -> None:
    # Neighbouring ids share the time and differ in the counter, but 62 bits stay random.
    a, b = new_run_id(), new_run_id()
    tail_a, tail_b = int(a[16:], 16) & (2**62 - 1), int(b[16:], 16) & (2**62 - 1)
    assert tail_a != tail_b
    samples = [int(new_run_id()[16:], 16) & (2**62 - 1) for _ in range(2000)]
    assert len(set(samples)) == 2000
    # Every one of the 62 bits varies.
    assert all(len({(x >> bit) & 1 for x in samples}) == 2 for bit in range(62))


def test_a_run_id_carries_the_time_it_was_made() -> None:
    # Not the time of an earlier id: an id made long after the last one has its own moment.
    first = new_run_id()
    time.sleep(0.02)
    before_ms = time.time_ns() // 1_000_000
    second = new_run_id()
    assert int(second[:12], 16) >= before_ms >= int(first[:12], 16) + 15
    assert second > first


def test_run_ids_keep_growing_through_a_busy_millisecond_and_a_small_clock_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [time.time_ns() + 10**9]
    monkeypatch.setattr(_run_record, "_time_ns", lambda: now[0])
    busy = [new_run_id() for _ in range(5000)]  # more than the 4,096 a millisecond counts
    assert busy == sorted(busy) and len(set(busy)) == 5000
    stamp = now[0] // 1_000_000
    assert {int(run_id[:12], 16) for run_id in busy} == {stamp, stamp + 1}
    now[0] -= 2 * 10**9  # the clock steps back 2 s: ids still grow, on the old stamp
    later = new_run_id()
    assert later > busy[-1]
    now[0] -= 60 * 10**9  # a step of a minute is followed: ids then start lower
    followed = new_run_id()
    assert int(followed[:12], 16) == now[0] // 1_000_000
    assert uuid.UUID(followed).version == 7


def test_from_dict_errors() -> None:
    with pytest.raises(InvalidRunError):
        Run.from_dict({})
    with pytest.raises(InvalidRunError):
        Run.from_dict({"run_id": "a", "created_at": "yesterday"})
    with pytest.raises(InvalidRunError):
        Run.from_dict({"run_id": "a", "owner": {"host": "h"}})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        # Each was taken apart rather than refused: "abc" became ["a", "b", "c"], a list of
        # pairs became a dict.
        ("output_tail", "abc"),
        ("output_tail", {"a": "b"}),
        ("output_tail", [1, 2]),
        ("parameters", [["a", 1]]),
        ("parameters", "ab"),
    ],
)
def test_from_dict_refuses_containers_of_the_wrong_shape(key: str, value: object) -> None:
    with pytest.raises(InvalidRunError, match=key):
        Run.from_dict({"run_id": "a", key: value})


def test_from_dict_takes_tuples_and_none_for_the_containers() -> None:
    run = Run.from_dict({"run_id": "a", "output_tail": ("x", "y"), "parameters": None})
    assert (run.output_tail, run.parameters) == (["x", "y"], {})


def test_current_owner_is_alive() -> None:
    owner = RunOwner.current()
    assert owner.pid == os.getpid()
    assert owner is RunOwner.current()
    assert owner.is_alive()


def test_owner_liveness_dead_reused_and_other_host() -> None:
    me = RunOwner.current()
    # Our pid with another start time is what a reused pid looks like.
    assert not RunOwner(me.host, me.pid, me.started_at - 1000.0).is_alive()
    assert not RunOwner(me.host + "-elsewhere", me.pid, me.started_at).is_alive()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(child.pid).create_time()
    child.wait()
    assert not RunOwner(me.host, child.pid, started).is_alive()


@pytest.mark.parametrize("boot_time_moved", [-1.0, 1.0, 2.0])
def test_a_live_owner_stays_alive_when_the_boot_time_moves_by_whole_seconds(
    boot_time_moved: float,
) -> None:
    # Found by the full suite (two registry tests and a CLI one failed together, once): psutil
    # gives a start time as the kernel's boot time (/proc/stat btime, whole seconds) plus the
    # ticks since boot, and btime moves by a second when NTP slews the wall clock across one.
    # A live owner then looked gone: its RUNNING runs were marked INTERRUPTED under it.
    me = RunOwner.current()
    assert RunOwner(me.host, me.pid, me.started_at + boot_time_moved).is_alive()
    # Anything else is another process that reused the pid.
    assert not RunOwner(me.host, me.pid, me.started_at + 0.5).is_alive()
    assert not RunOwner(me.host, me.pid, me.started_at + 30.0).is_alive()


_aware = st.datetimes(
    min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
runs = st.builds(
    Run,
    module_id=st.text(),
    module_name=st.text(),
    parameters=st.dictionaries(st.text(), _json, max_size=4),
    status=st.sampled_from(RunStatus),
    exit_code=st.none() | st.integers(-255, 255),
    error_message=st.none() | st.text(),
    created_at=_aware,
    started_at=st.none() | _aware,
    finished_at=st.none() | _aware,
    pid=st.none() | st.integers(1, 2**31),
    mode=st.sampled_from(["async", "threaded", "local", "dry_run"]),
    output_tail=st.lists(st.text(), max_size=5),
    peak_rss_bytes=st.none() | st.integers(0, 2**50),
    cpu_time_seconds=st.none() | st.floats(0, 1e6),
    owner=st.none() | st.builds(RunOwner, st.text(), st.integers(1, 2**31), st.floats(0, 2e9)),
)


@given(runs)
def test_to_dict_from_dict_round_trip_through_json(run: Run) -> None:
    data = json.loads(json.dumps(run.to_dict()))
    assert Run.from_dict(data) == run


# --- direct status assignment (issue 11, D16) -------------------------------------------------


def test_assigning_status_follows_the_transition_rules_and_stamps_times() -> None:
    # The guide's style: ``run.status = RunStatus.RUNNING`` ... ``run.status = COMPLETED``.
    run = Run()
    run.status = RunStatus.RUNNING
    assert run.status is RunStatus.RUNNING
    assert run.started_at is not None and run.finished_at is None
    run.status = RunStatus.COMPLETED
    run.exit_code = 0
    assert run.status is RunStatus.COMPLETED and run.finished_at is not None
    assert run.finished_at >= run.started_at
    run.status = RunStatus.COMPLETED  # the same status again is a no-op
    with pytest.raises(RunStateError):
        run.status = RunStatus.RUNNING
    with pytest.raises(RunStateError):
        run.status = RunStatus.FAILED
    assert run.status is RunStatus.COMPLETED


def test_pending_cannot_be_assigned_completed() -> None:
    run = Run()
    with pytest.raises(RunStateError) as info:
        run.status = RunStatus.COMPLETED
    assert isinstance(info.value, PrismQError) and isinstance(info.value, ValueError)
    assert run.status is RunStatus.PENDING and run.finished_at is None
    with pytest.raises(InvalidRunError):
        run.status = "sleeping"  # type: ignore[assignment]
    run.status = "failed"  # type: ignore[assignment]
    assert run.status is RunStatus.FAILED and run.finished_at is not None
    assert run.started_at is None
    running = Run()
    running.mark_running()
    with pytest.raises(RunStateError):
        running.status = RunStatus.PENDING


def test_assignment_keeps_timestamps_already_set() -> None:
    run = Run()
    run.mark_running(pid=5)
    started = run.started_at
    run.status = RunStatus.FAILED
    assert run.started_at == started and run.pid == 5
    # Constructing a run in any state stays possible (importing history, from_dict).
    imported = Run(status=RunStatus.COMPLETED, exit_code=0)
    assert imported.status is RunStatus.COMPLETED
    assert imported.copy() == imported


@pytest.mark.parametrize("current", list(RunStatus))
def test_mark_methods_follow_the_transition_table(current: RunStatus) -> None:
    # The mark_* methods check their legal source states inline (for speed); they must agree
    # with transition_error, the one table of legal moves, and word refusals the same way.
    marks = {
        RunStatus.RUNNING: lambda r: r.mark_running(pid=3),
        RunStatus.COMPLETED: lambda r: r.mark_completed(0),
        RunStatus.FAILED: lambda r: r.mark_failed("f", exit_code=1),
        RunStatus.CANCELLED: lambda r: r.mark_cancelled("c"),
        RunStatus.INTERRUPTED: lambda r: r.mark_interrupted("i"),
    }
    for target, mark in marks.items():
        run = Run(run_id="r", status=current)
        why = transition_error(current, target)
        if why is None:
            mark(run)
            assert run.status is target
            assert (run.started_at is not None) == (target is RunStatus.RUNNING)
            assert (run.finished_at is not None) == target.is_finished
        else:
            with pytest.raises(RunStateError) as info:
                mark(run)
            assert str(info.value) == f"run r: {why}"
            assert run.status is current and run.started_at is None and run.finished_at is None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_has_ids_and_an_owner_of_its_own() -> None:
    # Ids and the owner record may be prepared ahead (a pool of random ids, a cached owner):
    # a forked child must not hand out the parent's next ids nor claim the parent's pid.
    script = (
        "import json, os\n"
        "from prismq_subprocess._background._run_record import RunOwner, new_run_id\n"
        "new_run_id(); RunOwner.current()\n"
        "r, w = os.pipe()\n"
        "if os.fork() == 0:\n"
        "    ids = [new_run_id() for _ in range(3)]\n"
        "    os.write(w, json.dumps([ids, RunOwner.current().pid, os.getpid()]).encode())\n"
        "    os._exit(0)\n"
        "os.close(w)\n"
        "child = json.loads(os.read(r, 65536))\n"
        "print(json.dumps([[new_run_id() for _ in range(3)], child]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    mine, (theirs, child_owner_pid, child_pid) = json.loads(out)
    assert not set(mine) & set(theirs)
    assert child_owner_pid == child_pid


@pytest.mark.parametrize(
    "change",
    [
        {"run_id": None},  # (it got a fresh random id)
        {"owner": {"host": "h", "pid": float("inf"), "started_at": 1.0}},  # (bare OverflowError)
    ],
    ids=["run_id None", "owner pid inf"],
)
def test_from_dict_refuses_what_a_probe_found_it_took(change: dict[str, object]) -> None:
    data = {**Run(module_id="m").to_dict(), **change}
    with pytest.raises(InvalidRunError, match="malformed run data"):
        Run.from_dict(data)
