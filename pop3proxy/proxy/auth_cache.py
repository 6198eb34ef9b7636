"""``sync.auth_cache_ttl``: a login whose password the provider accepted within the TTL is served from
the cache at once; the provider is asked in the background, and an entry it refuses is dropped.

Only a keyed digest of each password is kept (the key is random and lives in memory only); a different
password never uses an entry. The trade-off (a password changed at the provider keeps opening the cache
until the entry expires or the background check sees it refused) is in SECURITY.md.
"""

from __future__ import annotations

import hmac
import logging
import time

import trio

from pop3proxy.net.endpoint import UpstreamAuthError, UpstreamError
from pop3proxy.net.pop3_client import UpstreamClient, connect
from pop3proxy.pop3.sasl import BearerToken
from pop3proxy.proxy.routing import Route

log = logging.getLogger("pop3proxy.proxy")


class AuthCache:
    """Mixed into `ProxyBackend`."""

    def _keyed(self, password: str) -> bytes:
        return hmac.new(self.memo_key, password.encode("utf-8"), "sha256").digest()

    def _auth_cached(self, route: Route, password: str) -> bool:
        """``sync.auth_cache_ttl``: this password was accepted by the provider for this account within
        the TTL (a keyed digest in memory only, never the password)."""
        entry = self._auth_cache.get(route.cache_id)
        if entry is None or isinstance(password, BearerToken):
            return False
        if time.monotonic() - entry[1] > self.settings.sync.auth_cache_ttl:
            del self._auth_cache[route.cache_id]
            return False
        return hmac.compare_digest(entry[0], self._keyed(password))

    async def _check_in_background(self, route: Route, password: str, client: UpstreamClient | None) -> None:
        """After a login served from the auth cache: log in at the provider (a refusal drops the entry)
        and fetch new mail, which shows at the next login. ``client``: the early connection, if any."""
        account = self._account(route.cache_id)
        try:
            client = client or await connect(route.endpoint)
        except UpstreamError as exc:
            log.info("background check of %r: provider unreachable: %s", route.cache_id, exc)
            return
        try:
            await client.login(route.remote_user, password)
        except UpstreamError as exc:
            await client.aclose()
            if isinstance(exc, UpstreamAuthError) and exc.code == "AUTH":
                self._auth_cache.pop(route.cache_id, None)
                log.warning("the provider no longer accepts the cached password of %r: auth cache entry "
                            "dropped (the login it served stays)", route.cache_id)
            return
        if account.sync_lock.locked():
            await client.aclose()
            return
        await account.acquire(session=False)
        await self._background_sync(route, account, client, password, trio.Event(), {})
