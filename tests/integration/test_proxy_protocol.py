"""The PROXY protocol on the POP3 listeners, end to end: real clients (poplib) → a real HAProxy
(``send-proxy-v2`` with TLVs, or ``send-proxy``) → a real ``pop3proxy serve`` in proxy mode → a real
Dovecot that trusts pop3proxy's XCLIENT. Clients connect from loopback aliases (127.0.0.2, 127.0.0.3)
so the address HAProxy carries differs from HAProxy's own (127.0.0.1): pop3proxy must log, count and
forward the carried one.

Connections that must be refused (untrusted peer; malformed, truncated, oversized or missing header;
another protocol) come from scripted raw sockets: each is closed without a greeting and logged in one
line, counts as no session, and a good connection afterwards is served as usual.
"""

from __future__ import annotations

import poplib
import re
import socket
import ssl
import struct
import urllib.request

import pytest
from helpers.common import HOST
from helpers.dovecot import running_dovecot
from helpers.haproxy import HAProxy, Route
from helpers.proxy import Proxy, sample
from helpers.waiting import eventually, wait_for

from pop3proxy.net.proxy_header import V2_SIGNATURE


class FromAddress(poplib.POP3):
    """poplib, connecting from a chosen local address."""

    def __init__(self, source: str, host: str, port: int, **kwargs) -> None:
        self.source = source
        super().__init__(host, port, timeout=30, **kwargs)

    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout, source_address=(self.source, 0))


class FromAddressSSL(poplib.POP3_SSL):
    """POP3S from a chosen local address."""

    def __init__(self, source: str, host: str, port: int, context: ssl.SSLContext) -> None:
        self.source = source
        super().__init__(host, port, timeout=30, context=context)

    def _create_socket(self, timeout):
        sock = socket.create_connection((self.host, self.port), timeout, source_address=(self.source, 0))
        return self.context.wrap_socket(sock, server_hostname=self.host)


@pytest.fixture(scope="module")
def trusting_dovecot():
    yield from running_dovecot(pool_size=2, trusted_networks="127.0.0.1/32")


def start_proxy(server_process, tmp_path, dovecot, *, listen=None, tls=False, **sections) -> Proxy:
    listen = {"host": HOST, "port": 0, "proxy_protocol": True, **(listen or {})}
    proxy = Proxy(server_process, tmp_path, dovecot, listen=listen,
                  upstream={"forward_client_address": True}, **sections)
    proxy.process = server_process(proxy.config()).start(tls=tls)
    return proxy


def logins_from(proxy: Proxy, user: str) -> list[str]:
    return re.findall(rf"login {re.escape(repr(user))} from (\S+):", proxy.output())


@pytest.mark.parametrize("version, client", [("v2", "127.0.0.2"), ("v1", "127.0.0.3"), ("v2", "::1"), ("v1", "::1")])
def test_a_client_through_haproxy_is_known_by_its_own_address(server_process, tmp_path, trusting_dovecot,
                                                               version, client):
    user, password = trusting_dovecot.take_user()
    trusting_dovecot.deliver(user, sample(1))
    proxy = start_proxy(server_process, tmp_path, trusting_dovecot)
    before = len(trusting_dovecot.log_text())
    with HAProxy(tmp_path, [Route(proxy.process.port, version, bind=client)]) as haproxy:
        pop = FromAddress(client, client, haproxy.routes[0].port)
        assert pop.user(user).startswith(b"+OK")
        assert pop.pass_(password).startswith(b"+OK")
        assert pop.stat()[0] == 1
        assert b"\r\n".join(pop.retr(1)[1]) + b"\r\n" == sample(1)
        pop.quit()
    wait_for(proxy, f"session end user={user!r} peer={client} ")
    assert logins_from(proxy, user) == [client]
    if client != "::1":  # the provider was told the client's address, not pop3proxy's (XCLIENT)
        eventually(lambda: f"user=<{user}>" in trusting_dovecot.log_text()[before:])
        logins = [line for line in trusting_dovecot.log_text()[before:].splitlines() if f"user=<{user}>" in line]
        assert logins and all(f"rip={client}" in line for line in logins), logins
    proxy.stop()


def test_sessions_per_address_count_the_carried_address(server_process, tmp_path, trusting_dovecot):
    proxy = start_proxy(server_process, tmp_path, trusting_dovecot, listen={"max_sessions_per_address": 1})
    with HAProxy(tmp_path, [Route(proxy.process.port)]) as haproxy:
        port = haproxy.routes[0].port
        first = FromAddress("127.0.0.2", HOST, port)
        second = FromAddress("127.0.0.3", HOST, port)  # all of them come from HAProxy's 127.0.0.1
        assert first.welcome.startswith(b"+OK") and second.welcome.startswith(b"+OK")
        with pytest.raises(poplib.error_proto, match=r"-ERR \[SYS/TEMP\] too many sessions from your address"):
            FromAddress("127.0.0.2", HOST, port)
        first.quit()
        second.quit()
    proxy.stop()


def test_implicit_tls_and_stls_through_haproxy(server_process, tmp_path, trusting_dovecot, server_cert):
    certfile, keyfile, ca_file = server_cert
    user, password = trusting_dovecot.take_user()
    proxy = start_proxy(server_process, tmp_path, trusting_dovecot, tls=True, listen={
        "tls_port": 0, "certfile": str(certfile), "keyfile": str(keyfile), "allow_plaintext_auth": "never"})
    context = ssl.create_default_context(cafile=str(ca_file))
    routes = [Route(proxy.process.tls_port, "v2"), Route(proxy.process.port, "v1")]
    with HAProxy(tmp_path, routes) as haproxy:
        pop3s = FromAddressSSL("127.0.0.2", HOST, routes[0].port, context)  # header, then TLS
        pop3s.user(user)
        assert pop3s.pass_(password).startswith(b"+OK")
        pop3s.quit()
        plain = FromAddress("127.0.0.3", HOST, routes[1].port)
        plain.stls(context)
        plain.user(user)
        assert plain.pass_(password).startswith(b"+OK")
        plain.quit()
        assert haproxy.process is not None
    assert logins_from(proxy, user) == ["127.0.0.2", "127.0.0.3"]
    proxy.stop()


def handshake_sent_with_the_header(port: int, header: bytes, context: ssl.SSLContext) -> bytes:
    """A TLS client whose ClientHello goes in the same segment as ``header``; returns the greeting."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=HOST)
    with socket.create_connection((HOST, port), timeout=30) as sock:
        first = True
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall((header if first else b"") + outgoing.read())
                first = False
                data = sock.recv(65536)
                assert data, "the server closed the connection during the handshake"
                incoming.write(data)
        sock.sendall(outgoing.read())
        greeting = b""
        while not greeting.endswith(b"\r\n"):
            try:
                greeting += tls.read(4096)
            except ssl.SSLWantReadError:
                incoming.write(sock.recv(65536))
        return greeting


def test_a_tls_handshake_sent_with_the_header_is_not_lost(server_process, tmp_path, trusting_dovecot, server_cert):
    certfile, keyfile, ca_file = server_cert
    proxy = start_proxy(server_process, tmp_path, trusting_dovecot, tls=True, listen={
        "tls_port": 0, "certfile": str(certfile), "keyfile": str(keyfile)})
    context = ssl.create_default_context(cafile=str(ca_file))
    for header in (b"PROXY TCP4 127.0.0.7 127.0.0.1 40000 995\r\n", v2_header("127.0.0.8")):
        assert handshake_sent_with_the_header(proxy.process.tls_port, header, context).startswith(b"+OK")
    proxy.stop()


def test_worker_processes_behind_haproxy(server_process, tmp_path, trusting_dovecot):
    user, password = trusting_dovecot.take_user()
    proxy = start_proxy(server_process, tmp_path, trusting_dovecot, listen={"workers": 2})
    sources = ["127.0.0.2", "127.0.0.3"] * 3
    with HAProxy(tmp_path, [Route(proxy.process.port)]) as haproxy:
        for source in sources:
            pop = FromAddress(source, HOST, haproxy.routes[0].port)
            pop.user(user)
            assert pop.pass_(password).startswith(b"+OK")
            pop.quit()
    assert sorted(logins_from(proxy, user)) == sorted(sources)
    proxy.stop()


# --- refused connections -------------------------------------------------------------------------


def v2_header(source: str, port: int = 40000, extra: bytes = b"") -> bytes:
    block = socket.inet_aton(source) + socket.inet_aton(HOST) + struct.pack("!HH", port, 110) + extra
    return V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(block)) + block


def refused(port: int, send: bytes, *, half_close: bool = False) -> bytes:
    """Connect, send, and read until the server closes: what it said (nothing, for a refusal)."""
    with socket.create_connection((HOST, port), timeout=30) as sock:
        if send:
            sock.sendall(send)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        got = b""
        try:
            while chunk := sock.recv(4096):
                got += chunk
        except ConnectionResetError:  # closed with octets of ours unread: a reset instead of a FIN
            pass
        return got


def talk(port: int, first: bytes, replies: int) -> list[bytes]:
    """Send ``first`` in one segment (a header with pipelined commands) and read ``replies`` replies."""
    with socket.create_connection((HOST, port), timeout=30) as sock:
        sock.sendall(first)
        reader = sock.makefile("rb")
        lines = []
        for _ in range(replies):
            line = reader.readline()
            lines.append(line)
            if line.startswith(b"+OK") and b"capability" in line.lower():  # CAPA: read to its end
                while (more := reader.readline()) not in (b".\r\n", b""):
                    lines.append(more)
        return lines


def sessions_counted(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://{HOST}:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    match = re.search(r"^pop3proxy_sessions_total (\S+)$", text, re.MULTILINE)
    assert match, text
    return float(match.group(1))


CASES = [
    (b"USER alice\r\n", False, "invalid PROXY header: not a PROXY protocol header"),
    (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", False, "invalid PROXY header: not a PROXY protocol header"),
    (b"PROXY TCP4 192.0.2.7 127.0.0.1 40000\r\n", False, "invalid PROXY header: version 1 line is not PROXY"),
    (b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 110\n", False, "invalid PROXY header: version 1 line not ended by CRLF"),
    (V2_SIGNATURE + b"\x22\x11\x00\x0c" + b"\0" * 12, False, "invalid PROXY header: version 2 command 2"),
    (V2_SIGNATURE + b"\x21\x11\x02\x09", False, "invalid PROXY header: version 2 header of 537 octets, more than 536"),
    (v2_header("192.0.2.7")[:20], True, "closed after 20 octets, before a complete PROXY header"),
    (b"PROXY TCP4 192.0.2.7", True, "closed after 20 octets, before a complete PROXY header"),
    (b"", False, "no complete PROXY header within 1 s (0 octets received)"),
    (b"PROXY TCP4 192.0.2.7 ", False, "no complete PROXY header within 1 s (21 octets received)"),
]


def test_malformed_truncated_and_missing_headers_are_closed_without_a_greeting(server_process, tmp_path,
                                                                              trusting_dovecot):
    proxy = start_proxy(server_process, tmp_path, trusting_dovecot, listen={"proxy_protocol_timeout": 1},
                        metrics={"host": HOST, "port": 0})
    metrics_port = int(wait_for(proxy, re.compile(r"listening for metrics on \S+ port (\d+)")).group(1))
    port = proxy.process.port
    for send, half_close, reason in CASES:
        assert refused(port, send, half_close=half_close) == b"", send  # not a word, not even a greeting
        wait_for(proxy, f"POP3 connection from 127.0.0.1 refused: {reason}")
    assert sessions_counted(metrics_port) == 0
    # a good header afterwards, with commands sent in the same segment: served, as the carried address
    remote = talk(port, v2_header("192.0.2.7") + b"CAPA\r\nQUIT\r\n", 3)
    assert remote[0].startswith(b"+OK") and remote[-1].startswith(b"+OK")
    assert b"USER\r\n" not in remote  # 192.0.2.7 is not loopback: no password before TLS
    # a v1 line is read past its end: the commands read with it reach the session all the same
    local = talk(port, b"PROXY TCP4 127.0.0.9 127.0.0.1 40000 110\r\nCAPA\r\nQUIT\r\n", 3)
    assert b"USER\r\n" in local  # the carried loopback client may (allow_plaintext_auth = "loopback")
    eventually(lambda: sessions_counted(metrics_port) == 2)
    output = proxy.output()
    assert output.count(" refused: ") == len(CASES)
    assert "Traceback" not in output and "session error" not in output
    proxy.stop()


def test_an_untrusted_peer_is_closed_without_a_greeting(server_process, tmp_path, trusting_dovecot):
    proxy = start_proxy(server_process, tmp_path, trusting_dovecot, listen={"trusted_proxies": ["10.0.0.0/8"]})
    assert refused(proxy.process.port, v2_header("192.0.2.7") + b"CAPA\r\n") == b""
    wait_for(proxy, "POP3 connection from 127.0.0.1 refused: 127.0.0.1 is not a trusted proxy (listen.trusted_proxies)")
    with HAProxy(tmp_path, [Route(proxy.process.port)]) as haproxy:  # HAProxy at 127.0.0.1 is not trusted either
        with pytest.raises((poplib.error_proto, OSError)):
            FromAddress("127.0.0.2", HOST, haproxy.routes[0].port)
    eventually(lambda: proxy.output().count(" refused: ") == 2, message="two refusals logged")
    assert "Traceback" not in proxy.output()
    proxy.stop()
