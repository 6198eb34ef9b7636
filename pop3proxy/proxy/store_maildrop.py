"""A maildrop over a locked local mailbox: what a session of the standalone backend is, and what a proxied
session's cache is (`proxied_maildrop` builds on it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import BinaryIO

import trio

from pop3proxy.net.backend_api import Maildrop
from pop3proxy.store.api import SessionLock
from pop3proxy.store.base import Mailbox, MessageInfo


class StoreMaildrop(Maildrop):
    """A maildrop over a locked local mailbox (standalone mode and the proxy's cache)."""

    def __init__(self, mailbox: Mailbox, lock: SessionLock | None, messages: Sequence[MessageInfo],
                 banner: str = "") -> None:
        self.mailbox = mailbox
        self.lock = lock
        self.messages = messages
        self.banner = banner

    def open(self, key: str) -> BinaryIO:
        return self.mailbox.open(key)

    def read(self, key: str, limit: int) -> bytes:
        return self.mailbox.read(key, limit)

    async def commit(self, deleted: Sequence[str]) -> None:
        if deleted:
            await trio.to_thread.run_sync(self.mailbox.delete, list(deleted))

    async def close(self) -> None:
        def close() -> None:
            try:
                self.mailbox.close()
            finally:
                if self.lock is not None:
                    self.lock.release()

        await trio.to_thread.run_sync(close)
