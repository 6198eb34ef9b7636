"""Logins over the provider connection opened while the client connected (`net.early`): APOP and
CRAM-MD5 checked by the provider itself, and the round trip of connecting taken out of every login.

Only the default provider (``[upstream]``) is connected early: it is the only one known before the
client names itself. APOP and CRAM-MD5 logins therefore work for users of the default provider whose
login name is their name there; any other is refused with a clear ``-ERR``. Neither gives pop3proxy the
password, so such a session has no offline password (no offline login by APOP), and the provider's
copies of what the client deletes go at the next sync (policy ``mirror``) rather than at once.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from pop3proxy.errors import LoginError
from pop3proxy.net import password_login
from pop3proxy.net.early import EarlyUpstream
from pop3proxy.net.endpoint import UpstreamAuthError, UpstreamError, UpstreamUnavailable
from pop3proxy.net.pop3_client import UpstreamClient, connect
from pop3proxy.proxy.routing import Route, default_endpoint

if TYPE_CHECKING:
    from pop3proxy.config import Settings

log = logging.getLogger("pop3proxy.proxy")

CHALLENGE_MECHANISMS = ("APOP", "CRAM-MD5")
GREETING_WAIT = 2.0  # seconds a client's greeting may wait for the provider's APOP timestamp


class EarlyLogins:
    """The default provider's early connections of one process (`ProxyBackend` holds one)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._early_open = 0
        self._provider_challenges: bool | None = None  # did the provider's last greeting/CAPA offer APOP or CRAM-MD5?

    def early_upstream(self, peer: tuple[str, int]) -> EarlyUpstream | None:
        up = self.settings.upstream
        endpoint = default_endpoint(self.settings)
        if endpoint is None or not up.early_connect or self._early_open >= up.early_connections:
            return None
        self._early_open += 1

        def closed() -> None:
            self._early_open -= 1

        return EarlyUpstream(endpoint, peer, up.forward_client_address, on_close=closed)

    async def greeting_ready(self, early: EarlyUpstream) -> tuple[str | None, bool]:
        """Wait (bounded) for the provider's greeting when it may carry an APOP timestamp to pass on."""
        wanted = self.settings.upstream.pass_challenges
        if not wanted or self._provider_challenges is False:
            return None, False
        if await early.wait(GREETING_WAIT):
            self._provider_challenges = early.apop_timestamp is not None or early.offers_cram_md5
        elif early.ready.is_set():
            self._provider_challenges = False  # unreachable now: greet at once until it is back
        return (early.apop_timestamp if "apop" in wanted else None,
                early.offers_cram_md5 and "cram-md5" in wanted)

    async def challenge(self, early: EarlyUpstream | None, mechanism: str) -> str:
        if early is None or early.client is None:
            raise LoginError(f"{mechanism} is not available now: the mail provider cannot be reached", "SYS/TEMP")
        try:
            return await password_login.cram_md5_challenge(early.client)
        except UpstreamAuthError as exc:
            raise LoginError(f"the mail provider refused {mechanism}: {exc}", "AUTH") from None
        except UpstreamError:
            raise LoginError("the mail provider cannot be reached now", "SYS/TEMP") from None

    async def connect_for_login(self, route: Route, early: EarlyUpstream | None,
                                peer: str) -> tuple[UpstreamClient, bool]:
        """A connection for this login: the early one when it is to the same provider, else a new one
        (telling the provider the client's address when configured). (client, whether it was early)."""
        client = await early.take(route.endpoint) if early is not None else None
        if client is not None:
            return client, True
        if early is not None and early.matches(route.endpoint) and isinstance(early.error, UpstreamUnavailable):
            raise early.error  # the provider was just tried and did not answer: no second wait
        client = await connect(route.endpoint)
        if self.settings.upstream.forward_client_address:
            try:
                await password_login.forward_client(client, peer, 0)
            except BaseException:
                await client.aclose()
                raise
        return client, False

    async def challenge_login(self, route: Route, user: str, answer: str, mechanism: str,
                              early: EarlyUpstream | None, *, token_account: bool) -> UpstreamClient:
        """Log in with the client's APOP digest or CRAM-MD5 answer on ``early``; the logged-in client."""
        if early is None or not early.matches(route.endpoint) or route.remote_user != user or token_account:
            raise LoginError(f"{mechanism} works only for users of the default provider; use USER/PASS", "AUTH")
        client = await early.take(route.endpoint)
        if client is None:
            raise LoginError("the mail provider cannot be reached now, try again", "SYS/TEMP")
        try:
            if mechanism == "APOP":
                await password_login.login_apop_digest(client, route.remote_user, answer)
            else:
                await password_login.cram_md5_answer(client, answer)
        except UpstreamAuthError as exc:
            await client.aclose()
            log.info("provider refused the %s login of %r: %s", mechanism, route.cache_id, exc)
            reason = "invalid user name or password" if exc.code == "AUTH" else "login refused by the mail provider"
            raise LoginError(reason, exc.code) from None
        except UpstreamUnavailable:
            await client.aclose()
            raise LoginError("the mail provider cannot be reached now (no offline login with "
                             f"{mechanism}), try again later", "SYS/TEMP") from None
        except BaseException:
            await client.aclose()
            raise
        return client
