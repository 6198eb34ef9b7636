"""A client for SpamAssassin's spamd, speaking the SPAMC/SPAMD protocol itself (no spamc binary).

One request per connection::

    SYMBOLS SPAMC/1.5\\r\\n
    Content-length: 1234\\r\\n
    User: alice\\r\\n
    \\r\\n
    <the message>

and spamd answers, then closes::

    SPAMD/1.1 0 EX_OK\\r\\n
    Content-length: 29\\r\\n
    Spam: True ; 1004.2 / 5.0\\r\\n
    \\r\\n
    GTUBE,MISSING_DATE,NO_RECEIVED

Learning is the TELL command (spamd answers it only when started with ``--allow-tell``, and never
while it runs as root)::

    TELL SPAMC/1.5\r\n
    Message-class: spam\r\n              (or ham)
    Set: local\r\n
    Content-length: 1234\r\n
    User: alice\r\n
    \r\n
    <the message>

answered by ``SPAMD/1.1 0 EX_OK`` with ``DidSet: local`` when spamd's Bayes learnt the message, and
without it when it already knew the message in that class (or its Bayes is off, ``use_bayes 0``).

`build_request`, `build_tell`, `parse_reply` and `parse_tell_reply` are pure; `SpamdClient.check`
and `SpamdClient.tell` do the I/O over TCP or a unix socket, with a timeout on the connect and on
every read and write. Every failure is a `SpamdError`.
"""

from __future__ import annotations

import contextlib
import re
import socket
from dataclasses import dataclass, field

from pop3proxy.filters._net import Address, connect, parse_address, read_until_eof

PROTOCOL = "SPAMC/1.5"
MAX_REPLY = 1 << 20  # SYMBOLS/CHECK replies are short; this bounds a misbehaving peer

_STATUS = re.compile(rb"^SPAMD/(\d+\.\d+) +(\d+) *(.*)$")
_SPAM = re.compile(r"^\s*(True|False|Yes|No)\s*;\s*(-?\d+(?:\.\d+)?)\s*/\s*(-?\d+(?:\.\d+)?)\s*$", re.I)
_SYMBOL = re.compile(r"^[A-Za-z0-9_.:-]+$")


LEARN_CLASSES = ("spam", "ham")
TELL_HINT = "spamd learns only when started with --allow-tell"
EX_UNAVAILABLE = 69  # spamd's answer to TELL without --allow-tell


class SpamdError(Exception):
    """spamd could not be reached, did not answer in time, refused, or answered garbage."""


@dataclass(frozen=True)
class SpamdReply:
    """What spamd said: its score, its own threshold and verdict, and the rules that hit."""

    score: float
    threshold: float
    spam: bool
    symbols: list[str] = field(default_factory=list)


def _header_value(name: str, value: str) -> str:
    if any(c in value for c in "\r\n\0") or not value.isprintable():
        raise SpamdError(f"cannot send {name} {value!r} to spamd: not a printable one-line value")
    return value


def build_request(message: bytes, user: str = "", command: str = "SYMBOLS") -> bytes:
    """The whole request: command line, headers, blank line, message."""
    if command not in ("SYMBOLS", "CHECK", "REPORT"):
        raise ValueError(f"unsupported spamd command {command!r}")
    lines = [f"{command} {PROTOCOL}", f"Content-length: {len(message)}"]
    if user:
        lines.append(f"User: {_header_value('user name', user)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + message


def build_tell(message: bytes, label: str, user: str = "") -> bytes:
    """A TELL request that has spamd's own Bayes learn the message as ``label`` (spam or ham)."""
    if label not in LEARN_CLASSES:
        raise ValueError(f"label must be spam or ham, not {label!r}")
    lines = [f"TELL {PROTOCOL}", f"Message-class: {label}", "Set: local", f"Content-length: {len(message)}"]
    if user:
        lines.append(f"User: {_header_value('user name', user)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + message


def _split_reply(data: bytes) -> tuple[int, str, dict[str, str], bytes]:
    """(code, status text, headers, body) of a spamd reply; no headers when spamd refused."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = data.partition(b"\n\n")
    lines = head.replace(b"\r\n", b"\n").split(b"\n")
    match = _STATUS.match(lines[0]) if lines else None
    if not match:
        raise SpamdError(f"not a spamd reply: {data[:80]!r}")
    code = int(match.group(2))
    text = match.group(3).decode("utf-8", "replace").strip()
    headers: dict[str, str] = {}
    if code != 0:
        return code, text, headers, body
    if not sep:
        raise SpamdError("spamd reply ended inside its headers")
    for line in lines[1:]:
        name, colon, value = line.decode("latin-1").partition(":")
        if not colon:
            raise SpamdError(f"bad header line in spamd reply: {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    return code, text, headers, body


def parse_tell_reply(data: bytes) -> bool:
    """Whether spamd learnt the message now (False: it already knew it in that class, or its Bayes
    is off). A refusal is a `SpamdError` naming ``--allow-tell`` when that is the likely cause."""
    code, text, headers, _ = _split_reply(data)
    if code != 0:
        hint = f" ({TELL_HINT})" if "tell" in text.lower() or code == EX_UNAVAILABLE else ""
        raise SpamdError(f"spamd refused to learn the message: {code} {text}{hint}")
    return "local" in [part.strip() for part in headers.get("didset", "").split(",")]


def parse_reply(data: bytes) -> SpamdReply:
    """Parse a complete spamd reply (everything up to the peer's close)."""
    code, text, headers, body = _split_reply(data)
    if code != 0:
        raise SpamdError(f"spamd refused the request: {code} {text}")
    if "content-length" in headers:
        length = headers["content-length"]
        if not length.isdigit():
            raise SpamdError(f"bad Content-length in spamd reply: {length!r}")
        if len(body) < int(length):
            raise SpamdError(f"spamd reply truncated: {len(body)} of {length} octets")
        body = body[: int(length)]
    spam_header = headers.get("spam")
    if spam_header is None:
        raise SpamdError("spamd reply has no Spam: header")
    spam = _SPAM.match(spam_header)
    if not spam:
        raise SpamdError(f"bad Spam: header in spamd reply: {spam_header!r}")
    symbols = [s.strip() for s in body.decode("utf-8", "replace").split(",") if s.strip()]
    for symbol in symbols:
        if not _SYMBOL.match(symbol):
            raise SpamdError(f"bad rule name in spamd reply: {symbol[:80]!r}")
    return SpamdReply(
        score=float(spam.group(2)),
        threshold=float(spam.group(3)),
        spam=spam.group(1).lower() in ("true", "yes"),
        symbols=symbols,
    )


class SpamdClient:
    """Ask one spamd about messages; ``address`` is ``host:port`` or a unix socket path."""

    def __init__(self, address: str, timeout: float = 30.0) -> None:
        self.address: Address = parse_address(address)
        self.timeout = timeout

    def check(self, message: bytes, user: str = "") -> SpamdReply:
        data = self._exchange(build_request(message, user))
        if not data:
            raise SpamdError(f"spamd at {self.address} closed the connection without a reply")
        return parse_reply(data)

    def tell(self, message: bytes, label: str, user: str = "") -> bool:
        """Have spamd's Bayes learn the message as spam or ham; True when it learnt it now, False when
        it already knew it so. Raises `SpamdError` when spamd refuses (no ``--allow-tell``) or fails."""
        data = self._exchange(build_tell(message, label, user))
        if not data:  # how spamd ends a TELL while it runs as root
            raise SpamdError(f"spamd at {self.address} closed the connection without a reply to TELL "
                             f"({TELL_HINT}, and never while it runs as root: -u USER)")
        return parse_tell_reply(data)

    def _exchange(self, request: bytes) -> bytes:
        """Send one request, return everything spamd answers until it closes (maybe nothing)."""
        where = f"spamd at {self.address}"
        try:
            sock = connect(self.address, self.timeout)
        except TimeoutError:
            raise SpamdError(f"cannot connect to {where}: no answer within {self.timeout:g} s") from None
        except OSError as exc:
            raise SpamdError(f"cannot connect to {where}: {exc.strerror or exc}") from None
        try:
            with sock:
                sock.sendall(request)
                with contextlib.suppress(OSError):  # the reply may still come; reading tells
                    sock.shutdown(socket.SHUT_WR)
                data = read_until_eof(sock, MAX_REPLY)
        except TimeoutError:
            raise SpamdError(f"{where} did not answer within {self.timeout:g} s") from None
        except ValueError as exc:
            raise SpamdError(f"{where}: {exc}") from None
        except OSError as exc:
            raise SpamdError(f"{where}: {exc.strerror or exc}") from None
        return data
