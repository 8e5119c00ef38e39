"""Server-Sent Events for a run's output, framework-free: :func:`sse_events` and :class:`SSEEvent`.

``sse_events(capture, run_id)`` is an async iterator of ``str`` chunks, each one or more complete
SSE events (WHATWG HTML, "Server-sent events"), ready for Starlette/FastAPI's
``StreamingResponse(..., media_type="text/event-stream")`` or a raw ASGI ``send`` (encode as
UTF-8). The events:

- ``retry: <ms>`` first (how long a browser waits before reconnecting);
- ``event: line``, ``id: <seq>``, ``data: {"seq": <seq>, "text": "<line>"}`` per output line
  (plus ``"truncated": <bytes cut>`` for a cut line). The payload is JSON because an SSE data line
  cannot hold CR or LF and a browser turns every line break (CR, LF, CRLF) into LF: JSON escapes
  them, so ``JSON.parse(event.data).text`` is exactly the line, lone CRs, U+2028, emoji and all
  (U+0085, U+2028 and U+2029 are escaped too: no SSE line breaks, but a client reading lines
  with Python's ``str.splitlines``, as httpx's ``iter_lines`` does, would break there);
  a lone surrogate comes back as the same escaped surrogate (from the ring; a line replayed
  from a log file has it as ``?``, the file being UTF-8).
- ``event: gap``, ``id: <last missing seq>``, ``data: {"dropped": N, "next_seq": M}`` when lines
  are missing (the subscriber fell behind and there is no log file);
- ``event: end``, ``data: {"status": "completed" | ... | null, "exit_code": 0 | ... | null}`` once
  the run's output is closed, then the iterator ends. A browser's ``EventSource`` reconnects
  whenever a stream ends, so close it on ``end``;
- a comment line (``: keep-alive``) after ``heartbeat`` idle seconds, so proxies and load
  balancers do not cut a quiet stream.

Ids are line seqs, so a reconnecting browser's ``Last-Event-ID`` header, passed back as
``last_event_id``, resumes right after the last line it got.
"""

from __future__ import annotations

import asyncio
import json
import re
import reprlib
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from json.encoder import encode_basestring, encode_basestring_ascii
from typing import Any

from .._core._durations import finite
from .._core._exceptions import (
    InvalidArgumentTypeError,
    InvalidSSEEventError,
    InvalidSubscriptionError,
)
from ._memory_registry import DEFAULT_POLL_INTERVAL, BaseRunRegistry
from ._output_capture import OutputCapture
from ._output_items import OutputChunk, OutputGap
from ._output_subscription import OutputSubscription

__all__ = ["SSE_HEADERS", "SSEEvent", "sse_events"]

#: Response headers for an SSE stream: the media type, no caching, and no proxy buffering
#: (``X-Accel-Buffering`` is nginx's switch).
SSE_HEADERS: Mapping[str, str] = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
# SSE's line breaks (CR, LF) and those str.splitlines() adds, where Python clients that read
# the stream by lines (httpx's iter_lines, so httpx-sse) break: an event name or id holding
# one would be two lines to such a client (a forged "id:" field, say).
_FIELD_BREAK = re.compile("[\r\n\x00\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
_KEEP_ALIVE = ": keep-alive\n\n"


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One Server-Sent Event; :meth:`encode` frames it.

    ``data``, ``event`` and ``id`` are ``str`` or ``None`` (format a number yourself). ``data``
    may hold line breaks: each line becomes its own ``data:`` field, and the browser
    joins them with LF (so CR and CRLF come back as LF; JSON-encode the data to keep them).
    ``str.splitlines()``'s other line breaks (``\v``, ``\f``, ``\x1c``-``\x1e``, U+0085,
    U+2028, U+2029) are none in SSE and stay in ``data`` as they are (a browser gets them
    back), but Python clients that read the stream by lines with it (httpx's ``iter_lines``,
    so httpx-sse) cut the field there: for such clients, escape them (``json.dumps`` with its
    default ``ensure_ascii=True`` does; the line events do). ``event`` and ``id`` must hold
    none of them, nor CR, LF or NUL.
    ``data=None`` sends no data field, so the browser dispatches nothing (e.g. a ``retry``-only
    event).

    Raises:
        InvalidSSEEventError: see the exception.
    """

    data: str | None = ""
    event: str | None = None
    id: str | None = None
    retry: int | None = None

    def __post_init__(self) -> None:
        for name in ("data", "event", "id"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise InvalidSSEEventError(f"SSE {name} must be a str or None, got {value!r}")
            if value is not None and not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    # The stream is UTF-8: the server would fail writing it, mid-response.
                    raise InvalidSSEEventError(
                        f"SSE {name} cannot be sent as UTF-8 (a lone surrogate): {value!r}; "
                        "JSON-encode it (json.dumps escapes it) or decode with another handler"
                    ) from None
        for name in ("event", "id"):
            value = getattr(self, name)
            if value is not None and _FIELD_BREAK.search(value):
                raise InvalidSSEEventError(
                    f"SSE {name} must not contain a line break (CR, LF, or one of "
                    f"str.splitlines()'s others, which line-reading clients split at) or NUL: "
                    f"{value!r}"
                )
        if self.retry is not None and (
            isinstance(self.retry, bool) or not isinstance(self.retry, int) or self.retry < 0
        ):
            raise InvalidSSEEventError(f"SSE retry must be an int >= 0, got {self.retry!r}")

    def encode(self) -> str:
        """Return the event as SSE text, ending with the blank line that dispatches it."""
        fields = []
        if self.id is not None:
            fields.append(f"id: {self.id}\n")
        if self.event is not None:
            fields.append(f"event: {self.event}\n")
        if self.retry is not None:
            fields.append(f"retry: {self.retry}\n")
        if self.data is not None:
            fields.extend(f"data: {line}\n" for line in _LINE_BREAK.split(self.data))
        fields.append("\n")
        return "".join(fields)


# No line breaks in SSE, but str.splitlines() breaks lines there, and so do Python clients
# built on it (httpx's iter_lines()): sent raw, they cut a data field in two for such a client.
# JSON-escaped they decode to the same text.
_UNICODE_BREAKS = re.compile("[\x85\u2028\u2029]")


def _escape_unicode_break(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def _json_string(text: str) -> str:
    if text.isascii():
        return encode_basestring(text)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate cannot be sent as UTF-8; the escaped form round-trips through JSON.
        return encode_basestring_ascii(text)
    encoded = encode_basestring(text)
    if "\x85" in encoded or "\u2028" in encoded or "\u2029" in encoded:
        return _UNICODE_BREAKS.sub(_escape_unicode_break, encoded)
    return encoded


def _line_events(chunk: OutputChunk) -> str:
    parts = []
    seq = chunk.first_seq
    truncated = chunk.truncated
    for text in chunk.lines:
        extra = f',"truncated":{truncated[seq]}' if truncated and seq in truncated else ""
        parts.append(
            f'id: {seq}\nevent: line\ndata: {{"seq":{seq},"text":{_json_string(text)}{extra}}}\n\n'
        )
        seq += 1
    return "".join(parts)


def _gap_event(gap: OutputGap, next_seq: int) -> str:
    data = json.dumps({"dropped": gap.dropped, "next_seq": next_seq}, separators=(",", ":"))
    return SSEEvent(data, event="gap", id=str(next_seq - 1)).encode()


def _parse_last_event_id(value: str | int | None) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit():
        try:
            return int(value)
        except ValueError:
            pass  # more digits than int() converts (sys.get_int_max_str_digits)
    # reprlib: the header is the client's, of any length, and the message may go back to it.
    raise InvalidSubscriptionError(
        f"last_event_id must be a line seq (decimal digits) or empty, got {reprlib.repr(value)}"
    )


def sse_events(
    capture: OutputCapture,
    run_id: str,
    *,
    last_event_id: str | int | None = None,
    heartbeat: float | None = 15.0,
    retry: int | None = 3000,
    wait: bool | float = False,
    max_lines_per_chunk: int = 256,
    registry: BaseRunRegistry | None = None,
    poll_interval: float = DEFAULT_POLL_INTERVAL,
    stop: asyncio.Event | None = None,
) -> AsyncGenerator[str, None]:
    """Return an async iterator of SSE text for ``run_id``'s output (see the module docstring
    for the events): from the line after ``last_event_id`` (a browser's ``Last-Event-ID``
    header; ``None`` or ``""``: from the first line), live until the run's output is closed.

    Each chunk holds whole events (at most ``max_lines_per_chunk`` line events). Closing the
    iterator (``aclose()``) ends the subscription; one dropped unclosed (Starlette's
    ``StreamingResponse`` drops it when the client disconnects) ends it once it is garbage
    collected, which in a reference cycle can be much later: close it when the response ends.
    The subscription exists from this call on (it is how an unknown run is refused here), but
    no task, thread or file is used for a client until iteration starts.

    With ``registry`` (and a capture with a ``log_dir``), a run that another process writes,
    e.g. another uvicorn worker, is streamed from its log file as it grows, with the same ids,
    until the registry has its final status (see ``OutputCapture.subscribe``); the ``end``
    event then carries that status. Check that the run exists (``registry.get_run``) before
    starting the response: for such a run, "unknown" is only found out while streaming.

    Args:
        heartbeat: seconds of silence before a ``: keep-alive`` comment; ``None``: never.
        retry: reconnection delay sent to the browser, in ms; ``None``: not sent.
        wait: as in ``OutputCapture.subscribe``.
        registry, poll_interval: as in ``OutputCapture.subscribe``.
        stop: once this event is set, the stream ends after the events already sent, without
            an ``end`` event, so a browser reconnects (with ``Last-Event-ID``) to whichever
            server answers next. Set it when the server begins to shut down: uvicorn waits
            for open responses before it runs the app's lifespan shutdown.

    Raises:
        InvalidArgumentTypeError: ``capture`` is not an :class:`OutputCapture`.
        OutputNotFoundError: the run is unknown to ``capture`` (and ``wait`` is false), or no
            run can have that id (see ``OutputCapture.subscribe``); raised here, before any
            response is started, so an endpoint can answer 404.
        InvalidRunIdError: ``run_id`` is not a ``str``.
        InvalidSubscriptionError: a malformed ``last_event_id`` or ``wait``, or a bad
            ``heartbeat``/``retry``/``max_lines_per_chunk``/``poll_interval``/``stop``.
    """
    if not isinstance(capture, OutputCapture):
        raise InvalidArgumentTypeError(
            f"sse_events needs an OutputCapture, not {type(capture).__name__}"
        )
    after = _parse_last_event_id(last_event_id)
    if heartbeat is not None and (
        isinstance(heartbeat, bool)
        or not isinstance(heartbeat, int | float)
        or not finite(heartbeat)
        or heartbeat <= 0
    ):
        raise InvalidSubscriptionError(f"heartbeat must be seconds > 0 or None, got {heartbeat!r}")
    if retry is not None and (isinstance(retry, bool) or not isinstance(retry, int) or retry < 0):
        raise InvalidSubscriptionError(f"retry must be an int >= 0 (ms) or None, got {retry!r}")
    if (
        isinstance(max_lines_per_chunk, bool)
        or not isinstance(max_lines_per_chunk, int)
        or max_lines_per_chunk < 1
    ):
        raise InvalidSubscriptionError(
            f"max_lines_per_chunk must be an int >= 1, got {max_lines_per_chunk!r}"
        )
    if stop is not None and not isinstance(stop, asyncio.Event):
        raise InvalidSubscriptionError(f"stop must be an asyncio.Event or None, got {stop!r}")
    subscription = capture.subscribe(
        run_id, after=after, wait=wait, registry=registry, poll_interval=poll_interval
    )
    return _stream(subscription, heartbeat, retry, max_lines_per_chunk, stop)


def _item_events(item: OutputChunk | OutputGap, subscription: OutputSubscription) -> str:
    if isinstance(item, OutputGap):
        return _gap_event(item, subscription.next_seq)
    return _line_events(item)


class _Waiting:
    """The deadline of the read a stream waits on, if any: what setting ``stop`` expires."""

    __slots__ = ("deadline",)

    def __init__(self) -> None:
        self.deadline: asyncio.Timeout | None = None

    def expire(self, _stopper: asyncio.Future[Any]) -> None:
        deadline = self.deadline
        if deadline is not None and not deadline.expired():
            deadline.reschedule(asyncio.get_running_loop().time())


async def _stream(
    subscription: OutputSubscription,
    heartbeat: float | None,
    retry: int | None,
    max_lines: int,
    stop: asyncio.Event | None,
) -> AsyncGenerator[str, None]:
    async with subscription:
        # Sent at once: some proxies hold the response headers back until the first bytes.
        yield SSEEvent(None, retry=retry).encode() if retry is not None else _KEEP_ALIVE
        chunks = subscription.chunks(max_lines)
        # Each read runs in this task, under the heartbeat's deadline; `stop` set while a read
        # waits moves that deadline to now. Cancelling a read loses nothing (it moves the
        # subscription's cursor only as it returns), and a read that returned is always sent.
        # Not a read task per chunk raced against `stop` with asyncio.wait: that took three
        # loop turns a chunk where a producer that never waits yields one, so a stream with
        # `stop` lost most lines of a fast run held in memory (gap events) where one without
        # kept up. Nor a nested generator: a stream a server drops unclosed (Starlette does
        # when the client leaves) is closed by its finalizer, and a nested generator collected
        # with it in a cycle was closed twice at once ("already running" logged for a mere
        # disconnect).
        waiting = _Waiting()
        stopper: asyncio.Future[Any] | None = None
        if stop is not None:
            stopper = asyncio.ensure_future(stop.wait())
            stopper.add_done_callback(waiting.expire)
        try:
            while True:
                if stop is not None and stop.is_set():
                    return  # stopped: no end event, so the browser reconnects
                try:
                    async with asyncio.timeout(heartbeat) as deadline:
                        waiting.deadline = deadline
                        try:
                            item = await anext(chunks)
                        finally:
                            waiting.deadline = None
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    if not deadline.expired():
                        raise  # e.g. OutputWaitTimeoutError, not our heartbeat
                    if stop is not None and stop.is_set():
                        return  # as above
                    yield _KEEP_ALIVE
                    continue
                yield _item_events(item, subscription)
        finally:
            if stopper is not None:
                stopper.cancel()
                # Its outcome is ours to take.
                await asyncio.gather(stopper, return_exceptions=True)
        end = subscription.end
        data = json.dumps(
            {
                "status": None if end is None else end.status,
                "exit_code": None if end is None else end.exit_code,
            },
            separators=(",", ":"),
        )
        yield SSEEvent(data, event="end").encode()
