"""APOP and CRAM-MD5 through pop3proxy, checked by the provider; the provider connection opened while
the client greets; the client's address passed on with XCLIENT."""

from __future__ import annotations

import base64
import hashlib
import hmac
import poplib
import re
import socket
import subprocess
import time

import pytest
import trio
from helpers.common import HOST, require_tool
from helpers.dovecot import running_dovecot
from helpers.faulty_upstream import GREETING, faulty_server
from helpers.proxy import Proxy, retr_all, sample
from helpers.waiting import eventually

pytestmark = pytest.mark.dovecot


def greeting_timestamp(client: poplib.POP3) -> bytes:
    found = re.search(rb"<[^>]*>", client.welcome)
    assert found, client.welcome
    return found.group()


def test_apop_with_poplib_is_checked_by_the_provider(proxy, dovecot):
    dovecot.deliver(dovecot.user, sample(1))
    proxy.start()
    client = poplib.POP3(HOST, proxy.process.port, timeout=10)
    greeting_timestamp(client)  # the provider's own timestamp, in pop3proxy's greeting
    with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\]"):
        client.apop(dovecot.user, dovecot.password + "-wrong")
    client.quit()
    client = poplib.POP3(HOST, proxy.process.port, timeout=10)
    assert client.apop(dovecot.user, dovecot.password).startswith(b"+OK")
    assert retr_all(client) == [sample(1)]
    client.dele(1)
    client.quit()
    # No password went through: the provider's copy goes at the next sync (mirror), not at once.
    assert dovecot.messages(dovecot.user) == [sample(1)]
    client = proxy.client(dovecot.user, dovecot.password)
    assert client.stat()[0] == 0
    client.quit()
    assert dovecot.messages(dovecot.user) == []


def test_apop_with_curl(proxy, dovecot):
    curl = require_tool("curl", "curl")
    dovecot.deliver(dovecot.user, sample(2))
    proxy.start()
    assert curl_first_message(curl, proxy, dovecot, "AUTH=+APOP") == sample(2)
    assert f"Login: user=<{dovecot.user}>, method=APOP" in dovecot.log_text()  # checked there


def curl_first_message(curl: str, proxy, dovecot, login_options: str) -> bytes:
    """Message 1 through the proxy, as curl fetches it with ``--login-options``."""
    url = f"pop3://{HOST}:{proxy.process.port}/1"
    out = subprocess.run([curl, "-s", "-S", "--max-time", "20", "--login-options", login_options,
                          "-u", f"{dovecot.user}:{dovecot.password}", url], capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


def cram_md5(client: poplib.POP3, user: str, password: str) -> bytes:
    reply = client._shortcmd("AUTH CRAM-MD5")
    assert reply.startswith(b"+ "), reply
    challenge = base64.b64decode(reply[2:])
    digest = hmac.new(password.encode(), challenge, hashlib.md5).hexdigest()
    return client._shortcmd(base64.b64encode(f"{user} {digest}".encode()).decode())


def test_cram_md5_relays_the_providers_challenge(proxy, dovecot):
    curl = require_tool("curl", "curl")
    dovecot.deliver(dovecot.user, sample(3))
    proxy.start()
    plain = poplib.POP3(HOST, proxy.process.port, timeout=10)
    assert "CRAM-MD5" not in " ".join(plain.capa().get("SASL", []))  # not offered by default
    plain.quit()

    proxy.start(upstream={"pass_challenges": ["apop", "cram-md5"]})
    client = poplib.POP3(HOST, proxy.process.port, timeout=10)
    assert "CRAM-MD5" in client.capa()["SASL"]
    with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\]"):
        cram_md5(client, dovecot.user, "wrong")
    client.quit()
    client = poplib.POP3(HOST, proxy.process.port, timeout=10)
    assert cram_md5(client, dovecot.user, dovecot.password).startswith(b"+OK")
    assert retr_all(client) == [sample(3)]
    client.quit()
    assert curl_first_message(curl, proxy, dovecot, "AUTH=CRAM-MD5") == sample(3)
    assert f"Login: user=<{dovecot.user}>, method=CRAM-MD5" in dovecot.log_text()


def test_apop_for_another_provider_is_refused_clearly(proxy, dovecot):
    proxy.start(accounts={"elsewhere": {"host": HOST, "port": 1, "tls": "none"}})
    client = poplib.POP3(HOST, proxy.process.port, timeout=10)
    with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\] APOP works only for users of the default"):
        client.apop("elsewhere", "whatever")
    client.quit()


def test_the_provider_connection_opened_while_greeting_is_the_logins(proxy, dovecot):
    proxy.start()
    before = len(dovecot.log_text())
    client = poplib.POP3(HOST, proxy.process.port, timeout=10)
    greeting_timestamp(client)  # the provider was connected to while greeting
    client.user(dovecot.user)
    client.pass_(dovecot.password)
    client.quit()
    log = dovecot.log_text()[before:]
    assert log.count(f"Login: user=<{dovecot.user}>") == 1
    # Had the login opened a second connection, the early one would end without a login attempt.
    assert "no auth attempts" not in log, log


class FromAddress(poplib.POP3):
    """poplib, connecting from another loopback address (127.0.0.2)."""

    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout, source_address=("127.0.0.2", 0))


@pytest.fixture(scope="module")
def trusting_dovecot():
    yield from running_dovecot(pool_size=2, trusted_networks="127.0.0.1/32")


@pytest.mark.parametrize("forward", [True, False])
def test_the_clients_address_reaches_the_provider(server_process, tmp_path, trusting_dovecot, forward):
    user, password = trusting_dovecot.take_user()
    proxy = Proxy(server_process, tmp_path, trusting_dovecot, upstream={"forward_client_address": forward})
    try:
        proxy.start()
        before = len(trusting_dovecot.log_text())
        for early in (True, False):  # the connection opened early, and one opened at login
            if not early:
                proxy.start(upstream={"forward_client_address": forward, "early_connect": False})
            client = FromAddress(HOST, proxy.process.port, timeout=10)
            client.user(user)
            client.pass_(password)
            client.quit()
        eventually(lambda: trusting_dovecot.log_text()[before:].count(f"user=<{user}>") >= 2, timeout=5)
        logins = [line for line in trusting_dovecot.log_text()[before:].splitlines() if f"user=<{user}>" in line]
        expected = "rip=127.0.0.2" if forward else "rip=127.0.0.1"
        assert len(logins) >= 2 and all(expected in line for line in logins), logins
    finally:
        proxy.stop()


def test_early_connections_are_capped(proxy, dovecot):
    proxy.start(upstream={"early_connections": 1})
    first = poplib.POP3(HOST, proxy.process.port, timeout=10)
    greeting_timestamp(first)  # the one early connection
    second = poplib.POP3(HOST, proxy.process.port, timeout=10)
    assert b"<" not in second.welcome  # past the cap: greeted without, and logs in as usual
    second.user(dovecot.user)
    assert second.pass_(dovecot.password).startswith(b"+OK")
    second.quit()
    first.quit()  # gives its early connection back
    eventually(lambda: b"<" in poplib.POP3(HOST, proxy.process.port, timeout=10).welcome, timeout=5)


async def test_a_stalled_provider_delays_the_greeting_two_seconds_at_most(server_process, tmp_path, dovecot):
    async with faulty_server(stall_on=GREETING) as server:
        proxy = Proxy(server_process, tmp_path, dovecot,
                      upstream={"host": HOST, "port": server.port, "tls": "none", "timeout": 10})
        await trio.to_thread.run_sync(proxy.start)
        try:
            started = time.monotonic()
            client = await trio.to_thread.run_sync(lambda: poplib.POP3(HOST, proxy.process.port, timeout=10))
            waited = time.monotonic() - started
            assert b"<" not in client.welcome
            assert 2.0 <= waited < 6.0, waited  # GREETING_WAIT, then greeted without the provider
            await trio.to_thread.run_sync(client.quit)
        finally:
            await trio.to_thread.run_sync(proxy.stop)
