"""Reading the PROXY protocol header from a stream (net/proxied.py): trust, time limit, the octets that
follow it, and the stream that gives them back. trio's in-memory streams stand in for sockets; the
listeners themselves are tested with real sockets and HAProxy in tests/integration/test_proxy_protocol.py."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from pop3proxy.net.proxied import PrefixedStream, ProxyPolicy, accept
from pop3proxy.net.proxy_header import V2_SIGNATURE

PROXY = ("127.0.0.1", 50000)
LINE = b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 110\r\n"
V2 = V2_SIGNATURE + b"\x21\x11\x00\x0c" + bytes([192, 0, 2, 7, 127, 0, 0, 1]) + b"\x9c\x40\x00\x6e"
POLICY = ProxyPolicy.of(["127.0.0.1/32", "::1/128"], timeout=5)


def test_trusted_networks():
    policy = ProxyPolicy.of(["10.0.0.0/8", "2001:db8::/32", "127.0.0.1"])
    assert policy.trusts("10.1.2.3") and policy.trusts("127.0.0.1") and policy.trusts("2001:db8::5")
    assert policy.trusts("::ffff:10.1.2.3")  # an IPv4 peer of a dual-stack listener
    assert not policy.trusts("11.0.0.1") and not policy.trusts("127.0.0.2") and not policy.trusts("::1")
    assert not policy.trusts("") and not policy.trusts("not an address")
    assert policy.trusts("2001:db8::5%eth0")


async def _carried(chunks: list[bytes], policy: ProxyPolicy = POLICY, peer=PROXY, close: bool = False):
    """What `accept` makes of ``chunks`` sent one by one, and what the stream still holds afterwards."""
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:

        async def send() -> None:
            for chunk in chunks:
                await client.send_all(chunk)
                await trio.testing.wait_all_tasks_blocked()
            if close:
                await client.aclose()

        nursery.start_soon(send)
        result = await accept(server, peer, policy)
    return result, server


async def _session_octets(received: bytes, stream, size: int) -> bytes:
    """What the session gets: the octets read with the header, then the stream's."""
    while len(received) < size:
        received += await stream.receive_some(100)
    return received


@pytest.mark.parametrize("header", [LINE, V2], ids=["v1", "v2"])
async def test_the_header_gives_the_client_and_the_rest_stays(header):
    (client, received), stream = await _carried([header + b"CAPA\r\n", b"QUIT\r\n"])
    assert client == ("192.0.2.7", 40000)
    if header == V2:
        assert received == b""  # a v2 header is read to its length and no further
    assert await _session_octets(received, stream, 12) == b"CAPA\r\nQUIT\r\n"


async def test_a_header_sent_an_octet_at_a_time():
    (client, received), _ = await _carried([bytes([octet]) for octet in V2 + b"USER"])
    assert client == ("192.0.2.7", 40000)


async def test_local_and_unknown_keep_the_proxys_address():
    local = V2_SIGNATURE + b"\x20\x00\x00\x00"
    assert (await _carried([local]))[0] == (PROXY, b"")
    (client, received), stream = await _carried([b"PROXY UNKNOWN\r\nCAPA\r\n"])
    assert client == PROXY
    assert await _session_octets(received, stream, 6) == b"CAPA\r\n"


@pytest.mark.parametrize("chunks, close, reason", [
    ([b"USER alice\r\n"], False, "invalid PROXY header: not a PROXY protocol header"),
    ([V2[:20]], True, "closed after 20 octets, before a complete PROXY header"),
    ([], True, "closed after 0 octets, before a complete PROXY header"),
    ([b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 110\n"], False, "invalid PROXY header: version 1 line not ended by CRLF"),
])
async def test_refusals_are_one_line(caplog, chunks, close, reason):
    caplog.set_level(logging.INFO)
    assert (await _carried(chunks, close=close))[0] is None
    [record] = caplog.records
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert record.getMessage() == f"POP3 connection from 127.0.0.1 refused: {reason}"


async def test_an_untrusted_peer_is_refused_before_anything_is_read(caplog):
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(LINE)
    policy = ProxyPolicy.of(["10.0.0.0/8"])
    assert await accept(server, PROXY, policy) is None
    assert await server.receive_some(100) == LINE  # not a single octet was taken
    assert "POP3 connection from 127.0.0.1 refused: 127.0.0.1 is not a trusted proxy" in caplog.text


async def test_a_missing_header_times_out(caplog, autojump_clock):
    policy = ProxyPolicy.of(["127.0.0.1/32"], timeout=3)
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(LINE[:10])
    started = trio.current_time()
    assert await accept(server, PROXY, policy) is None
    assert trio.current_time() - started == pytest.approx(3)
    assert "refused: no complete PROXY header within 3 s (10 octets received)" in caplog.text


async def test_a_broken_connection_is_refused(caplog):
    client, server = trio.testing.memory_stream_pair()
    await server.aclose()
    assert await accept(server, PROXY, POLICY) is None
    assert "refused: connection broke before a complete PROXY header (ClosedResourceError)" in caplog.text


async def test_prefixed_stream_gives_back_the_prefix_first():
    client, server = trio.testing.memory_stream_pair()
    stream = PrefixedStream(server, b"abcdef")
    await client.send_all(b"ghi")
    assert await stream.receive_some(4) == b"abcd"
    assert await stream.receive_some() == b"ef"
    assert await stream.receive_some() == b"ghi"
    await stream.send_all(b"back")
    await stream.wait_send_all_might_not_block()
    assert await client.receive_some() == b"back"
    await stream.aclose()
    assert await client.receive_some() == b""
