"""``serve``: run an ASGI app with uvicorn on event loops that can spawn subprocesses.

uvicorn picks the event loop itself, and on Windows it picks a selector loop (which cannot spawn)
whenever it runs the app in a child process (``--reload``, ``--workers``). ``serve`` decides the
``--loop`` option instead (:func:`plan_loop`) and hands everything else to uvicorn's own command
line, so every uvicorn option works as documented there. (On Windows with ``--reload`` or
``--workers``, the selector loop uvicorn picks is kept: Proactor loops cannot accept on the
listening socket those processes share, and the library spawns in THREADED mode there.)

- uvicorn releases whose ``--loop`` accepts an import string (0.36 and later) get our factory,
  ``prismq_subprocess._cli._loops:subprocess_loop``. The option travels with uvicorn's config into
  every process it starts, and each of them imports the factory and builds its loop with it.
- Older releases get the loop ``none`` (uvicorn then leaves the event-loop policy alone) and we
  install the Proactor policy with :func:`prismq_subprocess.install_subprocess_policy`; the
  processes they start are fresh interpreters, whose default policy on Windows is Proactor.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import prismq_subprocess as pq

from ._common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, CliError
from ._loops import LOOP_FACTORY

if TYPE_CHECKING:
    import click

from .._platform import is_windows, platform_name

__all__ = [
    "LoopPlan",
    "add_parser",
    "plan_loop",
    "prepare_loop",
    "starts_processes",
    "uvicorn_arguments",
]

_INSTALL_HINT = "install the web extra: pip install 'prismq_subprocess[web]'"

# IOCP ties a socket to one completion port for good, and the processes that --reload and
# --workers start all get the one listening socket: with Proactor loops only the first can accept
# on it (uvicorn issues #342 and #529; the reason uvicorn itself gives them a selector loop). So
# there serve keeps uvicorn's selector loop, and the library runs subprocesses in THREADED mode
# (auto-detected: it works on any loop).
_SHARED_SOCKET_NOTE = (
    "on Windows, the processes that --reload and --workers start share one listening socket, "
    "which Proactor loops cannot accept on (OSError WinError 87; uvicorn issues #342 and #529): "
    "they keep uvicorn's selector loop, and the app's subprocesses run in THREADED mode "
    "(auto-detected; it spawns on any loop)"
)
_SHARED_SOCKET_RISK = (
    "on Windows, Proactor loops in the processes that --reload and --workers start may fail to "
    "accept connections on the listening socket they share ('Accept failed on a socket', "
    "OSError WinError 87; uvicorn issues #342 and #529). Without --loop, serve keeps uvicorn's "
    "selector loop there and the app's subprocesses run in THREADED mode"
)


@dataclass(frozen=True)
class LoopPlan:
    """What ``serve`` does about the event loop.

    ``loop`` is the value passed to uvicorn's ``--loop``; with ``install_policy``,
    :func:`prismq_subprocess.install_subprocess_policy` runs before uvicorn starts; ``note`` is
    shown to the user when set.
    """

    loop: str
    install_policy: bool = False
    note: str | None = None


def plan_loop(
    requested: str | None,
    *,
    platform: str | None = None,
    accepts_factory: bool,
    has_uvloop: bool,
    multi_process: bool = False,
) -> LoopPlan:
    """Decide uvicorn's ``--loop`` for the loop the user asked for (``None``: ``auto``).

    ``auto``/``asyncio`` give a loop that can spawn subprocesses on every platform (uvloop for
    ``auto`` where it is installed and not Windows, as uvicorn would); ``uvloop`` is passed
    through (where it is installed, not on Windows); ``none`` keeps the event-loop policy,
    made a subprocess-capable one; any other value is the user's own factory, passed through
    with a note.
    ``multi_process`` (uvicorn will start processes: ``--reload``, ``--workers N``): on Windows
    those processes share one listening socket, which Proactor loops cannot accept on, so
    ``auto``/``asyncio`` then keep uvicorn's own (selector) loop, where the library runs
    subprocesses in THREADED mode; ``none`` still installs the Proactor policy, with a warning.

    Raises:
        CliError: ``uvloop`` asked for on Windows or where it is not installed, or a factory of
            your own with a uvicorn older than 0.36, which cannot load one (exit 2).
    """
    name = platform_name(platform)
    choice = "auto" if requested is None else requested
    plan = _base_plan(choice, name, accepts_factory, has_uvloop)
    if not (multi_process and is_windows(name)):
        return plan
    if choice in ("auto", "asyncio"):
        # uvicorn's "asyncio" gives the processes it starts a selector loop on Windows.
        return LoopPlan("asyncio", note=_SHARED_SOCKET_NOTE)
    if plan.loop == LOOP_FACTORY or plan.install_policy:
        return dataclasses.replace(plan, note=_SHARED_SOCKET_RISK)
    return plan


def _base_plan(choice: str, name: str, accepts_factory: bool, has_uvloop: bool) -> LoopPlan:
    ours = LoopPlan(LOOP_FACTORY) if accepts_factory else LoopPlan("none", install_policy=True)
    if choice == "auto":
        return LoopPlan("uvloop") if has_uvloop and not is_windows(name) else ours
    if choice == "asyncio":
        return ours
    if choice == "uvloop":
        if is_windows(name):
            raise CliError("--loop uvloop: uvloop does not run on Windows", EXIT_USAGE)
        if not has_uvloop:
            # uvicorn would fail only when it builds the loop, with an import traceback.
            raise CliError(
                "--loop uvloop: uvloop is not installed (pip install uvloop)", EXIT_USAGE
            )
        return LoopPlan("uvloop")
    if choice == "none":
        return LoopPlan("none", install_policy=True)
    if not accepts_factory:
        raise CliError(
            f"--loop {choice}: this uvicorn (before 0.36) takes auto, asyncio, uvloop or none",
            EXIT_USAGE,
        )
    return LoopPlan(
        choice,
        note=(
            f"--loop {choice}: your loop factory is used as is; on Windows it must make "
            "Proactor loops for the ASYNC run mode to spawn subprocesses"
        ),
    )


# What click (uvicorn's parser) reads as true from a flag's variable, after strip() and lower().
_TRUE_WORDS = frozenset({"1", "true", "t", "yes", "y", "on"})


def _int_or_none(text: str | None) -> int | None:
    # int(), as click and uvicorn convert the worker count; what they refuse, they report.
    try:
        return None if text is None else int(text)
    except ValueError:
        return None


def starts_processes(args: list[str], env: Mapping[str, str] | None = None) -> bool:
    """Whether uvicorn, given ``args`` (and ``env``, default ``os.environ``), will run the app
    in processes it starts: ``--reload``, or more than one worker.

    uvicorn's command line takes every option from a ``UVICORN_<NAME>`` variable too (click's
    ``auto_envvar_prefix``), an empty one counting as unset, and an option given wins over its
    variable. So the worker count is ``--workers N``, else ``UVICORN_WORKERS``, else uvicorn's
    ``WEB_CONCURRENCY``; reloading is ``--reload`` or a true ``UVICORN_RELOAD`` (``1``,
    ``true``, ``yes``, ``on``...). A value uvicorn would refuse counts as one worker and no
    reload: its own parser reports it.
    """
    environ = os.environ if env is None else env
    workers = environ.get("UVICORN_WORKERS") or environ.get("WEB_CONCURRENCY")
    reload = environ.get("UVICORN_RELOAD", "").strip().lower() in _TRUE_WORDS
    for i, arg in enumerate(args):
        if arg == "--reload":
            reload = True
        elif arg == "--workers" and i + 1 < len(args):
            workers = args[i + 1]
        elif arg.startswith("--workers="):
            workers = arg.partition("=")[2]
    count = _int_or_none(workers)
    return reload or (count is not None and count > 1)


def uvicorn_arguments(args: list[str]) -> tuple[list[str], str | None]:
    """Split ``--loop X`` / ``--loop=X`` out of uvicorn's arguments (the last one wins).

    Returns the other arguments, in order, and the requested loop (``None`` if not given).
    """
    rest: list[str] = []
    requested: str | None = None
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--loop" and i + 1 < len(args):
            requested = args[i + 1]
            i += 2
            continue
        if arg.startswith("--loop="):
            requested = arg.partition("=")[2]
        else:
            rest.append(arg)
        i += 1
    return rest, requested


def prepare_loop(plan: LoopPlan, platform: str | None = None) -> None:
    """Do this process's part of ``plan`` before uvicorn starts: show its note and install the
    subprocess-capable event-loop policy when the plan asks for it (``platform`` is for tests).
    """
    if plan.note:
        print(f"prismq-subprocess serve: {plan.note}", file=sys.stderr)
    if plan.install_policy:
        pq.install_subprocess_policy(platform)


def _exit_status(exc: SystemExit) -> int:
    code = exc.code
    if code is None:
        return EXIT_OK
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return EXIT_FAILURE


def _run(args: argparse.Namespace) -> int:
    uvicorn_args = list(args.uvicorn_args)
    if uvicorn_args[:1] == ["--"]:
        # `serve -- APP --port N`, as `run -- CMD`: to click a leading `--` would make every
        # option after it a positional argument.
        uvicorn_args = uvicorn_args[1:]
    if not uvicorn_args:
        args.parser.error("APP is required, e.g. 'myapp:app'")
    try:
        import uvicorn
        from uvicorn.main import main as uvicorn_main
    except ImportError:
        raise CliError(f"uvicorn is not installed; {_INSTALL_HINT}", EXIT_USAGE) from None
    rest, requested = uvicorn_arguments(uvicorn_args)
    plan = plan_loop(
        requested,
        # uvicorn 0.36 replaced loop set-up functions with loop factories; only those accept an
        # import string for --loop.
        accepts_factory=hasattr(uvicorn.Config, "get_loop_factory"),
        has_uvloop=importlib.util.find_spec("uvloop") is not None,
        multi_process=starts_processes(rest),
    )
    prepare_loop(plan)
    return _run_uvicorn(uvicorn_main, rest, plan.loop)


def _run_uvicorn(command: click.Command, args: list[str], loop: str) -> int:
    """Run uvicorn's own command line with ``args``, its ``loop`` parameter set to ``loop``.

    The value is set after parsing rather than passed as ``--loop``: before 0.36, uvicorn's
    option accepts neither ``none`` nor an import string, though ``uvicorn.run()`` takes both.
    Errors are reported the way click's standalone mode does it.
    """
    import click  # uvicorn's dependency: present whenever uvicorn is

    try:
        with command.make_context("prismq-subprocess serve", args) as ctx:
            ctx.params["loop"] = loop
            command.invoke(ctx)
    except click.exceptions.Exit as exc:  # --help, --version
        return exc.exit_code
    except click.ClickException as exc:  # usage errors
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        print("Aborted!", file=sys.stderr)
        return EXIT_FAILURE
    except SystemExit as exc:  # uvicorn's own sys.exit(), e.g. when the app cannot be imported
        return _exit_status(exc)
    return EXIT_OK


def add_parser(subparsers: Any) -> None:
    """Register the ``serve`` command."""
    parser = subparsers.add_parser(
        "serve",
        help="run an ASGI app with uvicorn on loops that can spawn subprocesses",
        usage="prismq-subprocess serve APP [uvicorn options...]",
        description=(
            "Run APP (e.g. 'myapp:app') with uvicorn, taking every uvicorn option ('serve APP "
            "--help' lists them), with one difference: --loop is chosen so that the app can "
            "spawn subprocesses in every process uvicorn runs it in. --loop auto (default) and "
            "asyncio give a loop that can spawn (uvloop where installed, for auto, off Windows); "
            "on Windows with --reload/--workers they keep uvicorn's selector loop, the only one "
            "that can share the listening socket, and the app spawns in THREADED mode; uvloop "
            "and your own factory are passed through. Needs uvicorn: pip install "
            "'prismq_subprocess[web]' (exit 2 if it is missing)."
        ),
    )
    parser.add_argument(
        "uvicorn_args", nargs=argparse.REMAINDER, metavar="APP [uvicorn options...]"
    )
    parser.set_defaults(handler=_run, parser=parser, accepts_unknown=True)
