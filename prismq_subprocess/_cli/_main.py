"""The argument parser and the entry point shared by ``python -m prismq_subprocess`` and the
``prismq-subprocess`` script."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from collections.abc import Sequence

import prismq_subprocess as pq

from .._platform._host import SIGPIPE
from . import _doctor, _run_cmd, _runs, _serve
from ._common import (
    EXIT_CANNOT_RUN,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    CliError,
    signal_exit_code,
)

__all__ = ["build_parser", "main"]

PROG = "prismq-subprocess"


def build_parser() -> argparse.ArgumentParser:
    """Build the parser of every command (each module registers its own sub-command)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Run child processes through prismq_subprocess, inspect run registries, check a "
            "host, and serve an ASGI app on an event loop that can spawn subprocesses."
        ),
        epilog="See docs/CLI.md for the commands, their exit codes and examples.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {pq.__version__}")
    subparsers = parser.add_subparsers(dest="subcommand", metavar="COMMAND", required=True)
    for module in (_doctor, _run_cmd, _runs, _serve):
        module.add_parser(subparsers)
    # Each command's own parser, for usage errors found after parsing (see main).
    parser.set_defaults(command_parsers=dict(subparsers.choices))
    return parser


def _silence_stdout() -> None:
    # Python flushes stdout again at exit and would print a second BrokenPipeError traceback.
    with open(os.devnull, "wb") as devnull:
        os.dup2(devnull.fileno(), sys.stdout.fileno())


def _tolerant_stdout() -> None:
    # Run data (a module name, a path) may hold what the output's encoding cannot (an ASCII
    # locale, PYTHONIOENCODING=ascii): written escaped rather than ending in a traceback.
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper) and stream.errors == "strict":
            with contextlib.suppress(OSError, ValueError):
                stream.reconfigure(errors="backslashreplace")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return its exit status (usage errors exit 2 through argparse)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        if not getattr(args, "accepts_unknown", False):
            # The command's usage, not the top level's (`run --bogus -- true`).
            command = args.command_parsers.get(args.subcommand, parser)
            command.error(f"unrecognized arguments: {' '.join(unknown)}")
        # `serve` hands its options to uvicorn: those before APP land here, the rest (from APP
        # on) in its REMAINDER argument, so joining them keeps the original order.
        args.uvicorn_args = [*unknown, *args.uvicorn_args]
    _tolerant_stdout()
    try:
        return int(args.handler(args))
    except CliError as exc:
        if sys.stderr is not None:  # None: started with fd 2 closed (print would use stdout)
            # Our stderr may be what failed (a full disk): the exit status still tells.
            with contextlib.suppress(OSError):
                print(f"{PROG} {args.subcommand}: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of our output went away (`... | head`): end as a shell would report it.
        _silence_stdout()
        sigpipe = SIGPIPE
        return EXIT_FAILURE if sigpipe is None else signal_exit_code(sigpipe)
    except OSError as exc:
        # Our output could not be written (a full disk, `> /dev/full`): one line, not a
        # traceback; `run` reports it as a failed forward of the command's output (125).
        _silence_stdout()
        if sys.stderr is not None:
            with contextlib.suppress(OSError):
                print(f"{PROG} {args.subcommand}: {exc}", file=sys.stderr, flush=True)
        return EXIT_CANNOT_RUN if args.subcommand == "run" else EXIT_FAILURE
