"""The client side towards a provider: which replies are multi-line, CAPA / LIST / UIDL
listings, the APOP greeting timestamp and digest.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

from pop3proxy.pop3.commands import parse_number
from pop3proxy.pop3.dotstuff import to_crlf
from pop3proxy.pop3.errors import LocalProtocolError, RemoteProtocolError
from pop3proxy.pop3.framing import ReplyReader

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

    def send(self, command: str, *args: str | int, sasl: bool = False, pipelined: bool = False) -> bytes:
        """The command line to write; queues the right kind of reply.

        With `sasl`, `command` is a SASL response line (RFC 5034), which may be empty. With `pipelined`
        (a server that offers PIPELINING, RFC 2449), it may follow commands whose replies are pending;
        the replies are read in order.
        """
        if self.pending and not pipelined:
            raise LocalProtocolError("cannot send a command while a reply is pending")
        parts = [command, *(str(arg) for arg in args)]
        for part in parts:
            if any(c in part for c in "\r\n\0"):
                raise LocalProtocolError(f"line break or NUL in command part {part!r}")
        if sasl:
            if args:
                raise LocalProtocolError("a SASL response is a single line")
            self.expect(False)
            return command.encode("utf-8") + b"\r\n"
        if not command:
            raise LocalProtocolError("empty command")
        keyword = command.upper()
        self.expect(keyword in _MULTILINE_ALWAYS or (keyword in _MULTILINE_WITHOUT_ARGS and not args))
        return " ".join(parts).encode("utf-8") + b"\r\n"

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


HEADER_DIGEST_PREFIX = "hd-"


def header_digest(top: bytes) -> str:
    """An identifier for a message of a provider without UIDL, from its ``TOP n 0`` answer: ``hd-`` +
    SHA-256 hex of the header block (up to, not including, the blank line, with CRLF line endings).
    It is stable for as long as the provider keeps the message, but two messages with identical
    headers share it."""
    head = to_crlf(top)
    end = head.find(b"\r\n\r\n")
    if end >= 0:
        head = head[: end + 2]
    elif head.startswith(b"\r\n"):
        head = b""
    return HEADER_DIGEST_PREFIX + hashlib.sha256(head).hexdigest()
