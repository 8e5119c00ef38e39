"""Soak harness: a long-running host (a web backend up for weeks) in one process and one loop.

Not collected by pytest (no ``test_`` prefix): run it by hand, e.g.::

    PYTHONPATH=. python tests/soak.py --layer all --runs 3000 --every 500

Each layer runs many short runs (some cancelled, timed out, failing) through one public part of
the library, with at most ``--concurrency`` at once, and every ``--every`` runs records: RSS,
tracemalloc growth by line, ``gc`` object counts by type, threads, open fds, asyncio tasks,
pending timers (``loop._scheduled``), and the sizes of the library's internal tables (wrapper,
process manager, output capture, task manager, runner, registries, the POSIX host's and the
reaper's tables, cgroup sub-directories of this process, the I/O thread). At the end it prints,
for each figure, its first and last value after warm-up and the growth per run: anything that
keeps growing with the number of runs (beyond what a retention setting keeps) is a leak.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import os
import random
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

import psutil

import prismq_subprocess as pq
from prismq_subprocess._core import _host_shutdown, _tree_stop
from prismq_subprocess._io import _child_exit
from prismq_subprocess._platform import _fork, _posix_host

PY = sys.executable
MODES = [pq.RunMode.ASYNC, pq.RunMode.THREADED, pq.RunMode.LOCAL]


def _len(obj: Any, *names: str) -> int | None:
    for name in names:
        if obj is None:
            return None
        obj = getattr(obj, name, None)
    if obj is None:
        return None
    try:
        return len(obj)
    except TypeError:
        return None


class Probe:
    """Collects the figures of the process and of the objects registered in ``parts``."""

    def __init__(self) -> None:
        self.parts: dict[str, Any] = {}
        self.rows: list[tuple[int, dict[str, float]]] = []
        self.snap0: tracemalloc.Snapshot | None = None
        self.types0: collections.Counter[str] | None = None
        self.proc = psutil.Process()

    def tables(self) -> dict[str, float]:
        out: dict[str, float] = {}

        def put(name: str, value: int | None) -> None:
            if value is not None:
                out[name] = value

        host = _posix_host._HOST
        if host is not None:
            for attr in (
                "_run_cgroups",
                "_pending",
                "_leader_of",
                "_cookie_of",
                "_unknown_leaders",
            ):
                put(f"host.{attr}", _len(host, attr))
            put("cookies._equal", _len(host, "cookies", "_equal"))
            reaper = host.reaper
            if reaper is not None:
                for attr in ("_leaders", "_exited_early", "_known"):
                    put(f"reaper.{attr}", _len(reaper, attr))
            if host.cgroups is not None:
                token = host.cookies.token.lower()
                with contextlib.suppress(OSError):
                    put(
                        "cgroup_dirs",
                        sum(1 for n in os.listdir(host.cgroups.base) if token in n),
                    )
        put("tree_stop._CHILDREN", len(_tree_stop._CHILDREN))
        put("tree_stop._WORKERS", len(_tree_stop._WORKERS))
        put("host_shutdown._PARTICIPANTS", len(_host_shutdown._PARTICIPANTS))
        put("fork._AWARE", len(_fork._AWARE))
        put("child_exit._loop_pidfds", sum(len(v) for v in _child_exit._loop_pidfds.values()))
        for name, obj in self.parts.items():
            for attr in (
                "_live",
                "_retired",
                "_processes",
                "_stops",
                "_stop_requested",
                "_runs",
                "_ended",
                "_expiry",
                "_released",
                "_run_waiters",
                "_pending",
                "_failed",
                "_entries",
                "_queue",
                "_abandoned",
                "_active",
                "_active_runs",
                "_cancel_reasons",
                "_cancel_requests",
                "_close_signals",
                "_watches",
                "_waiters",
            ):
                put(f"{name}.{attr}", _len(obj, attr))
            for sub in ("_watcher", "_unsaved"):
                w = getattr(obj, sub, None)
                if w is not None:
                    for attr in ("_watched", "_requested", "_cancels", "_runs"):
                        put(f"{name}.{sub}.{attr}", _len(w, attr))
            log = getattr(obj, "_log", None)
            if log is not None:
                put(f"{name}._log._states", _len(log, "_states"))
                put(f"{name}._log._flush_waiters", _len(log, "_flush_waiters"))
            strategy = getattr(obj, "_strategy", None)
            if strategy is not None:
                for attr in ("_watches", "_live", "_pending"):
                    put(f"{name}.strategy.{attr}", _len(strategy, attr))
                bridge = getattr(strategy, "_bridge", None)
                if bridge is not None:
                    for attr in ("_commands", "_outbox", "_live", "_lent", "_readers", "_writers"):
                        put(f"{name}.bridge.{attr}", _len(bridge, attr))
        return out

    def measure(self, runs: int, loop: asyncio.AbstractEventLoop) -> None:
        gc.collect()
        row: dict[str, float] = {
            "rss_kb": self.proc.memory_info().rss / 1024,
            "traced_kb": tracemalloc.get_traced_memory()[0] / 1024,
            "threads": threading.active_count(),
            "fds": len(os.listdir("/proc/self/fd")),
            "tasks": len(asyncio.all_tasks(loop)),
            "timers": len(getattr(loop, "_scheduled", ())),
            "ready": len(getattr(loop, "_ready", ())),
            "gc_objects": len(gc.get_objects()),
            "children": len(self.proc.children(recursive=True)),
        }
        row.update(self.tables())
        self.rows.append((runs, row))
        print(
            f"[{runs:6d}] rss={row['rss_kb']:.0f}K traced={row['traced_kb']:.0f}K "
            f"thr={row['threads']} fds={row['fds']} tasks={row['tasks']} "
            f"timers={row['timers']} objs={row['gc_objects']} kids={row['children']}",
            flush=True,
        )

    def baseline(self) -> None:
        gc.collect()
        if tracemalloc.is_tracing():
            self.snap0 = tracemalloc.take_snapshot()
        self.types0 = collections.Counter(type(o).__name__ for o in gc.get_objects())

    def report(self, label: str) -> list[str]:
        suspects: list[str] = []
        if len(self.rows) < 2:
            return suspects
        (r0, first), (r1, last) = (
            self.rows[1] if len(self.rows) > 2 else self.rows[0],
            self.rows[-1],
        )
        span = max(1, r1 - r0)
        print(f"\n== {label}: figures from run {r0} to run {r1} ==")
        for key in sorted(set(first) | set(last)):
            a, b = first.get(key, 0), last.get(key, 0)
            grows = b - a
            if key == "gc_objects":
                grows -= span * 0.5  # (a few objects per run come and go)
            elif key == "traced_kb":
                grows -= span * 50 / 1024  # (50 bytes a run)
            elif key == "rss_kb":
                grows = 0  # (the allocator's arenas: read the series)
            flag = "  <-- grows" if grows > 0 else ""
            if flag:
                suspects.append(f"{key} {a:.0f}->{b:.0f}")
            series = " ".join(f"{row.get(key, 0):.0f}" for _, row in self.rows)
            print(
                f"  {key:40s} {a:10.0f} -> {b:10.0f}  ({(b - a) / span:+.3f}/run) [{series}]{flag}"
            )
        gc.collect()
        if self.snap0 is not None and tracemalloc.is_tracing():
            snap = tracemalloc.take_snapshot()
            print("  -- tracemalloc top growth by line (since warm-up) --")
            for stat in snap.compare_to(self.snap0, "lineno")[:12]:
                print(f"    {stat}")
        if self.types0 is not None:
            now = collections.Counter(type(o).__name__ for o in gc.get_objects())
            now.subtract(self.types0)
            print("  -- gc objects growth by type --")
            for name, n in now.most_common(12):
                print(f"    {name:30s} {n:+d}")
        return suspects


async def drive(
    probe: Probe,
    total: int,
    every: int,
    concurrency: int,
    one: Callable[[int], Awaitable[None]],
    warmup: int,
) -> None:
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(concurrency)
    errors: collections.Counter[str] = collections.Counter()

    async def guarded(i: int) -> None:
        try:
            await one(i)
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                raise
        except Exception as exc:
            errors[type(exc).__name__] += 1
        finally:
            sem.release()

    async def batch(start: int, stop: int) -> None:
        tasks = []
        for i in range(start, stop):
            await sem.acquire()
            tasks.append(asyncio.create_task(guarded(i)))
        await asyncio.gather(*tasks)

    await batch(0, warmup)
    await asyncio.sleep(0.3)
    probe.baseline()
    probe.measure(0, loop)
    done = 0
    while done < total:
        step = min(every, total - done)
        await batch(warmup + done, warmup + done + step)
        done += step
        await asyncio.sleep(0.3)  # let stops, sweeps, timers settle
        probe.measure(done, loop)
    if errors:
        print("  errors by type:", dict(errors))


# -- the layers -------------------------------------------------------------------------------
def kind(i: int) -> str:
    r = i % 20
    if r == 0:
        return "cancel"
    if r == 1:
        return "timeout"
    if r == 2:
        return "fail"
    return "ok"


async def cancel_soon(aw: Awaitable[Any], delay: float) -> None:
    task = asyncio.ensure_future(aw)
    await asyncio.sleep(delay)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


async def layer_wrapper(args: argparse.Namespace, probe: Probe, mode: pq.RunMode) -> None:
    async with pq.SubprocessWrapper(mode, grace_period=0.5) as wrapper:
        probe.parts["wrapper"] = wrapper

        async def one(i: int) -> None:
            k, op = kind(i), i % 3
            if k == "cancel":
                await cancel_soon(wrapper.run("sleep", "5"), random.uniform(0, 0.05))
            elif k == "timeout":
                with contextlib.suppress(pq.ProcessTimeoutError, TimeoutError):
                    await wrapper.run("sleep", "5", timeout=0.05)
            elif k == "fail":
                await wrapper.run("sh", "-c", "echo oops >&2; exit 3")
            elif op == 0:
                await wrapper.run("echo", "hello", str(i))
            elif op == 1:
                async with wrapper.stream("sh", "-c", "echo a; echo b; echo c") as lines:
                    async for _ in lines:
                        pass
            else:
                proc = await wrapper.create_subprocess_exec(
                    "cat", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
                )
                await proc.communicate(b"data\n")

        await drive(probe, args.runs, args.every, args.concurrency, one, args.warmup)


def write_script(d: str) -> str:
    path = os.path.join(d, "mod.py")
    with open(path, "w") as f:
        f.write(
            "import sys, time\n"
            "a = sys.argv[1:]\n"
            "print('line 1'); print('line 2')\n"
            "if '--fail' in a: sys.exit(2)\n"
            "if '--sleep' in a: time.sleep(5)\n"
        )
    return path


async def layer_runner(args: argparse.Namespace, probe: Probe, mode: pq.RunMode) -> None:
    tmp = tempfile.mkdtemp(prefix="soak-")
    script = write_script(tmp)
    registry: pq.RunRegistry | pq.SQLiteRunRegistry
    if args.sqlite:
        registry = pq.SQLiteRunRegistry(os.path.join(tmp, "runs.db"), max_runs=args.max_runs)
    else:
        registry = pq.RunRegistry(max_runs=args.max_runs)
    async with registry:
        capture = pq.OutputCapture(
            log_dir=os.path.join(tmp, "logs") if args.log_dir else None,
            retain_ended_runs=args.retain_runs,
            retain_ended_seconds=args.retain_seconds,
        )
        async with (
            capture,
            pq.ModuleRunner(
                registry,
                run_mode=mode,
                output=capture,
                grace_period=0.5,
                max_concurrent=16,
                sample_interval=0.05,
            ) as runner,
        ):
            probe.parts.update(
                registry=registry,
                capture=capture,
                runner=runner,
                processes=runner.processes,
                wrapper=runner.wrapper,
            )

            async def follow(run_id: str) -> None:
                with contextlib.suppress(Exception):
                    async with capture.subscribe(run_id) as sub:
                        async for _ in sub:
                            pass

            async def one(i: int) -> None:
                probe.parts["tm"] = runner._task_manager
                k = kind(i)
                use_cmd = i % 2 == 0
                if k == "cancel":
                    if i % 40 == 0:
                        rid = await runner.start_module("m", "M", script, {"sleep": True})
                        await asyncio.sleep(random.uniform(0, 0.1))
                        await runner.cancel(rid)
                    else:
                        await cancel_soon(
                            runner.execute_command("c", "C", ["sleep", "5"]),
                            random.uniform(0, 0.05),
                        )
                    return
                if k == "timeout":
                    await runner.execute_command("c", "C", ["sleep", "5"], timeout=0.05)
                    return
                if k == "fail":
                    await runner.execute_command("c", "C", ["sh", "-c", "echo x; exit 3"])
                    return
                if i % 10 == 3:
                    rid = await runner.start_module("m", "M", script, {"n": i})
                    await follow(rid)
                    return
                if i % 10 == 4:
                    rid = await runner.start_command("c", "C", ["echo", "hi"])
                    chunks = [c async for c in pq.sse_events(capture, rid, heartbeat=1.0)]
                    assert chunks
                    return
                if use_cmd:
                    await runner.execute_command("c", "C", ["echo", "hi", str(i)])
                else:
                    await runner.execute_command("c", "C", ["sh", "-c", "echo a; echo b"])

            await drive(probe, args.runs, args.every, args.concurrency, one, args.warmup)
            print("  registry runs:", await registry.count_runs())


async def layer_tasks(args: argparse.Namespace, probe: Probe) -> None:
    tmp = tempfile.mkdtemp(prefix="soak-")
    registry: pq.RunRegistry | pq.SQLiteRunRegistry
    if args.sqlite:
        registry = pq.SQLiteRunRegistry(os.path.join(tmp, "runs.db"), max_runs=args.max_runs)
    else:
        registry = pq.RunRegistry(max_runs=args.max_runs)
    rm = pq.ResourceManager(max_memory_percent=99.9)
    async with registry:
        capture = pq.OutputCapture(
            log_dir=os.path.join(tmp, "logs") if args.log_dir else None,
            retain_ended_runs=args.retain_runs,
            retain_ended_seconds=args.retain_seconds,
        )
        async with (
            capture,
            pq.BackgroundTaskManager(
                registry, max_concurrent=16, output=capture, resource_manager=rm
            ) as tm,
        ):
            probe.parts.update(registry=registry, capture=capture, tm=tm)

            async def work(i: int) -> None:
                await capture.append_line(pq_id[i], f"line {i}")
                k = kind(i)
                if k == "fail":
                    raise ValueError("boom")
                if k in ("cancel", "timeout"):
                    await asyncio.sleep(5)
                await asyncio.sleep(0)

            pq_id: dict[int, str] = {}

            async def one(i: int) -> None:
                run = pq.Run(module_id="t", module_name="T")
                pq_id[i] = run.run_id
                rid = await tm.start_task(run, work(i))
                sub_task = asyncio.create_task(_drain(capture, rid))
                if kind(i) in ("cancel", "timeout"):
                    await asyncio.sleep(random.uniform(0, 0.02))
                    await tm.cancel_task(rid)
                while tm.is_active(rid):  # (the manager has no per-run wait)  # noqa: ASYNC110
                    await asyncio.sleep(0.005)
                await sub_task
                del pq_id[i]

            await drive(probe, args.runs, args.every, args.concurrency, one, args.warmup)
            print("  registry runs:", await registry.count_runs())


async def _drain(capture: pq.OutputCapture, rid: str) -> None:
    with contextlib.suppress(Exception):
        async for _ in pq.sse_events(capture, rid, heartbeat=1.0):
            pass


async def layer_executor(args: argparse.Namespace, probe: Probe, mode: pq.RunMode) -> None:
    tmp = tempfile.mkdtemp(prefix="soak-")
    script = write_script(tmp)
    rm = pq.ResourceManager(max_memory_percent=99.9)
    async with pq.ConcurrentExecutor(max_concurrent=16, resource_manager=rm, run_mode=mode) as ex:
        probe.parts.update(
            executor=ex,
            runner=ex.runner,
            registry=ex.runner.registry,
            processes=ex.runner.processes,
            wrapper=ex.runner.wrapper,
        )

        async def one(i: int) -> None:
            if i % 16:
                return  # one batch per 16 indices, of 16 modules
            items = []
            for j in range(16):
                k = kind(i + j)
                params: dict[str, Any] = {"n": i + j}
                if k == "fail":
                    params["fail"] = True
                if k == "timeout":
                    params = {"sleep": True}
                items.append(
                    pq.ModuleSpec(
                        module_id="e",
                        module_name="E",
                        script_path=script,
                        parameters=params,
                        timeout=0.3 if k == "timeout" else None,
                    )
                )
            if kind(i) == "cancel":
                await cancel_soon(ex.execute_batch(items), random.uniform(0.05, 0.2))
            else:
                await ex.execute_batch(items)

        await drive(probe, args.runs, args.every, 1, one, args.warmup)


async def layer_periodic(args: argparse.Namespace, probe: Probe) -> None:
    counter = {"n": 0}

    async def tick() -> None:
        counter["n"] += 1

    def sync_tick() -> None:
        counter["n"] += 1

    async def one(i: int) -> None:
        func = tick if i % 2 else sync_tick
        task = pq.PeriodicTask(f"p{i}", 0.01, func)
        task.start()
        await asyncio.sleep(0.03)
        await task.stop()
        if i % 5 == 0:
            async with pq.PeriodicTask(f"q{i}", 0.01, tick):
                await asyncio.sleep(0.01)

    rm = pq.ResourceManager(max_memory_percent=99.9)
    long = pq.PeriodicTask("long", 0.005, tick)
    long.start()
    probe.parts["rm"] = rm

    async def one_rm(i: int) -> None:
        await one(i)
        await rm.check_resources()
        with contextlib.suppress(pq.ResourceLimitException):
            await rm.admit(wait=False)

    await drive(probe, args.runs, args.every, args.concurrency, one_rm, args.warmup)
    await long.stop()
    print("  ticks:", counter["n"], "long runs:", long.stats.runs)


async def layer_capture(args: argparse.Namespace, probe: Probe) -> None:
    """OutputCapture alone: many runs, subscribers, SSE, retention by count/bytes/seconds."""
    tmp = tempfile.mkdtemp(prefix="soak-")
    capture = pq.OutputCapture(
        max_lines_per_run=50,
        log_dir=os.path.join(tmp, "logs") if args.log_dir else None,
        retain_ended_runs=args.retain_runs,
        retain_ended_seconds=args.retain_seconds,
    )
    async with capture:
        probe.parts["capture"] = capture

        async def one(i: int) -> None:
            rid = f"run-{i}"
            capture.open_run(rid)
            subs = [asyncio.create_task(_drain(capture, rid)) for _ in range(2)]
            await asyncio.sleep(0)
            await capture.append_lines(rid, [f"line {j}" for j in range(100)])
            if i % 7 == 0:
                # a subscriber that leaves early
                sub = capture.subscribe(rid)
                async with sub:
                    async for _ in sub:
                        break
            await capture.close_run(rid, status="completed", exit_code=0)
            await asyncio.gather(*subs)

        await drive(probe, args.runs, args.every, args.concurrency, one, args.warmup)


async def main(args: argparse.Namespace) -> None:
    probe = Probe()
    layer = args.layer
    mode = pq.RunMode(args.mode)
    t0 = time.monotonic()
    if layer == "wrapper":
        await layer_wrapper(args, probe, mode)
    elif layer == "runner":
        await layer_runner(args, probe, mode)
    elif layer == "tasks":
        await layer_tasks(args, probe)
    elif layer == "executor":
        await layer_executor(args, probe, mode)
    elif layer == "periodic":
        await layer_periodic(args, probe)
    elif layer == "capture":
        await layer_capture(args, probe)
    print(f"  elapsed {time.monotonic() - t0:.1f}s")
    suspects = probe.report(f"{layer} {args.mode}{' sqlite' if args.sqlite else ''}")
    print("SUSPECTS:", suspects or "none")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--layer",
        default="wrapper",
        choices=["wrapper", "runner", "tasks", "executor", "periodic", "capture"],
    )
    parser.add_argument("--mode", default="async", choices=["async", "threaded", "local"])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--every", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--sqlite", action="store_true")
    parser.add_argument("--log-dir", action="store_true")
    parser.add_argument("--max-runs", type=int, default=None)
    parser.add_argument("--retain-runs", type=int, default=1000)
    parser.add_argument("--retain-seconds", type=float, default=3600.0)
    parser.add_argument("--no-trace", action="store_true")
    a = parser.parse_args()
    if not a.no_trace:
        tracemalloc.start(1)
    asyncio.run(main(a))
