"""The accounts this process serves now (`AccountRegistry`): each account's session lock, shared
by its session and its syncs; and the password source of accounts that prefetch.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import trio

from pop3proxy.config import AccountSettings
from pop3proxy.store.api import MailboxBusy, SessionLock, SessionLocks

log = logging.getLogger("pop3proxy.proxy")
T = TypeVar("T")

# A login waits this long for a mailbox lock held by another process: with several worker processes,
# a client that reconnects at once after QUIT may reach another worker while the first one is still
# closing the mailbox. flock() cannot be waited for asynchronously (nor cancelled), so it is polled.
LOCK_WAIT = 2.0
LOCK_POLL = 0.005


async def lock_waiting(locks: SessionLocks, cache_id: str, wait: float = LOCK_WAIT) -> SessionLock:
    """``locks.try_lock``, waiting up to ``wait`` seconds for another process to give the lock back."""
    lock, _ = await _lock_then(locks, cache_id, wait, None)
    return lock


async def _lock_then(locks: SessionLocks, cache_id: str, wait: float,
                     then: Callable[[], T] | None) -> tuple[SessionLock, T | None]:
    """`lock_waiting`, and ``then()`` in the same worker-thread hop once the lock is taken (the lock is
    given back there when it raises)."""
    deadline = trio.current_time() + wait
    while True:
        try:
            return await trio.to_thread.run_sync(_try_lock_then, locks, cache_id, then)
        except MailboxBusy:
            if trio.current_time() >= deadline:
                raise
        await trio.sleep(LOCK_POLL)


def _try_lock_then(locks: SessionLocks, cache_id: str, then: Callable[[], T] | None) -> tuple[SessionLock, T | None]:
    lock = locks.try_lock(cache_id)
    try:
        return lock, then() if then is not None else None
    except BaseException:
        lock.release()
        raise


def _close_then_release(closing: Callable[[], object] | None, lock: SessionLock | None) -> None:
    try:
        if closing is not None:
            closing()
    finally:
        if lock is not None:
            lock.release()


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
        self.passes_done = 0  # sync passes of this process that ended (a view read before is stale)
        self._acquiring = trio.Lock()

    async def acquire(self, *, session: bool, then: Callable[[], T] | None = None) -> T | None:
        """Hold the account (the session's hold, or a sync's); ``then()`` runs in the same worker-thread
        hop as taking the cross-process lock (opening the account's files), and its value is returned.
        When it raises, the account is not held."""
        async with self._acquiring:
            if session and self.session_active:
                raise MailboxBusy(self.cache_id)
            value = None
            if self.holders == 0:
                # a sync of its own (prefetch) does not wait for a session elsewhere
                self.lock, value = await _lock_then(self._registry.locks, self.cache_id,
                                                    LOCK_WAIT if session else 0.0, then)
                self._registry._listed(self)
            elif then is not None:
                value = await trio.to_thread.run_sync(then)
            self.holders += 1
            if session:
                self.session_active = True
            return value

    async def release(self, *, session: bool, closing: Callable[[], object] | None = None) -> None:
        """Give a hold back; ``closing()`` (closing the session's files) runs in the same worker-thread hop
        as giving the cross-process lock back when this was the last hold."""
        # Serialised with acquire(): a login arriving while the lock is being released waits for it
        # instead of finding the lock still held (a false IN-USE right after a QUIT).
        with trio.CancelScope(shield=True):
            async with self._acquiring:
                if session:
                    self.session_active = False
                self.holders -= 1
                lock = None
                if self.holders == 0 and self.lock is not None:
                    lock, self.lock = self.lock, None
                try:
                    if closing is not None or lock is not None:
                        await trio.to_thread.run_sync(_close_then_release, closing, lock)
                finally:
                    if lock is not None:
                        self._registry._unlisted(self)
