"""How OAuth2 logins go through the proxy backend (`OAuthLogins`, which `ProxyBackend` holds).

* A legacy client logs in to an OAuth2 account with its LOCAL password (scrypt, checked first);
  pop3proxy then logs in upstream with the account's access token. A token the provider refuses
  is renewed once; a wrong local password never touches the token.
* A modern client's AUTH XOAUTH2 / OAUTHBEARER token (a `BearerToken`) goes upstream unchanged.
"""

from __future__ import annotations

import logging
import time

import trio

from pop3proxy.errors import LoginError
from pop3proxy.net.endpoint import AUTH_TEXT, UpstreamAuthError, UpstreamUnavailable
from pop3proxy.net.pop3_client import UpstreamClient, connect
from pop3proxy.ops import metrics
from pop3proxy.pop3.sasl import BearerToken
from pop3proxy.proxy.credentials import kdf_limiter
from pop3proxy.proxy.oauth.manager import NeedsAuthorisation, TokenManager, TokenUnavailable
from pop3proxy.proxy.oauth.tokens import check_local_password
from pop3proxy.proxy.routing import Route
from pop3proxy.proxy.trust import refuse_untrusted

log = logging.getLogger("pop3proxy.proxy")



class OAuthLogins:
    """The OAuth2 logins of one backend: its `TokenManager`, whose token store also keeps the local passwords."""

    def __init__(self, oauth: TokenManager, offline_enabled: bool) -> None:
        self.oauth = oauth
        self.offline_enabled = offline_enabled

    def __contains__(self, cache_id: str) -> bool:
        return cache_id in self.oauth

    async def upstream_secret(self, route: Route, password: str | None) -> str:
        """What logs in upstream: for an OAuth2 account a current access token, else `password`."""
        if route.cache_id in self.oauth and not isinstance(password, BearerToken):
            return BearerToken(await self.oauth.token(route.cache_id))
        if password is None:
            raise UpstreamUnavailable("no credentials for this session", "no credentials")
        return password

    async def login(self, route: Route, password: str) -> UpstreamClient | None:
        """A legacy client's login to an OAuth2 account: local password first, then the token. The
        logged-in client, or None when the cache is to be served offline."""
        ok = await trio.to_thread.run_sync(
            check_local_password, self.oauth.store, route.cache_id, password, limiter=kdf_limiter())
        if not ok:
            raise LoginError("invalid user name or password", "AUTH")
        for attempt in (1, 2):
            try:
                token = BearerToken(await self.oauth.token(route.cache_id, force=attempt == 2))
            except NeedsAuthorisation:
                log.warning("OAuth2 account %r needs authorisation: run `pop3proxy oauth login %s`",
                            route.cache_id, route.cache_id)
                raise LoginError("the account needs authorisation at the mail provider again; ask the "
                                 "administrator to run `pop3proxy oauth login`", "AUTH", verified=True) from None
            except TokenUnavailable as exc:
                self._offline(route, exc)
                return None
            started = time.monotonic()
            try:
                client = await connect(route.endpoint)
            except UpstreamUnavailable as exc:
                self._offline(route, exc)
                return None
            try:
                await client.login(route.remote_user, token)
            except UpstreamAuthError as exc:
                await client.aclose()
                if exc.code == "AUTH" and attempt == 1:
                    log.info("provider refused the OAuth2 token of %r; renewing it: %s", route.cache_id, exc)
                    continue
                log.warning("provider refused the OAuth2 login of %r: %s", route.cache_id, exc)
                raise LoginError(AUTH_TEXT.get(exc.code, "login refused by the mail provider")
                                 if exc.code != "AUTH" else "the mail provider refused the OAuth2 token",
                                 exc.code if exc.code != "AUTH" else "SYS/TEMP") from None
            except UpstreamUnavailable as exc:
                await client.aclose()
                self._offline(route, exc)
                return None
            except BaseException:
                await client.aclose()
                raise
            metrics.upstream_latency(time.monotonic() - started)
            return client
        raise AssertionError("unreachable")

    async def bearer_login(self, route: Route, token: BearerToken) -> UpstreamClient:
        """A modern client's XOAUTH2 / OAUTHBEARER login: its token goes upstream unchanged.

        There is no offline login with a token (pop3proxy cannot check one by itself)."""
        started = time.monotonic()
        try:
            client = await connect(route.endpoint)
        except UpstreamUnavailable as exc:
            log.warning("provider unreachable for the OAuth2 login of %r: %s", route.cache_id, exc)
            raise LoginError("the mail provider cannot be reached, try again later", "SYS/TEMP") from None
        try:
            await client.login(route.remote_user, token)
        except UpstreamAuthError as exc:
            await client.aclose()
            log.info("provider refused the OAuth2 login of %r: %s", route.cache_id, exc)
            raise LoginError(AUTH_TEXT.get(exc.code, "login refused by the mail provider"), exc.code) from None
        except UpstreamUnavailable as exc:
            await client.aclose()
            log.warning("provider failed during the OAuth2 login of %r: %s", route.cache_id, exc)
            raise LoginError("the mail provider cannot be reached, try again later", "SYS/TEMP") from None
        except BaseException:
            await client.aclose()
            raise
        metrics.upstream_latency(time.monotonic() - started)
        return client

    def _offline(self, route: Route, reason: Exception) -> None:
        """The local password was right but no upstream session is possible: the cache is served (not
        after a TLS failure: `refuse_untrusted`)."""
        refuse_untrusted(route, reason)
        log.warning("OAuth2 account %r cannot reach the provider now: %s", route.cache_id, reason)
        if not self.offline_enabled:
            raise LoginError("the mail provider cannot be reached, try again later", "SYS/TEMP")
        return None
