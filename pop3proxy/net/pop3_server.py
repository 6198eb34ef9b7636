"""The POP3 server driver (trio): one `_Connection` per client feeds received octets to the
sans-IO `Session` and carries out its actions (login through the backend, STLS, sending
messages with back-pressure and sendfile, QUIT updates), under the configured limits.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import BinaryIO

import trio

from pop3proxy import pop3 as p
from pop3proxy.errors import LoginError, sole_exception
from pop3proxy.net import proxied
from pop3proxy.net.addresses import is_loopback
from pop3proxy.net.backend_api import Backend, Maildrop
from pop3proxy.net.early import EarlyUpstream
from pop3proxy.net.gate import Gate
from pop3proxy.net.sendfile import open_as_is, open_for_sendfile, send_file
from pop3proxy.net.streams import client_gone, peer_of, set_nodelay
from pop3proxy.net.throttle import Throttle
from pop3proxy.ops import metrics
from pop3proxy.pop3 import session as s

log = logging.getLogger("pop3proxy")

READ_CHUNK = 256 * 1024
INLINE_READ = 64 * 1024  # messages up to this size are read without a worker thread
SENDFILE_MIN = 256 * 1024  # larger messages that need no dot-stuffing go out with sendfile()
RECEIVE_SIZE = 64 * 1024
SHUTTING_DOWN = "this server is shutting down, connect again"
EVICT_AFTER = 2.0  # seconds a pre-login connection must have waited before it may be closed for room


@dataclass
class ServerConfig:
    idle_timeout: float = 600.0
    login_timeout: float = 60.0  # absolute: from the greeting to a successful login
    max_unauthenticated: int = 200  # connections not logged in yet; a new one evicts the oldest idle one
    max_output: int = 1 << 20  # octets of replies a session holds before it sends them (back-pressure)
    tls_handshake_timeout: float = 30.0
    max_sessions: int = 1000
    max_sessions_per_address: int = 50
    max_bad_commands: int = 20
    allow_plaintext_auth: str = "loopback"  # "loopback" | "always" | "never"
    ssl_context: ssl.SSLContext | None = None
    greeting: str = "pop3proxy ready"
    throttle: Throttle = field(default_factory=Throttle)
    proxy: proxied.ProxyPolicy | None = None  # a PROXY protocol header first, from these proxies only


@dataclass
class ServerState:
    """Shared by all connections of one server."""

    config: ServerConfig
    backend: Backend
    gate: Gate | None = None  # sessions (all, per address) and the login throttle; built from config if None
    stats: dict[str, int] = field(default_factory=lambda: {"sessions": 0, "errors": 0, "evicted": 0})
    # Connections still in AUTHORIZATION, oldest first (dicts keep insertion order).
    unauthenticated: dict[_Connection, None] = field(default_factory=dict)
    live: set[_Connection] = field(default_factory=set)  # every session now (a drain waits for them)
    accepting: trio.CancelScope = field(default_factory=trio.CancelScope)  # the accept loops (a drain ends them)

    def __post_init__(self) -> None:
        if self.gate is None:
            self.gate = Gate(self.config.throttle, self.config.max_sessions_per_address, self.config.max_sessions)

    def make_room(self) -> bool:
        """Close the oldest pre-login connection that has waited for input at least EVICT_AFTER
        seconds; False when there is none (a burst of real clients is never evicted)."""
        now = trio.current_time()
        for victim in self.unauthenticated:
            if victim.evict(now - EVICT_AFTER):
                self.stats["evicted"] += 1
                return True
        return False

    def admit(self, conn: _Connection) -> None:
        """Count a new pre-login connection; beyond the cap, close an old idle one to make room, so
        that idle or trickling connections can never keep a real user from logging in."""
        if len(self.unauthenticated) >= self.config.max_unauthenticated:
            self.make_room()
        self.unauthenticated[conn] = None

class _Connection:
    """Drives one ``Session`` over one stream."""

    def __init__(self, state: ServerState, stream: trio.abc.Stream, tls_active: bool,
                 peer: tuple[str, int] | None = None, received: bytes = b"") -> None:
        self.state = state
        self.config = state.config
        self.stream = stream
        self.peer = peer or peer_of(stream)  # the client's: a PROXY header's, or the socket's peer
        self.received = received  # what the client sent with the PROXY header, before its greeting
        loopback = is_loopback(self.peer[0])
        plaintext = {"always": True, "never": False, "loopback": loopback}[self.config.allow_plaintext_auth]
        self.session = s.Session(
            stls_available=self.config.ssl_context is not None and not tls_active,
            tls_active=tls_active,
            plaintext_auth=plaintext,
            greeting=self.config.greeting,
            max_bad_commands=self.config.max_bad_commands,
            bearer_auth=getattr(state.backend, "accepts_bearer", False),
        )
        self.out: list[bytes] = []
        self.out_bytes = 0  # octets in self.out
        self.login_deadline = trio.current_time() + self.config.login_timeout
        self._wait_scope: trio.CancelScope | None = None  # set while waiting for input
        self.waiting_since = 0.0
        self.evicted = False
        self.closing = False  # the service stops: the session ends at its next wait for input
        self.maildrop: Maildrop | None = None
        self.upstream: str | None = None  # the provider this session's login went to (logs)
        self.early: EarlyUpstream | None = None  # the provider connection opened while greeting
        self.bytes_sent = 0

    def _queue(self, data: bytes) -> None:
        self.out.append(data)
        self.out_bytes += len(data)

    async def flush(self) -> None:
        if self.out:
            data = b"".join(self.out)
            self.out.clear()
            self.out_bytes = 0
            await self._send(data)

    async def _send(self, data: bytes) -> None:
        with trio.fail_after(self.config.idle_timeout):
            await self.stream.send_all(data)
        self.bytes_sent += len(data)

    def _count_sent(self, octets: int) -> None:
        self.bytes_sent += octets

    def evict(self, waiting_before: float) -> bool:
        """Close this pre-login connection to make room, if it has been waiting for input since
        before ``waiting_before`` (trio time)."""
        if self._wait_scope is None or self.evicted or self.waiting_since > waiting_before:
            return False
        self.evicted = True
        self._wait_scope.cancel()
        return True

    def shut_down(self) -> None:
        """End this session at its next wait for input (now, if it waits), with ``-ERR [SYS/TEMP]``."""
        self.closing = True
        if self._wait_scope is not None:
            self._wait_scope.cancel()

    def _authorizing(self) -> bool:
        return self.session.state is s.State.AUTHORIZATION

    async def run(self) -> None:
        early = self.state.backend.early_upstream(self.peer)
        if early is None:
            return await self._run()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(early.run)
            try:
                # The provider's own APOP timestamp and CRAM-MD5: the client's digest is checked there.
                timestamp, cram_md5 = await self.state.backend.greeting_ready(early)
                self.session.apop_timestamp = timestamp
                self.session.challenge_mechanisms = ("CRAM-MD5",) if cram_md5 else ()
                self.early = early
                await self._run()
            finally:
                with trio.CancelScope(shield=True):
                    await early.aclose()
                nursery.cancel_scope.cancel()

    async def _run(self) -> None:
        self._queue(self.session.greeting())
        if self.received:
            self.session.receive_data(self.received)
        self.state.admit(self)
        self.state.live.add(self)
        try:
            while True:
                if not self._authorizing():
                    self.state.unauthenticated.pop(self, None)
                actions = self.session.next_actions()
                if actions is None:
                    if not await self._receive():
                        return
                    continue
                if await self._perform(actions):
                    return
                if self.out_bytes >= self.config.max_output:
                    # Replies to pipelined commands are sent before more commands are handled: the
                    # buffer stays bounded and a client that does not read stops being read from.
                    await self.flush()
        finally:
            self.state.unauthenticated.pop(self, None)
            self.state.live.discard(self)
            if self.maildrop is not None:
                maildrop, self.maildrop = self.maildrop, None
                with trio.CancelScope(shield=True):
                    await maildrop.close()

    async def _receive(self) -> bool:
        """Flush replies, then wait for input. False when the client is gone or idle too long."""
        if self.closing:
            self._queue(p.err(SHUTTING_DOWN, "SYS/TEMP"))
        await self.flush()
        if self.closing:
            return False
        deadline = trio.current_time() + self.config.idle_timeout
        authorizing = self._authorizing()
        if authorizing:  # each byte resets the idle timer, but not the deadline to log in
            deadline = min(deadline, self.login_deadline)
        self.waiting_since = trio.current_time()
        with trio.CancelScope(deadline=deadline) as self._wait_scope:
            data = await self.stream.receive_some(RECEIVE_SIZE)
            self._wait_scope = None
            if not data:
                return False
            self.session.receive_data(data)
            return True
        self._wait_scope = None
        if self.closing:
            self._queue(p.err(SHUTTING_DOWN, "SYS/TEMP"))
        elif self.evicted:
            text = "too many connections waiting to log in, closing connection"
            self._queue(p.err(text, "SYS/TEMP"))
        elif authorizing and trio.current_time() >= self.login_deadline:
            self._queue(p.err("login timeout, closing connection"))
        else:
            self._queue(p.err("idle timeout, closing connection"))
        with trio.move_on_after(5):
            await self.flush()
        return False

    async def _perform(self, actions: Iterable[s.Action]) -> bool:
        """Carry out actions; True when the connection is to be closed."""
        queue = list(actions)
        while queue:
            action = queue.pop(0)
            if isinstance(action, s.Send):
                self._queue(action.data)
            elif isinstance(action, s.SendMessage):
                await self._send_message(action)
            elif isinstance(action, s.Authenticate):
                queue[:0] = await self._login(action)
            elif isinstance(action, s.Challenge):
                queue[:0] = await self._challenge(action)
            elif isinstance(action, s.StartTLS):
                await self.flush()
                queue[:0] = await self._start_tls()
            elif isinstance(action, s.Update):
                queue[:0] = await self._update(action)
            elif isinstance(action, s.Close):
                await self.flush()
                return True
        return False

    async def _login(self, action: s.Authenticate) -> list[s.Action]:
        await self.flush()
        assert self.state.gate is not None
        address, account = self.peer[0], self.state.backend.account_key(action.user)  # name variants: one key
        try:
            async with self.state.gate.login(address, account) as attempt:
                if attempt.blocked:
                    log.warning("login of %r from %s refused: too many failed logins", action.user, address)
                    return self.session.login_failed("too many failed logins, try again later", "LOGIN-DELAY")
                await trio.sleep(attempt.delay)  # an account being guessed at: slowed, not refused
                try:
                    maildrop = await self.state.backend.login(action.user, action.password, address,
                                                              mechanism=action.mechanism, early=self.early)
                except LoginError as exc:
                    log.info("login failed for %r from %s: %s", action.user, address, exc.text,
                             extra={"user": action.user, "peer": address, "result": "failed", "code": exc.code})
                    metrics.login("failed")
                    if (exc.code == "AUTH" or exc.guess) and not exc.verified:
                        await trio.sleep(await attempt.failed())
                    return self.session.login_failed(exc.text, exc.code)
                attempt.succeeded()
        except LoginError as exc:  # the gate cannot count logins now (a cluster's database): temporary
            return self.session.login_failed(exc.text, exc.code)
        self.maildrop = maildrop
        if self.early is not None:  # the login used it, or did not need it: no provider connection waits
            await self.early.aclose()
        self.upstream = getattr(maildrop, "upstream", None)
        log.info("login %r from %s: %d messages", action.user, self.peer[0], len(maildrop.messages),
                 extra={"user": action.user, "peer": address, "upstream": self.upstream,
                        "messages": len(maildrop.messages), "result": "ok"})
        metrics.login("ok")
        return self.session.login_succeeded(action.user, maildrop.messages, maildrop.banner)

    async def _challenge(self, action: s.Challenge) -> list[s.Action]:
        await self.flush()
        try:
            challenge = await self.state.backend.challenge(self.early, action.mechanism)
        except LoginError as exc:
            return self.session.challenge_failed(exc.text, exc.code)
        return self.session.challenge_given(challenge)

    async def _start_tls(self) -> list[s.Action]:
        assert self.config.ssl_context is not None
        tls = trio.SSLStream(self.stream, self.config.ssl_context, server_side=True)
        with trio.fail_after(self.config.tls_handshake_timeout):
            await tls.do_handshake()
        self.stream = tls
        return self.session.tls_started()

    async def _update(self, action: s.Update) -> list[s.Action]:
        assert self.maildrop is not None
        maildrop, ok = self.maildrop, True
        try:
            await maildrop.commit(action.deleted)
        except Exception as exc:  # the mailbox stays as it was; the client is told
            log.error("UPDATE failed for %r: %s", self.session.user, exc)
            ok = False
        # The session is over: the mailbox is given back before the client hears so, and a login right
        # after QUIT (on another worker process or node) finds it free instead of waiting for it.
        self.maildrop = None
        with trio.CancelScope(shield=True):
            await maildrop.close()
        return self.session.update_done(ok)

    async def _sendable(self, action: s.SendMessage) -> BinaryIO | None:
        """The message's own file when a RETR of it can go out with sendfile(), else None (it is read)."""
        assert self.maildrop is not None and action.size is not None
        try:
            if action.dot_lines is False and action.size > INLINE_READ:  # the store knows: no scan
                return open_as_is(self.maildrop, action.key, action.size)
            if action.dot_lines is None and action.size >= SENDFILE_MIN:  # not known: scanned first
                return await trio.to_thread.run_sync(open_for_sendfile, self.maildrop, action.key, action.size)
        except (OSError, KeyError, ValueError):
            pass
        return None

    async def _send_message(self, action: s.SendMessage) -> None:
        assert self.maildrop is not None
        maildrop = self.maildrop
        # A RETR of a message the store knows has no line starting with '.' goes out as it is: no stuffing.
        stuffer = None if action.top_lines is None and action.dot_lines is False else p.DotStuffer(
            action.top_lines, crlf=True)  # the stores serve CRLF form

        def first_read() -> tuple[BinaryIO, bytes]:
            f = maildrop.open(action.key)
            try:
                return f, f.read(READ_CHUNK)
            except BaseException:
                f.close()
                raise

        if action.top_lines is None and action.size is not None and isinstance(self.stream, trio.SocketStream):
            sendable = await self._sendable(action)
            if sendable is not None:
                try:
                    self._queue(action.status)
                    await self.flush()
                    assert isinstance(self.stream, trio.SocketStream)
                    await send_file(self.stream.socket, sendable, action.size, self.config.idle_timeout,
                                    self._count_sent)
                finally:
                    sendable.close()
                self._queue(b".\r\n")
                return
        if action.size is not None and action.size <= INLINE_READ:
            return self._send_small(action, stuffer)
        try:
            f, chunk = await trio.to_thread.run_sync(first_read)
        except (OSError, KeyError) as exc:
            self._unreadable(action, exc)
            return
        self._queue(action.status)
        try:
            total, line_start = 0, True
            while chunk:
                total += len(chunk)
                if stuffer is None:
                    self._queue(chunk)
                    line_start = chunk.endswith(b"\n")
                else:
                    self._queue(stuffer.feed(chunk))
                if (stuffer is not None and stuffer.done) or (action.size is not None and total >= action.size):
                    break  # no further read (and thread hop) just to learn that the file ended
                await self.flush()
                chunk = await trio.to_thread.run_sync(f.read, READ_CHUNK)
            if stuffer is not None:
                self._queue(stuffer.finish())
            else:
                self._queue(_terminator(line_start))
        finally:
            f.close()


    def _send_small(self, action: s.SendMessage, stuffer: p.DotStuffer | None) -> None:
        """A small message is read whole right here: a page-cache read of a few KiB costs less than
        handing it to a worker thread and back."""
        assert self.maildrop is not None and action.size is not None
        try:
            data = self.maildrop.read(action.key, action.size)
        except (OSError, KeyError) as exc:
            self._unreadable(action, exc)
            return
        self._queue(action.status)
        if stuffer is not None:
            self._queue(stuffer.feed(data))
            self._queue(stuffer.finish())
        else:
            self._queue(data)
            self._queue(_terminator(not data or data.endswith(b"\n")))

    def _unreadable(self, action: s.SendMessage, exc: Exception) -> None:
        # The file vanished or cannot be read (removed by hand, EMFILE, EIO): nothing was promised yet,
        # so the client gets a temporary error and marks nothing.
        log.error("cannot read message %s of %r: %s", action.key, self.session.user, exc)
        self._queue(action.error)


def _terminator(line_start: bool) -> bytes:
    """What ends a multi-line reply sent as it is: a lone "." line, after a CRLF if the data lacks one."""
    return b".\r\n" if line_start else b"\r\n.\r\n"


async def handle_stream(state: ServerState, stream: trio.abc.Stream, *, implicit_tls: bool = False) -> None:
    """Serve one client; never raises."""
    started = time.monotonic()
    conn: _Connection | None = None
    address = ""
    try:
        set_nodelay(stream)
        peer, received = peer_of(stream), b""
        if state.config.proxy is not None:
            carried = await proxied.accept(stream, peer, state.config.proxy)
            if carried is None:  # refused (logged): no session, not a word
                return
            peer, received = carried
        state.stats["sessions"] += 1
        address = peer[0]
        assert state.gate is not None
        verdict = await state.gate.admit(address)
        if verdict == "full" and state.make_room():  # the session closed for room leaves soon
            verdict = await state.gate.admit(address, force=True)
        if verdict != "ok":
            refusal = ("too many sessions, try again later" if verdict == "full"
                       else "too many sessions from your address")
            with trio.move_on_after(5):
                await stream.send_all(p.err(refusal, "SYS/TEMP"))
            return
        metrics.session_started()
        try:
            if implicit_tls:
                assert state.config.ssl_context is not None
                transport = proxied.PrefixedStream(stream, received) if received else stream
                received = b""  # the handshake's first octets, when they came with the PROXY header
                stream = trio.SSLStream(transport, state.config.ssl_context, server_side=True)
                with trio.fail_after(state.config.tls_handshake_timeout):
                    await stream.do_handshake()
            conn = _Connection(state, stream, tls_active=implicit_tls, peer=peer, received=received)
            await conn.run()
        finally:
            metrics.session_ended()
            state.gate.leave(address)
    except Exception as exc:
        # A nursery (the early provider connection's) hands its errors on in a group: what counts is
        # the exception inside.
        if client_gone(exc):  # the client went away or was too slow; nothing to tell it
            gone = sole_exception(exc)
            log.info("client %s went away (%s)", address, type(gone).__name__,
                     extra={"peer": address, "result": "disconnected"})
        else:
            state.stats["errors"] += 1
            log.error("session error", exc_info=sole_exception(exc))
            try:
                with trio.move_on_after(1):
                    await stream.send_all(p.err("internal error, closing connection", "SYS/TEMP"))
            except Exception:
                pass
    finally:
        if conn is not None and conn.session.user:
            log.info(
                "session end user=%r peer=%s served=%d bytes=%d duration=%.3fs",
                conn.session.user,
                conn.peer[0],
                conn.session.messages_served,
                conn.bytes_sent,
                time.monotonic() - started,
                extra={"user": conn.session.user, "peer": conn.peer[0], "upstream": conn.upstream,
                       "messages": conn.session.messages_served, "bytes": conn.bytes_sent,
                       "duration": round(time.monotonic() - started, 3)},
            )
        with trio.move_on_after(1) as cleanup:
            cleanup.shield = True
            await trio.aclose_forcefully(stream)
