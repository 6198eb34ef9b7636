"""Line endings: normalising stored mail to CRLF, and streaming converters (bare LF, mboxrd)
that read a stored message as the CRLF octets a client receives.
"""

from __future__ import annotations

import io
import re
from typing import BinaryIO

from pop3proxy.pop3.dotstuff import to_crlf

CHUNK = 64 * 1024


def normalise(data: bytes) -> bytes:
    """The message in CRLF form: bare LF becomes CRLF, and a non-empty message ends with CRLF."""
    data = to_crlf(data)
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


def has_dot_lines(data: bytes) -> bool:
    """Whether a line of ``data`` (a whole message) starts with ".": RETR and TOP then dot-stuff it."""
    return data.startswith(b".") or b"\n." in data


class _BareLfConverter:
    """Turns bare LF into CRLF across chunk boundaries (a CRLF split between chunks is kept as is)."""

    def __init__(self) -> None:
        self._after_cr = False

    def feed(self, data: bytes) -> bytes:
        head = b""
        if self._after_cr and data[:1] == b"\n":
            head, data = b"\n", data[1:]
        if head or data:
            self._after_cr = data[-1:] == b"\r"
        return head + to_crlf(data)

    def finish(self) -> bytes:
        return b""


_QUOTED_FROM = re.compile(rb"^>(>*From )", re.MULTILINE)  # mboxrd unquoting: drop one '>'
_QUOTABLE_FROM = re.compile(rb"^(>*From )", re.MULTILINE)  # mboxrd quoting: add one '>'
_UNDECIDED = re.compile(rb">+(?:F(?:r(?:o(?:m)?)?)?)?")  # a line start that may still become >+From


class _MboxrdConverter:
    """Turns mboxrd body lines (LF on disk) into the message in CRLF form, chunk by chunk.

    Every LF becomes CRLF (on disk an LF always ends a line; a CR before it is message data), and one '>' is
    removed from lines matching ``^>+From ``.
    """

    def __init__(self) -> None:
        self._at_line_start = True
        self._held = b""  # a line start that cannot be decided yet (such as b">>Fro")

    def feed(self, data: bytes) -> bytes:
        text, self._held = self._held + data, b""
        out = b""
        if not self._at_line_start:
            end = text.find(b"\n")
            if end < 0:
                return text
            out, text = text[:end] + b"\r\n", text[end + 1 :]
        last = text.rfind(b"\n") + 1
        if _UNDECIDED.fullmatch(text, last):
            text, self._held = text[:last], text[last:]
        self._at_line_start = not text or text.endswith(b"\n")
        return out + _QUOTED_FROM.sub(rb"\1", text).replace(b"\n", b"\r\n")

    def finish(self) -> bytes:
        held, self._held = self._held, b""
        return held


class _CrlfStream(io.RawIOBase):
    """A read-only stream of the CRLF form of `length` octets (or all) of `source` from its position."""

    def __init__(
        self,
        source: BinaryIO,
        converter: _BareLfConverter | _MboxrdConverter,
        length: int | None = None,
    ) -> None:
        self._source = source
        self._converter = converter
        self._remaining = length
        self._out = b""
        self._pos = 0
        self._eof = False

    def readable(self) -> bool:
        return True

    # Narrower than RawIOBase's any writable buffer: io.BufferedReader, its only caller, passes these.
    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        while self._pos >= len(self._out):
            if self._eof:
                return 0
            self._fill()
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = self._out[self._pos : self._pos + n]
        self._pos += n
        return n

    def _fill(self) -> None:
        want = CHUNK if self._remaining is None else min(CHUNK, self._remaining)
        data = self._source.read(want) if want else b""
        if data:
            if self._remaining is not None:
                self._remaining -= len(data)
            self._out = self._converter.feed(data)
        else:
            self._eof = True
            self._out = self._converter.finish()
        self._pos = 0

    def close(self) -> None:
        if not self.closed:
            self._source.close()
        super().close()


def _stream(
    source: BinaryIO, converter: _BareLfConverter | _MboxrdConverter, length: int | None = None
) -> BinaryIO:
    return io.BufferedReader(_CrlfStream(source, converter, length), CHUNK)
