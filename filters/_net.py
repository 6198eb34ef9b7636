"""Blocking socket helpers shared by the filters that talk to a scanning daemon (spamd, clamd).

Filters run in worker threads, so plain blocking sockets with timeouts are the simplest correct
tool. An address is ``host:port`` (``[v6addr]:port`` for IPv6) or the absolute path of a unix socket.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class Address:
    """Where a daemon listens: a TCP host and port, or a unix socket path."""

    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.path:
            return self.path
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str) -> Address:
    """``host:port``, ``[v6]:port`` or ``/path/to/socket``; ValueError otherwise."""
    text = text.strip()
    if text.startswith("/"):
        return Address(path=text)
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"bad address {text!r}: expected [v6addr]:port")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"bad address {text!r}: expected host:port or /path/to/socket")
    if not host:
        raise ValueError(f"bad address {text!r}: no host")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad address {text!r}: the port must be a number from 1 to 65535")
    return Address(host=host, port=int(port_text))


def connect(address: Address, timeout: float) -> socket.socket:
    """A connected socket whose every later operation times out after ``timeout`` seconds.

    Raises OSError (``TimeoutError`` for a timeout) like ``socket`` does.
    """
    if address.path:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(address.path)
        except BaseException:
            sock.close()
            raise
        return sock
    sock = socket.create_connection((address.host, address.port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def read_until_eof(sock: socket.socket, limit: int) -> bytes:
    """Everything the peer sends until it closes; more than ``limit`` octets is a ValueError."""
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > limit:
            raise ValueError(f"reply longer than {limit} octets")
        chunks.append(chunk)
