"""``doctor``: the real report, its JSON form, and the library's containment report in it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from cli_support import cli

from prismq_subprocess._cli import _doctor
from prismq_subprocess._platform._cookie import COOKIE_PREFIX


def test_doctor_text_report() -> None:
    result = cli("doctor")
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode()
    keys = {line.split(" : ")[0].strip() for line in text.splitlines() if " : " in line}
    for key in (
        "platform",
        "python",
        "event loop",
        "loop can spawn",
        "PRISMQ_RUN_MODE",
        "auto-detected mode",
        "psutil",
        "memory",
        "processes",
        "containment",
    ):
        assert key in keys, text
    assert "loop can spawn     : yes" in text
    assert "PRISMQ_RUN_MODE    : unset (auto-detect)" in text
    # Values are aligned in one column.
    top = [line for line in text.splitlines() if not line.startswith(" ")]
    assert len({line.index(" : ") for line in top}) == 1


def test_doctor_json_report() -> None:
    result = cli("doctor", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["python"]["executable"] == sys.executable
    assert report["platform"]["sys_platform"] == sys.platform
    assert report["event_loop"]["can_spawn"] is True
    assert report["event_loop"]["spawn_error"] is None
    # Every key docs/CLI.md lists is there whatever the variable holds (None when unset).
    assert report["env_var"] == {
        "name": "PRISMQ_RUN_MODE",
        "value": None,
        "valid": None,
        "error": None,
        "mode": None,
    }
    detected = report["mode"]["detected"]
    if not sys.platform.startswith("win"):
        assert detected["mode"] == "async"
        assert report["event_loop"]["class"] == "_UnixSelectorEventLoop"
    assert detected["source"] == "auto" and detected["reason"]
    ps = report["psutil"]
    assert ps["cpu_count"] >= 1 and ps["process_count"] > 1
    assert 0 < ps["memory_available_bytes"] <= ps["memory_total_bytes"]
    containment = report["containment"]
    assert containment["platform"] == sys.platform
    assert containment["mechanisms"] and containment["strongest"] == containment["mechanisms"][0]


def test_doctor_reports_the_pinned_mode() -> None:
    report = json.loads(cli("doctor", "--json", env={"PRISMQ_RUN_MODE": " Threaded "}).stdout)
    assert report["env_var"]["valid"] is True and report["env_var"]["mode"] == "threaded"
    assert report["mode"]["detected"]["mode"] == "threaded"
    assert report["mode"]["detected"]["source"] == "environment"


def test_doctor_flags_an_invalid_env_var() -> None:
    result = cli("doctor", env={"PRISMQ_RUN_MODE": "turbo"})
    assert result.returncode == 1
    text = result.stdout.decode()
    assert "'turbo' INVALID" in text
    assert "PRISMQ_RUN_MODE is invalid (without it:" in text
    report = json.loads(cli("doctor", "--json", env={"PRISMQ_RUN_MODE": "turbo"}).stdout)
    assert report["env_var"]["valid"] is False and "turbo" in report["env_var"]["error"]
    assert report["env_var"]["mode"] is None
    assert report["mode"]["detected"] is None and "turbo" in report["mode"]["error"]


class _NoSubprocessLoop(asyncio.SelectorEventLoop):
    """What Windows' SelectorEventLoop does when asked to spawn."""

    async def _make_subprocess_transport(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


class _NoSubprocessPolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return _NoSubprocessLoop()


@pytest.fixture
def no_subprocess_policy() -> Iterator[None]:
    old = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(_NoSubprocessPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(old)


@pytest.mark.usefixtures("no_subprocess_policy")
def test_doctor_reports_a_loop_that_cannot_spawn() -> None:
    report = _doctor.collect()
    loop = report["event_loop"]
    assert loop["class"] == "_NoSubprocessLoop" and loop["policy"] == "_NoSubprocessPolicy"
    assert loop["can_spawn"] is False
    assert "NotImplementedError" in loop["spawn_error"]
    assert "loop can spawn     : no: _NoSubprocessLoop has no subprocess support" in (
        _doctor.render(report)
    )


# -- containment: the library's own report (pq.containment_report()) -------------------------


def _fresh_containment_report() -> dict[str, Any]:
    # In a fresh interpreter, as doctor runs: the report is chosen once per process.
    code = (
        "import dataclasses, json\n"
        "import prismq_subprocess as pq\n"
        "print(json.dumps(dataclasses.asdict(pq.containment_report())))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_doctor_containment_is_the_librarys_report() -> None:
    report = json.loads(cli("doctor", "--json").stdout)["containment"]
    expected = _fresh_containment_report()
    assert report["platform"] == sys.platform == expected["platform"]
    assert report["mechanisms"] == expected["mechanisms"]
    assert report["mechanisms"][-1] == "process-group"  # every host has the last resort
    assert report["strongest"] == report["mechanisms"][0]
    assert report["cgroup_dir"] == expected["cgroup_dir"]
    assert report["die_with_host"] == expected["die_with_host"]
    assert report["notes"] == expected["notes"]
    if "cookie" in report["mechanisms"]:
        # The variable is unique to each host process, so only its prefix can be compared.
        assert report["cookie_variable"].startswith(COOKIE_PREFIX)


def test_doctor_text_shows_the_containment_report() -> None:
    text = cli("doctor").stdout.decode()
    report = json.loads(cli("doctor", "--json").stdout)["containment"]
    line = next(line for line in text.splitlines() if line.startswith("containment "))
    assert line.endswith(
        f": {' + '.join(report['mechanisms'])} (strongest: {report['strongest']})"
    ), text
    assert "children die with host" in text
    for note in report["notes"]:
        assert note in text
