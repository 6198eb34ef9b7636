"""Dot-stuffing of message bodies for RETR and TOP, safe across chunk boundaries; CRLF helpers."""

from __future__ import annotations

from pop3proxy.pop3.errors import LocalProtocolError


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
