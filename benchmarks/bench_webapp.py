"""The example app (examples/fastapi_app) under real uvicorn, 1 and 2 workers on one SQLite file:
the figures a web backend's users feel.

- **start -> first SSE line**: from sending ``POST /api/modules/count/runs`` to the first
  ``line`` event, on a stream opened right after the POST returned, on the worker that owns the
  run and (2 workers) on the other one, which follows the run's log file. Includes starting the
  Python child.
- **cancel from the other worker**: ``POST /api/runs/{id}/cancel`` sent to the worker that does
  not own the run, until its answer (the run is then recorded CANCELLED, its tree stopped), and
  until the run's pid and its child's pid are gone.
- **lines delivered vs printed**: runs printing lines as fast as they can, each followed live
  from every worker: lines received in order, without gaps or repeats, against lines printed.

Uses the server helpers of tests/webapp (one server per worker count; nothing is downloaded).

    python benchmarks/bench_webapp.py [--trials 10] [--lines 20000] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "webapp"))

from _common import Target, table, write_json
from webapp_support import AppServer, Stream, read_events, wait_gone

#: Goals: a browser sees a new run's first line within a quarter second on either worker, and a
#: cancel sent to the wrong worker is done (tree stopped, recorded) within half a second.
FIRST_LINE_TARGET_S = 0.25
CANCEL_TARGET_S = 0.5


def _ms(values: list[float]) -> dict[str, float]:
    return {
        "min_ms": min(values) * 1000,
        "median_ms": statistics.median(values) * 1000,
        "max_ms": max(values) * 1000,
        "n": len(values),
    }


def _first_lines(server: AppServer, pids: set[int], trials: int) -> dict[str, list[float]]:
    found: dict[str, list[float]] = {"owner": [], "other": []}
    for _ in range(trials):
        streams: list[tuple[int, Stream]] = []
        ready = threading.Barrier(len(pids) + 1)
        go = threading.Event()
        run: dict[str, Any] = {}

        def follow(
            pid: int,
            ready: threading.Barrier = ready,
            go: threading.Event = go,
            run: dict[str, Any] = run,
            streams: list[tuple[int, Stream]] = streams,
        ) -> None:
            with server.on_worker(pid=pid) as (client, _):
                ready.wait()
                go.wait()
                streams.append((pid, read_events(client, run["run_id"], stop_after=1)))

        threads = [threading.Thread(target=follow, args=(pid,)) for pid in pids]
        for thread in threads:
            thread.start()
        ready.wait()
        with server.client() as client:
            client.get("/api/health")  # connected before the clock starts
            started = time.monotonic()
            answer = client.post("/api/modules/count/runs", json={"lines": 5, "delay": 0.01})
        run.update(answer.json())
        go.set()
        for thread in threads:
            thread.join()
        for pid, stream in streams:
            assert stream.first_line_at is not None and stream.lines[0][0] == 0
            kind = "owner" if pid == run["worker_pid"] else "other"
            found[kind].append(stream.first_line_at - started)
    return found


def _cancels(server: AppServer, trials: int) -> dict[str, list[float]]:
    answered: list[float] = []
    stopped: list[float] = []
    for _ in range(trials):
        with server.client() as client:
            answer = client.post(
                "/api/modules/count/runs", json={"lines": 100000, "delay": 0.05, "child": True}
            ).json()
            first = read_events(client, answer["run_id"], stop_after=1)
        child = int(first.lines[0][1].split()[2])
        with server.on_worker(not_pid=answer["worker_pid"]) as (client, _):
            pid = client.get(f"/api/runs/{answer['run_id']}").json()["pid"]
            started = time.monotonic()
            result = client.post(f"/api/runs/{answer['run_id']}/cancel").json()
            answered.append(time.monotonic() - started)
            assert result["result"] == "cancelled", result
            assert wait_gone([pid, child])
            stopped.append(time.monotonic() - started)
    return {"answered": answered, "tree_gone": stopped}


def _delivery(server: AppServer, pids: set[int], runs: int, lines: int) -> dict[str, Any]:
    run_ids = []
    with server.client() as client:
        for _ in range(runs):
            answer = client.post("/api/modules/count/runs", json={"lines": lines, "delay": 0})
            run_ids.append(answer.json()["run_id"])
    streams: list[Stream] = []

    def follow(run_id: str, pid: int) -> None:
        with server.on_worker(pid=pid) as (client, _):
            streams.append(read_events(client, run_id))

    threads = [
        threading.Thread(target=follow, args=(run_id, pid)) for run_id in run_ids for pid in pids
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    expected = [(i, f"line {i + 1} of {lines}") for i in range(lines)]
    exact = sum(1 for stream in streams if stream.lines == expected)
    return {
        "streams": len(streams),
        "printed": runs * lines * len(pids),
        "delivered": sum(len(stream.lines) for stream in streams),
        "streams_exact": exact,
        "ended_completed": sum(
            1 for s in streams if s.end == {"status": "completed", "exit_code": 0}
        ),
    }


def run(trials: int = 10, lines: int = 20_000, runs: int = 5) -> dict[str, Any]:
    result: dict[str, Any] = {"trials": trials, "workers": {}}
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            server = AppServer(Path(tmp) / "data", workers)
            try:
                pids = server.find_workers()
                first = _first_lines(server, pids, trials)
                entry: dict[str, Any] = {
                    "first_line": {kind: _ms(v) for kind, v in first.items() if v},
                    "delivery": _delivery(server, pids, runs, lines),
                }
                if workers == 2:
                    cancels = _cancels(server, trials)
                    entry["cancel_other_worker"] = {k: _ms(v) for k, v in cancels.items()}
                result["workers"][str(workers)] = entry
            finally:
                server.close()
    return result


def report(result: dict[str, Any]) -> str:
    rows = []
    for workers, entry in result["workers"].items():
        for kind, figures in entry["first_line"].items():
            rows.append(
                [
                    f"{workers} worker(s)",
                    f"start -> first SSE line ({kind} worker)",
                    f"{figures['median_ms']:.0f}",
                    f"{figures['min_ms']:.0f}-{figures['max_ms']:.0f}",
                ]
            )
        for kind, figures in entry.get("cancel_other_worker", {}).items():
            rows.append(
                [
                    f"{workers} worker(s)",
                    f"cancel from the other worker ({kind})",
                    f"{figures['median_ms']:.0f}",
                    f"{figures['min_ms']:.0f}-{figures['max_ms']:.0f}",
                ]
            )
    text = table(["server", "what", "median ms", "range ms"], rows)
    for workers, entry in result["workers"].items():
        d = entry["delivery"]
        text += (
            f"\n{workers} worker(s): {d['delivered']:,} lines delivered of {d['printed']:,} printed"
            f" ({d['streams']} streams, {d['streams_exact']} exact, in order)"
        )
    return text


def targets(result: dict[str, Any]) -> list[Target]:
    out = []
    two = result["workers"].get("2", {})
    for kind, figures in two.get("first_line", {}).items():
        median = figures["median_ms"] / 1000
        out.append(
            Target(
                f"first SSE line, {kind} worker, < {FIRST_LINE_TARGET_S * 1000:.0f} ms",
                median < FIRST_LINE_TARGET_S,
                f"median {median * 1000:.0f} ms",
            )
        )
    cancel = two.get("cancel_other_worker", {}).get("tree_gone")
    if cancel:
        median = cancel["median_ms"] / 1000
        out.append(
            Target(
                f"cancel from the other worker, tree gone, < {CANCEL_TARGET_S * 1000:.0f} ms",
                median < CANCEL_TARGET_S,
                f"median {median * 1000:.0f} ms",
            )
        )
    for workers, entry in result["workers"].items():
        d = entry["delivery"]
        out.append(
            Target(
                f"{workers} worker(s): every printed line delivered, in order",
                d["delivered"] == d["printed"] and d["streams_exact"] == d["streams"],
                f"{d['delivered']:,} of {d['printed']:,}",
            )
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--lines", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    result = run(args.trials, args.lines, args.runs)
    print(report(result))
    for target in targets(result):
        print(target.line())
    write_json("webapp", result)


if __name__ == "__main__":
    main()
