"""Bytes to events: `LineReader` splits a client's octets into command lines (server side);
`ReplyReader` turns a provider's octets into `Status` / `Data` / `EndOfData` events (client side).
"""

from __future__ import annotations

import enum
import re
from collections import deque
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

from pop3proxy.pop3.commands import MAX_COMMAND_LINE
from pop3proxy.pop3.errors import LocalProtocolError, RemoteProtocolError
from pop3proxy.pop3.replies import _RESP_CODE

MAX_REPLY_LINE: Final = 512  # a status line including CRLF (RFC 2449)


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return self.value


NEED_DATA: Final = _Sentinel.NEED_DATA
NeedData: TypeAlias = Literal[_Sentinel.NEED_DATA]


@dataclass(frozen=True)
class Line:
    """One received line without its terminator (CRLF or a lone LF)."""

    data: bytes


@dataclass(frozen=True)
class LineTooLong:
    """A line of `length` octets (terminator included) was received and discarded."""

    length: int


class LineReader:
    """Splits received octets into lines, discarding over-long ones whole."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._searched = 0  # octets at the buffer's start known to hold no LF
        self._discarded: int | None = None  # octets of an over-long line so far

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def receive_data(self, data: bytes | bytearray) -> None:
        self._buffer += data

    def discard_buffer(self) -> int:
        """Drop everything received but not yet returned (after STLS)."""
        dropped = len(self._buffer)
        self._buffer.clear()
        self._searched = 0
        self._discarded = None
        return dropped

    def next_event(self, max_length: int = MAX_COMMAND_LINE) -> Line | LineTooLong | NeedData:
        buffer = self._buffer
        end = buffer.find(b"\n", self._searched)
        if end < 0:
            if self._discarded is not None:
                self._discarded += len(buffer)
                buffer.clear()
            elif len(buffer) >= max_length:
                # Even its terminator will not fit any more: drop what we have.
                self._discarded = len(buffer)
                buffer.clear()
            self._searched = len(buffer)
            return NEED_DATA
        self._searched = 0
        length = end + 1
        if self._discarded is not None:
            length += self._discarded
            self._discarded = None
            del buffer[: end + 1]
            return LineTooLong(length)
        if length > max_length:
            del buffer[: end + 1]
            return LineTooLong(length)
        data = bytes(buffer[: end - 1 if end and buffer[end - 1] == 0x0D else end])
        del buffer[: end + 1]
        return Line(data)


@dataclass(frozen=True)
class Status:
    """A status line: `+OK`/`-ERR` with optional RFC 2449 code, or a `+ ` continuation."""

    ok: bool
    code: str | None
    text: str
    continuation: bool = False

    def __post_init__(self) -> None:
        if self.continuation and (not self.ok or self.code is not None):
            raise LocalProtocolError("a continuation is positive and has no code")


@dataclass(frozen=True)
class Data:
    """Part of a multi-line reply's body, unstuffed, CRLF line endings kept."""

    data: bytes


@dataclass(frozen=True)
class EndOfData:
    """The terminating `.` line of a multi-line reply."""


Event: TypeAlias = Status | Data | EndOfData

_STATUS = re.compile(rb"(\+OK|-ERR)(?: (.*))?", re.DOTALL | re.IGNORECASE)
_CONTINUATION = re.compile(rb"\+(?: (.*))?", re.DOTALL)
_TEXT_CODE = re.compile(rf"\[({_RESP_CODE.pattern})\](?: (.*))?", re.DOTALL)


def _parse_status(line: bytes, multiline: bool) -> Status:
    match = _STATUS.fullmatch(line)
    if match is None:
        match = _CONTINUATION.fullmatch(line)
        if match is None or multiline:
            raise RemoteProtocolError(f"invalid status line from the server: {line[:80]!r}")
        return Status(True, None, (match[1] or b"").decode("utf-8", "replace"), continuation=True)
    text = (match[2] or b"").decode("utf-8", "replace")
    code = None
    coded = _TEXT_CODE.fullmatch(text)
    if coded is not None:
        code, text = coded[1], coded[2] or ""
    return Status(match[1].upper() == b"+OK", code, text)


class ReplyReader:
    """Turns a POP3 server's octets into events; `expect()` says what kind comes next."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._expected: deque[bool] = deque()
        self._in_data = False
        self._line_start = False  # in data: the unread buffer starts a line
        self._failed: str | None = None

    @property
    def pending(self) -> bool:
        """True while a reply is expected or a multi-line body is still being read."""
        return self._in_data or bool(self._expected)

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def in_data(self) -> bool:
        """True while the body of a multi-line reply is being read."""
        return self._in_data

    def expect(self, multiline: bool) -> None:
        """Queue the kind of the next reply (multi-line if positive)."""
        self._expected.append(multiline)

    def receive_data(self, data: bytes | bytearray) -> None:
        self._buffer += data

    def next_event(self) -> Event | NeedData:
        if self._failed is not None:
            raise RemoteProtocolError(f"the server's reply stream is broken: {self._failed}")
        try:
            return self._next_data() if self._in_data else self._next_status()
        except RemoteProtocolError as exc:
            self._failed = str(exc)
            raise

    def _next_status(self) -> Status | NeedData:
        buffer = self._buffer
        if not self._expected:
            if buffer:
                raise RemoteProtocolError("the server sent data nobody asked for")
            return NEED_DATA
        end = buffer.find(b"\n", 0, MAX_REPLY_LINE)
        if end < 0:
            if len(buffer) >= MAX_REPLY_LINE:
                raise RemoteProtocolError("status line from the server is too long")
            return NEED_DATA
        line = bytes(buffer[: end - 1 if end and buffer[end - 1] == 0x0D else end])
        del buffer[: end + 1]
        multiline = self._expected.popleft()
        status = _parse_status(line, multiline)
        if multiline and status.ok:
            self._in_data = True
            self._line_start = True
        return status

    def _next_data(self) -> Data | EndOfData | NeedData:
        buffer = self._buffer
        if self._line_start:
            if buffer.startswith(b".\r\n"):
                del buffer[:3]
                self._in_data = False
                return EndOfData()
            if len(buffer) < 3 and b".\r\n".startswith(buffer):
                return NEED_DATA  # perhaps the terminator, perhaps a stuffed line
        end = buffer.find(b"\n.\r\n")
        if end >= 0:
            end += 1
        else:
            # Hold back a line start in the last octets: it may begin the terminator.
            end = len(buffer)
            last = buffer.rfind(b"\n", max(0, end - 3))
            if last >= 0 and b".\r\n".startswith(buffer[last + 1 :]):
                end = last + 1
        if end == 0:
            return NEED_DATA
        if end == len(buffer):
            chunk = bytes(buffer)
            buffer.clear()
        else:
            chunk = bytes(buffer[:end])
            del buffer[:end]
        if self._line_start and chunk.startswith(b"."):
            chunk = chunk[1:]
        self._line_start = chunk.endswith(b"\n")
        if b"\n." in chunk:
            chunk = chunk.replace(b"\n.", b"\n")
        return Data(chunk)
