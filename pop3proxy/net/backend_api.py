"""What the POP3 server driver needs from the application: a `Backend` that logs users in and
the `Maildrop` it returns (the messages of one locked mailbox).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import BinaryIO

import trio

from pop3proxy.errors import LoginError
from pop3proxy.net.early import EarlyUpstream
from pop3proxy.store.api import Stores
from pop3proxy.store.base import MessageInfo

log = logging.getLogger("pop3proxy")


class Maildrop:
    """What a successful login hands the session: a locked, listed mailbox."""

    messages: Sequence[MessageInfo]
    banner: str = ""

    def open(self, key: str) -> BinaryIO:  # runs in a worker thread
        raise NotImplementedError

    def read(self, key: str, limit: int) -> bytes:
        """At most ``limit`` octets of a message, from its start (a small one, read whole)."""
        with self.open(key) as f:
            return f.read(limit)

    async def commit(self, deleted: Sequence[str]) -> None:
        """Apply the session's deletions (UPDATE state)."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release the mailbox; called once, whether or not the session reached UPDATE."""


class Backend:
    """Where logins are checked and maildrops come from."""

    stores: Stores | None = None  # the engines it runs on (the composition root's choice); None in tests

    async def login(self, user: str, password: str, peer: str, *, mechanism: str = "USER",
                    early: EarlyUpstream | None = None) -> Maildrop:
        """Check a login and hand out its maildrop, or raise LoginError. ``mechanism`` "APOP" and
        "CRAM-MD5" carry the client's digest or base64 answer as ``password``, for the provider of
        ``early`` to check."""
        raise NotImplementedError

    def early_upstream(self, peer: tuple[str, int]) -> EarlyUpstream | None:
        """A provider connection to open while the client connects (None: none)."""
        return None

    async def greeting_ready(self, early: EarlyUpstream) -> tuple[str | None, bool]:
        """When the client may be greeted (after waiting, bounded, for ``early``'s provider): the APOP
        timestamp to greet with (None: no APOP) and whether to offer AUTH CRAM-MD5."""
        return None, False

    async def challenge(self, early: EarlyUpstream | None, mechanism: str) -> str:
        """The provider's base64 challenge for AUTH ``mechanism`` (CRAM-MD5) on ``early``."""
        raise LoginError(f"{mechanism} is not available here", "AUTH")

    def account_key(self, user: str) -> str:
        """The account a login name means, for throttling: name variants that reach one account give
        one key. By default the name itself, case folded."""
        return user.lower()

    def attach(self, nursery: trio.Nursery, *, background: bool = True) -> None:
        """Called once before serving, with a nursery for work that outlives a session. ``background``:
        also start the work that runs once per service (False in the workers of a multi-process one)."""

    def close_with(self, close: Callable[[], None]) -> None:
        """Have `aclose` call ``close`` (in a worker thread): what the composition root opened for
        this backend (the store's connections) goes with it."""
        self.__dict__.setdefault("_closers", []).append(close)

    async def aclose(self) -> None:
        """Let go of what the backend holds; a subclass that overrides it calls this too."""
        for close in reversed(self.__dict__.pop("_closers", [])):
            await trio.to_thread.run_sync(close)
