"""Small facts about a client's stream: its peer address, whether an error means the client went away,
TCP_NODELAY."""

from __future__ import annotations

import socket

import trio

__all__ = ["client_gone", "peer_of", "set_nodelay"]


def peer_of(stream: trio.abc.Stream) -> tuple[str, int]:
    inner = stream
    while isinstance(inner, trio.SSLStream):
        inner = inner.transport_stream
    sock = getattr(inner, "socket", None)
    if sock is None:
        return ("", 0)
    try:
        address = sock.getpeername()
    except OSError:
        return ("", 0)
    if isinstance(address, tuple):
        return (address[0], address[1])
    return (str(address), 0)


_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError)


def client_gone(exc: BaseException) -> bool:
    """True when ``exc`` (or every exception of its group) says the client's stream broke or stalled."""
    if isinstance(exc, BaseExceptionGroup):
        matched, rest = exc.split(_GONE)
        return matched is not None and rest is None
    return isinstance(exc, _GONE)


def set_nodelay(stream: trio.abc.Stream) -> None:
    sock = getattr(stream, "socket", None)
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
