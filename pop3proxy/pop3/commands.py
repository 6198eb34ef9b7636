"""Parsing of client commands: keyword and arguments, numbers, the line-length limits."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from pop3proxy.pop3.errors import LocalProtocolError
from pop3proxy.pop3.replies import _client_error

MAX_COMMAND_LINE: Final = 255  # octets including CRLF (RFC 2449)
MAX_AUTH_LINE: Final = 16384  # a credential line: PASS, AUTH with an initial response, a SASL response
# Commands whose line may be longer than MAX_COMMAND_LINE (up to MAX_AUTH_LINE): long passwords and
# OAuth2 bearer tokens (2,500+ octets) in an AUTH initial response, as Dovecot accepts them.
CREDENTIAL_COMMANDS: Final = frozenset({b"PASS", b"AUTH"})


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


_CONTROL = re.compile(rb"[\x01-\x08\x0a-\x1f]")


def parse_command(line: bytes) -> Command:
    """Parse one command line (without terminator); `RemoteProtocolError` if invalid."""
    line = bytes(line)
    if not line:
        raise _client_error("Empty command line")
    if b"\0" in line:
        raise _client_error("NUL octet in command line")
    if _CONTROL.search(line):  # a lone CR and the like: never echoed back into a reply line
        raise _client_error("Control character in command line")
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
