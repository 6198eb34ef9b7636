"""Formatting of server replies: +OK / -ERR status lines, multi-line replies, SASL continuations,
response codes (RFC 1939, 2449, 5034)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from pop3proxy.pop3.errors import LocalProtocolError, RemoteProtocolError


def _client_error(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(message, err(message))

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
