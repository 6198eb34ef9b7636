"""The PROXY protocol header parser (net/proxy_header.py): versions 1 and 2, what it accepts, where the
session's own octets start, and every malformed, truncated or oversized form refused."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pop3proxy.net.proxy_header import (
    V1_MAX_LENGTH,
    V2_MAX_LENGTH,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    parse,
    wanted,
)

SESSION = b"USER alice\r\n"  # what a client sends right after the header


def v2(command: int = 1, family: int = 0x11, block: bytes = b"", *, version: int = 2, length: int | None = None) -> bytes:
    size = len(block) if length is None else length
    return V2_SIGNATURE + bytes([version << 4 | command, family]) + struct.pack("!H", size) + block


def ipv4_block(src="192.0.2.7", dst="198.51.100.1", sport=40000, dport=110) -> bytes:
    return ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed + struct.pack("!HH", sport, dport)


def ipv6_block(src="2001:db8::7", dst="2001:db8::1", sport=40000, dport=995) -> bytes:
    return ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed + struct.pack("!HH", sport, dport)


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def complete(data: bytes) -> ProxyHeader:
    header = parse(data)
    assert header is not None
    return header


# --- version 1 -----------------------------------------------------------------------------------


def test_v1_tcp4_carries_the_client_and_keeps_what_follows():
    line = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 110\r\n"
    header = complete(line + SESSION)
    assert header == ProxyHeader(1, len(line), ("192.0.2.7", 40000), ("198.51.100.1", 110))
    assert (line + SESSION)[header.length:] == SESSION


@pytest.mark.parametrize("src, dst", [
    ("2001:db8::7", "2001:db8::1"),
    ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "FFFF:FFFF:FFFF:FFFF:FFFF:FFFF:FFFF:FFFF"),  # the longest line
    ("::1", "::"),
])
def test_v1_tcp6(src, dst):
    line = f"PROXY TCP6 {src} {dst} 65535 0\r\n".encode()
    header = complete(line)
    assert header.source == (str(ipaddress.IPv6Address(src)), 65535)
    assert header.destination == (str(ipaddress.IPv6Address(dst)), 0)
    assert header.length == len(line) <= V1_MAX_LENGTH


def test_v1_ipv4_mapped_source_is_named_as_ipv4():
    assert complete(b"PROXY TCP6 ::ffff:c000:207 ::1 1 2\r\n").source == ("192.0.2.7", 1)


@pytest.mark.parametrize("line", [
    b"PROXY UNKNOWN\r\n",
    b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
    b"PROXY UNKNOWN whatever the sender wrote\r\n",
])
def test_v1_unknown_keeps_the_connections_address(line):
    assert len(line) <= V1_MAX_LENGTH
    header = complete(line + SESSION)
    assert header == ProxyHeader(1, len(line))  # no source: the socket's peer stands


def test_v1_longest_line_is_accepted_and_one_octet_more_is_not():
    longest = b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 16) + b"\r\n"
    assert len(longest) == V1_MAX_LENGTH
    assert complete(longest + SESSION).length == V1_MAX_LENGTH
    too_long = b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 15) + b"\r\n"
    with pytest.raises(ProxyHeaderError, match="longer than 107"):
        parse(too_long)
    with pytest.raises(ProxyHeaderError, match="longer than 107"):  # refused once 107 octets hold no CRLF
        parse(too_long[:V1_MAX_LENGTH])


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 110\r\n",
    b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 995\r\n",
    b"PROXY UNKNOWN\r\n",
])
def test_v1_every_prefix_is_incomplete(line):
    for end in range(len(line)):
        assert parse(line[:end]) is None, line[:end]
        assert wanted(line[:end]) >= 1


@pytest.mark.parametrize("line, reason", [
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 110\n", "CRLF"),  # a bare LF
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 110\r", None),  # a lone CR at the end: incomplete, see below
    (b"PROXY TCP4 192.0.2.7\r198.51.100.1 40000 110\r\n", "CRLF"),
    (b"proxy TCP4 192.0.2.7 198.51.100.1 40000 110\r\n", "not a PROXY"),
    (b"PROXYTCP4 192.0.2.7 198.51.100.1 40000 110\r\n", "not a PROXY"),
    (b"PROXY  TCP4 192.0.2.7 198.51.100.1 40000 110\r\n", "PROXY TCP4"),
    (b"PROXY TCP5 192.0.2.7 198.51.100.1 40000 110\r\n", "PROXY TCP4"),
    (b"PROXY UDP4 192.0.2.7 198.51.100.1 40000 110\r\n", "PROXY TCP4"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 40000\r\n", "PROXY TCP4"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 110 extra\r\n", "PROXY TCP4"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 110 \r\n", "PROXY TCP4"),
    (b"PROXY TCP4 192.0.2.07 198.51.100.1 40000 110\r\n", "IPv4"),  # heading zeroes are not permitted
    (b"PROXY TCP4 192.0.2.256 198.51.100.1 40000 110\r\n", "IPv4"),
    (b"PROXY TCP4 2001:db8::7 198.51.100.1 40000 110\r\n", "IPv4"),
    (b"PROXY TCP6 192.0.2.7 2001:db8::1 40000 110\r\n", "IPv6"),
    (b"PROXY TCP6 fe80::1%eth0 2001:db8::1 40000 110\r\n", "IPv6"),
    (b"PROXY TCP6 2001:db8:::7 2001:db8::1 40000 110\r\n", "IPv6"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 040000 110\r\n", "port"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 110\r\n", "port"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 -1 110\r\n", "port"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 +1 110\r\n", "port"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 4\xd90 110\r\n", "port"),
    (b"PROXY TCP4 \xc0\x00\x02\x07 198.51.100.1 40000 110\r\n", "IPv4"),
])
def test_v1_malformed_lines_are_refused(line, reason):
    if reason is None:
        assert parse(line) is None  # might still become a CRLF
        with pytest.raises(ProxyHeaderError, match="CRLF"):
            parse(line + b"x")
        return
    with pytest.raises(ProxyHeaderError, match=reason):
        parse(line + SESSION)


# --- version 2 -----------------------------------------------------------------------------------


def test_v2_tcp_over_ipv4_keeps_what_follows():
    header = v2(block=ipv4_block())
    parsed = complete(header + SESSION)
    assert parsed == ProxyHeader(2, len(header), ("192.0.2.7", 40000), ("198.51.100.1", 110))
    assert (header + SESSION)[parsed.length:] == SESSION


def test_v2_tcp_over_ipv6():
    header = v2(family=0x21, block=ipv6_block())
    assert complete(header) == ProxyHeader(2, 16 + 36, ("2001:db8::7", 40000), ("2001:db8::1", 995))


def test_v2_ipv4_mapped_source_is_named_as_ipv4():
    header = v2(family=0x21, block=ipv6_block(src="::ffff:192.0.2.7"))
    assert complete(header).source == ("192.0.2.7", 40000)


def test_v2_tlvs_are_skipped():
    tlvs = tlv(0x03, b"\x00\x00\x00\x00") + tlv(0x05, b"unique-id") + tlv(0x04, b"")
    header = v2(block=ipv4_block() + tlvs)
    parsed = complete(header + SESSION)
    assert parsed.source == ("192.0.2.7", 40000)
    assert parsed.length == len(header)


@pytest.mark.parametrize("family, block", [
    (0x11, ipv4_block()),  # LOCAL with an address block: ignored all the same
    (0x00, b""),
    (0x77, b"\x01\x02"),  # LOCAL: the family is not even looked at
])
def test_v2_local_keeps_the_connections_address(family, block):
    header = v2(command=0, family=family, block=block)
    assert complete(header + SESSION) == ProxyHeader(2, len(header))


@pytest.mark.parametrize("family, block", [
    (0x00, b""),  # AF_UNSPEC
    (0x00, ipv4_block()),
    (0x12, ipv4_block()),  # UDP over IPv4
    (0x22, ipv6_block()),  # UDP over IPv6
    (0x31, b"/run/a.sock".ljust(108, b"\0") + b"/run/b.sock".ljust(108, b"\0")),  # UNIX stream
    (0x32, b"\0" * 216),
])
def test_v2_proxy_of_another_kind_keeps_the_connections_address(family, block):
    header = v2(family=family, block=block)
    assert complete(header + SESSION) == ProxyHeader(2, len(header))


def test_v2_header_at_the_limit_is_accepted_and_one_octet_more_is_not():
    at_limit = v2(block=ipv4_block() + tlv(0x04, b"\0" * (V2_MAX_LENGTH - 16 - 12 - 3)))
    assert len(at_limit) == V2_MAX_LENGTH == 536
    assert complete(at_limit + SESSION).length == V2_MAX_LENGTH
    over = v2(block=ipv4_block() + tlv(0x04, b"\0" * (V2_MAX_LENGTH - 16 - 12 - 2)))
    with pytest.raises(ProxyHeaderError, match="537 octets, more than 536"):
        parse(over)
    with pytest.raises(ProxyHeaderError, match="more than 536"):  # known from the 16 fixed octets alone
        parse(over[:16])
    with pytest.raises(ProxyHeaderError, match="65551 octets"):
        parse(v2(length=0xFFFF))
    assert parse(at_limit, max_length=600) is not None
    with pytest.raises(ProxyHeaderError, match="more than 100"):
        parse(at_limit, max_length=100)


@pytest.mark.parametrize("header", [
    v2(block=ipv4_block()),
    v2(family=0x21, block=ipv6_block() + tlv(0x05, b"id")),
    v2(command=0, family=0x00),
])
def test_v2_every_prefix_is_incomplete_and_nothing_past_the_header_is_wanted(header):
    for end in range(len(header)):
        prefix = header[:end]
        assert parse(prefix) is None
        assert 1 <= wanted(prefix) <= len(header) - end  # never a read past the header's end


@pytest.mark.parametrize("header, reason", [
    (v2(version=1, block=ipv4_block()), "version 1"),
    (v2(version=3, block=ipv4_block()), "version 3"),
    (v2(command=2, block=ipv4_block()), "command 2"),
    (v2(command=0xF, block=ipv4_block()), "command 15"),
    (v2(family=0x41, block=ipv4_block()), "0x41"),
    (v2(family=0x13, block=ipv4_block()), "0x13"),
    (v2(family=0x11, block=ipv4_block()[:8]), "12 needed"),
    (v2(family=0x21, block=ipv4_block()), "36 needed"),
    (b"\r\n\r\n\x00\r\nQUIX\n" + v2(block=ipv4_block())[12:], "not a PROXY"),
    (b"\r\n\r\n\x01" + v2(block=ipv4_block())[5:], "not a PROXY"),
])
def test_v2_malformed_headers_are_refused(header, reason):
    with pytest.raises(ProxyHeaderError, match=reason):
        parse(header + SESSION)


def test_v2_a_wrong_version_is_refused_before_the_rest_arrives():
    with pytest.raises(ProxyHeaderError, match="version 1"):
        parse(V2_SIGNATURE + b"\x11")


# --- neither -------------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [
    SESSION,  # a POP3 client that was not told about the balancer
    b"CAPA\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello
    b"\x00",
    b"GET / HTTP/1.1\r\n",
    b"\n",
    b"\r\r",
])
def test_other_protocols_are_refused_from_their_first_octets(data):
    with pytest.raises(ProxyHeaderError):
        parse(data)


def test_nothing_yet_is_incomplete():
    assert parse(b"") is None
    assert wanted(b"") == 16  # as much as the shortest v2 header, and no more


@given(st.binary(max_size=700))
def test_any_octets_give_a_header_none_or_a_refusal(data):
    try:
        header = parse(data)
    except ProxyHeaderError:
        return
    if header is None:
        assert len(data) < V2_MAX_LENGTH
        assert wanted(data) >= 1
    else:
        assert header.version in (1, 2) and header.length <= len(data)
        assert header.length <= (V1_MAX_LENGTH if header.version == 1 else V2_MAX_LENGTH)


@given(st.sampled_from([b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 110\r\n", v2(block=ipv4_block() + tlv(4, b"x"))]),
       st.binary(max_size=200))
def test_what_follows_a_header_never_changes_it(header, rest):
    assert complete(header + rest) == complete(header)
