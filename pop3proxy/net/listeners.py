"""Listening sockets and the accept loop: one task per listener, each connection in its own task."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial

import trio

from pop3proxy.net.pop3_server import ServerState, handle_stream

log = logging.getLogger("pop3proxy")


async def serve_listeners(
    state: ServerState,
    plain: Sequence[trio.abc.Listener] = (),
    implicit_tls: Sequence[trio.abc.Listener] = (),
) -> None:
    """Serve until cancelled; one handler task per connection, errors contained per connection."""
    async with trio.open_nursery() as nursery:
        for listener in plain:
            nursery.start_soon(trio.serve_listeners, partial(handle_stream, state), [listener])
        for listener in implicit_tls:
            nursery.start_soon(
                trio.serve_listeners, partial(handle_stream, state, implicit_tls=True), [listener]
            )


async def open_listeners(host: str, port: int) -> list[trio.SocketListener]:
    return await trio.open_tcp_listeners(port, host=host)


def listener_port(listeners: Sequence[trio.SocketListener]) -> int:
    return listeners[0].socket.getsockname()[1]

