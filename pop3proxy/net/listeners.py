"""Listening sockets and the accept loop: one task per listener, each connection in its own task."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial

import trio

from pop3proxy.net.pop3_server import ServerState, handle_stream

log = logging.getLogger("pop3proxy")

DRAIN_POLL = 0.05  # seconds between looks at the sessions left while draining
DRAIN_GRACE = 5.0  # seconds a session told to end has to do so before the service stops anyway


async def serve_listeners(
    state: ServerState,
    plain: Sequence[trio.abc.Listener] = (),
    implicit_tls: Sequence[trio.abc.Listener] = (),
) -> None:
    """Serve until cancelled; one handler task per connection, errors contained per connection.
    Cancelling ``state.accepting`` closes the listeners and lets the sessions go on (a drain)."""
    async with trio.open_nursery() as sessions:
        with state.accepting:
            async with trio.open_nursery() as nursery:
                for listener in plain:
                    nursery.start_soon(partial(trio.serve_listeners, partial(handle_stream, state), [listener],
                                               handler_nursery=sessions))
                for listener in implicit_tls:
                    nursery.start_soon(partial(trio.serve_listeners,
                                               partial(handle_stream, state, implicit_tls=True), [listener],
                                               handler_nursery=sessions))


async def drain(state: ServerState, timeout: float, grace: float = DRAIN_GRACE) -> None:
    """Stop accepting (the listeners close: a load balancer's health check fails and new clients go to
    other nodes), let the sessions finish for ``timeout`` seconds, then end those still open with
    ``-ERR [SYS/TEMP]`` at their next wait for input (``grace`` seconds at most, for one busy sending)."""
    state.accepting.cancel()
    count = len(state.live)
    log.info("draining: no new connections; %d session%s open", count, "" if count == 1 else "s")
    with trio.move_on_after(timeout):
        while state.live:
            await trio.sleep(DRAIN_POLL)
    if state.live:
        log.info("draining: closing %d session%s still open", len(state.live), "" if len(state.live) == 1 else "s")
        for conn in list(state.live):
            conn.shut_down()
        with trio.move_on_after(grace):
            while state.live:
                await trio.sleep(DRAIN_POLL)


async def open_listeners(host: str, port: int) -> list[trio.SocketListener]:
    return await trio.open_tcp_listeners(port, host=host)


def listener_port(listeners: Sequence[trio.SocketListener]) -> int:
    return listeners[0].socket.getsockname()[1]

