"""Incremental decoders that read what ``bytes.decode()`` reads.

Python's incremental decoder for "utf-16" and "utf-32" insists on a byte-order mark: without one
it raises a bare ``UnicodeError`` ("UTF-16 stream does not start with BOM"), whatever the
``errors`` handler, while ``bytes.decode("utf-16")`` reads such text in this machine's byte
order. A program on Windows often writes UTF-16 without a mark (``cmd /U``), and a run's
``ProcessResult`` decodes its output with ``bytes.decode()``: streaming the same output line by
line must give the same text, not fail before the first line.
"""

from __future__ import annotations

import codecs
import encodings.utf_8_sig
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["incremental_decoder"]

# codec name -> (its byte-order marks, little- and big-endian; the width of a code unit).
_MARKED = {
    "utf-16": ((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE), 2),
    "utf-32": ((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE), 4),
}
_NATIVE = 0 if sys.byteorder == "little" else 1
_ORDERS = ("le", "be")


def incremental_decoder(encoding: str, errors: str) -> codecs.IncrementalDecoder:
    """An incremental decoder of ``encoding`` (a known codec) that decodes as
    ``bytes.decode(encoding, errors)`` does, a piece at a time."""
    name = codecs.lookup(encoding).name
    if name in _MARKED:
        return _ByteOrderFromMark(name, errors)
    if name == "utf-8-sig":
        return _Utf8Signed(errors)
    return codecs.getincrementaldecoder(encoding)(errors=errors)


class _Utf8Signed(encodings.utf_8_sig.IncrementalDecoder):
    """UTF-8 with an optional leading mark. Python's own decoder holds back up to two bytes
    that could begin the mark, and drops them at the end of the input (``final``): a stream of
    just ``b"\xef"`` gave ``""``, where ``bytes.decode("utf-8-sig")`` gives ``"\ufffd"`` (or
    raises, with ``errors="strict"``)."""

    def decode(self, input: Buffer, final: bool = False) -> str:
        text: str = super().decode(input, final)
        if final and self.buffer:  # the start of a mark that never came whole
            held, self.buffer = self.buffer, b""
            text += codecs.utf_8_decode(held, self.errors, True)[0]
        return text


class _ByteOrderFromMark(codecs.IncrementalDecoder):
    """UTF-16 or UTF-32 whose byte order is told by a leading mark (dropped, as
    ``bytes.decode()`` drops it), or is this machine's without one.

    The state is ``(held-back bytes, order)``: order 0 while the first code unit has not come
    yet, then 1 + the index in ``_ORDERS`` of the byte order chosen.
    """

    def __init__(self, name: str, errors: str = "strict") -> None:
        super().__init__(errors)
        self._name = name
        self._marks, self._width = _MARKED[name]
        self._pending = b""
        self._order = -1  # not chosen yet
        self._inner: codecs.IncrementalDecoder | None = None

    def _choose(self, order: int) -> None:
        self._order = order
        self._inner = codecs.getincrementaldecoder(f"{self._name}-{_ORDERS[order]}")(
            errors=self.errors
        )

    def decode(self, input: Buffer, final: bool = False) -> str:
        if self._inner is not None:
            return self._inner.decode(input, final)
        data = self._pending + bytes(input)
        if len(data) < self._width and not final:
            self._pending = data  # not enough to tell a mark yet
            return ""
        self._pending = b""
        skip = 0
        for order, mark in enumerate(self._marks):
            if data.startswith(mark):
                skip = len(mark)
                self._choose(order)
                break
        else:
            self._choose(_NATIVE)
        assert self._inner is not None
        try:
            return self._inner.decode(data[skip:], final)
        except UnicodeDecodeError as exc:
            # Positions in what the caller gave (the mark included), as the codec's own are.
            raise UnicodeDecodeError(
                exc.encoding, data, exc.start + skip, exc.end + skip, exc.reason
            ) from None

    def reset(self) -> None:
        self._pending = b""
        self._order = -1
        self._inner = None

    def getstate(self) -> tuple[bytes, int]:
        if self._inner is None:
            return (self._pending, 0)
        held, _ = self._inner.getstate()
        return (held, 1 + self._order)

    def setstate(self, state: tuple[bytes, int]) -> None:
        held, order = state
        if order == 0:
            self.reset()
            self._pending = held
            return
        self._choose(order - 1)
        assert self._inner is not None
        self._inner.setstate((held, 0))
