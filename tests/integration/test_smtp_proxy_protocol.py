"""The PROXY protocol on the SMTP relay (``smtp.proxy_protocol``): real clients (smtplib) → a real HAProxy
(``send-proxy-v2``, ``send-proxy``) → the relay (in-process, as in test_smtp.py) → a real SMTP provider.
The relay takes the client's address from the header (for its logs and its plain-text AUTH rule, also
after STARTTLS); connections without a valid header in time, or from an untrusted peer, are closed
without a greeting and logged in one line each."""

from __future__ import annotations

import logging
import smtplib
import socket
import ssl
import struct
from functools import partial

import pytest
import trio
from helpers.common import HOST
from helpers.haproxy import HAProxy, Route
from helpers.smtp_fixtures import (  # noqa: F401  (fixtures)
    PROVIDER_USER,
    Client,
    message,
    provider,
    relay_config,
    running_relay,
)
from helpers.waiting import wait_for_async

from pop3proxy.config import load_settings
from pop3proxy.net.proxy_header import V2_SIGNATURE


class ClientFrom(Client):
    """`Client` (STARTTLS, then AUTH) connecting from a chosen loopback address."""

    def __init__(self, source: str, port: int, ca_file) -> None:
        self.smtp = smtplib.SMTP(HOST, port, local_hostname="client.test", timeout=30, source_address=(source, 0))
        self.smtp.ehlo()
        self.smtp.starttls(context=ssl.create_default_context(cafile=str(ca_file)))
        self.smtp.ehlo()


def submit_from(source: str, port: int, ca_file, data: bytes):
    client = ClientFrom(source, port, ca_file)
    try:
        return client.auth(), client.send(data)
    finally:
        client.close()


def proxied_settings(tmp_path, provider, server_cert, **listen):
    listen = {"proxy_protocol_timeout": 1, **listen}
    return load_settings(relay_config(tmp_path, provider, server_cert, smtp={"proxy_protocol": True}, listen=listen))


@pytest.mark.parametrize("version", ["v2", "v1"])
async def test_a_client_through_haproxy_is_known_by_its_own_address(tmp_path, provider, server_cert, caplog,
                                                                    version):
    caplog.set_level(logging.INFO)
    settings = proxied_settings(tmp_path, provider, server_cert)
    data = message(f"through haproxy {version}")
    async with running_relay(settings) as port:
        haproxy = HAProxy(tmp_path, [Route(port, version)])
        await trio.to_thread.run_sync(haproxy.start)
        try:
            auth, reply = await trio.to_thread.run_sync(
                partial(submit_from, "127.0.0.2", haproxy.routes[0].port, server_cert[2], data))
        finally:
            await trio.to_thread.run_sync(haproxy.stop)
    assert auth[0] == 235 and reply[0] == 250
    assert [m.data for m in provider.received()] == [data]
    # AUTH came after STARTTLS (a new aiosmtpd session): the carried address held
    assert f"smtp login {PROVIDER_USER!r} from 127.0.0.2 via" in caplog.text
    assert "smtp login" in caplog.text and "from 127.0.0.1" not in caplog.text.split("smtp login", 1)[1]
    assert " refused: " not in caplog.text


def ehlo_after(port: int, header: bytes) -> bytes:
    """The EHLO reply after ``header``: what the relay offers that client before TLS."""
    with socket.create_connection((HOST, port), timeout=30) as sock:
        sock.sendall(header)
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"220")
        sock.sendall(b"EHLO client.test\r\n")
        reply = b""
        while not (line := reader.readline()).startswith(b"250 "):
            assert line, reply
            reply += line
        sock.sendall(b"QUIT\r\n")
        return reply + line


async def test_plain_text_auth_follows_the_carried_address(tmp_path, provider, server_cert):
    settings = proxied_settings(tmp_path, provider, server_cert)  # allow_plaintext_auth = "loopback"
    async with running_relay(settings) as port:
        remote = await trio.to_thread.run_sync(ehlo_after, port, b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 587\r\n")
        local = await trio.to_thread.run_sync(ehlo_after, port, b"PROXY TCP4 127.0.0.9 127.0.0.1 40000 587\r\n")
    assert b"STARTTLS" in remote and b"AUTH" not in remote  # 192.0.2.7 is not loopback, HAProxy's 127.0.0.1 is
    assert b"AUTH" in local


def refused(port: int, send: bytes, half_close: bool = False) -> bytes:
    """Connect, send, and read until the relay closes: what it said (nothing, for a refusal)."""
    with socket.create_connection((HOST, port), timeout=30) as sock:
        if send:
            sock.sendall(send)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        got = b""
        try:
            while chunk := sock.recv(4096):
                got += chunk
        except ConnectionResetError:  # closed with octets of ours unread
            pass
        return got


def v2(command: int, block: bytes) -> bytes:
    return V2_SIGNATURE + bytes([0x20 | command, 0x11]) + struct.pack("!H", len(block)) + block


IPV4 = socket.inet_aton("192.0.2.7") + socket.inet_aton(HOST) + struct.pack("!HH", 40000, 587)
CASES = [
    (b"EHLO client.test\r\n", False, "invalid PROXY header: PROXY unrecognized signature"),
    (v2(2, IPV4), False, "invalid PROXY header: PROXYv2 unsupported command"),
    (v2(1, IPV4 + b"\x04" + struct.pack("!H", 600) + b"\0" * 600), False,
     "invalid PROXY header: longer than 536 octets"),
    (b"PROXY TCP4 192.0.2.7", True, "closed before a complete PROXY header"),
    (b"", False, "no complete PROXY header within 1 s"),
]


async def test_no_valid_header_in_time_is_refused_without_a_greeting(tmp_path, provider, server_cert, caplog):
    caplog.set_level(logging.INFO)
    settings = proxied_settings(tmp_path, provider, server_cert)
    async with running_relay(settings) as port:
        for send, half_close, reason in CASES:
            assert await trio.to_thread.run_sync(refused, port, send, half_close) == b"", send
            await wait_for_async(lambda: caplog.text, f"SMTP connection from 127.0.0.1 refused: {reason}")
        # and a good one afterwards, through HAProxy
        haproxy = HAProxy(tmp_path, [Route(port)])
        await trio.to_thread.run_sync(haproxy.start)
        try:
            auth, reply = await trio.to_thread.run_sync(
                partial(submit_from, "127.0.0.3", haproxy.routes[0].port, server_cert[2], message("after")))
        finally:
            await trio.to_thread.run_sync(haproxy.stop)
    assert auth[0] == 235 and reply[0] == 250
    refusals = [r for r in caplog.records if " refused: " in r.getMessage()]
    assert len(refusals) == len(CASES) and all(r.exc_info is None for r in refusals)
    # aiosmtpd's own lines about the header are not added to ours (the test provider's aiosmtpd warns of
    # something else: Session.login_data)
    assert not [r for r in caplog.records if r.name.startswith("mail.") and "proxy" in r.getMessage().lower()]


async def test_an_untrusted_peer_is_refused_at_once(tmp_path, provider, server_cert, caplog):
    settings = proxied_settings(tmp_path, provider, server_cert, trusted_proxies=["10.0.0.0/8"])
    async with running_relay(settings) as port:
        got = await trio.to_thread.run_sync(refused, port, b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 587\r\n")
        assert got == b""
        await wait_for_async(lambda: caplog.text, "SMTP connection from 127.0.0.1 refused: 127.0.0.1 is not a "
                                                  "trusted proxy (listen.trusted_proxies)")
    assert "PROXY header" not in caplog.text  # refused before any of it was read
