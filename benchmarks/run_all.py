"""Run the whole benchmark suite, print the tables and one PASS/FAIL line per target.

    python benchmarks/run_all.py            # full run (about 20 minutes on 2 cores)
    python benchmarks/run_all.py --quick    # smoke-sized run (under 3 minutes; not for quoting)
    python benchmarks/run_all.py --only spawn,lines

A full run times every comparison with warm-up, samples calibrated to >= 0.5 s (1.25-1.5x that
when calibrated; fresh-interpreter suites take one whole case per sample) and 7 interleaved rounds;
quick mode shrinks samples (0.1 s) and rounds (3; 1 for big, many and stop).

Writes benchmarks/results/{spawn,lines,big_output,many,stop,capture,registry,background}.json,
whatever the task-layer benchmarks (bench_tasks.py, bench_periodic.py, maintained separately)
write, and summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_background
import bench_big_output
import bench_capture
import bench_lines
import bench_many
import bench_registry
import bench_spawn
import bench_stop
from _common import BENCH_DIR, PYTHON, RESULTS_DIR, Target, environment, write_json

SUITES = ("spawn", "lines", "big", "many", "stop", "capture", "registry", "background", "tasks")
#: suite -> (module, JSON name)
MODULES: dict[str, tuple[Any, str]] = {
    "spawn": (bench_spawn, "spawn"),
    "lines": (bench_lines, "lines"),
    "big": (bench_big_output, "big_output"),
    "many": (bench_many, "many"),
    "stop": (bench_stop, "stop"),
    "capture": (bench_capture, "capture"),
    "registry": (bench_registry, "registry"),
    "background": (bench_background, "background"),
}

QUICK: dict[str, dict[str, Any]] = {
    "spawn": {
        "min_sample": 0.1,
        "rounds": 3,
        # c=256 only in full runs: 256 live children per sample is slow on 2 cores.
        "groups": (("true", 1), ("true", 8), ("true", 64)),
    },
    "lines": {"min_sample": 0.1, "rounds": 3, "lines": 50_000},
    "big": {"size_mb": 50, "rounds": 1},
    "many": {"children": 200, "rounds": 1},
    "stop": {"children": [100], "unrelated": [1000], "repeats": 3, "cap": 10.0},
    "capture": {"min_sample": 0.1, "rounds": 3},
    "registry": {"min_sample": 0.1, "rounds": 3},
    "background": {"min_sample": 0.1, "rounds": 3, "ticks": 50},
    "tasks": {"periodic": ["--ticks", "200"], "tasks": []},
}
FULL: dict[str, dict[str, Any]] = {
    "spawn": {"min_sample": 0.5, "rounds": 7},
    "lines": {"min_sample": 0.5, "rounds": 7},
    "big": {"size_mb": 200, "rounds": 7},
    "many": {"children": 500, "rounds": 7},
    # The close case was one sample per mode (the module's default of 1 round) while the suite
    # promised 7 interleaved rounds for every comparison.
    "stop": {"children": [1000], "unrelated": [0, 1000], "rounds": 7, "repeats": 7, "cap": 60.0},
    "capture": {"min_sample": 0.5, "rounds": 7},
    "registry": {"min_sample": 0.5, "rounds": 7},
    "background": {"min_sample": 0.5, "rounds": 7, "ticks": 100},
    "tasks": {"periodic": [], "tasks": []},
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_task_layer(config: dict[str, Any]) -> tuple[str, list[Target], dict[str, Any]]:
    """Item 5: call the separately maintained task-layer benchmarks and collect their JSON."""
    lines: list[str] = []
    found: dict[str, Any] = {}
    targets: list[Target] = []
    for script, extra in (
        ("bench_tasks.py", config["tasks"]),
        ("bench_periodic.py", config["periodic"]),
    ):
        path = BENCH_DIR / script
        if not path.exists():
            lines.append(f"{script}: not present yet, skipped")
            targets.append(Target(f"task layer ({script})", None, "benchmark not present"))
            continue
        log(f"tasks: {script} {' '.join(extra)}")
        since = time.time() - 1
        proc = subprocess.run(
            [PYTHON, str(path), *extra], capture_output=True, text=True, cwd=BENCH_DIR.parent
        )
        lines.append(f"{script}: " + (proc.stdout.strip() or proc.stderr.strip()[-500:]))
        if proc.returncode != 0:
            targets.append(Target(f"task layer ({script})", False, f"exit {proc.returncode}"))
            continue
        for json_path in RESULTS_DIR.glob("*.json"):
            if json_path.stat().st_mtime >= since and json_path.stem not in {
                *(json_name for _, json_name in MODULES.values()),
                "summary",
            }:
                found[json_path.stem] = json.loads(json_path.read_text())
        targets.append(Target(f"task layer ({script})", True, "ran; numbers in its JSON"))
    return (
        "Task layer (item 5, benchmarks maintained separately)\n" + "\n".join(lines),
        targets,
        found,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, finishes in ~3 min")
    parser.add_argument("--only", default=",".join(SUITES), help=f"comma list of {SUITES}")
    args = parser.parse_args()
    config = QUICK if args.quick else FULL
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    started = time.perf_counter()
    reports: list[str] = []
    targets: list[Target] = []
    for suite in only:
        if suite == "tasks":
            text, found_targets, _ = run_task_layer(config["tasks"])
            reports.append(text)
            targets.extend(found_targets)
            continue
        if suite not in MODULES:
            parser.error(f"unknown suite {suite!r}; choose from {SUITES}")
        module, name = MODULES[suite]
        suite_started = time.perf_counter()
        result = module.run(**config[suite], log=log)
        log(f"{suite}: {time.perf_counter() - suite_started:.0f} s")
        write_json(name, {"quick": args.quick, **result})
        reports.append(module.report(result))
        targets.extend(module.targets(result))
    env = environment()
    print(
        f"\nprismq_subprocess benchmarks ({'quick' if args.quick else 'full'}): Python "
        f"{env['python']}, {env['cpus']} CPUs, {env['platform']}, {env['date']}\n"
    )
    for text in reports:
        print(text + "\n")
    print("Targets (issue 7 and the performance issue):")
    for t in targets:
        print(t.line())
    write_json(
        "summary",
        {
            "quick": args.quick,
            "seconds": time.perf_counter() - started,
            "targets": [{"name": t.name, "passed": t.passed, "detail": t.detail} for t in targets],
        },
    )
    print(f"\nJSON in {RESULTS_DIR}; took {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
