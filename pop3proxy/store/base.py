"""The mailbox interface every cache backend implements, and what it says of one message."""

from __future__ import annotations

import abc
import builtins
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO, NamedTuple


class MessageInfo(NamedTuple):
    """One stored message. `key` names it in the store (a Maildir file's base name, an mbox entry's
    digest); `uidl` is what pop3proxy answers to UIDL for it (the key, for both backends: the provider's
    own UIDL, called ``uid`` in the state database, is never shown to the client); `size` is the exact
    octet count of the message in CRLF form; `dot_lines` says whether a line of it starts with "." (RETR
    and TOP must then dot-stuff it), None when the store does not know (a message stored before the store
    kept it, a file another tool wrote, mbox): the reader then looks.

    A named tuple rather than a dataclass: a login to a large mailbox builds one per message."""

    key: str
    uidl: str
    size: int
    dot_lines: bool | None = None


class Mailbox(abc.ABC):
    """A store of messages, each served in CRLF form. Each message has a key (see `MessageInfo`)."""

    @abc.abstractmethod
    def list(self) -> list[MessageInfo]:
        """All messages, oldest first, in a stable order."""

    @abc.abstractmethod
    def open(self, key: str) -> BinaryIO:
        """A binary file yielding exactly the message's octets in CRLF form. Raises KeyError if absent."""

    def read(self, key: str, limit: int) -> bytes:
        """At most ``limit`` octets of the message (CRLF form) from its start. Raises KeyError if absent."""
        with self.open(key) as f:
            return f.read(limit)

    @abc.abstractmethod
    def add(self, data: bytes) -> MessageInfo:
        """Store a message atomically and durably (fsync'ed) and describe it."""

    def add_many(self, messages: builtins.list[bytes]) -> builtins.list[MessageInfo]:
        """Store several messages; when it returns, all are durable (one flush for the batch where the
        backend can do that). A crash meanwhile leaves each message either stored whole or not at all."""
        return [self.add(data) for data in messages]

    def spool_path(self) -> Path:
        """Where a message too big to hold in memory is written while it arrives (see `store.spool`);
        what a crash leaves there is removed by ``clean_tmp``."""
        raise NotImplementedError

    def add_file(self, path: Path, size: int, dot_lines: bool | None = None) -> MessageInfo:
        """Store a message spooled to ``path`` (CRLF form, ``size`` octets) durably, without reading it
        into memory; the file is taken (renamed or removed). ``dot_lines``: whether a line of it starts
        with "." (None: not known; see `MessageInfo`)."""
        raise NotImplementedError

    @abc.abstractmethod
    def delete(self, keys: Iterable[str]) -> None:
        """Remove messages durably; keys that are not (or no longer) present are ignored."""

    def close(self) -> None:  # noqa: B027 - a deliberate no-op default, not a forgotten abstract method
        """Release what the object holds; files returned by `open()` stay usable."""

    def __enter__(self) -> Mailbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
