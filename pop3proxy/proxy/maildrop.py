"""The maildrop of a proxied login: the cached mailbox, and the client's deletions passed on to the
provider at QUIT (policy ``mirror``) or at the next sync."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Sequence

import trio

from pop3proxy.net.endpoint import UpstreamError
from pop3proxy.net.pop3_client import connect
from pop3proxy.proxy.accounts import _Account
from pop3proxy.proxy.local import StoreMaildrop
from pop3proxy.proxy.oauth import NeedsAuthorisation, TokenUnavailable
from pop3proxy.proxy.routing import Route
from pop3proxy.proxy.sync import delete_upstream
from pop3proxy.store.base import Mailbox
from pop3proxy.store.state import UserState

if TYPE_CHECKING:
    from pop3proxy.proxy.backend import ProxyBackend

log = logging.getLogger("pop3proxy.proxy")


class ProxyMaildrop(StoreMaildrop):
    def __init__(self, backend: "ProxyBackend", account: _Account, route: Route, password: str | None,
                 mailbox: Mailbox, state: UserState, messages, banner: str) -> None:
        super().__init__(mailbox, None, messages, banner)
        self.backend = backend
        self.account = account
        self.route = route
        self._password = password  # None offline; kept only for this session's mirror deletions
        self.state = state

    def __repr__(self) -> str:
        return f"ProxyMaildrop({self.route.cache_id!r})"

    @property
    def upstream(self) -> str:
        return self.route.endpoint.where

    async def commit(self, deleted: Sequence[str]) -> None:
        if not deleted:
            return

        def local() -> set[str]:
            uids = set(self.state.uids_for_keys(deleted).values())
            # The cache first, the marks after: when the cache cannot be changed (an mbox cannot be
            # rewritten on a full disk) nothing is marked, so the -ERR the client gets is true — no
            # deletion is applied later, here or at the provider. Files removed before a failure (or
            # a crash) without their marks are fetched again while the provider has them.
            self.mailbox.delete(list(deleted))
            self.state.mark_deleted(deleted)
            return uids

        uids = await trio.to_thread.run_sync(local)
        no_credentials = self._password is None and self.route.cache_id not in self.backend.oauth
        if self.backend.settings.upstream.delete != "mirror" or not uids or no_credentials:
            return  # offline deletions reach the provider at the next online sync
        try:
            with trio.fail_after(self.backend.settings.upstream.timeout * 2):
                secret = await self.backend.upstream_secret(self.route, self._password)
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
        try:
            await trio.to_thread.run_sync(self._close_files)
        finally:
            await self.account.release(session=False)

    def _close_files(self) -> None:
        try:
            self.mailbox.close()
        finally:
            self.state.close()
