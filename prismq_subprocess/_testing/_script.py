"""`DryRunScript`: scripted DRY_RUN answers, chosen per command, and what a test checks afterwards.

The model is pytest-subprocess's ``fp`` fixture: register what each command "does"; in strict
mode a command nobody registered is an error, so a test cannot pass while its code runs commands
it never expected.
"""

from __future__ import annotations

import inspect
import math
import os
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .._core._exceptions import (
    InvalidArgumentTypeError,
    InvalidCommandError,
    UnscriptedCommandError,
)
from .._core._validation import check_limit, check_timeout
from .._strategies._dry_run import DryRunCall, DryRunRecorder, DryRunResponse, DryRunStrategy
from ._streamed import StreamedResponse, StreamingDryRunStrategy

__all__ = ["DryRunScript", "ScriptRule"]

Command = tuple[str, ...] | str


#: Whether a recorded command is one a rule (or a query) is about.
Predicate = Callable[[DryRunCall], bool]


class ScriptRule:
    """One registered answer: which commands it matches, what it answers, and how often.

    Returned by :meth:`DryRunScript.register`; :attr:`calls` lists the commands it answered.
    """

    def __init__(
        self, description: str, test: Predicate, response: DryRunResponse, times: int | None
    ) -> None:
        #: Which commands it matches, e.g. ``prefix ('git', 'push')``.
        self.description = description
        self._test = test
        #: What it answers.
        self.response = response
        #: How many times it answers (``None``: every time).
        self.times = times
        self._calls: list[DryRunCall] = []

    @property
    def calls(self) -> list[DryRunCall]:
        """The commands this rule answered, oldest first (a copy)."""
        return list(self._calls)

    @property
    def used_up(self) -> bool:
        """True once a rule registered with ``times=n`` has answered ``n`` commands."""
        return self.times is not None and len(self._calls) >= self.times

    def matches(self, call: DryRunCall) -> bool:
        """Whether ``call`` is one of the commands this rule is about (used up or not)."""
        return self._test(call)

    def _take(self, call: DryRunCall) -> bool:
        if self.used_up:
            return False
        self._calls.append(call)
        return True

    def __repr__(self) -> str:
        uses = "every time" if self.times is None else f"{self.times} time(s)"
        return (
            f"<{self.description} -> returncode {self.response.returncode}, answered "
            f"{len(self._calls)}, answers {uses}>"
        )


def _command_text(args: Command) -> str:
    """A recorded command as one line: the shell line, or the arguments joined by spaces."""
    return args if isinstance(args, str) else " ".join(args)


def _parts(value: object, what: str) -> Command:
    if isinstance(value, str):
        if not value:
            raise InvalidCommandError(f"{what} must not be empty")
        return value
    if isinstance(value, bytes) or not isinstance(value, Iterable):
        raise InvalidArgumentTypeError(
            f"{what} must be a tuple/list of arguments or a shell command line (str), not "
            f"{type(value).__name__} {value!r}"
        )
    parts = []
    for position, part in enumerate(value):
        if isinstance(part, bytes):
            parts.append(part.decode(errors="replace"))
        elif isinstance(part, str | os.PathLike):
            parts.append(os.fsdecode(part))
        else:
            raise InvalidArgumentTypeError(
                f"{what} argument {position} is {type(part).__name__} {part!r}; expected str, "
                "bytes or os.PathLike"
            )
    if not parts:
        raise InvalidCommandError(f"{what} must not be empty")
    return tuple(parts)


def _matcher(
    command: object, prefix: object, regex: object, match: object
) -> tuple[str, Predicate]:
    choices = {"command": command, "prefix": prefix, "regex": regex, "match": match}
    given = [name for name, value in choices.items() if value is not None]
    if len(given) != 1:
        raise InvalidCommandError(
            "register() needs exactly one of: a command (exact arguments, or a shell command "
            f"line), prefix=, regex=, match= (got {', '.join(given) or 'none'})"
        )
    if command is not None:
        exact = _parts(command, "command")
        return f"exact {exact!r}", lambda call: call.args == exact
    if prefix is not None:
        return _prefix_matcher(_parts(prefix, "prefix"))
    if regex is not None:
        return _regex_matcher(regex)
    if not callable(match):
        raise InvalidArgumentTypeError(
            f"match must be a callable taking a DryRunCall, not {type(match).__name__}"
        )
    if inspect.iscoroutinefunction(match) or inspect.isasyncgenfunction(match):
        # Its result (a coroutine) is always true: the rule would answer every command.
        raise InvalidArgumentTypeError(
            f"match must be a plain function returning a bool, not an async function: {match!r}"
        )
    predicate: Callable[[DryRunCall], Any] = match
    shown = getattr(match, "__qualname__", repr(match))
    return f"match {shown}", lambda call: bool(predicate(call))


def _prefix_matcher(start: Command) -> tuple[str, Predicate]:
    if isinstance(start, str):
        line = start
        return (
            f"prefix {line!r}",
            lambda call: isinstance(call.args, str) and call.args.startswith(line),
        )
    head = start
    return (
        f"prefix {head!r}",
        lambda call: not isinstance(call.args, str) and call.args[: len(head)] == head,
    )


def _regex_matcher(regex: object) -> tuple[str, Predicate]:
    if not isinstance(regex, str | re.Pattern) or isinstance(
        getattr(regex, "pattern", regex), bytes
    ):
        # (A bytes pattern failed every later run: commands are matched as text.)
        raise InvalidArgumentTypeError(
            f"regex must be a str or a compiled str pattern, not {regex!r:.60}"
        )
    try:
        pattern = re.compile(regex)
    except re.error as exc:
        raise InvalidCommandError(f"regex {regex!r} does not compile: {exc}") from None
    return (
        f"regex {pattern.pattern!r}",
        lambda call: pattern.search(_command_text(call.args)) is not None,
    )


def _output(value: object, name: str) -> bytes:
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise InvalidArgumentTypeError(f"{name} must be bytes or str, not {type(value).__name__}")


def _response(
    *,
    returncode: object,
    stdout: object,
    stderr: object,
    duration: float,
    lines: Iterable[str | bytes] | None,
    line_delay: float,
) -> DryRunResponse:
    if isinstance(returncode, bool) or not isinstance(returncode, int):
        raise InvalidArgumentTypeError(f"returncode must be an int, not {returncode!r}")
    run_for = check_timeout(duration, "duration") or 0.0
    delay = check_timeout(line_delay, "line_delay") or 0.0
    if math.isinf(delay):
        raise InvalidCommandError("line_delay must be a finite number of seconds")
    out, err = _output(stdout, "stdout"), _output(stderr, "stderr")
    if lines is None:
        if delay:
            raise InvalidCommandError("line_delay needs lines=")
        return DryRunResponse(returncode=returncode, stdout=out, stderr=err, duration=run_for)
    if isinstance(lines, str | bytes):
        raise InvalidArgumentTypeError(
            "lines must be a list of lines, not one str/bytes (use stdout= for a single block)"
        )
    if out:
        raise InvalidCommandError("give stdout= or lines=, not both")
    chunks = tuple(_line(item, position) for position, item in enumerate(lines))
    return StreamedResponse(
        returncode=returncode,
        stdout=b"".join(chunks),
        stderr=err,
        duration=max(run_for, delay * len(chunks)),
        lines=chunks,
        line_delay=delay,
    )


def _line(item: object, position: int) -> bytes:
    data = _output(item, f"lines[{position}]")
    return data if data.endswith(b"\n") else data + b"\n"


class DryRunScript:
    """Scripted answers for DRY_RUN commands, chosen per command, with a record of every call.

    It is the handler of its :attr:`recorder`; :meth:`strategy` makes DRY_RUN strategies that
    answer from it, so ``override_strategy(script.strategy)`` (what the ``pq_dry_run`` fixture
    does) makes every auto-detected wrapper use it. Rules are tried in the order they were
    registered; the first that matches and is not used up answers. A command no rule answers
    gets :attr:`default` when ``strict`` is false, and raises :class:`UnscriptedCommandError`
    (and is kept in :attr:`unscripted`) when it is true, the default.

    Arguments are validated exactly as in the real modes before the script is asked (bad input
    raises the same errors), because the wrapper validates before any strategy runs.

    Thread-safe.
    """

    def __init__(self, *, strict: bool = True, default: DryRunResponse | None = None) -> None:
        #: Unscripted commands raise (True) or get :attr:`default` (False).
        self.strict = strict
        #: The answer to unscripted commands when not strict: returncode 0, no output.
        self.default = default or DryRunResponse()
        # Re-entrant: a match= predicate may look at the script (calls, rules) while it answers.
        self._lock = threading.RLock()
        self._rules: list[ScriptRule] = []
        self._unscripted: list[DryRunCall] = []
        self._unmatched: list[DryRunCall] = []
        #: Records every answered command (``calls``), and the input each was sent.
        self.recorder = DryRunRecorder(self)

    # -- scripting ----------------------------------------------------------------------------
    def register(
        self,
        command: Sequence[str | bytes | os.PathLike[str]] | str | None = None,
        *,
        prefix: Sequence[str | bytes | os.PathLike[str]] | str | None = None,
        regex: str | re.Pattern[str] | None = None,
        match: Callable[[DryRunCall], bool] | None = None,
        returncode: int = 0,
        stdout: bytes | str = b"",
        stderr: bytes | str = b"",
        duration: float = 0.0,
        lines: Iterable[str | bytes] | None = None,
        line_delay: float = 0.0,
        times: int | None = None,
    ) -> ScriptRule:
        """Script what matching commands "do"; return the rule (its ``calls`` can be asserted).

        Which commands, exactly one of:

        - ``command``: these exact arguments (a tuple/list), or this exact shell command line (a
          str, for ``create_subprocess_shell``/``shell=True``);
        - ``prefix=``: arguments that start with these, or a shell line that starts with this str;
        - ``regex=``: ``re.search`` in the command as one line (arguments joined by spaces);
        - ``match=``: a callable ``match(call: DryRunCall) -> bool``.

        What they do: exit with ``returncode``, having written ``stdout``/``stderr`` (str is
        encoded as UTF-8), after ``duration`` seconds (``inf``: until stopped; terminating ends
        the fake process with ``-SIGTERM``). ``lines`` instead of ``stdout`` streams lines one
        by one, ``line_delay`` seconds apart, to ``stream()``/``iter_lines`` consumers; a line
        without a newline gets one.

        How often: ``times=None`` answers every matching command; ``times=n`` answers the next
        ``n`` and is then used up, so registering the same command several times with
        ``times=1`` scripts a sequence of answers.

        Raises:
            InvalidCommandError: not exactly one matcher, an empty command, a regex that does not
                compile, ``stdout`` together with ``lines``, ``line_delay`` without ``lines``.
            InvalidArgumentTypeError: a command part, output or returncode of the wrong type.
            InvalidTimeoutError: a negative ``duration`` or ``line_delay``.
            InvalidLimitError: ``times`` is not an int >= 1.
        """
        description, test = _matcher(command, prefix, regex, match)
        response = _response(
            returncode=returncode,
            stdout=stdout,
            stderr=stderr,
            duration=duration,
            lines=lines,
            line_delay=line_delay,
        )
        if times is not None:
            check_limit(times, "times", minimum=1)
        rule = ScriptRule(description, test, response, times)
        with self._lock:
            self._rules.append(rule)
        return rule

    def __call__(self, call: DryRunCall) -> DryRunResponse:
        """Answer ``call`` (the recorder calls this for every command).

        Raises:
            UnscriptedCommandError: strict, and no rule answers ``call``.
        """
        with self._lock:
            used_up = []
            for rule in self._rules:
                try:
                    matched = rule.matches(call)
                except Exception as exc:
                    # The test's own predicate is broken: said as such, and kept as unscripted
                    # so that the plugin fails the test even if the application swallows this.
                    self._unmatched.append(call)
                    self._unscripted.append(call)
                    raise UnscriptedCommandError(
                        f"DRY_RUN: the match predicate of {rule!r} raised "
                        f"{type(exc).__name__} for {call.args!r}: {exc}",
                        call.args,
                    ) from exc
                if matched:
                    if rule._take(call):
                        return rule.response
                    used_up.append(rule)
            self._unmatched.append(call)
            if not self.strict:
                return self.default
            self._unscripted.append(call)
            rules = list(self._rules)
        lines = [f"DRY_RUN: nothing is scripted for {call.args!r}"]
        if used_up:
            lines.append("  rules matching it, all used up: " + "; ".join(map(repr, used_up)))
        lines.append(_registered(rules))
        lines.append(
            "  script it with register(...) (e.g. pq_dry_run.register(...)), or set "
            "strict = False to answer unscripted commands with returncode 0"
        )
        raise UnscriptedCommandError("\n".join(lines), call.args)

    def strategy(self) -> DryRunStrategy:
        """A new DRY_RUN strategy answering from this script (one per wrapper; all share
        :attr:`recorder`). Scripted ``lines`` stream with their delays."""
        return StreamingDryRunStrategy(recorder=self.recorder)

    # -- what happened ------------------------------------------------------------------------
    @property
    def calls(self) -> list[DryRunCall]:
        """Every answered command, oldest first (a copy; unscripted ones in strict mode are in
        :attr:`unscripted` instead)."""
        return self.recorder.calls

    @property
    def commands(self) -> list[Command]:
        """Just the ``args`` of each answered command."""
        return self.recorder.commands

    @property
    def unscripted(self) -> list[DryRunCall]:
        """Commands refused in strict mode because no rule answered them (a copy)."""
        with self._lock:
            return list(self._unscripted)

    @property
    def unmatched(self) -> list[DryRunCall]:
        """Commands no rule answered: refused (strict) or given :attr:`default` (a copy)."""
        with self._lock:
            return list(self._unmatched)

    @property
    def rules(self) -> list[ScriptRule]:
        """The registered rules, in order (a copy)."""
        with self._lock:
            return list(self._rules)

    def calls_matching(
        self,
        command: Sequence[str | bytes | os.PathLike[str]] | str | None = None,
        *,
        prefix: Sequence[str | bytes | os.PathLike[str]] | str | None = None,
        regex: str | re.Pattern[str] | None = None,
        match: Callable[[DryRunCall], bool] | None = None,
    ) -> list[DryRunCall]:
        """The answered commands that match (same matchers as :meth:`register`), oldest first.

        Raises:
            InvalidCommandError / InvalidArgumentTypeError: as :meth:`register`.
        """
        _, test = _matcher(command, prefix, regex, match)
        return [call for call in self.calls if test(call)]

    def unscripted_report(self, start: int = 0) -> str | None:
        """A description of the unscripted commands from index ``start`` on, or ``None``."""
        with self._lock:
            missed = self._unscripted[start:]
            rules = list(self._rules)
        if not missed:
            return None
        lines = [f"{len(missed)} command(s) ran in DRY_RUN with nothing scripted for them:"]
        lines += [f"  - {call.args!r}" for call in missed]
        lines.append(_registered(rules))
        lines.append(
            "  script them with pq_dry_run.register(...), or set pq_dry_run.strict = False"
        )
        return "\n".join(lines)


def _registered(rules: list[ScriptRule]) -> str:
    if not rules:
        return "  registered rules: none"
    return "  registered rules:\n" + "\n".join(f"    {rule!r}" for rule in rules)
