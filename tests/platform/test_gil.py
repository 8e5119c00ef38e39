"""``GilShare``: a worker thread's long ``/proc`` walk lets the event loop's thread run.

The effect on the loop (its worst stall during a stop) is measured by benchmarks/bench_stop.py,
not here: a timing bound would flake on a shared machine."""

from __future__ import annotations

import threading

import pytest

from prismq_subprocess._platform import _gil


class _Clock:
    """A clock that moves only when the test says (a real one would make pause counts depend
    on how the machine schedules the thread)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _walk(share: _gil.GilShare, clock: _Clock, slices: int, steps_per_slice: int = 5) -> None:
    for _ in range(slices * steps_per_slice):
        clock.now += _gil._SLICE / steps_per_slice
        share()


def test_a_worker_thread_pauses_every_slice(monkeypatch: pytest.MonkeyPatch) -> None:
    pauses: list[float] = []
    clock = _Clock()
    monkeypatch.setattr(_gil, "_sleep", pauses.append)
    monkeypatch.setattr(_gil, "_clock", clock)

    def worker() -> None:
        _walk(_gil.GilShare(), clock, 20)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    # One pause per slice of work (the float steps may put a slice's end one step later).
    assert 16 <= len(pauses) <= 20
    assert set(pauses) == {_gil._PAUSE}


async def test_the_event_loops_own_thread_never_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    # There the pause itself would stall the loop (e.g. kill_trees_now from a loop callback).
    pauses: list[float] = []
    clock = _Clock()
    monkeypatch.setattr(_gil, "_sleep", pauses.append)
    monkeypatch.setattr(_gil, "_clock", clock)
    _walk(_gil.GilShare(), clock, 10)
    assert pauses == []
