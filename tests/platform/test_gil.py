"""``GilShare``: a worker thread's long ``/proc`` walk lets the event loop's thread run.

The effect on the loop (its worst stall during a stop) is measured by benchmarks/bench_stop.py,
not here: a timing bound would flake on a shared machine."""

from __future__ import annotations

import threading
import time

import pytest

from prismq_subprocess._platform import _gil


def _walk(share: _gil.GilShare, seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        share()


def test_a_worker_thread_pauses_every_slice(monkeypatch: pytest.MonkeyPatch) -> None:
    pauses: list[float] = []
    monkeypatch.setattr(_gil, "_sleep", pauses.append)

    def worker() -> None:
        _walk(_gil.GilShare(), 20 * _gil._SLICE)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert 10 <= len(pauses) <= 20
    assert set(pauses) == {_gil._PAUSE}


async def test_the_event_loops_own_thread_never_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    # There the pause itself would stall the loop (e.g. kill_trees_now from a loop callback).
    pauses: list[float] = []
    monkeypatch.setattr(_gil, "_sleep", pauses.append)
    _walk(_gil.GilShare(), 10 * _gil._SLICE)
    assert pauses == []
