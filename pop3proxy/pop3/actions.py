"""What the sans-IO session asks its driver to do (actions), and the states it moves through."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol


class MessageInfo(Protocol):
    """What the session needs to know of a message (``store.MessageInfo`` fits)."""

    @property
    def key(self) -> str: ...
    @property
    def uidl(self) -> str: ...
    @property
    def size(self) -> int: ...
    # Optional: ``dot_lines`` (bool | None), whether a line of the message starts with "." (see SendMessage).

class State(enum.Enum):
    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    UPDATE = "UPDATE"
    CLOSED = "CLOSED"


@dataclass(frozen=True)
class Send:
    """Send these bytes to the client."""

    data: bytes


@dataclass(frozen=True)
class SendMessage:
    """Open the message ``key``; if it opens, send ``status`` and stream it dot-stuffed, then the
    terminating ``.`` line; if it cannot be opened, send ``error`` instead (nothing was promised yet).

    ``top_lines`` is ``None`` for RETR and the TOP line count otherwise. ``dot_lines`` is what the store
    knows: False, no line of the message starts with "." (it may go out as it is), True, some line does,
    None, not known (the driver looks).
    """

    key: str
    top_lines: int | None = None
    size: int | None = None  # the octets the store said it holds: reading may stop there
    status: bytes = b"+OK\r\n"
    error: bytes = b"-ERR [SYS/TEMP] the message cannot be read now\r\n"
    dot_lines: bool | None = None


@dataclass(frozen=True)
class Authenticate:
    """Check these credentials; answer with ``login_succeeded`` or ``login_failed``."""

    user: str
    password: str = field(repr=False)
    # "USER", "PLAIN", "XOAUTH2" or "OAUTHBEARER" (password is then a sasl.BearerToken); "APOP" (password is
    # the client's digest over the greeting's timestamp) or "CRAM-MD5" (password is the client's base64
    # response to the challenge): both are checked by the provider whose timestamp or challenge it was.
    mechanism: str


@dataclass(frozen=True)
class Challenge:
    """AUTH ``mechanism`` (CRAM-MD5) needs the provider's challenge: get it (base64), answer with
    ``challenge_given``, or ``challenge_failed`` when there is none."""

    mechanism: str


@dataclass(frozen=True)
class StartTLS:
    """The ``+OK`` has been queued; flush it, discard buffered plaintext, handshake, call ``tls_started``."""


@dataclass(frozen=True)
class Update:
    """QUIT in TRANSACTION: delete these keys, then call ``update_done``."""

    deleted: tuple[str, ...]


@dataclass(frozen=True)
class Close:
    """Close the connection (after flushing what was sent)."""


Action = Send | SendMessage | Authenticate | Challenge | StartTLS | Update | Close
