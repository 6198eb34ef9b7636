"""Password logins towards the provider (USER/PASS, AUTH PLAIN, APOP; APOP and CRAM-MD5 answers a
client computed; XCLIENT): functions over the `LoginChannel` an `UpstreamClient` is."""


from __future__ import annotations

import base64
import contextlib
import logging
from typing import Protocol

from pop3proxy.net.endpoint import (
    Endpoint,
    UpstreamAuthError,
    UpstreamUnavailable,
    _auth_code,
)
from pop3proxy.pop3.client import (
    apop_digest,
)
from pop3proxy.pop3.commands import MAX_COMMAND_LINE
from pop3proxy.pop3.framing import Status

log = logging.getLogger("pop3proxy.upstream")


class LoginChannel(Protocol):
    """What a login needs of the provider's session (`UpstreamClient` is one)."""

    endpoint: Endpoint
    capabilities: dict[str, list[str]] | None
    auth_method: str | None

    @property
    def apop_timestamp(self) -> str | None: ...

    async def request(self, command: str, *args: str | int, sasl: bool = False, secret: bool = False) -> Status:
        """One command and its single-line reply; ``secret``: the line carries a credential."""
        ...

    def unavailable(self, reason: str) -> UpstreamUnavailable:
        """The session is unusable for ``reason`` (the error to raise)."""
        ...

    def scrub(self, text: str) -> str:
        """``text`` without the secrets of the login under way."""
        ...

    def scrub_reply(self, text: str) -> str:
        """The provider's status text, fit for an error message (not shown at all when a secret of the
        login under way is too short to be masked in it)."""
        ...

    def keeping_secret(self, *secrets: str) -> contextlib.AbstractContextManager[None]:
        """Keep ``secrets`` out of every error message while the block runs."""
        ...


def offers(channel: LoginChannel, method: str) -> bool:
    caps = channel.capabilities
    if method == "plain":
        return caps is not None and "PLAIN" in (m.upper() for m in caps.get("SASL", []))
    if method == "user":
        return caps is None or "USER" in caps
    return channel.apop_timestamp is not None


def offers_cram_md5(channel: LoginChannel) -> bool:
    caps = channel.capabilities
    return caps is not None and "CRAM-MD5" in (m.upper() for m in caps.get("SASL", []))


def auth_error(channel: LoginChannel, method: str, reply: Status) -> UpstreamAuthError:
    return UpstreamAuthError(
        f"{channel.endpoint.where}: the provider refused the login ({method}): {channel.scrub_reply(reply.text)}",
        _auth_code(reply.code),
    )


async def login(channel: LoginChannel, user: str, password: str) -> str:
    """Log in with the first of the endpoint's methods the provider offers; return it.

    A method is tried only when the provider offers it: ``plain`` when CAPA lists SASL
    PLAIN, ``user`` when CAPA lists USER or CAPA is not supported, ``apop`` when the
    greeting holds a timestamp. A method is skipped only when it proves unavailable
    (``-ERR`` to USER, before the password was sent): once the provider has refused the
    credentials no other method is tried, as each try counts as a failed login there.
    """
    if not user or any(c in user + password for c in "\r\n\0"):
        raise UpstreamAuthError(
            f"{channel.endpoint.where}: the user name or password holds a line break or NUL", "AUTH"
        )
    methods = [method for method in channel.endpoint.auth if offers(channel, method)]
    if not methods:
        configured = ", ".join(channel.endpoint.auth)
        raise UpstreamAuthError(
            f"{channel.endpoint.where}: the provider offers none of the login methods configured ({configured})",
            "SYS/PERM",
        )
    plain_response = base64.b64encode(f"\0{user}\0{password}".encode()).decode("ascii")
    with channel.keeping_secret(password, plain_response):
        unavailable: tuple[str, Status] | None = None
        for method in methods:
            refused = await _METHODS[method](channel, user, password, plain_response)
            if refused is None:
                channel.auth_method = method
                log.debug("logged in to %s as %s with %s", channel.endpoint.where, user, method)
                return method
            unavailable = (method, refused)
        assert unavailable is not None
        raise auth_error(channel, *unavailable)


async def login_plain(channel: LoginChannel, user: str, password: str, response: str) -> Status | None:
    if len(f"AUTH PLAIN {response}\r\n") <= MAX_COMMAND_LINE:
        reply = await channel.request("AUTH", "PLAIN", response, secret=True)
    else:  # too long for an initial response (RFC 5034): wait for the empty challenge
        reply = await channel.request("AUTH", "PLAIN")
        if reply.continuation:
            reply = await channel.request(response, sasl=True, secret=True)
    if reply.continuation:
        raise channel.unavailable("unexpected SASL challenge from the provider")
    if not reply.ok:
        raise auth_error(channel, "plain", reply)
    return None


async def login_user(channel: LoginChannel, user: str, password: str, response: str) -> Status | None:
    reply = await channel.request("USER", user)
    if not reply.ok:
        return reply  # USER/PASS is not available (nothing was said about the password)
    reply = await channel.request("PASS", password, secret=True)
    if not reply.ok:
        raise auth_error(channel, "user", reply)
    return None


async def login_apop(channel: LoginChannel, user: str, password: str, response: str) -> Status | None:
    timestamp = channel.apop_timestamp
    assert timestamp is not None
    reply = await channel.request("APOP", user, apop_digest(timestamp, password), secret=True)
    if not reply.ok:
        raise auth_error(channel, "apop", reply)
    return None

# -- challenge-response logins relayed from a client (APOP, CRAM-MD5) ---------------


async def login_apop_digest(channel: LoginChannel, user: str, digest: str) -> None:
    """APOP with a digest the client computed over this connection's greeting timestamp."""
    if channel.apop_timestamp is None:
        raise UpstreamAuthError(f"{channel.endpoint.where}: the provider offers no APOP", "SYS/PERM")
    reply = await channel.request("APOP", user, digest, secret=True)
    if not reply.ok:
        raise auth_error(channel, "apop", reply)
    channel.auth_method = "apop"


async def cram_md5_challenge(channel: LoginChannel) -> str:
    """Start AUTH CRAM-MD5; the provider's base64 challenge, for the client to answer."""
    reply = await channel.request("AUTH", "CRAM-MD5")
    if not reply.continuation:
        raise auth_error(channel, "cram-md5", reply) if not reply.ok else channel.unavailable(
            "the provider answered AUTH CRAM-MD5 without a challenge")
    return reply.text


async def cram_md5_answer(channel: LoginChannel, response: str) -> None:
    """The client's base64 answer to the challenge of `cram_md5_challenge`."""
    reply = await channel.request(response, sasl=True, secret=True)
    if reply.continuation:
        raise channel.unavailable("unexpected second SASL challenge from the provider")
    if not reply.ok:
        raise auth_error(channel, "cram-md5", reply)
    channel.auth_method = "cram-md5"


async def forward_client(channel: LoginChannel, address: str, port: int) -> bool:
    """Tell the provider the real client's address (XCLIENT, as Dovecot accepts from its
    login_trusted_networks, whether or not its CAPA lists it) before logging in; False when it
    refuses (logged; the login goes on from pop3proxy's address)."""
    args = [f"ADDR={address}"] + ([f"PORT={port}"] if port else [])
    reply = await channel.request("XCLIENT", *args)
    if not reply.ok:
        log.warning("%s refused XCLIENT: %s", channel.endpoint.where, channel.scrub_reply(reply.text))
    return reply.ok


_METHODS = {"plain": login_plain, "user": login_user, "apop": login_apop}
