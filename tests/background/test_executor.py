"""ConcurrentExecutor: ordered batch results, concurrency bound, admission (fake readings)."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path
from typing import Any

import anyio
import pytest

import prismq_subprocess as pq
from prismq_subprocess._background._executor import (
    _OWN_REGISTRY_MAX_RUNS,
    ConcurrentExecutor,
    ModuleSpec,
)
from prismq_subprocess._core._exceptions import RunnerClosedError

GiB = 1 << 30


def reader(*percents: float) -> pq.ResourceManager:
    """A ResourceManager over scripted memory readings (the last one repeats)."""
    readings = list(percents)

    def read() -> pq.ResourceSnapshot:
        percent = readings.pop(0) if len(readings) > 1 else readings[0]
        return pq.ResourceSnapshot(
            memory_percent=percent, available_bytes=8 * GiB, total_bytes=16 * GiB
        )

    return pq.ResourceManager(max_memory_percent=90.0, reader=read, poll_interval=0.01)


@pytest.fixture
def scripts(tmp_path: Path) -> dict[str, Path]:
    code = {
        "ok": "import sys\nprint('ok', *sys.argv[1:])\n",
        "fail": "import sys\nprint('failing')\nsys.exit(2)\n",
        "sleep": "import time\nprint('sleeping', flush=True)\ntime.sleep(60)\n",
        "short": "import time\ntime.sleep(0.2)\n",
    }
    paths = {}
    for name, text in code.items():
        paths[name] = tmp_path / f"{name}.py"
        paths[name].write_text(textwrap.dedent(text))
    return paths


async def test_batch_returns_one_result_per_item_in_order(
    scripts: dict[str, Path], tmp_path: Path
) -> None:
    async with ConcurrentExecutor(max_concurrent=3, run_mode="async", grace_period=1.0) as ex:
        results = await ex.execute_batch(
            [
                ModuleSpec("a", "A", scripts["ok"], {"n": 1}),
                {"module_id": "b", "module_name": "B", "script_path": scripts["fail"]},
                ModuleSpec("c", "C", tmp_path / "missing.py"),
                ModuleSpec("d", "D", scripts["ok"], {"bad": object()}),
                {"module_id": "e", "module_name": "E", "script_path": scripts["ok"], "x": 1},
                ModuleSpec("f", "F", scripts["sleep"], timeout=0.5),
                ModuleSpec("g", "G", scripts["ok"], {"n": 2}),
            ]
        )
        assert [r["module_id"] for r in results] == list("abcdefg")
        a, b, c, d, e, f, g = results
        assert a["status"] == "completed" and a["success"] and a["exit_code"] == 0
        assert a["output_tail"] == ["ok --n 1"] and a["duration"] > 0
        assert b["status"] == "failed" and b["exit_code"] == 2
        assert b["error"] == "exited with status 2: failing" and b["error_type"] is None
        assert c["run_id"] is None and c["error_type"] == "ScriptNotFoundError"
        assert d["run_id"] is None and d["error_type"] == "InvalidParametersError"
        assert e["error_type"] == "InvalidParametersError" and "x" in e["error"]
        assert f["status"] == "failed" and f["error"].startswith("timed out after 0.5 s")
        assert g["output_tail"] == ["ok --n 2"]
        stored = await ex.registry.list_runs()
        assert {run.module_id for run in stored} == {"a", "b", "f", "g"}


async def test_at_most_max_concurrent_modules_run_at_once(scripts: dict[str, Path]) -> None:
    async with ConcurrentExecutor(max_concurrent=2, run_mode="threaded") as ex:
        peak = 0
        done = asyncio.Event()

        async def watch() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, len(ex.runner.processes.live()))
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch())
        results = await ex.execute_batch(
            ModuleSpec(str(i), "S", scripts["short"]) for i in range(6)
        )
        done.set()
        await watcher
    assert [r["status"] for r in results] == ["completed"] * 6
    assert 1 <= peak <= 2


async def test_refused_admission_raises_or_becomes_a_result(scripts: dict[str, Path]) -> None:
    async with ConcurrentExecutor(
        resource_manager=reader(95.0), admission_wait=False, run_mode="async"
    ) as ex:
        with pytest.raises(pq.ResourceLimitException, match=r"memory_percent 95\.0 > 90\.0"):
            await ex.execute_module("a", "A", scripts["ok"])
        [result] = await ex.execute_batch([ModuleSpec("b", "B", scripts["ok"])])
        assert result["error_type"] == "ResourceLimitException" and result["run_id"] is None
        assert await ex.registry.count_runs() == 0


async def test_admission_waits_until_resources_free_up(scripts: dict[str, Path]) -> None:
    manager = reader(95.0, 95.0, 50.0)
    async with ConcurrentExecutor(resource_manager=manager, run_mode="async") as ex:
        result = await ex.execute_module("a", "A", scripts["ok"])
    assert result["status"] == "completed"


async def test_admission_wait_has_a_timeout(scripts: dict[str, Path]) -> None:
    async with ConcurrentExecutor(
        resource_manager=reader(95.0), admission_timeout=0.05, run_mode="async"
    ) as ex:
        with pytest.raises(pq.ResourceWaitTimeoutError):
            await ex.execute_module("a", "A", scripts["ok"])


async def test_cancelling_a_batch_cancels_its_runs(scripts: dict[str, Path]) -> None:
    output = pq.OutputCapture()
    async with ConcurrentExecutor(
        max_concurrent=2, run_mode="async", output=output, grace_period=1.0
    ) as ex:
        batch = asyncio.create_task(
            ex.execute_batch([ModuleSpec(str(i), "S", scripts["sleep"]) for i in range(3)])
        )
        while len(ex.runner.processes.live()) < 2:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        batch.cancel()
        with pytest.raises(asyncio.CancelledError):
            await batch
        runs = await ex.registry.list_runs()
        assert [run.status for run in runs] == [pq.RunStatus.CANCELLED] * 2
        assert ex.runner.processes.live() == {}
    await output.aclose()


async def test_closed_executor_refuses_work(scripts: dict[str, Path]) -> None:
    ex = ConcurrentExecutor(run_mode="async")
    assert (await ex.execute_module("a", "A", scripts["ok"]))["success"]
    ex.cleanup()
    ex.cleanup()
    with pytest.raises(RunnerClosedError):
        await ex.execute_module("a", "A", scripts["ok"])
    [result] = await ex.execute_batch([ModuleSpec("a", "A", scripts["ok"])])
    assert result["error_type"] == "RunnerClosedError"


async def test_closing_ends_calls_waiting_for_admission(scripts: dict[str, Path]) -> None:
    # Resources stay short and there is no admission timeout: aclose() must end the waiting
    # calls (they polled the resource manager for ever), and the batch still gets its result.
    ex = ConcurrentExecutor(max_concurrent=1, resource_manager=reader(99.0), run_mode="async")
    call = asyncio.create_task(ex.execute_module("a", "A", scripts["ok"]))
    batch = asyncio.create_task(ex.execute_batch([ModuleSpec("b", "B", scripts["ok"])]))
    await asyncio.sleep(0.1)
    assert not call.done() and not batch.done()
    await ex.aclose()
    async with asyncio.timeout(5):
        with pytest.raises(RunnerClosedError):
            await call
        [result] = await batch
    assert result["error_type"] == "RunnerClosedError"


async def test_cancelling_a_call_waiting_for_admission(scripts: dict[str, Path]) -> None:
    async with ConcurrentExecutor(
        max_concurrent=1, resource_manager=reader(99.0), run_mode="async"
    ) as ex:
        call = asyncio.create_task(ex.execute_module("a", "A", scripts["ok"]))
        await asyncio.sleep(0.05)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        # Its slot was given back: a call admitted now runs.
        ex.resource_manager = None
        async with asyncio.timeout(10):
            assert (await ex.execute_module("b", "B", scripts["ok"]))["success"]


def test_an_executor_serves_one_event_loop_after_another(scripts: dict[str, Path]) -> None:
    # A module-level executor and one asyncio.run() per command or test: its slots were an
    # asyncio.Semaphore bound to the first loop that waited on it, so every call that had to
    # wait in a later loop failed with "bound to a different event loop".
    ex = ConcurrentExecutor(max_concurrent=1, run_mode="async")
    specs = [ModuleSpec(f"m{i}", "M", scripts["short"]) for i in range(3)]
    for _ in range(2):
        results = asyncio.run(ex.execute_batch(specs))
        assert [r["status"] for r in results] == ["completed"] * 3, results
    ex.cleanup()


def test_bad_limits_and_specs() -> None:
    with pytest.raises(pq.exceptions.InvalidLimitError):
        ConcurrentExecutor(max_concurrent=0)
    with pytest.raises(ValueError, match="incomplete"):
        ModuleSpec.from_any({"module_id": "a"})
    with pytest.raises(pq.exceptions.InvalidArgumentTypeError, match="ModuleSpec or a mapping"):
        ModuleSpec.from_any(42)  # type: ignore[arg-type]
    # Refused when made, not at every call (nor never, without a resource manager).
    with pytest.raises(pq.exceptions.InvalidTimeoutError):
        ConcurrentExecutor(admission_timeout=-5)
    with pytest.raises(pq.exceptions.InvalidParametersError, match="keys must be str"):
        ModuleSpec.from_any({"module_id": "a", 1: "x"})  # type: ignore[dict-item]


# --- the PrismQ guide's call shapes (issue 13, issue 11 D13) -----------------------------------


@pytest.fixture
def argv_script(tmp_path: Path) -> Path:
    folder = tmp_path / "mods"
    folder.mkdir()
    script = folder / "show.py"
    script.write_text("import os, sys\nprint('args', *sys.argv[1:])\nprint('cwd', os.getcwd())\n")
    return script


async def test_guide_execute_module_with_an_argument_list(argv_script: Path) -> None:
    async with ConcurrentExecutor(max_concurrent=2, run_mode="async") as ex:
        # ConcurrentExecutor.execute_module(module_id, script_path, args), as in the guide.
        result = await ex.execute_module("show", argv_script, ["--mode", "fast", "-v"])
        assert result["module_id"] == "show"
        assert (result["exit_code"], result["success"]) == (0, True)
        # The guide runs the script in its own folder.
        assert result["output_tail"] == ["args --mode fast -v", f"cwd {argv_script.parent}"]
        keywords = await ex.execute_module(
            module_id="kw", script_path=str(argv_script), args=("x",)
        )
        assert keywords["output_tail"][0] == "args x" and keywords["module_name"] == "kw"
        no_args = await ex.execute_module("bare", argv_script)
        assert no_args["output_tail"][0] == "args"
        run = await ex.registry.get_run(result["run_id"])
        assert run is not None and run.status is pq.RunStatus.COMPLETED


async def test_a_relative_script_with_cwd_is_the_same_script_in_every_call_shape(
    argv_script: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A probe's find: with cwd= given, the full shape took a relative script_path from cwd (as
    # the child would, ModuleRunner.prepare), the guide's shapes from this process's current
    # directory: the same arguments ran another script, with no error.
    decoy = tmp_path / "show.py"
    decoy.write_text("print('the decoy in the current directory')\n")
    monkeypatch.chdir(tmp_path)
    folder = argv_script.parent
    async with ConcurrentExecutor(max_concurrent=2, run_mode="async") as ex:
        full = await ex.execute_module("m", "m", "show.py", cwd=folder)
        guide = await ex.execute_module("m", "show.py", [], cwd=folder)
        keywords = await ex.execute_module("m", script_path="show.py", cwd=str(folder))
        relative = await ex.execute_module("m", "show.py", [], cwd="mods")
    for result in (full, guide, keywords, relative):
        assert result["output_tail"] == ["args", f"cwd {folder}"], result
    # Without cwd the guide's rule stands: taken from the current directory, run in its folder.
    async with ConcurrentExecutor(max_concurrent=1, run_mode="async") as ex:
        plain = await ex.execute_module("m", "show.py", [])
    assert plain["output_tail"] == ["the decoy in the current directory"]


async def test_guide_execute_batch_with_tuples(argv_script: Path, tmp_path: Path) -> None:
    async with ConcurrentExecutor(max_concurrent=2, run_mode="threaded") as ex:
        results = await ex.execute_batch(
            [
                ("a", argv_script, ["1"]),
                ("b", tmp_path / "missing.py", []),
                ModuleSpec("c", "C", argv_script, {"n": 2}),
                ("d", argv_script, "not-a-list"),
            ]
        )
    assert [r["module_id"] for r in results] == ["a", "b", "c", "d"]
    a, b, c, d = results
    assert a["success"] and a["output_tail"][0] == "args 1"
    assert b["error_type"] == "ScriptNotFoundError" and not b["success"]
    assert c["output_tail"][0] == "args --n 2"
    assert d["error_type"] == "InvalidArgumentTypeError" and "args" in d["error"]


@pytest.mark.parametrize(
    ("call", "names"),
    [
        (lambda ex, p: ex.execute_module("id", "Name", 5), "script_path"),
        (lambda ex, p: ex.execute_module("id", p, "--flag"), "args"),
        (lambda ex, p: ex.execute_module("id", p, ["--n", 3]), "args"),
        (lambda ex, p: ex.execute_module("id", p, ["x"], args=["y"]), "args"),
        (lambda ex, p: ex.execute_module("id", p, ["x"], {"n": 1}), "parameters"),
        (lambda ex, p: ex.execute_module("id", "Name", p, args="--x"), "args"),
    ],
)
async def test_bad_shapes_raise_a_specific_error_before_anything_starts(
    argv_script: Path, call: Any, names: str
) -> None:
    async with ConcurrentExecutor(run_mode="async") as ex:
        with pytest.raises(pq.PrismQError, match=names) as info:
            await call(ex, argv_script)
        assert isinstance(info.value, TypeError | ValueError)
        assert await ex.registry.count_runs() == 0


async def test_parameters_and_args_together(argv_script: Path) -> None:
    async with ConcurrentExecutor(run_mode="async") as ex:
        result = await ex.execute_module("m", "M", argv_script, {"n": 1}, args=["tail"])
    assert result["output_tail"][0] == "args --n 1 tail"


# --- review (session 21) -------------------------------------------------------------------


@pytest.mark.parametrize(
    "batch",
    [
        None,
        5,
        "abc",
        ModuleSpec("a", "A", "ok.py"),
        {"module_id": "a", "module_name": "A", "script_path": "ok.py"},
        ("a", "ok.py", ["--flag"]),
        ["a", Path("ok.py"), []],
    ],
    ids=["None", "int", "str", "one-spec", "one-mapping", "one-guide-tuple", "one-guide-list"],
)
async def test_a_batch_that_is_not_a_list_of_specs_is_refused(batch: object) -> None:
    # One spec (or mapping) instead of a list ran nothing and gave one error result per key or
    # character, or raised a bare TypeError ("'ModuleSpec' object is not iterable").
    async with ConcurrentExecutor(run_mode="dry_run") as ex:
        with pytest.raises(pq.exceptions.InvalidArgumentTypeError, match="execute_batch"):
            await ex.execute_batch(batch)  # type: ignore[arg-type]
        assert await ex.registry.list_runs() == []


async def test_an_item_of_the_wrong_kind_is_a_type_error_result() -> None:
    # It was InvalidParametersError (a ValueError), where a batch of the wrong kind is an
    # InvalidArgumentTypeError (a new user's find, session 35).
    async with ConcurrentExecutor(run_mode="dry_run") as ex:
        [result] = await ex.execute_batch(["bogus"])  # type: ignore[list-item]
        assert result["run_id"] is None and result["error_type"] == "InvalidArgumentTypeError"
        assert "a batch item must be a ModuleSpec" in result["error"]


async def test_the_executors_own_registry_keeps_a_bounded_history(tmp_path: Path) -> None:
    # A host keeps one executor up for weeks: its own in-memory registry (nobody else reads
    # it; each call returns its result) kept every run for good, output tail included (8.5 KB
    # a run for 60 lines of output: 10,000 modules, 85 MB). It keeps the newest finished runs.
    script = tmp_path / "m.py"
    script.write_text("print('x')\n")
    kept = _OWN_REGISTRY_MAX_RUNS
    async with ConcurrentExecutor(max_concurrent=16, run_mode=pq.RunMode.DRY_RUN) as executor:
        results = await executor.execute_batch(
            [ModuleSpec("m", "M", script) for _ in range(kept + 150)]
        )
        assert all(r["status"] == "completed" for r in results)
        # (Retention runs on each add_run: the runs that finished after the last one stay.)
        assert kept <= await executor.registry.count_runs() <= kept + 16
        newest = results[-1]["run_id"]
        assert (await executor.registry.get_run(newest)) is not None
    # A registry of the caller's is left as it was given (its retention is the caller's).
    mine = pq.RunRegistry()
    async with mine, ConcurrentExecutor(run_mode=pq.RunMode.DRY_RUN, registry=mine) as executor:
        await executor.execute_batch([ModuleSpec("m", "M", script) for _ in range(3)])
        assert mine.max_runs is None and await mine.count_runs() == 3


SIGTERM_SEEN = textwrap.dedent(
    """
    import pathlib, signal, sys, time
    def on_term(*_):
        pathlib.Path(sys.argv[1]).write_text("term")
        sys.exit(3)
    signal.signal(signal.SIGTERM, on_term)
    print("ready", flush=True)
    time.sleep(60)
    """
)


@pytest.mark.parametrize("how", ["aclose", "async with"])
def test_closed_in_a_cancelled_anyio_scope_a_running_module_gets_its_grace(
    how: str, tmp_path: Path
) -> None:
    """Closed in the ``finally`` of a cancelled anyio scope (or by leaving ``async with``) while
    a module runs (in a task of its own): as after asyncio's one-shot cancellation the child
    gets SIGTERM and its grace period, and the run is recorded CANCELLED before aclose()
    returns (the runner's own aclose() is shielded)."""
    script = tmp_path / "term.py"
    script.write_text(SIGTERM_SEEN)
    seen_term = tmp_path / "term"
    seen: dict[str, object] = {}

    async def main() -> None:
        ex = ConcurrentExecutor(run_mode="async", grace_period=5.0)
        call = asyncio.create_task(ex.execute_module("m", "M", script, args=[str(seen_term)]))

        async def until_running() -> None:
            while not ex.runner.processes.live():  # noqa: ASYNC110
                await anyio.sleep(0.01)
            await anyio.sleep(0.3)  # its SIGTERM handler is in place

        with anyio.move_on_after(5.0) as scope:
            if how == "async with":
                async with ex:
                    await until_running()
                    scope.cancel()
                    await anyio.sleep(30)
            else:
                try:
                    await until_running()
                    scope.cancel()
                    await anyio.sleep(30)
                finally:
                    await ex.aclose()
                    seen["returned"] = True
        seen["term"] = seen_term.exists()
        seen["live"] = ex.runner.processes.live()
        seen["statuses"] = [run.status for run in await ex.registry.list_runs()]
        seen["result"] = await call

    anyio.run(main, backend="asyncio")
    assert seen["term"] is True
    assert seen["live"] == {}
    assert seen["statuses"] == [pq.RunStatus.CANCELLED]
    if how == "aclose":
        assert seen.get("returned") is True


@pytest.mark.parametrize("make", [pq.ConcurrentExecutor, pq.BackgroundTaskManager])
def test_a_resource_manager_that_is_not_one_is_refused_at_once(make: Any) -> None:
    # Found by an adversarial probe: ConcurrentExecutor(resource_manager=5) was accepted, and
    # then every module failed with a bare AttributeError ('int' object has no attribute
    # 'admit'), execute_module raising it instead of returning a result.
    args: tuple[Any, ...] = () if make is pq.ConcurrentExecutor else (pq.RunRegistry(),)
    with pytest.raises(pq.exceptions.InvalidArgumentTypeError, match="resource_manager"):
        make(*args, resource_manager=5)


async def test_a_yes_no_admission_option_must_be_a_bool() -> None:
    # A probe's find: admit(wait="no") waited (a non-empty str is true), as did
    # admission_wait="no" on the executor and the manager.
    with pytest.raises(pq.exceptions.InvalidArgumentTypeError, match="wait"):
        await pq.ResourceManager(90.0).admit(wait="no")  # type: ignore[arg-type]
    with pytest.raises(pq.exceptions.InvalidArgumentTypeError, match="admission_wait"):
        pq.ConcurrentExecutor(admission_wait="no")  # type: ignore[arg-type]
    with pytest.raises(pq.exceptions.InvalidArgumentTypeError, match="admission_wait"):
        pq.BackgroundTaskManager(pq.RunRegistry(), admission_wait="no")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"module_id": None}, pq.exceptions.InvalidArgumentTypeError),
        ({"module_name": {"x": 1}}, pq.exceptions.InvalidArgumentTypeError),
        ({"run_id": 5}, pq.exceptions.InvalidRunError),
        ({"run_id": ""}, pq.exceptions.InvalidRunError),
    ],
)
async def test_bad_names_are_refused_before_queueing_for_admission(
    fields: dict[str, Any], error: type[Exception], tmp_path: Path
) -> None:
    # A probe's find: a bad module_id, module_name or run_id was refused only once a slot was
    # free and admission passed; with resources short for good, the call hung (or, with an
    # admission timeout, raised ResourceWaitTimeoutError about the resources instead).
    script = tmp_path / "hello.py"
    script.write_text("print('hi')\n")
    arguments: dict[str, Any] = {"module_id": "m", "module_name": "M", "run_id": None, **fields}
    async with pq.ConcurrentExecutor(1, reader(95.0), admission_wait=True) as executor:
        with pytest.raises(error):
            await asyncio.wait_for(
                executor.execute_module(
                    arguments["module_id"],
                    arguments["module_name"],
                    script,
                    run_id=arguments["run_id"],
                ),
                10,
            )
        (result,) = await asyncio.wait_for(
            executor.execute_batch([pq.ModuleSpec(script_path=script, **arguments)]), 10
        )
        assert result["status"] == "failed" and error.__name__ in result["error"], result


@pytest.mark.parametrize("count", [2, 3, 4])
async def test_a_list_of_script_paths_gets_one_error_result_per_item_whatever_its_length(
    count: int,
) -> None:
    # A probe's find: exactly three paths were taken for one (module_id, script_path, args)
    # item and refused as a whole with "not list"; two or four gave a result per item.
    async with ConcurrentExecutor(run_mode="dry_run") as ex:
        results = await ex.execute_batch([f"job{i}.py" for i in range(count)])  # type: ignore[misc]
    assert len(results) == count
    assert all(r["error_type"] == "InvalidArgumentTypeError" for r in results), results
