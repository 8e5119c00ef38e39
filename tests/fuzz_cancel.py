"""Chaos harness: cancellation and timeouts at random moments in every real mode; leak checks.

Not collected by pytest (no ``test_`` prefix): run it by hand, e.g.::

    PYTHONPATH=. python -W error::ResourceWarning tests/fuzz_cancel.py --rounds 20 --mode all

Each round, in one ``asyncio.run``, makes a wrapper and starts many operations concurrently
(``run()`` with and without timeout, ``stream()`` consumers breaking early,
``create_subprocess_exec`` + ``communicate(input=...)``, children forking grandchildren and
double-forked daemons, children ignoring SIGTERM, ``ModuleRunner`` and
``BackgroundTaskManager`` runs cancelled through their APIs), cancels them at random delays (0 to
50 ms, double cancels, ``wait_for``, ``asyncio.timeout``), closes the wrapper, then checks that
no process carrying the round's marker survives, that threads and descriptors return to their
baseline, that no task is pending, that nothing was logged as never retrieved / never awaited /
a ResourceWarning, and that every cancelled await raised what it should.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import gc
import logging
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

import psutil

import prismq_subprocess as pq
from prismq_subprocess import RunMode

PY = sys.executable
MARK = "CHAOS_FUZZ_TOKEN"
GRACE = 0.3

FORK_TREE = "sleep 30 & sleep 30"
DAEMON = (
    "import os, sys, time\n"
    "if os.fork() == 0:\n"
    "    os.setsid()\n"
    "    if os.fork() == 0:\n"
    "        time.sleep(30); os._exit(0)\n"
    "    os._exit(0)\n"
    "print('parent', flush=True)\n"
    "time.sleep(30)\n"
)
# A daemon keeping the pipes while its parent exits at once (the drain rule's step 3).
DAEMON_HOLDS_PIPES = (
    "import os, time\n"
    "if os.fork() == 0:\n"
    "    os.setsid()\n"
    "    if os.fork() == 0:\n"
    "        time.sleep(30); os._exit(0)\n"
    "    os._exit(0)\n"
    "print('parent done', flush=True)\n"
)
IGNORE_TERM = (
    "import signal, time, sys\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "time.sleep(30)\n"
)
LINES = "import sys\nfor i in range(int(sys.argv[1])):\n    print('line', i, flush=(i % 7 == 0))\n"
SLOW_LINES = (
    "import sys, time\nfor i in range(1000):\n    print('line', i, flush=True); time.sleep(0.005)\n"
)

log = logging.getLogger("chaos")
# Operations that take 30 s unless cancelled.
ENDLESS = {"run_tree", "raw_tree", "run_daemon", "run_ignore_term", "runner_execute"}
# asyncio's own debug-mode warning when a cancelled creation kills its child (documented).
EXPECTED_LOGS = ("Close running child process: kill",)


class Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, what: str) -> None:
        self.items.append(what)
        print("  PROBLEM:", what, flush=True)


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if os.environ.get("CHAOS_STACKS"):
            record.msg = record.getMessage() + "\n" + "".join(traceback.format_stack()[-12:])
            record.args = ()
        self.records.append(record)


# -- cancellation patterns --------------------------------------------------------------------
SLOW: list[str] = []
PATTERN: contextvars.ContextVar[str] = contextvars.ContextVar("PATTERN", default="?")


def tagged() -> dict[str, str]:
    """The environment for a child: says which cancellation pattern it ran under."""
    return dict(os.environ, CHAOS_OP=PATTERN.get())


ONLY: list[str] = []


async def drive(
    rng: random.Random, make: Callable[[], Awaitable[Any]], name: str, problems: Problems
) -> str:
    """Run ``make()`` under a random cancellation pattern; check the outcome; return a label."""
    pattern = rng.choice(["none", "cancel", "cancel", "double", "wait_for", "timeout", "cancel0"])
    if pattern == "none" and name in ENDLESS:
        pattern = "cancel"
    delay = rng.choice([0.0, 0.0, rng.uniform(0, 0.005), rng.uniform(0, 0.05)])
    PATTERN.set(f"{name}/{pattern}/{delay:.4f}")
    if pattern == "none":
        with contextlib.suppress(TimeoutError, pq.PrismQError):
            await make()
        return f"{name}/none"
    if pattern == "wait_for":
        try:
            await asyncio.wait_for(make(), delay)
        except TimeoutError:
            pass
        except pq.PrismQError:
            pass
        return f"{name}/wait_for"
    if pattern == "timeout":
        try:
            async with asyncio.timeout(delay):
                await make()
        except TimeoutError:
            pass
        except pq.PrismQError:
            pass
        return f"{name}/timeout"
    task = asyncio.ensure_future(make())
    if pattern == "cancel0":
        requested = task.cancel()  # before its first step
    else:
        if delay:
            await asyncio.sleep(delay)
        else:
            await asyncio.sleep(0)
        requested = task.cancel()
        if pattern == "double":
            await asyncio.sleep(rng.choice([0, 0.001, 0.01, 0.03]))
            requested = task.cancel() or requested
    try:
        await asyncio.wait_for(asyncio.shield(task), 60)
    except asyncio.CancelledError:
        if not task.cancelled():
            raise
        return f"{name}/{pattern}"
    except TimeoutError:
        problems.add(f"{name}/{pattern}: the cancelled task did not end within 60 s")
        return f"{name}/{pattern}"
    except pq.PrismQError:
        if requested:
            problems.add(
                f"{name}/{pattern}: cancel() returned True but the task raised {task.exception()!r}"
            )
        return f"{name}/{pattern}"
    if requested:
        problems.add(
            f"{name}/{pattern}: cancel() returned True but the task returned {task.result()!r}"
        )
    return f"{name}/{pattern}"


# -- operations --------------------------------------------------------------------------------
def operations(
    w: pq.SubprocessWrapper, runner: Any, manager: Any, problems: Problems
) -> dict[str, Callable[[random.Random], Callable[[], Awaitable[Any]]]]:
    async def run_quick(rng: random.Random) -> None:
        n = rng.choice([1, 100, 5000])
        r = await w.run(PY, "-c", LINES, str(n))
        expected = "".join(f"line {i}\n" for i in range(n))
        if r.returncode != 0 or r.stdout_text != expected:
            problems.add(f"run_quick lost output: rc={r.returncode} len={len(r.stdout)}")

    async def run_timeout(rng: random.Random) -> None:
        try:
            await w.run("sh", "-c", FORK_TREE, timeout=rng.uniform(0.001, 0.1))
        except pq.ProcessTimeoutError:
            return
        problems.add("run_timeout returned without a timeout")

    async def run_tree(rng: random.Random) -> None:
        await w.run("sh", "-c", FORK_TREE)

    async def run_daemon(rng: random.Random) -> None:
        t = rng.choice([None, 0.05, 0.3])
        PATTERN.set(PATTERN.get() + f"/t={t}")
        await w.run(PY, "-c", DAEMON, timeout=t, env=tagged())

    async def run_daemon_pipes(rng: random.Random) -> None:
        r = await w.run(PY, "-c", DAEMON_HOLDS_PIPES, env=tagged())
        if b"parent done" not in r.stdout:
            problems.add(f"run_daemon_pipes lost output: {r.stdout!r}")

    async def run_ignore_term(rng: random.Random) -> None:
        await w.run(
            PY, "-c", IGNORE_TERM, timeout=rng.choice([None, 0.05, 0.2]), grace_period=GRACE
        )

    async def run_input(rng: random.Random) -> None:
        data = os.urandom(rng.choice([0, 10, 100_000, 1_000_000]))
        r = await w.run("cat", input=data)
        if r.stdout != data:
            problems.add(f"run_input lost data: {len(r.stdout)} of {len(data)}")

    async def stream_break(rng: random.Random) -> None:
        k = rng.randint(0, 20)
        async with w.stream(PY, "-c", SLOW_LINES, encoding="utf-8") as lines:
            i = 0
            async for line in lines:
                if line != f"line {i}\n":
                    problems.add(f"stream_break got {line!r} for line {i}")
                i += 1
                if i >= k:
                    break

    async def stream_full(rng: random.Random) -> None:
        n = rng.choice([0, 10, 3000])
        got = 0
        async with w.stream(PY, "-c", LINES, str(n)) as lines:
            async for _ in lines:
                got += 1
        if got != n:
            problems.add(f"stream_full: {got} lines of {n}")

    async def iter_lines_break(rng: random.Random) -> None:
        p = await w.create_subprocess_exec(PY, "-c", SLOW_LINES, stdout=subprocess.PIPE)
        try:
            i = 0
            async for _ in pq.iter_lines(p.stdout):
                i += 1
                if i > rng.randint(0, 10):
                    break
        finally:
            await pq.terminate_gracefully(p, timeout=GRACE)

    async def communicate(rng: random.Random) -> None:
        data = os.urandom(rng.choice([0, 1000, 300_000]))
        p = await w.create_subprocess_exec(
            "cat", stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            out, _ = await p.communicate(input=data)
        except BaseException:
            await pq.terminate_gracefully(p, timeout=GRACE)
            raise
        if out != data:
            problems.add(f"communicate lost data: {len(out)} of {len(data)}")

    async def raw_tree(rng: random.Random) -> None:
        p = await w.create_subprocess_exec("sh", "-c", FORK_TREE)
        try:
            await p.wait()
        finally:
            await pq.terminate_gracefully(p, timeout=GRACE)

    async def runner_cancel(rng: random.Random) -> None:
        run_id = await runner.start_command("m", "M", ["sh", "-c", FORK_TREE])
        await asyncio.sleep(rng.choice([0, 0.01, 0.05]))
        result = await runner.cancel(run_id)
        if result not in (pq.CancelResult.CANCELLED, pq.CancelResult.ALREADY_FINISHED):
            problems.add(f"runner.cancel answered {result!r}")

    async def runner_execute(rng: random.Random) -> None:
        await runner.execute_command(
            "m", "M", [PY, "-c", IGNORE_TERM], timeout=rng.choice([None, 0.1])
        )

    async def manager_cancel(rng: random.Random) -> None:
        run = pq.Run(module_id="bg", module_name="BG")

        async def work() -> None:
            await w.run("sh", "-c", FORK_TREE)

        manager.start_task(run, work())
        await asyncio.sleep(rng.choice([0, 0.001, 0.02, 0.05]))
        await manager.cancel_task(run.run_id)

    def bind(fn: Callable[[random.Random], Awaitable[Any]]) -> Any:
        return lambda rng: lambda: fn(rng)

    return {
        name: bind(fn)
        for name, fn in {
            "run_quick": run_quick,
            "run_timeout": run_timeout,
            "run_tree": run_tree,
            "run_daemon": run_daemon,
            "run_daemon_pipes": run_daemon_pipes,
            "run_ignore_term": run_ignore_term,
            "run_input": run_input,
            "stream_break": stream_break,
            "stream_full": stream_full,
            "iter_lines_break": iter_lines_break,
            "communicate": communicate,
            "raw_tree": raw_tree,
            "runner_cancel": runner_cancel,
            "runner_execute": runner_execute,
            "manager_cancel": manager_cancel,
        }.items()
    }


# -- leak checks -----------------------------------------------------------------------------
def marked_processes(token: str) -> list[psutil.Process]:
    me = os.getpid()
    found = []
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            if proc.environ().get(MARK) == token:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def describe(procs: list[psutil.Process]) -> str:
    out = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            tag = ""
            with contextlib.suppress(psutil.Error):
                tag = p.environ().get("CHAOS_OP", "")
            out.append(f"{p.pid}:{p.status()}:{' '.join(p.cmdline())[:40]!r}:ppid={p.ppid()}:{tag}")
    return "; ".join(out)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def fd_list() -> dict[str, str]:
    result = {}
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            result[fd] = os.readlink(f"/proc/self/fd/{fd}")
    return result


def wait_for(cond: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


async def one_round(
    mode: str, seed: int, ops_count: int, problems: Problems, tmp: str
) -> list[str]:
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    loop_errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: loop_errors.append(ctx))
    w = pq.SubprocessWrapper(RunMode(mode), grace_period=GRACE)
    registry = pq.RunRegistry()
    runner = pq.ModuleRunner(registry, wrapper=w, grace_period=GRACE)
    manager = pq.BackgroundTaskManager(registry)
    ops = operations(w, runner, manager, problems)
    names = ONLY or list(ops)
    labels: list[str] = []
    chosen = [rng.choice(names) for _ in range(ops_count)]

    async def timed(name: str) -> str:
        t = time.monotonic()
        label = await drive(
            random.Random(rng.random()), ops[name](random.Random(rng.random())), name, problems
        )
        spent = time.monotonic() - t
        if spent > 2:
            SLOW.append(f"{mode} {label} {spent:.1f}s")
        return label

    coros = [timed(name) for name in chosen]
    results = await asyncio.gather(*coros, return_exceptions=True)
    for name, res in zip(chosen, results, strict=True):
        if isinstance(res, BaseException):
            problems.add(
                f"{name}: the driver raised {res!r}\n" + "".join(traceback.format_exception(res))
            )
        else:
            labels.append(res)
    t = time.monotonic()
    await manager.aclose()
    await runner.aclose()
    await w.aclose()
    if time.monotonic() - t > 2:
        SLOW.append(f"{mode} closing {time.monotonic() - t:.1f}s")
    await asyncio.sleep(0)
    me = asyncio.current_task()
    pending = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
    if pending:
        await asyncio.sleep(0.2)
        pending = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
        if pending:
            problems.add(f"pending tasks after close: {pending!r}")
    for ctx in loop_errors:
        where = ctx.get("task") or ctx.get("future")
        problems.add(
            f"loop exception handler: {ctx.get('message')} {ctx.get('exception')!r} {where!r}"
        )
    return labels


def run_mode(
    mode: str, rounds: int, ops_count: int, seed0: int, debug_every: int, problems: Problems
) -> None:
    token = f"{os.getpid()}-{mode}"
    os.environ[MARK] = token
    capture = Capture()
    logging.getLogger().addHandler(capture)
    unraisable: list[str] = []
    sys.unraisablehook = lambda u: unraisable.append(f"{u.exc_value!r} in {u.object!r}")
    tmp = tempfile.mkdtemp()
    # Warm-up round: lazily created, long-lived threads/fds (e.g. the cgroup worker) settle.
    asyncio.run(one_round(mode, seed0 - 1, 4, Problems(), tmp))
    time.sleep(0.6)
    gc.collect()
    base_threads = threading.active_count()
    base_fds = fd_count()
    base_fd_list = fd_list()
    for r in range(rounds):
        seed = seed0 + r
        debug = debug_every and r % debug_every == 0
        t0 = time.monotonic()
        before = len(problems.items)
        try:
            labels = asyncio.run(one_round(mode, seed, ops_count, problems, tmp), debug=bool(debug))
        except BaseException as exc:
            problems.add(f"round raised {exc!r}\n{traceback.format_exc()}")
            labels = []
        gc.collect()
        leaked = marked_processes(token)
        if leaked:
            time.sleep(1.0)
            leaked = marked_processes(token)
            if leaked:
                problems.add(f"[{mode} seed {seed}] processes survived: {describe(leaked)}")
                for p in leaked:
                    with contextlib.suppress(psutil.Error):
                        p.kill()
        zombies = [
            c
            for c in psutil.Process().children(recursive=True)
            if c.status() == psutil.STATUS_ZOMBIE
        ]
        if zombies:
            problems.add(f"[{mode} seed {seed}] zombies: {describe(zombies)}")
        if not wait_for(lambda: threading.active_count() <= base_threads, 5):
            problems.add(
                f"[{mode} seed {seed}] threads {threading.active_count()} > {base_threads}: "
                f"{[t.name for t in threading.enumerate()]}"
            )
        if not wait_for(lambda: fd_count() <= base_fds, 5):
            now = fd_list()
            extra = {k: v for k, v in now.items() if base_fd_list.get(k) != v}
            problems.add(f"[{mode} seed {seed}] fds {fd_count()} > {base_fds}: {extra}")
        for rec in capture.records:
            msg = rec.getMessage()
            if rec.name.startswith("prismq_subprocess.containment"):
                continue
            if rec.name == "asyncio" and msg.startswith(EXPECTED_LOGS):
                continue
            problems.add(f"[{mode} seed {seed}] logged {rec.levelname} {rec.name}: {msg[:3000]}")
        capture.records.clear()
        for u in unraisable:
            problems.add(f"[{mode} seed {seed}] unraisable: {u[:300]}")
        unraisable.clear()
        status = "ok" if len(problems.items) == before else "PROBLEMS"
        spent = time.monotonic() - t0
        kind = "debug " if debug else ""
        print(
            f"[{mode}] round {r} seed {seed} {kind}{spent:.1f}s {status} ({len(labels)} ops)",
            flush=True,
        )
    logging.getLogger().removeHandler(capture)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", default="all")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--ops", type=int, default=24)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--debug-every", type=int, default=4)
    parser.add_argument("--load", action="store_true", help="two `yes` burners meanwhile")
    parser.add_argument("--only", default="")
    args = parser.parse_args()
    ONLY.extend(filter(None, args.only.split(",")))
    warnings.simplefilter("always", ResourceWarning)
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout)
    burners = []
    if args.load:
        env = {k: v for k, v in os.environ.items() if k != MARK}
        burners = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL, env=env) for _ in range(2)]
    problems = Problems()
    modes = ["async", "threaded", "local"] if args.mode == "all" else args.mode.split(",")
    try:
        for mode in modes:
            run_mode(mode, args.rounds, args.ops, args.seed, args.debug_every, problems)
    finally:
        for b in burners:
            b.kill()
            b.wait()
    print("slow:", SLOW)
    print(f"\n{len(problems.items)} problem(s)")
    sys.exit(1 if problems.items else 0)


if __name__ == "__main__":
    main()
