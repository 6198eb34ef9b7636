"""The accounts this process serves now (`AccountRegistry`): each account's session lock, shared
by its session and its syncs; and the password source of accounts that prefetch.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import trio

from pop3proxy.config import AccountSettings
from pop3proxy.store.api import MailboxBusy, SessionLock, SessionLocks

log = logging.getLogger("pop3proxy.proxy")

# A login waits this long for a mailbox lock held by another process: with several worker processes,
# a client that reconnects at once after QUIT may reach another worker while the first one is still
# closing the mailbox. flock() cannot be waited for asynchronously (nor cancelled), so it is polled.
LOCK_WAIT = 2.0
LOCK_POLL = 0.005


async def lock_waiting(locks: SessionLocks, cache_id: str, wait: float = LOCK_WAIT) -> SessionLock:
    """``locks.try_lock``, waiting up to ``wait`` seconds for another process to give the lock back."""
    deadline = trio.current_time() + wait
    while True:
        try:
            return await trio.to_thread.run_sync(locks.try_lock, cache_id)
        except MailboxBusy:
            if trio.current_time() >= deadline:
                raise
        await trio.sleep(LOCK_POLL)


def read_password_source(name: str, account: AccountSettings) -> str | None:
    """An account's stored password (file or environment), or None. Raises ValueError if unsafe."""
    if account.password_file is not None:
        path = Path(account.password_file)
        try:
            st = path.stat()
        except OSError as exc:
            raise ValueError(f"accounts.{name}.password_file: cannot read {path}: {exc.strerror}") from None
        if st.st_mode & (stat.S_IRWXO | stat.S_IRWXG):
            raise ValueError(
                f"accounts.{name}.password_file: {path} is readable by others; chmod 600 it"
            )
        return path.read_text(encoding="utf-8").rstrip("\r\n")
    if account.password_env is not None:
        value = os.environ.get(account.password_env)
        if value is None:
            raise ValueError(f"accounts.{name}.password_env: variable {account.password_env} is not set")
        return value
    return None


class AccountRegistry:
    """The accounts this process holds now, each with its session lock (see `Account`)."""

    def __init__(self, locks: SessionLocks) -> None:
        self.locks = locks
        self._held: dict[str, Account] = {}

    def get(self, cache_id: str) -> Account:
        account = self._held.get(cache_id)
        if account is None:
            account = self._held[cache_id] = Account(self, cache_id)
        return account

    def _listed(self, account: Account) -> None:
        self._held[account.cache_id] = account  # a release may have unlisted it meanwhile

    def _unlisted(self, account: Account) -> None:
        if self._held.get(account.cache_id) is account:
            del self._held[account.cache_id]


class Account:
    """One account in this process: shares the cross-process session lock between a session and its
    syncs (``holders``), and keeps a second session of this process out (``session_active``)."""

    def __init__(self, registry: AccountRegistry, cache_id: str) -> None:
        self._registry = registry
        self.cache_id = cache_id
        self.holders = 0
        self.lock: SessionLock | None = None
        self.session_active = False
        self.sync_lock = trio.Lock()
        self._acquiring = trio.Lock()

    async def acquire(self, *, session: bool) -> None:
        async with self._acquiring:
            if session and self.session_active:
                raise MailboxBusy(self.cache_id)
            if self.holders == 0:
                # a sync of its own (prefetch) does not wait for a session elsewhere
                self.lock = await lock_waiting(self._registry.locks, self.cache_id, LOCK_WAIT if session else 0.0)
                self._registry._listed(self)
            self.holders += 1
            if session:
                self.session_active = True

    async def release(self, *, session: bool) -> None:
        # Serialised with acquire(): a login arriving while the lock is being released waits for it
        # instead of finding the lock still held (a false IN-USE right after a QUIT).
        with trio.CancelScope(shield=True):
            async with self._acquiring:
                if session:
                    self.session_active = False
                self.holders -= 1
                if self.holders == 0 and self.lock is not None:
                    lock, self.lock = self.lock, None
                    await trio.to_thread.run_sync(lock.release)
                    self._registry._unlisted(self)
