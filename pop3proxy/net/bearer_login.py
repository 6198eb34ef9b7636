"""Logging in to a provider with an OAuth2 access token: SASL XOAUTH2 or OAUTHBEARER, whichever CAPA's
SASL line offers (a function over the `LoginChannel` an `UpstreamClient` is).
"""

from __future__ import annotations

import logging

from pop3proxy.net.endpoint import UpstreamAuthError
from pop3proxy.net.password_login import LoginChannel, auth_error
from pop3proxy.pop3.sasl import MECHANISMS as OAUTH_MECHANISMS
from pop3proxy.pop3.sasl import OAUTHBEARER, OAUTHBEARER_ABORT, SaslError, oauthbearer, xoauth2

log = logging.getLogger("pop3proxy.upstream")


async def login_bearer(channel: LoginChannel, user: str, token: str,
                       mechanisms: tuple[str, ...] = OAUTH_MECHANISMS) -> str:
    """Log in with an OAuth2 access token, by the first of `mechanisms` CAPA's SASL line offers.

    The response is sent in the two-line form (``AUTH XOAUTH2``, ``+``, then the response),
    which every provider accepts (Microsoft's only). A refusal comes as a base64 JSON
    challenge first; it is answered (an empty line for XOAUTH2, ``AQ==`` for OAUTHBEARER,
    RFC 7628) and then ``-ERR`` ends the attempt. Returns the mechanism used.
    """
    offered = {m.upper() for m in (channel.capabilities or {}).get("SASL", [])}
    usable = [m for m in mechanisms if m in offered]
    if not usable:
        raise UpstreamAuthError(
            f"{channel.endpoint.where}: the provider offers neither XOAUTH2 nor OAUTHBEARER (needed for OAuth2)",
            "SYS/PERM",
        )
    mechanism = usable[0]
    try:
        if mechanism == OAUTHBEARER:
            response = oauthbearer(user, token, channel.endpoint.host, channel.endpoint.port)
        else:
            response = xoauth2(user, token)
    except SaslError as exc:
        raise UpstreamAuthError(f"{channel.endpoint.where}: {exc}", "AUTH") from None
    with channel.keeping_secret(token, response):
        reply = await channel.request("AUTH", mechanism)
        if not reply.continuation:
            if reply.ok:
                raise channel.unavailable(f"the provider accepted AUTH {mechanism} without credentials")
            raise auth_error(channel, mechanism.lower(), reply)
        reply = await channel.request(response, sasl=True, secret=True)
        if reply.continuation:  # an error challenge: answer it, then the -ERR follows
            reply = await channel.request(OAUTHBEARER_ABORT if mechanism == OAUTHBEARER else "", sasl=True)
        if reply.continuation:
            raise channel.unavailable("unexpected SASL challenge from the provider")
        if not reply.ok:
            raise auth_error(channel, mechanism.lower(), reply)
        channel.auth_method = mechanism.lower()
        log.debug("logged in to %s as %s with %s", channel.endpoint.where, user, mechanism)
        return channel.auth_method
