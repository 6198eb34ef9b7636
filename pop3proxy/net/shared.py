"""One `Gate` for several worker processes: the parent keeps it (`GateServer`), each worker asks it
over a stream socket it inherited (`RemoteGate`).

The channel carries one JSON object per line. A worker's requests carry an ``id``; what a request
took (a session slot, a login in flight) is held under that id until the worker gives it back
(``leave`` / ``end`` with ``ref``) or its channel closes — a worker that dies gives back everything
it held, so its clients' sessions and logins in flight stop counting at once.

    admit  {id, addr, force}       -> {id, verdict}     ("ok", "full", "address")
    leave  {ref}
    begin  {id, addr, acct}        -> {id, blocked, delay}
    failed {id, ref, addr, acct}   -> {id, delay}   (the attempt `ref` stops being in flight: a failure)
    end    {id, ref, ok}           -> {id}          (answered once counted: the client is answered after)
    ready  {}                      (the worker is serving)
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from pop3proxy.net.gate import Attempt, Gate

log = logging.getLogger("pop3proxy")

MAX_LINE = 64 * 1024  # a request or reply is a few dozen octets; anything longer is a broken channel
END_WAIT = 5.0  # seconds a finished login waits for the parent to have counted its end


class ChannelClosed(Exception):
    """The other end of the channel went away."""


class _Lines:
    """JSON lines over a stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buffer = bytearray()

    async def receive(self) -> dict[str, Any]:
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                return json.loads(line)
            if len(self._buffer) > MAX_LINE:
                raise ChannelClosed("line too long")
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                raise ChannelClosed("closed")
            self._buffer += data

    @staticmethod
    def encode(message: dict[str, Any]) -> bytes:
        return json.dumps(message, separators=(",", ":")).encode() + b"\n"


class RemoteGate(Gate):
    """A worker's view of the parent's gate. `run` must be running (it reads the replies); when the
    parent goes away it returns, and the worker should stop."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        super().__init__()
        self._lines = _Lines(stream)
        self._send, self._outbox = trio.open_memory_channel[bytes](math.inf)  # bounded by sessions
        self._waiting: dict[int, tuple[trio.Event, list[dict]]] = {}
        self._next_id = 0
        self._closed = False
        self._sessions: dict[str, list[int]] = {}  # address -> ids of the session slots held

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write)
            try:
                while True:
                    reply = await self._lines.receive()
                    ident: Any = reply.get("id")  # a JSON value from the peer: a key of ours or not
                    waiter = self._waiting.pop(ident, None)
                    if waiter is not None:
                        waiter[1].append(reply)
                        waiter[0].set()
            except (ChannelClosed, ValueError) as exc:
                log.warning("worker: the supervising process is gone (%s); stopping", exc)
            finally:
                self._closed = True
                for event, _ in self._waiting.values():
                    event.set()
                nursery.cancel_scope.cancel()

    async def _write(self) -> None:
        async for data in self._outbox:
            try:
                await self._lines.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    def _notify(self, message: dict[str, Any]) -> None:
        if not self._closed:
            self._send.send_nowait(_Lines.encode(message))

    def _start(self, message: dict[str, Any]) -> tuple[int, trio.Event, list[dict]]:
        self._next_id += 1
        ident = self._next_id
        event, box = trio.Event(), list[dict]()
        self._waiting[ident] = (event, box)
        self._notify({**message, "id": ident})
        return ident, event, box

    async def _answer(self, event: trio.Event, box: list[dict]) -> dict[str, Any]:
        await event.wait()
        if not box:
            raise ChannelClosed("the supervising process is gone")
        return box[0]

    def ready(self) -> None:
        self._notify({"op": "ready"})

    async def admit(self, address: str, force: bool = False) -> str:
        ident, event, box = self._start({"op": "admit", "addr": address, "force": force})
        try:
            verdict = str((await self._answer(event, box)).get("verdict"))
        except BaseException:
            self._waiting.pop(ident, None)
            self._notify({"op": "leave", "ref": ident})  # whatever the parent decided, given back
            raise
        if verdict == "ok":
            self._sessions.setdefault(address, []).append(ident)
        return verdict

    def leave(self, address: str) -> None:
        held = self._sessions.get(address)
        if held:
            self._notify({"op": "leave", "ref": held.pop()})
            if not held:
                del self._sessions[address]

    @asynccontextmanager
    async def login(self, address: str, account: str) -> AsyncIterator[Attempt]:
        ident, event, box = self._start({"op": "begin", "addr": address, "acct": account})
        try:
            reply = await self._answer(event, box)
        except BaseException:
            self._waiting.pop(ident, None)
            self._notify({"op": "end", "ref": ident, "ok": False})
            raise
        attempt = Attempt(bool(reply.get("blocked")), float(reply.get("delay", 0.0)),
                          _gate=self, _address=address, _account=account, _ref=ident)
        attempt.in_flight = not attempt.blocked
        quiet = bool(reply.get("quiet"))
        try:
            yield attempt
        finally:
            if attempt.in_flight:
                attempt.in_flight = False
                if attempt.ok and quiet:  # no failure near it: the parent counts its end when it reads it
                    self._notify({"op": "end", "ref": ident, "ok": True})
                else:
                    await self._end(ident, attempt.ok)

    async def _end(self, ref: int, ok: bool) -> None:
        """Give back a login in flight and wait (briefly, even when cancelled) until the parent has
        counted it: the answer to the client comes after, so the client's next login, on any worker,
        never finds this one still in flight (a success with no failure near it is not waited for: the
        parent said it was quiet, and one attempt in flight then changes no limit)."""
        if self._closed:
            return
        ident, event, _ = self._start({"op": "end", "ref": ref, "ok": ok})
        try:
            with trio.CancelScope(shield=True), trio.move_on_after(END_WAIT):
                await event.wait()
        finally:
            self._waiting.pop(ident, None)

    async def failed_login(self, attempt: Attempt) -> float:
        if not attempt.in_flight:
            return 0.0
        attempt.in_flight = False  # the parent counts the failure instead, in one step
        ident, event, box = self._start({"op": "failed", "ref": attempt._ref, "addr": attempt._address,
                                         "acct": attempt._account})
        try:
            return float((await self._answer(event, box)).get("delay", 0.0))
        finally:
            self._waiting.pop(ident, None)


class GateServer:
    """The parent's side: one `Gate`, answering every worker's channel."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    async def serve(self, stream: trio.abc.Stream, on_ready: Callable[[], None] = lambda: None) -> None:
        """Answer one worker until its channel closes, then give back all it held."""
        lines = _Lines(stream)
        sessions: dict[int, str] = {}
        logins: dict[int, tuple[str, str]] = {}
        gate = self.gate
        try:
            while True:
                try:
                    request = await lines.receive()
                except (ChannelClosed, ValueError):
                    return
                op = request.get("op")
                # JSON values from the worker: an id it chose, or the id (ref) of an earlier request
                ident: Any = request.get("id")
                ref: Any = request.get("ref")
                reply: dict[str, Any] | None = None
                if op == "admit":
                    address = str(request.get("addr", ""))
                    verdict = gate.try_admit(address, bool(request.get("force")))
                    if verdict == "ok":
                        sessions[ident] = address
                    reply = {"id": ident, "verdict": verdict}
                elif op == "leave":
                    left = sessions.pop(ref, None)
                    if left is not None:
                        gate.leave(left)
                elif op == "begin":
                    address, account = str(request.get("addr", "")), str(request.get("acct", ""))
                    blocked, delay = gate.begin(address, account)
                    if not blocked:
                        logins[ident] = (address, account)
                    reply = {"id": ident, "blocked": blocked, "delay": delay,
                             "quiet": not blocked and gate.throttle.quiet(address, account)}
                elif op == "failed":
                    held = logins.pop(ref, None)
                    if held is not None:  # no longer in flight, a failure: never both, never neither
                        delay = gate.throttle.failed_attempt(*held)
                    else:
                        delay = gate.throttle.failed(str(request.get("addr", "")), str(request.get("acct", "")))
                    reply = {"id": ident, "delay": delay}
                elif op == "end":
                    held = logins.pop(ref, None)
                    if held is not None:
                        gate.end(*held, bool(request.get("ok")))
                    if ident is not None:
                        reply = {"id": ident}
                elif op == "ready":
                    on_ready()
                if reply is not None:
                    try:
                        await stream.send_all(_Lines.encode(reply))
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return
        finally:
            for address in sessions.values():
                gate.leave(address)
            for address, account in logins.values():
                gate.end(address, account, False)
