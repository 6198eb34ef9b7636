"""The PROXY protocol header (HAProxy's doc/proxy-protocol.txt, versions 1 and 2), without I/O.

A load balancer that speaks it sends one header before the first octet of the client's own: the
client's address and port as the balancer saw them. `parse` reads it from the start of what was
received so far:

- ``None``: not complete yet; `wanted` says how many more octets may be read without reading past
  the end of a version 2 header (a version 1 line has no length: what is read past its CRLF belongs
  to the session, ``data[header.length:]``);
- `ProxyHeaderError`: not a valid header (wrong signature, bad field, too long): drop the connection;
- a `ProxyHeader`: its ``source`` is the client's (host, port), or None when the header carries no
  address to use (v1 ``UNKNOWN``, v2 ``LOCAL``, an unspecified, UNIX or datagram family): the
  connection's own peer address stands.

Bounds: a version 1 line is at most 107 octets with its CRLF (the specification's longest); a version
2 header at most ``max_length`` octets (`V2_MAX_LENGTH`, 536, by default: the 16 fixed octets, the
216 of a UNIX address block and 304 of TLVs), whatever its length field says. TLVs are skipped.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass

V1_PREFIX = b"PROXY "
V1_MAX_LENGTH = 107  # "PROXY UNKNOWN ffff:...:ffff ffff:...:ffff 65535 65535\r\n"
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # signature, version and command, family and protocol, length
V2_MAX_LENGTH = 536

_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")
_V4 = re.compile(rb"[0-9.]{7,15}")
_V6 = re.compile(rb"[0-9A-Fa-f:]{2,39}")
_V2_ADDRESSES = {0x11: (4, 12), 0x21: (16, 36)}  # TCP over IPv4 / IPv6: (address size, block size)


class ProxyHeaderError(ValueError):
    """The octets received are not a valid PROXY protocol header."""


@dataclass(frozen=True)
class ProxyHeader:
    version: int  # 1 or 2
    length: int  # octets of the header itself: what follows belongs to the session
    source: tuple[str, int] | None = None  # the client; None: keep the connection's own peer
    destination: tuple[str, int] | None = None


def parse(data: bytes, max_length: int = V2_MAX_LENGTH) -> ProxyHeader | None:
    """The header at the start of ``data``; None while it is incomplete (see the module docstring)."""
    if not data:
        return None
    if data[:1] == b"P":
        return _parse_v1(data)
    if data[:1] == b"\r":
        return _parse_v2(data, max_length)
    raise ProxyHeaderError("not a PROXY protocol header")


def wanted(data: bytes, max_length: int = V2_MAX_LENGTH) -> int:
    """Octets to read next for ``data`` (a header still incomplete), never past a v2 header's end."""
    if data[:1] == b"P":
        return max(1, V1_MAX_LENGTH - len(data))
    if len(data) < V2_FIXED:
        return V2_FIXED - len(data)
    total = V2_FIXED + struct.unpack_from("!H", data, 14)[0]
    return max(1, min(total, max_length) - len(data))


def _parse_v1(data: bytes) -> ProxyHeader | None:
    head = data[:V1_MAX_LENGTH]
    if not head.startswith(V1_PREFIX[: len(head)]):
        raise ProxyHeaderError("not a PROXY protocol header")
    end = head.find(b"\r\n")
    if end < 0:
        if b"\n" in head or b"\r" in head[:-1]:
            raise ProxyHeaderError("version 1 line not ended by CRLF")
        if len(data) >= V1_MAX_LENGTH:
            raise ProxyHeaderError(f"version 1 line longer than {V1_MAX_LENGTH} octets")
        return None
    line = head[:end]
    if b"\n" in line or b"\r" in line:
        raise ProxyHeaderError("version 1 line not ended by CRLF")
    fields = line.split(b" ")
    length = end + 2
    if fields[1:2] == [b"UNKNOWN"]:
        return ProxyHeader(1, length)  # whatever follows UNKNOWN is ignored
    if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError("version 1 line is not PROXY TCP4|TCP6|UNKNOWN <src> <dst> <sport> <dport>")
    version = 4 if fields[1] == b"TCP4" else 6
    source = _v1_address(fields[2], version), _v1_port(fields[4])
    destination = _v1_address(fields[3], version), _v1_port(fields[5])
    return ProxyHeader(1, length, source, destination)


def _v1_address(text: bytes, version: int) -> str:
    pattern = _V4 if version == 4 else _V6
    try:
        if not pattern.fullmatch(text):
            raise ValueError
        address = ipaddress.ip_address(text.decode("ascii"))
    except ValueError:
        raise ProxyHeaderError(f"version 1 line: {text[:40]!r} is not an IPv{version} address") from None
    if address.version != version:
        raise ProxyHeaderError(f"version 1 line: {text[:40]!r} is not an IPv{version} address")
    return _host(address)


def _v1_port(text: bytes) -> int:
    if not _PORT.fullmatch(text) or int(text) > 65535:
        raise ProxyHeaderError(f"version 1 line: {text[:10]!r} is not a port")
    return int(text)


def _parse_v2(data: bytes, max_length: int) -> ProxyHeader | None:
    signature = data[: len(V2_SIGNATURE)]
    if signature != V2_SIGNATURE[: len(signature)]:
        raise ProxyHeaderError("not a PROXY protocol header")
    if len(data) > 12 and data[12] >> 4 != 2:
        raise ProxyHeaderError(f"version 2 signature with version {data[12] >> 4}")
    if len(data) < V2_FIXED:
        return None
    command, family, size = data[12] & 0x0F, data[13], struct.unpack_from("!H", data, 14)[0]
    total = V2_FIXED + size
    if total > max_length:
        raise ProxyHeaderError(f"version 2 header of {total} octets, more than {max_length}")
    if command > 1:
        raise ProxyHeaderError(f"version 2 command {command} is neither LOCAL nor PROXY")
    if command == 1 and (family >> 4 > 3 or family & 0x0F > 2):
        raise ProxyHeaderError(f"version 2 address family and protocol 0x{family:02x} are not defined")
    if len(data) < total:
        return None
    if command == 0 or family not in _V2_ADDRESSES:
        # LOCAL (the balancer's own connection, e.g. a health check), or an address of a kind that is
        # not TCP over IP: the connection's own endpoints stand (the specification's UNSPEC fallback).
        return ProxyHeader(2, total)
    width, block = _V2_ADDRESSES[family]
    if size < block:
        raise ProxyHeaderError(f"version 2 address block of {size} octets, {block} needed")
    source = ipaddress.ip_address(data[16:16 + width])
    destination = ipaddress.ip_address(data[16 + width:16 + 2 * width])
    source_port, destination_port = struct.unpack_from("!HH", data, 16 + 2 * width)
    return ProxyHeader(2, total, (_host(source), source_port), (_host(destination), destination_port))


def _host(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """The address as the listeners name peers; an IPv4-mapped IPv6 address as its IPv4 form."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)
