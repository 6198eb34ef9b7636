"""The maildrop of a proxied login: the cached mailbox, and the client's deletions passed on to the
provider at QUIT (policy ``mirror``) or at the next sync."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import trio

from pop3proxy.net.endpoint import UpstreamError
from pop3proxy.net.pop3_client import connect
from pop3proxy.proxy.accounts import Account
from pop3proxy.proxy.oauth import NeedsAuthorisation, TokenUnavailable
from pop3proxy.proxy.routing import Route
from pop3proxy.proxy.store_maildrop import StoreMaildrop
from pop3proxy.proxy.sync import delete_upstream
from pop3proxy.store.api import AccountState, StateError
from pop3proxy.store.base import Mailbox, MessageInfo

log = logging.getLogger("pop3proxy.proxy")


@dataclass(frozen=True)
class Mirror:
    """How a session's deletions reach the provider at QUIT: only under ``upstream.delete = "mirror"``,
    within ``timeout`` seconds, logged in with what ``secret(route, password)`` gives (a password, or
    an OAuth2 account's token: ``token_account`` says it has one even when the session has no password)."""

    enabled: bool
    timeout: float
    secret: Callable[[Route, str | None], Awaitable[str]]
    token_account: bool = False


class ProxyMaildrop(StoreMaildrop):
    def __init__(self, account: Account, route: Route, password: str | None, mailbox: Mailbox,
                 state: AccountState, messages: Sequence[MessageInfo], banner: str, mirror: Mirror) -> None:
        super().__init__(mailbox, None, messages, banner)
        self.account = account
        self.route = route
        self._password = password  # None offline; kept only for this session's mirror deletions
        self.state = state
        self.mirror = mirror

    def __repr__(self) -> str:
        return f"ProxyMaildrop({self.route.cache_id!r})"

    @property
    def upstream(self) -> str:
        return self.route.endpoint.where

    async def commit(self, deleted: Sequence[str]) -> None:
        if not deleted:
            return

        def local() -> set[str]:
            lock = self.account.lock
            if lock is not None and not lock.confirm():  # another node may be serving the account now
                raise StateError(f"the session lock of {self.route.cache_id!r} was lost; no deletion applied")
            uids = set(self.state.uids_for_keys(deleted).values())
            # The marks first (durable), so that a crash after a file is gone never brings its message
            # back; when the cache cannot be changed (an mbox cannot be rewritten on a full disk), the
            # marks of what is still there are undone: the -ERR the client gets is true, and no deletion
            # is applied later, here or at the provider.
            self.state.mark_deleted(deleted)
            try:
                self.mailbox.delete(list(deleted))
            except BaseException:
                present = {info.key for info in self.mailbox.list()}
                self.state.restore_deleted([key for key in deleted if key in present])
                raise
            return uids

        uids = await trio.to_thread.run_sync(local)
        no_credentials = self._password is None and not self.mirror.token_account
        if not self.mirror.enabled or not uids or no_credentials:
            return  # offline deletions reach the provider at the next online sync
        try:
            with trio.fail_after(self.mirror.timeout):
                secret = await self.mirror.secret(self.route, self._password)
                async with await connect(self.route.endpoint) as client:
                    await client.login(self.route.remote_user, secret)
                    count = await delete_upstream(client, self.state, uids)
            log.info("deleted %d messages of %r upstream", count, self.route.cache_id)
        except (UpstreamError, trio.TooSlowError, NeedsAuthorisation, TokenUnavailable) as exc:
            log.warning("upstream deletion for %r postponed to the next sync: %s", self.route.cache_id, exc)

    async def close(self) -> None:
        self._password = None
        # The session is over (QUIT answered): a login right after it must not be told IN-USE while
        # these files are still being closed. The hold on the lock is given back below.
        self.account.session_active = False
        await self.account.release(session=False, closing=self._close_files)

    def _close_files(self) -> None:
        try:
            self.mailbox.close()
        finally:
            self.state.close()
