"""Password logins towards the provider (USER/PASS, AUTH PLAIN, APOP), mixed into `UpstreamClient`."""


from __future__ import annotations

import base64
import logging

from pop3proxy.net.endpoint import (
    UpstreamAuthError,
    _auth_code,
)
from pop3proxy.pop3.client import (
    apop_digest,
)
from pop3proxy.pop3.commands import MAX_COMMAND_LINE
from pop3proxy.pop3.framing import Status
from pop3proxy.pop3.sasl import BearerToken

log = logging.getLogger("pop3proxy.upstream")


class PasswordLoginMixin:
    """The methods of `UpstreamClient` that log in with a password."""

    def _offers(self, method: str) -> bool:
        caps = self.capabilities
        if method == "plain":
            return caps is not None and "PLAIN" in (m.upper() for m in caps.get("SASL", []))
        if method == "user":
            return caps is None or "USER" in caps
        return self.apop_timestamp is not None

    async def login(self, user: str, password: str) -> str:
        """Log in with the first of the endpoint's methods the provider offers; return it.

        A method is tried only when the provider offers it: ``plain`` when CAPA lists SASL
        PLAIN, ``user`` when CAPA lists USER or CAPA is not supported, ``apop`` when the
        greeting holds a timestamp. A method is skipped only when it proves unavailable
        (``-ERR`` to USER, before the password was sent): once the provider has refused the
        credentials no other method is tried, as each try counts as a failed login there.
        """
        if isinstance(password, BearerToken):
            return await self.login_bearer(user, password)
        if not user or any(c in user + password for c in "\r\n\0"):
            raise UpstreamAuthError(
                f"{self.endpoint.where}: the user name or password holds a line break or NUL", "AUTH"
            )
        methods = [method for method in self.endpoint.auth if self._offers(method)]
        if not methods:
            configured = ", ".join(self.endpoint.auth)
            raise UpstreamAuthError(
                f"{self.endpoint.where}: the provider offers none of the login methods configured ({configured})",
                "SYS/PERM",
            )
        plain_response = base64.b64encode(f"\0{user}\0{password}".encode()).decode("ascii")
        self._secrets = (password, plain_response)
        try:
            unavailable: tuple[str, Status] | None = None
            for method in methods:
                refused = await getattr(self, f"_login_{method}")(user, password, plain_response)
                if refused is None:
                    self.auth_method = method
                    log.debug("logged in to %s as %s with %s", self.endpoint.where, user, method)
                    return method
                unavailable = (method, refused)
            assert unavailable is not None
            raise self._auth_error(*unavailable)
        finally:
            self._secrets = ()

    def _auth_error(self, method: str, reply: Status) -> UpstreamAuthError:
        text = self._scrub_reply(reply.text)
        return UpstreamAuthError(
            f"{self.endpoint.where}: the provider refused the login ({method}): {text}", _auth_code(reply.code)
        )

    async def _login_plain(self, user: str, password: str, response: str) -> Status | None:
        if len(f"AUTH PLAIN {response}\r\n") <= MAX_COMMAND_LINE:
            reply = await self._request("AUTH", "PLAIN", response)
        else:  # too long for an initial response (RFC 5034): wait for the empty challenge
            reply = await self._request("AUTH", "PLAIN")
            if reply.continuation:
                reply = await self._request(response, sasl=True)
        if reply.continuation:
            raise self._unavailable("unexpected SASL challenge from the provider")
        if not reply.ok:
            raise self._auth_error("plain", reply)
        return None

    async def _login_user(self, user: str, password: str, response: str) -> Status | None:
        reply = await self._request("USER", user)
        if not reply.ok:
            return reply  # USER/PASS is not available (nothing was said about the password)
        reply = await self._request("PASS", password)
        if not reply.ok:
            raise self._auth_error("user", reply)
        return None

    async def _login_apop(self, user: str, password: str, response: str) -> Status | None:
        timestamp = self.apop_timestamp
        assert timestamp is not None
        reply = await self._request("APOP", user, apop_digest(timestamp, password))
        if not reply.ok:
            raise self._auth_error("apop", reply)
        return None

    # -- challenge-response logins relayed from a client (APOP, CRAM-MD5) ---------------

    def offers_cram_md5(self) -> bool:
        caps = self.capabilities
        return caps is not None and "CRAM-MD5" in (m.upper() for m in caps.get("SASL", []))

    async def login_apop_digest(self, user: str, digest: str) -> None:
        """APOP with a digest the client computed over this connection's greeting timestamp."""
        if self.apop_timestamp is None:
            raise UpstreamAuthError(f"{self.endpoint.where}: the provider offers no APOP", "SYS/PERM")
        reply = await self._request("APOP", user, digest)
        if not reply.ok:
            raise self._auth_error("apop", reply)
        self.auth_method = "apop"

    async def cram_md5_challenge(self) -> str:
        """Start AUTH CRAM-MD5; the provider's base64 challenge, for the client to answer."""
        reply = await self._request("AUTH", "CRAM-MD5")
        if not reply.continuation:
            raise self._auth_error("cram-md5", reply) if not reply.ok else self._unavailable(
                "the provider answered AUTH CRAM-MD5 without a challenge")
        return reply.text

    async def cram_md5_answer(self, response: str) -> None:
        """The client's base64 answer to the challenge of `cram_md5_challenge`."""
        reply = await self._request(response, sasl=True)
        if reply.continuation:
            raise self._unavailable("unexpected second SASL challenge from the provider")
        if not reply.ok:
            raise self._auth_error("cram-md5", reply)
        self.auth_method = "cram-md5"

    async def forward_client(self, address: str, port: int) -> bool:
        """Tell the provider the real client's address (XCLIENT, as Dovecot accepts from its
        login_trusted_networks, whether or not its CAPA lists it) before logging in; False when it
        refuses (logged; the login goes on from pop3proxy's address)."""
        args = [f"ADDR={address}"] + ([f"PORT={port}"] if port else [])
        reply = await self._request("XCLIENT", *args)
        if not reply.ok:
            log.warning("%s refused XCLIENT: %s", self.endpoint.where, self._scrub_reply(reply.text))
        return reply.ok

    # -- transaction ------------------------------------------------------------------
