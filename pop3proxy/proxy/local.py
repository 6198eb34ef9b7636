"""Standalone mode: users from a local users file, mail from the local store (no provider)."""

from __future__ import annotations

import logging
from pathlib import Path

import trio

from pop3proxy.errors import LoginError
from pop3proxy.net.backend_api import Backend, Maildrop
from pop3proxy.proxy.accounts import lock_waiting
from pop3proxy.proxy.credentials import kdf_limiter, read_users, verify_password
from pop3proxy.proxy.store_maildrop import StoreMaildrop
from pop3proxy.store import open_store
from pop3proxy.store.api import MailboxBusy, SessionLock, SessionLocks, local_stores

log = logging.getLogger("pop3proxy")


class LocalBackend(Backend):
    """Standalone mode: users from a users file, mail from the local store."""

    def __init__(self, users_file: Path, root: Path, backend: str = "maildir",
                 locks: SessionLocks | None = None) -> None:
        self.users_file = users_file
        self.root = root
        self.store_backend = backend
        self.locks = locks if locks is not None else local_stores(root).locks
        read_users(users_file)  # a broken users file is a startup error, not a login error

    async def login(self, user: str, password: str, peer: str, *, mechanism: str = "USER", early=None) -> Maildrop:
        if mechanism in ("APOP", "CRAM-MD5"):  # never offered: there is no provider to check the digest
            raise LoginError(f"{mechanism} is not available here", "AUTH")

        def check() -> bool:
            stored = read_users(self.users_file).get(user)
            # Spend the same time for unknown users, so timing does not reveal who exists.
            return verify_password(password, stored or _DUMMY_HASH) and stored is not None

        if not await trio.to_thread.run_sync(check, limiter=kdf_limiter()):
            raise LoginError("invalid user name or password", "AUTH")
        return await open_maildrop(self.locks, self.root, user, self.store_backend)


_DUMMY_HASH = "$scrypt$n=16384,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="


async def open_maildrop(locks: SessionLocks, root: Path, user: str, backend: str, banner: str = "") -> StoreMaildrop:
    """Lock ``user``'s mailbox and take the session's snapshot of it."""

    def open_locked(lock: SessionLock) -> StoreMaildrop:
        try:
            mailbox = open_store(root, user, backend)
            try:
                return StoreMaildrop(mailbox, lock, mailbox.list(), banner)
            except BaseException:
                mailbox.close()
                raise
        except BaseException:
            lock.release()
            raise

    try:
        lock = await lock_waiting(locks, user)
        return await trio.to_thread.run_sync(open_locked, lock)
    except MailboxBusy:
        raise LoginError("mailbox is in use by another session", "IN-USE") from None
    except OSError as exc:
        log.error("cannot open mailbox of %r: %s", user, exc)
        raise LoginError("cannot open the mailbox, try again later", "SYS/TEMP") from None
