"""``doctor``: what this host and interpreter offer prismq_subprocess, and what it would choose."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import warnings
from typing import Any

import psutil

import prismq_subprocess as pq

from .._platform._host import host_description
from ._common import EXIT_FAILURE, EXIT_OK, format_pairs, print_json

__all__ = ["add_parser", "collect", "render"]


def _policy() -> object:
    # The policy API is deprecated from Python 3.14, but it is still what asyncio.run() asks.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return asyncio.get_event_loop_policy()


def _decision_dict(decision: pq.ModeDecision) -> dict[str, Any]:
    return {
        "mode": str(decision.mode),
        "reason": decision.reason,
        "source": decision.source.value,
        "pinned": decision.pinned,
    }


async def _probe_loop() -> dict[str, Any]:
    """Run inside the loop asyncio.run() creates: its class, whether it spawns, what a wrapper
    created there would pick."""
    loop = asyncio.get_running_loop()
    spawn_error: str | None = None
    try:
        # The library's own ASYNC mode is exactly this call; THREADED does not need it.
        process = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
        await process.wait()
        can_spawn = process.returncode == 0
        if not can_spawn:
            spawn_error = f"the probe child exited with status {process.returncode}"
    except NotImplementedError:
        can_spawn = False
        spawn_error = f"{type(loop).__name__} has no subprocess support (NotImplementedError)"
    except OSError as exc:
        can_spawn = False
        spawn_error = f"{type(exc).__name__}: {exc}"
    try:
        detected: dict[str, Any] | None = _decision_dict(pq.detect_run_mode())
        detect_error = None
    except pq.InvalidRunModeError as exc:
        detected, detect_error = None, str(exc)
    return {
        "loop": type(loop).__name__,
        "loop_module": type(loop).__module__,
        "can_spawn": can_spawn,
        "spawn_error": spawn_error,
        "detected": detected,
        "detect_error": detect_error,
        # What the platform and loop alone would choose, were PRISMQ_RUN_MODE unset.
        "auto": _decision_dict(pq.detect_run_mode(env={})),
    }


def _env_var() -> dict[str, Any]:
    raw = os.environ.get(pq.ENV_VAR)
    # Every key is always there (None when it does not apply), so a reader of --json can index it.
    info: dict[str, Any] = {
        "name": pq.ENV_VAR,
        "value": raw,
        "valid": None,
        "error": None,
        "mode": None,
    }
    if raw is None or not raw.strip():
        return info  # unset or blank both mean "auto-detect"
    try:
        info["mode"] = pq.RunMode.parse(raw).value
        info["valid"] = True
    except pq.InvalidRunModeError as exc:
        info["valid"] = False
        info["error"] = str(exc)
    return info


def _psutil_figures() -> dict[str, Any]:
    memory = psutil.virtual_memory()
    return {
        "version": psutil.__version__,
        "cpu_count": psutil.cpu_count(logical=True),
        "cpu_count_physical": psutil.cpu_count(logical=False),
        "memory_total_bytes": memory.total,
        "memory_available_bytes": memory.available,
        "process_count": len(psutil.pids()),
    }


_HOST = host_description()


def collect() -> dict[str, Any]:
    """Gather the doctor report as one JSON-ready dict (starts one short child process)."""
    policy = _policy()
    loop_info = asyncio.run(_probe_loop())
    return {
        "prismq_subprocess": {"version": pq.__version__},
        "platform": {
            "sys_platform": _HOST["sys_platform"],
            "platform": _HOST["platform"],
            "machine": _HOST["machine"],
        },
        "python": {
            "version": _HOST["python_version"],
            "implementation": _HOST["python_implementation"],
            "executable": sys.executable,
        },
        "event_loop": {
            "class": loop_info["loop"],
            "module": loop_info["loop_module"],
            "policy": type(policy).__name__,
            "can_spawn": loop_info["can_spawn"],
            "spawn_error": loop_info["spawn_error"],
        },
        "env_var": _env_var(),
        "mode": {
            "detected": loop_info["detected"],
            "error": loop_info["detect_error"],
            "auto": loop_info["auto"],
        },
        "psutil": _psutil_figures(),
        "containment": _containment(),
    }


def _containment() -> dict[str, Any]:
    # The library's own report: what a spawn from this interpreter would use (asking for it
    # switches the means on, as the first spawn would; doctor's process ends right after).
    report = pq.containment_report()
    return {**dataclasses.asdict(report), "strongest": report.strongest}


def _bytes(value: int) -> str:
    return f"{value / 1024**3:.1f} GiB"


def render(report: dict[str, Any]) -> str:
    """The human form of :func:`collect`'s report: aligned ``key : value`` lines."""
    loop = report["event_loop"]
    env = report["env_var"]
    mode = report["mode"]
    ps = report["psutil"]
    if env["value"] is None:
        env_text = "unset (auto-detect)"
    elif env["valid"] is None:
        env_text = f"{env['value']!r} (blank: auto-detect)"
    elif env["valid"]:
        env_text = f"{env['value']!r} -> {env['mode']} (valid)"
    else:
        env_text = f"{env['value']!r} INVALID: {env['error']}"
    if mode["detected"] is not None:
        detected = mode["detected"]
        mode_text = f"{detected['mode']} ({detected['reason']})"
    else:
        auto = mode["auto"]
        mode_text = f"none: {pq.ENV_VAR} is invalid (without it: {auto['mode']}, {auto['reason']})"
    spawn_text = "yes" if loop["can_spawn"] else f"no: {loop['spawn_error']}"
    containment = report["containment"]
    summary = f"{' + '.join(containment['mechanisms'])} (strongest: {containment['strongest']})"
    pairs = [
        ("prismq_subprocess", report["prismq_subprocess"]["version"]),
        ("platform", f"{report['platform']['sys_platform']} ({report['platform']['platform']})"),
        (
            "python",
            f"{report['python']['version']} {report['python']['implementation']}"
            f" ({report['python']['executable']})",
        ),
        ("event loop", f"{loop['class']} (policy {loop['policy']})"),
        ("loop can spawn", spawn_text),
        (pq.ENV_VAR, env_text),
        ("auto-detected mode", mode_text),
        ("psutil", ps["version"]),
        ("cpus", f"{ps['cpu_count']} logical, {ps['cpu_count_physical']} physical"),
        (
            "memory",
            f"{_bytes(ps['memory_total_bytes'])} total, "
            f"{_bytes(ps['memory_available_bytes'])} available",
        ),
        ("processes", str(ps["process_count"])),
        ("containment", summary),
    ]
    details = format_pairs(
        [
            ("cgroup v2 sub-groups in", containment["cgroup_dir"] or "-"),
            ("cookie variable", containment["cookie_variable"] or "-"),
            ("children die with host", containment["die_with_host"]),
            *(("note", note) for note in containment["notes"]),
        ],
        indent="  ",
    )
    return f"{format_pairs(pairs)}\n{details}"


def _run(args: argparse.Namespace) -> int:
    report = collect()
    if args.json:
        print_json(report)
    else:
        print(render(report))
    # An invalid PRISMQ_RUN_MODE makes every auto-detecting wrapper raise: worth a failing status.
    return EXIT_FAILURE if report["env_var"]["valid"] is False else EXIT_OK


def add_parser(subparsers: Any) -> None:
    """Register the ``doctor`` command."""
    parser = subparsers.add_parser(
        "doctor",
        help="report what this host offers and which run mode would be chosen",
        description=(
            "Report the platform, Python, the event loop asyncio.run() would create and whether "
            "it can spawn subprocesses (a real probe), PRISMQ_RUN_MODE, the auto-detected run "
            "mode and why, psutil figures and the means used to contain a child's whole tree. "
            "Exit status 1 when PRISMQ_RUN_MODE is invalid, else 0."
        ),
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=_run)
