"""Sans-IO POP3: read commands, format replies, dot-stuff bodies, read upstream replies.

Nothing here does I/O. The server side turns received octets into `Line` events
(`LineReader`) and lines into `Command`s (`parse_command`), and formats replies
(`ok`, `err`, `multiline`, `continuation`, `DotStuffer`). The client side turns a
provider's octets into `Status` / `Data` / `EndOfData` events (`ReplyReader`,
`ClientConnection`). RFC 1939 (POP3), 2449 (CAPA, response codes), 5034 (SASL).
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

__all__ = [
    "MAX_AUTH_LINE",
    "MAX_COMMAND_LINE",
    "MAX_REPLY_LINE",
    "NEED_DATA",
    "NeedData",
    "ClientConnection",
    "Command",
    "Data",
    "DotStuffer",
    "EndOfData",
    "Event",
    "Line",
    "LineReader",
    "LineTooLong",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "ReplyReader",
    "Status",
    "apop_digest",
    "continuation",
    "err",
    "multiline",
    "ok",
    "parse_capa",
    "parse_command",
    "parse_greeting_timestamp",
    "parse_number",
    "parse_scan_listing",
    "parse_uidl_listing",
    "to_crlf",
    "wire_size",
]

MAX_COMMAND_LINE: Final = 255  # octets including CRLF (RFC 2449)
MAX_AUTH_LINE: Final = 8192  # a SASL response line (RFC 5034)
MAX_REPLY_LINE: Final = 512  # a status line including CRLF (RFC 2449)


# --- errors -------------------------------------------------------------------------


class ProtocolError(Exception):
    """Base of this module's errors."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something invalid.

    `reply` is the complete `-ERR ...` line a server sends back; it is empty when
    the error was found by the client side.
    """

    def __init__(self, message: str, reply: bytes = b"") -> None:
        super().__init__(message)
        self.reply = reply


class LocalProtocolError(ProtocolError):
    """This program misused the API (a bug here, not the peer's fault)."""


def _client_error(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(message, err(message))


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return self.value


NEED_DATA: Final = _Sentinel.NEED_DATA
NeedData: TypeAlias = Literal[_Sentinel.NEED_DATA]


# --- server side: reading commands --------------------------------------------------


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

    def receive_data(self, data: bytes) -> None:
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


_KEYWORD = re.compile(rb"[A-Za-z0-9]{1,40}")


@dataclass(frozen=True)
class Command:
    """A parsed command line: `keyword` upper case, `arg_text` the raw rest of the line."""

    keyword: str
    args: tuple[str, ...]
    arg_text: str

    def __post_init__(self) -> None:
        if not (_KEYWORD.fullmatch(self.keyword.encode()) and self.keyword == self.keyword.upper()):
            raise LocalProtocolError(f"invalid command keyword {self.keyword!r}")


def parse_command(line: bytes) -> Command:
    """Parse one command line (without terminator); `RemoteProtocolError` if invalid."""
    line = bytes(line)
    if not line:
        raise _client_error("Empty command line")
    if b"\0" in line:
        raise _client_error("NUL octet in command line")
    keyword, _, rest = line.partition(b" ")
    if not _KEYWORD.fullmatch(keyword):
        raise _client_error("Invalid command keyword")
    try:
        arg_text = rest.decode("utf-8")
    except UnicodeDecodeError:
        raise _client_error("Command arguments are not valid UTF-8") from None
    args = tuple(arg for arg in arg_text.split(" ") if arg)
    return Command(keyword.decode("ascii").upper(), args, arg_text)


_NUMBER = re.compile(r"[0-9]{1,10}")


def parse_number(text: str) -> int | None:
    """A positive decimal message number (no sign, no spaces, at most 10 digits)."""
    if not _NUMBER.fullmatch(text):
        return None
    number = int(text)
    return number if number > 0 else None


# --- server side: writing replies ---------------------------------------------------

_RESP_LEVEL = r"[\x21-\x2e\x30-\x5c\x5e-\x7e]+"
_RESP_CODE = re.compile(rf"{_RESP_LEVEL}(?:/{_RESP_LEVEL})*")


def _line_bytes(text: str | bytes) -> bytes:
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    if b"\r" in data or b"\n" in data:
        raise LocalProtocolError(f"line break inside a reply line: {data!r}")
    return data


def _status_line(status: bytes, text: str) -> bytes:
    data = _line_bytes(text)
    return status + b" " + data + b"\r\n" if data else status + b"\r\n"


def ok(text: str = "") -> bytes:
    """`+OK text` CRLF."""
    return _status_line(b"+OK", text)


def err(text: str, code: str | None = None) -> bytes:
    """`-ERR [CODE] text` CRLF; `code` is an RFC 2449 response code such as `AUTH`, `IN-USE`."""
    if code is not None:
        if not _RESP_CODE.fullmatch(code):
            raise LocalProtocolError(f"invalid response code {code!r}")
        text = f"[{code}] {text}" if text else f"[{code}]"
    return _status_line(b"-ERR", text)


def multiline(first: str, lines: Iterable[str | bytes]) -> bytes:
    """A positive multi-line reply: status line, dot-stuffed lines, terminating `.`."""
    parts = [ok(first)]
    for line in lines:
        data = _line_bytes(line)
        parts.append(b"." + data + b"\r\n" if data.startswith(b".") else data + b"\r\n")
    parts.append(b".\r\n")
    return b"".join(parts)


def continuation(text: bytes = b"") -> bytes:
    """A SASL server challenge: `+ text` CRLF (RFC 5034)."""
    return b"+ " + _line_bytes(text) + b"\r\n"


# --- message bodies -----------------------------------------------------------------


def _has_bare_lf(data: bytes) -> bool:
    return data.count(b"\n") != data.count(b"\r\n")


def to_crlf(data: bytes) -> bytes:
    """The whole message with every bare LF turned into CRLF."""
    if not _has_bare_lf(data):
        return data
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def wire_size(data: bytes) -> int:
    """Octets of `data` once bare LFs become CRLF (what RETR sends before stuffing)."""
    return len(data) + data.count(b"\n") - data.count(b"\r\n")


class DotStuffer:
    """Turns a message, fed in chunks of any size, into a multi-line reply body.

    Bare LFs become CRLF, a `.` starting a line is doubled, and `finish()` ends the
    body with CRLF (if missing) and the terminating `.` line. With `top_lines=n` only
    the headers, the blank line and at most n body lines are emitted (RFC 1939 TOP);
    `done` turns True once the rest of the message is not needed.
    """

    def __init__(self, top_lines: int | None = None, *, crlf: bool = False) -> None:
        """``crlf=True`` promises the input is already in CRLF form (as the stores serve it): the
        bare-LF conversion, and its scan of every chunk, is skipped."""
        if top_lines is not None and top_lines < 0:
            raise LocalProtocolError("top_lines must not be negative")
        self._crlf = crlf
        self.done = False
        self._top = top_lines
        self._finished = False
        self._last_cr = False  # the last input octet was CR
        self._line_start = True  # the output so far is empty or ends with LF
        self._in_headers = top_lines is not None
        self._body_left = top_lines or 0
        # The last octets of CRLF-form output while in the headers; it starts as if a
        # line had just ended, so that a message opening with a blank line has no headers.
        self._tail = b"\r\n"

    def feed(self, chunk: bytes) -> bytes:
        if self._finished:
            raise LocalProtocolError("feed() after finish()")
        if self.done or not chunk:
            return b""
        data = bytes(chunk) if self._crlf else self._normalise(bytes(chunk))
        if self._top is not None:
            data = self._cut(data)
        return self._stuff(data)

    def finish(self) -> bytes:
        if self._finished:
            raise LocalProtocolError("finish() called twice")
        self._finished = True
        self.done = True
        return b".\r\n" if self._line_start else b"\r\n.\r\n"

    def _normalise(self, chunk: bytes) -> bytes:
        head = b""
        if self._last_cr and chunk.startswith(b"\n"):
            head, chunk = b"\n", chunk[1:]  # the second half of a split CRLF
        self._last_cr = chunk.endswith(b"\r")
        chunk = to_crlf(chunk)
        return head + chunk if head else chunk

    def _cut(self, data: bytes) -> bytes:
        """Keep what TOP sends of `data` (already in CRLF form)."""
        start = 0
        if self._in_headers:
            window = self._tail + data[:3]
            found = window.find(b"\r\n\r\n")
            if found >= 0:
                start = found + 4 - len(self._tail)
            else:
                found = data.find(b"\r\n\r\n")
                if found < 0:
                    self._tail = (self._tail + data[-3:])[-3:]
                    return data
                start = found + 4
            self._in_headers = False
            if self._body_left == 0:
                self.done = True
                return data[:start]
        lines = data.count(b"\n", start)
        if lines < self._body_left:
            self._body_left -= lines
            return data
        end = start
        for _ in range(self._body_left):
            end = data.index(b"\n", end) + 1
        self.done = True
        return data[:end]

    def _stuff(self, data: bytes) -> bytes:
        if not data:
            return data
        if b"\n." in data:
            data = data.replace(b"\n.", b"\n..")
        if self._line_start and data.startswith(b"."):
            data = b"." + data
        self._line_start = data.endswith(b"\n")
        return data


# --- client side: reading replies ---------------------------------------------------


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

    def expect(self, multiline: bool) -> None:
        """Queue the kind of the next reply (multi-line if positive)."""
        self._expected.append(multiline)

    def receive_data(self, data: bytes) -> None:
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


_MULTILINE_ALWAYS = frozenset({"CAPA", "RETR", "TOP"})
_MULTILINE_WITHOUT_ARGS = frozenset({"LIST", "UIDL", "AUTH"})  # bare AUTH lists mechanisms


class ClientConnection(ReplyReader):
    """The client side of one POP3 session: format commands, read their replies.

    The server's greeting is expected from the start. One command at a time: `send`
    refuses while a reply is pending.
    """

    def __init__(self) -> None:
        super().__init__()
        self.expect(False)

    def send(self, command: str, *args: str | int) -> bytes:
        """The command line to write; queues the right kind of reply."""
        if self.pending:
            raise LocalProtocolError("cannot send a command while a reply is pending")
        parts = [command, *(str(arg) for arg in args)]
        for part in parts:
            if any(c in part for c in "\r\n\0"):
                raise LocalProtocolError(f"line break or NUL in command part {part!r}")
        if not command:
            raise LocalProtocolError("empty command")
        keyword = command.upper()
        self.expect(keyword in _MULTILINE_ALWAYS or (keyword in _MULTILINE_WITHOUT_ARGS and not args))
        return " ".join(parts).encode("utf-8") + b"\r\n"


# --- client side: reading reply contents --------------------------------------------

_TIMESTAMP = re.compile(r"<[^<>\s@]+@[^<>\s]+>")


def parse_greeting_timestamp(text: str) -> str | None:
    """The APOP timestamp `<...@...>` anywhere in a greeting, brackets included."""
    match = _TIMESTAMP.search(text)
    return match[0] if match else None


def apop_digest(timestamp: str, secret: str) -> str:
    """The APOP digest: lower-case hex MD5 of timestamp + secret (RFC 1939)."""
    return hashlib.md5((timestamp + secret).encode("utf-8"), usedforsecurity=False).hexdigest()


def _text_lines(lines: Iterable[str | bytes] | str | bytes) -> Iterable[str]:
    if isinstance(lines, (str, bytes, bytearray)):
        lines = lines.splitlines()
    for line in lines:
        text = line.decode("utf-8", "replace") if isinstance(line, (bytes, bytearray)) else line
        text = text.rstrip("\r\n")
        if text.strip():
            yield text


def parse_capa(lines: Iterable[str | bytes] | str | bytes) -> dict[str, list[str]]:
    """CAPA reply lines → {upper-case capability: its arguments}."""
    capabilities: dict[str, list[str]] = {}
    for text in _text_lines(lines):
        name, *args = text.split()
        capabilities.setdefault(name.upper(), []).extend(args)
    return capabilities


def _listing(
    lines: Iterable[str | bytes] | str | bytes, what: str, more_allowed: bool
) -> Iterable[tuple[int, str]]:
    """`number value` lines, numbers unique; `more_allowed`: fields may follow the value."""
    seen: set[int] = set()
    for text in _text_lines(lines):
        parts = text.split()
        number = parse_number(parts[0])
        if number is None or number in seen or len(parts) < 2 or (len(parts) > 2 and not more_allowed):
            raise RemoteProtocolError(f"invalid {what} line from the server: {text[:80]!r}")
        seen.add(number)
        yield number, parts[1]


_SIZE = re.compile(r"[0-9]{1,20}")
_UID = re.compile(r"[\x21-\x7e]{1,70}")


def parse_scan_listing(lines: Iterable[str | bytes] | str | bytes) -> dict[int, int]:
    """LIST reply lines (`number size`, perhaps more after) → {message number: octets}."""
    sizes: dict[int, int] = {}
    for number, size in _listing(lines, "LIST", more_allowed=True):
        if not _SIZE.fullmatch(size):
            raise RemoteProtocolError(f"invalid message size from the server: {size[:80]!r}")
        sizes[number] = int(size)
    return sizes


def parse_uidl_listing(lines: Iterable[str | bytes] | str | bytes) -> dict[int, str]:
    """UIDL reply lines (`number uid`) → {message number: unique id}."""
    uids: dict[int, str] = {}
    for number, uid in _listing(lines, "UIDL", more_allowed=False):
        if not _UID.fullmatch(uid):
            raise RemoteProtocolError(f"invalid unique id from the server: {uid[:80]!r}")
        uids[number] = uid
    return uids
