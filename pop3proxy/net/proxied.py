"""Connections from a load balancer that speaks the PROXY protocol (``listen.proxy_protocol``).

Before anything else, even a TLS handshake, the connection must come from ``listen.trusted_proxies``
and start with a complete, valid header (`proxy_header`) within ``listen.proxy_protocol_timeout``
seconds; otherwise it is closed without a greeting, and one line is logged. The header's client
address then stands for the connection everywhere: the gate (sessions per address, the login
throttle), the plain-text login rule, logs, metrics and XCLIENT towards the provider.

Octets that came after the header belong to the session: a client may write at once, before the
greeting. The listeners feed them to the POP3 session (plain) or put them back in front of the
stream (`PrefixedStream`, for a TLS handshake that follows the header).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import trio

from pop3proxy.net.proxy_header import V2_MAX_LENGTH, ProxyHeader, ProxyHeaderError, parse, wanted

log = logging.getLogger("pop3proxy")

DEFAULT_TIMEOUT = 5.0  # seconds; the specification asks for at least 3 (a TCP retransmission)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class ProxyPolicy:
    """Who may send a header, how long it may take and how long it may be."""

    trusted: tuple[Network, ...]
    timeout: float = DEFAULT_TIMEOUT
    max_length: int = V2_MAX_LENGTH

    @classmethod
    def of(cls, networks: Iterable[str], timeout: float = DEFAULT_TIMEOUT) -> ProxyPolicy:
        return cls(tuple(ipaddress.ip_network(n, strict=False) for n in networks), timeout)

    def trusts(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            return False  # no network peer (a unix socket, an in-memory stream): nobody to trust
        candidates = [address]
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            candidates.append(address.ipv4_mapped)  # a dual-stack listener's IPv4 peer
        return any(a in network for a in candidates for network in self.trusted)


class _Refused(Exception):
    pass


async def read_header(stream: trio.abc.ReceiveStream, policy: ProxyPolicy) -> tuple[ProxyHeader, bytes]:
    """The header and the octets received after it. Raises `ProxyHeaderError` for an invalid one and
    `_Refused` when none came complete in time."""
    data = b""
    with trio.move_on_after(policy.timeout):
        while (header := parse(data, policy.max_length)) is None:
            chunk = await stream.receive_some(wanted(data, policy.max_length))
            if not chunk:
                raise _Refused(f"closed after {len(data)} octets, before a complete PROXY header")
            data += chunk
        return header, data[header.length:]
    raise _Refused(f"no complete PROXY header within {policy.timeout:g} s ({len(data)} octets received)")


async def accept(stream: trio.abc.ReceiveStream, peer: tuple[str, int], policy: ProxyPolicy,
                 service: str = "POP3") -> tuple[tuple[str, int], bytes] | None:
    """The client's address and the octets after the header; None when the connection is refused
    (logged here, in one line): it is then to be closed without a word."""
    if not policy.trusts(peer[0]):
        reason = f"{peer[0] or 'its peer'} is not a trusted proxy (listen.trusted_proxies)"
    else:
        try:
            header, rest = await read_header(stream, policy)
        except ProxyHeaderError as exc:
            reason = f"invalid PROXY header: {exc}"
        except _Refused as exc:
            reason = str(exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            reason = f"connection broke before a complete PROXY header ({type(exc).__name__})"
        else:
            return (header.source or peer), rest
    log.warning("%s connection from %s refused: %s", service, peer[0] or "?", reason,
                extra={"peer": peer[0], "result": "refused"})
    return None


class PrefixedStream(trio.abc.Stream):
    """A stream whose first octets were already received (they came with the PROXY header)."""

    def __init__(self, stream: trio.abc.Stream, prefix: bytes) -> None:
        self.stream = stream
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._prefix:
            await trio.lowlevel.checkpoint()
            size = len(self._prefix) if max_bytes is None else max_bytes
            data, self._prefix = self._prefix[:size], self._prefix[size:]
            return data
        return await self.stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.stream.aclose()
