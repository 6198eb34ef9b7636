"""Which failures of the provider may lead to offline mode, and a password sent once per attempt.

Each upstream failure class (`net.endpoint.may_go_offline`) is tried against a real ``pop3proxy serve``
whose provider is the scripted `faulty_upstream` server (faults are what a real server cannot do on
demand). alice has a cache and an offline hash from a first session, so every refusal below is the
proxy's choice, not a missing offline copy:

* refused, timed out, reset or closed: the cache is served offline;
* STLS not offered, refused, plain text injected after its ``+OK``, a garbled exchange before it, a
  broken TLS handshake: ``-ERR [SYS/TEMP]`` and an ERROR line, never offline.

And a login the provider leaves unanswered on the connection opened early is not sent again on a new
connection (each try counts as a failed login at the provider: a lock-out for the user).
"""

from __future__ import annotations

import poplib
import re
import socket

import pytest
import trio
from helpers.common import HOST, write_config
from helpers.waiting import wait_for_async
from helpers.faulty_upstream import GREETING, faulty_server

PASSWORD = "trust-me-not-9"
TIMEOUT = 1.5  # upstream.timeout: a stall past it is "timed out"
MESSAGE = b"From: a@example.org\r\nSubject: kept\r\n\r\nbody\r\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class Proxy:
    def __init__(self, factory, tmp_path, port: int) -> None:
        self.factory, self.tmp_path, self.port = factory, tmp_path, port
        self.process = None

    async def start(self, **upstream) -> None:
        await self.stop()
        config = write_config(self.tmp_path / "proxy.toml", {
            "listen": {"host": HOST, "port": 0},
            "upstream": {"host": HOST, "port": self.port, "tls": "none", "timeout": TIMEOUT, **upstream},
            "cache": {"root": self.tmp_path / "cache"},
            "sync": {"login_budget": 10, "auth_cache_ttl": 0},
            "log": {"level": "debug"},
        })
        self.process = await trio.to_thread.run_sync(self.factory(config).start)

    async def stop(self) -> None:
        if self.process is not None:
            process, self.process = self.process, None
            await trio.to_thread.run_sync(process.stop)

    async def login(self, user: str = "alice") -> str:
        """The reply to PASS (``+OK …`` or ``-ERR …``); the session is ended with QUIT."""
        port = self.process.port

        def run() -> str:
            client = poplib.POP3(HOST, port, timeout=60)
            try:
                client.user(user)
                try:
                    reply = client.pass_(PASSWORD).decode()
                except poplib.error_proto as exc:
                    return exc.args[0].decode() if isinstance(exc.args[0], bytes) else str(exc.args[0])
                client.quit()
                return reply
            finally:
                client.close()

        return await trio.to_thread.run_sync(run)


@pytest.fixture
async def provider(server_process, tmp_path):
    """(server, proxy): alice's first session went through, so she has a cache and an offline hash."""
    async with faulty_server(messages={"u1": MESSAGE}, password=PASSWORD) as server:
        proxy = Proxy(server_process, tmp_path, server.port)
        await proxy.start()
        reply = await proxy.login()
        assert reply.startswith("+OK") and "offline" not in reply, reply
        try:
            yield server, proxy
        finally:
            await proxy.stop()


@pytest.mark.parametrize("fault", ["refused", "timed out", "closed at once"])
async def test_an_unreachable_provider_serves_the_cache(provider, fault):
    server, proxy = provider
    if fault == "refused":
        await proxy.start(port=free_port())
    elif fault == "timed out":
        server.behaviour.stall_on = GREETING
    else:
        server.behaviour.close_on_connect = True
    reply = await proxy.login()
    assert reply.startswith("+OK") and "offline" in reply, reply


@pytest.mark.parametrize("fault", [
    "STLS not offered", "STLS refused", "text injected after STLS", "garbled greeting before STLS",
    "TLS handshake broken",
])
async def test_a_tls_failure_is_never_offline(provider, fault):
    server, proxy = provider
    behaviour = server.behaviour
    behaviour.stls = fault != "STLS not offered"  # the faulty server refuses STLS itself
    if fault == "text injected after STLS":
        behaviour.garbage_on, behaviour.garbage = "STLS", "+OK begin TLS\r\n+OK injected in plain text"
    elif fault == "garbled greeting before STLS":
        behaviour.garbage_on, behaviour.garbage = GREETING, "* not a POP3 greeting"
    await proxy.start(tls="implicit" if fault == "TLS handshake broken" else "starttls")
    reply = await proxy.login()
    assert reply.startswith("-ERR [SYS/TEMP]") and "offline" not in reply, (fault, reply)
    # The ERROR line is written before the reply; its reader thread may see it a moment later.
    await wait_for_async(proxy.process, re.compile(r"ERROR .*cannot be trusted"))


async def test_an_unanswered_password_on_the_early_connection_is_not_sent_again(provider):
    server, proxy = provider
    server.behaviour.stall_on = "PASS"  # the provider takes the password and never answers
    sent = server.commands.count("PASS")
    reply = await proxy.login()
    # alice has an offline copy: the cache, offline; and the provider saw her password once.
    assert reply.startswith("+OK") and "offline" in reply, reply
    assert server.commands.count("PASS") == sent + 1


async def test_a_dropped_early_connection_is_replaced_before_the_password(provider):
    # The provider closes the waiting connection when the login begins (its idle timeout, as it were):
    # the login goes on over a new connection, and the password is sent once.
    server, proxy = provider
    sent = server.commands.count("PASS")
    server.behaviour.drop_on = "USER"
    reply = await proxy.login()
    assert reply.startswith("+OK") and "offline" not in reply, reply
    assert server.behaviour.drop_on is None  # the drop happened
    assert server.commands.count("PASS") == sent + 1
