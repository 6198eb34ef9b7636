"""A connection to the provider opened as soon as a client connects, before it logs in.

While the client reads the greeting and sends USER, the provider's connection is set up (TCP, TLS,
greeting, CAPA); the login then uses it instead of paying that round trip. It is also what makes APOP
and CRAM-MD5 possible through the proxy: the client's digest is computed over the provider's own APOP
timestamp (put in pop3proxy's greeting) or CRAM-MD5 challenge (relayed), so the provider checks it.
"""

from __future__ import annotations

import logging

import trio

from pop3proxy.net import password_login
from pop3proxy.net.endpoint import Endpoint, UpstreamError
from pop3proxy.net.pop3_client import UpstreamClient, connect

log = logging.getLogger("pop3proxy.upstream")


class EarlyUpstream:
    def __init__(self, endpoint: Endpoint, peer: tuple[str, int], forward_client: bool = False,
                 on_close=None) -> None:
        self.endpoint = endpoint
        self.peer = peer
        self.forward_client = forward_client
        self.client: UpstreamClient | None = None
        self.error: UpstreamError | None = None
        self.ready = trio.Event()
        self._on_close = on_close
        self._closed = False

    async def run(self) -> None:
        """Connect (in the connection's nursery); never raises for the provider's failures."""
        try:
            client = await connect(self.endpoint)
            if self.forward_client:
                await password_login.forward_client(client, *self.peer)
            self.client = client
        except UpstreamError as exc:
            self.error = exc
            log.debug("early connection to %s failed: %s", self.endpoint.where, exc)
        finally:
            self.ready.set()
            if self._closed and self.client is not None:  # closed while connecting
                with trio.CancelScope(shield=True):
                    await self.client.aclose()
                self.client = None

    async def wait(self, seconds: float) -> bool:
        """Wait at most ``seconds`` for the provider's greeting; True when the connection is up."""
        with trio.move_on_after(seconds):
            await self.ready.wait()
        return self.client is not None

    @property
    def apop_timestamp(self) -> str | None:
        return self.client.apop_timestamp if self.client is not None else None

    @property
    def offers_cram_md5(self) -> bool:
        return self.client is not None and password_login.offers_cram_md5(self.client)

    def matches(self, endpoint: Endpoint) -> bool:
        return (endpoint.host.lower(), endpoint.port, endpoint.tls) == (
            self.endpoint.host.lower(), self.endpoint.port, self.endpoint.tls)

    async def take(self, endpoint: Endpoint) -> UpstreamClient | None:
        """The connection, for a login to ``endpoint`` (waiting for it if it is still being set up);
        None when it is for another provider, failed, or was taken already. The caller closes it."""
        if not self.matches(endpoint) or self._closed:
            return None
        await self.ready.wait()
        client, self.client = self.client, None
        return client

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        client, self.client = self.client, None
        if client is not None:
            await client.aclose()
        if self._on_close is not None:
            self._on_close()
