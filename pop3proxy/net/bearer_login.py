"""Logging in to a provider with an OAuth2 access token (a part of `UpstreamClient`, kept apart for
size): SASL XOAUTH2 or OAUTHBEARER, whichever CAPA's SASL line offers.
"""

from __future__ import annotations

import logging

from pop3proxy.net.endpoint import UpstreamAuthError
from pop3proxy.pop3.sasl import MECHANISMS as OAUTH_MECHANISMS
from pop3proxy.pop3.sasl import OAUTHBEARER, OAUTHBEARER_ABORT, SaslError, oauthbearer, xoauth2

log = logging.getLogger("pop3proxy.upstream")


class BearerLoginMixin:
    """Uses UpstreamClient's capabilities, endpoint, _request, _secrets, _unavailable, _auth_error."""

    async def login_bearer(self, user: str, token: str, mechanisms: tuple[str, ...] = OAUTH_MECHANISMS) -> str:
        """Log in with an OAuth2 access token, by the first of `mechanisms` CAPA's SASL line offers.

        The response is sent in the two-line form (``AUTH XOAUTH2``, ``+``, then the response),
        which every provider accepts (Microsoft's only). A refusal comes as a base64 JSON
        challenge first; it is answered (an empty line for XOAUTH2, ``AQ==`` for OAUTHBEARER,
        RFC 7628) and then ``-ERR`` ends the attempt. Returns the mechanism used.
        """
        offered = {m.upper() for m in (self.capabilities or {}).get("SASL", [])}
        usable = [m for m in mechanisms if m in offered]
        if not usable:
            raise UpstreamAuthError(
                f"{self.endpoint.where}: the provider offers neither XOAUTH2 nor OAUTHBEARER (needed for OAuth2)",
                "SYS/PERM",
            )
        mechanism = usable[0]
        try:
            if mechanism == OAUTHBEARER:
                response = oauthbearer(user, token, self.endpoint.host, self.endpoint.port)
            else:
                response = xoauth2(user, token)
        except SaslError as exc:
            raise UpstreamAuthError(f"{self.endpoint.where}: {exc}", "AUTH") from None
        self._secrets = (token, response)
        try:
            reply = await self._request("AUTH", mechanism)
            if not reply.continuation:
                if reply.ok:
                    raise self._unavailable(f"the provider accepted AUTH {mechanism} without credentials")
                raise self._auth_error(mechanism.lower(), reply)
            reply = await self._request(response, sasl=True, secret=True)
            if reply.continuation:  # an error challenge: answer it, then the -ERR follows
                reply = await self._request(OAUTHBEARER_ABORT if mechanism == OAUTHBEARER else "", sasl=True)
            if reply.continuation:
                raise self._unavailable("unexpected SASL challenge from the provider")
            if not reply.ok:
                raise self._auth_error(mechanism.lower(), reply)
            self.auth_method = mechanism.lower()
            log.debug("logged in to %s as %s with %s", self.endpoint.where, user, mechanism)
            return self.auth_method
        finally:
            self._secrets = ()
