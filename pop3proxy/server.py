"""trio listeners and the per-connection driver of ``session.Session``.

The driver is the only place where a client's bytes meet sockets: it feeds received data to the
session, carries out the session's actions (send, stream a message, log in through the backend, start
TLS, apply deletions) and enforces the time limits. Whatever goes wrong inside one connection is caught
at its boundary: it never takes the server down and no traceback reaches the client.
"""

from __future__ import annotations

import io
import ipaddress
import logging
import os
import socket
import ssl
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import BinaryIO, Iterable, Sequence

import trio

from pop3proxy import metrics
from pop3proxy import protocol as p
from pop3proxy import session as s
from pop3proxy.passwords import read_users, verify_password
from pop3proxy.store import MailboxBusy, MessageInfo, lock_mailbox, open_store
from pop3proxy.throttle import Throttle

log = logging.getLogger("pop3proxy")

READ_CHUNK = 256 * 1024
INLINE_READ = 64 * 1024  # messages up to this size are read without a worker thread
SENDFILE_MIN = 256 * 1024  # larger messages that need no dot-stuffing go out with sendfile()
RECEIVE_SIZE = 64 * 1024


_KDF_LIMITER: trio.CapacityLimiter | None = None


def kdf_limiter() -> trio.CapacityLimiter:
    """Password hashing (scrypt, 16 MiB each) runs at most two at a time, bounding memory."""
    global _KDF_LIMITER
    if _KDF_LIMITER is None:
        _KDF_LIMITER = trio.CapacityLimiter(2)
    return _KDF_LIMITER


class LoginError(Exception):
    """A login that did not succeed; ``code`` is the RFC 3206 response code for the client."""

    def __init__(self, text: str, code: str | None = "AUTH") -> None:
        super().__init__(text)
        self.text = text
        self.code = code


class Maildrop:
    """What a successful login hands the session: a locked, listed mailbox."""

    messages: Sequence[MessageInfo]
    banner: str = ""

    def open(self, key: str) -> BinaryIO:  # runs in a worker thread
        raise NotImplementedError

    async def commit(self, deleted: Sequence[str]) -> None:
        """Apply the session's deletions (UPDATE state)."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release the mailbox; called once, whether or not the session reached UPDATE."""


class Backend:
    """Where logins are checked and maildrops come from."""

    async def login(self, user: str, password: str, peer: str) -> Maildrop:
        raise NotImplementedError

    def attach(self, nursery: trio.Nursery) -> None:
        """Called once before serving, with a nursery for background work that outlives a session."""

    async def aclose(self) -> None:
        pass


class StoreMaildrop(Maildrop):
    """A maildrop over a locked local mailbox (standalone mode and the proxy's cache)."""

    def __init__(self, mailbox, lock, messages: Sequence[MessageInfo], banner: str = "") -> None:
        self.mailbox = mailbox
        self.lock = lock
        self.messages = messages
        self.banner = banner

    def open(self, key: str) -> BinaryIO:
        return self.mailbox.open(key)

    async def commit(self, deleted: Sequence[str]) -> None:
        if deleted:
            await trio.to_thread.run_sync(self.mailbox.delete, list(deleted))

    async def close(self) -> None:
        def close() -> None:
            try:
                self.mailbox.close()
            finally:
                self.lock.release()

        await trio.to_thread.run_sync(close)


class LocalBackend(Backend):
    """Standalone mode: users from a users file, mail from the local store."""

    def __init__(self, users_file: Path, root: Path, backend: str = "maildir") -> None:
        self.users_file = users_file
        self.root = root
        self.store_backend = backend
        read_users(users_file)  # a broken users file is a startup error, not a login error

    async def login(self, user: str, password: str, peer: str) -> Maildrop:
        def check() -> bool:
            stored = read_users(self.users_file).get(user)
            # Spend the same time for unknown users, so timing does not reveal who exists.
            return verify_password(password, stored or _DUMMY_HASH) and stored is not None

        if not await trio.to_thread.run_sync(check, limiter=kdf_limiter()):
            raise LoginError("invalid user name or password", "AUTH")
        return await open_maildrop(self.root, user, self.store_backend)


_DUMMY_HASH = "$scrypt$n=16384,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="


async def open_maildrop(root: Path, user: str, backend: str, banner: str = "") -> StoreMaildrop:
    """Lock ``user``'s mailbox and take the session's snapshot of it."""

    def open_locked() -> StoreMaildrop:
        lock = lock_mailbox(root, user)
        try:
            mailbox = open_store(root, user, backend)
            try:
                return StoreMaildrop(mailbox, lock, mailbox.list(), banner)
            except BaseException:
                mailbox.close()
                raise
        except BaseException:
            lock.release()
            raise

    try:
        return await trio.to_thread.run_sync(open_locked)
    except MailboxBusy:
        raise LoginError("mailbox is in use by another session", "IN-USE") from None
    except OSError as exc:
        log.error("cannot open mailbox of %r: %s", user, exc)
        raise LoginError("cannot open the mailbox, try again later", "SYS/TEMP") from None


@dataclass
class ServerConfig:
    idle_timeout: float = 600.0
    tls_handshake_timeout: float = 30.0
    max_sessions: int = 1000
    max_sessions_per_address: int = 50
    max_bad_commands: int = 20
    allow_plaintext_auth: str = "loopback"  # "loopback" | "always" | "never"
    ssl_context: ssl.SSLContext | None = None
    greeting: str = "pop3proxy ready"
    throttle: Throttle = field(default_factory=Throttle)


@dataclass
class ServerState:
    """Shared by all connections of one server."""

    config: ServerConfig
    backend: Backend
    sessions: int = 0
    per_address: dict[str, int] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=lambda: {"sessions": 0, "errors": 0})


def make_server_ssl_context(certfile: Path, keyfile: Path | None = None, min_version: str = "1.2") -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    if min_version in ("1.0", "1.1"):
        # Legacy clients: OpenSSL's default security level refuses TLS 1.0/1.1 outright.
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        log.warning("TLS %s allowed for clients: only for legacy clients that cannot do better", min_version)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0/1.1 only when asked for
        ctx.minimum_version = {
            "1.0": ssl.TLSVersion.TLSv1,
            "1.1": ssl.TLSVersion.TLSv1_1,
            "1.2": ssl.TLSVersion.TLSv1_2,
            "1.3": ssl.TLSVersion.TLSv1_3,
        }[min_version]
    ctx.load_cert_chain(str(certfile), str(keyfile or certfile))
    return ctx


def _peer_of(stream: trio.abc.Stream) -> tuple[str, int]:
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


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return host == ""  # unix sockets and in-memory test streams are local


class _Connection:
    """Drives one ``Session`` over one stream."""

    def __init__(self, state: ServerState, stream: trio.abc.Stream, tls_active: bool) -> None:
        self.state = state
        self.config = state.config
        self.stream = stream
        self.peer = _peer_of(stream)
        loopback = _is_loopback(self.peer[0])
        plaintext = {"always": True, "never": False, "loopback": loopback}[self.config.allow_plaintext_auth]
        self.session = s.Session(
            stls_available=self.config.ssl_context is not None and not tls_active,
            tls_active=tls_active,
            plaintext_auth=plaintext,
            greeting=self.config.greeting,
            max_bad_commands=self.config.max_bad_commands,
        )
        self.out: list[bytes] = []
        self.maildrop: Maildrop | None = None
        self.upstream: str | None = None  # the provider this session's login went to (logs)
        self.bytes_sent = 0

    async def flush(self) -> None:
        if self.out:
            data = b"".join(self.out)
            self.out.clear()
            await self._send(data)

    async def _send(self, data: bytes) -> None:
        with trio.fail_after(self.config.idle_timeout):
            await self.stream.send_all(data)
        self.bytes_sent += len(data)

    async def run(self) -> None:
        self.out.append(self.session.greeting())
        try:
            while True:
                actions = self.session.next_actions()
                if actions is None:
                    if not await self._receive():
                        return
                    continue
                if await self._perform(actions):
                    return
        finally:
            if self.maildrop is not None:
                maildrop, self.maildrop = self.maildrop, None
                with trio.CancelScope(shield=True):
                    await maildrop.close()

    async def _receive(self) -> bool:
        """Flush replies, then wait for input. False when the client is gone or idle too long."""
        await self.flush()
        with trio.move_on_after(self.config.idle_timeout):
            data = await self.stream.receive_some(RECEIVE_SIZE)
            if not data:
                return False
            self.session.receive_data(data)
            return True
        self.out.append(p.err("idle timeout, closing connection"))
        await self.flush()
        return False

    async def _perform(self, actions: Iterable[s.Action]) -> bool:
        """Carry out actions; True when the connection is to be closed."""
        queue = list(actions)
        while queue:
            action = queue.pop(0)
            if isinstance(action, s.Send):
                self.out.append(action.data)
            elif isinstance(action, s.SendMessage):
                await self._send_message(action)
            elif isinstance(action, s.Authenticate):
                queue[:0] = await self._login(action)
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
        throttle = self.config.throttle
        address = self.peer[0]
        if throttle.blocked(address, action.user):
            log.warning("login of %r from %s refused: too many failed logins", action.user, address)
            return self.session.login_failed("too many failed logins, try again later", "LOGIN-DELAY")
        try:
            maildrop = await self.state.backend.login(action.user, action.password, address)
        except LoginError as exc:
            log.info("login failed for %r from %s: %s", action.user, address, exc.text,
                     extra={"user": action.user, "peer": address, "result": "failed", "code": exc.code})
            metrics.login("failed")
            if exc.code == "AUTH":
                await trio.sleep(throttle.failed(address, action.user))
            return self.session.login_failed(exc.text, exc.code)
        throttle.succeeded(address, action.user)
        self.maildrop = maildrop
        self.upstream = getattr(maildrop, "upstream", None)
        log.info("login %r from %s: %d messages", action.user, self.peer[0], len(maildrop.messages),
                 extra={"user": action.user, "peer": address, "upstream": self.upstream,
                        "messages": len(maildrop.messages), "result": "ok"})
        metrics.login("ok")
        return self.session.login_succeeded(action.user, maildrop.messages, maildrop.banner)

    async def _start_tls(self) -> list[s.Action]:
        assert self.config.ssl_context is not None
        tls = trio.SSLStream(self.stream, self.config.ssl_context, server_side=True)
        with trio.fail_after(self.config.tls_handshake_timeout):
            await tls.do_handshake()
        self.stream = tls
        return self.session.tls_started()

    async def _update(self, action: s.Update) -> list[s.Action]:
        assert self.maildrop is not None
        try:
            await self.maildrop.commit(action.deleted)
        except Exception as exc:  # the mailbox stays as it was; the client is told
            log.error("UPDATE failed for %r: %s", self.session.user, exc)
            return self.session.update_done(False)
        return self.session.update_done(True)

    async def _sendfile(self, f: BinaryIO, size: int) -> None:
        """Copy a whole file to the (plain) socket in the kernel: a large RETR without Python copies."""
        assert isinstance(self.stream, trio.SocketStream)
        sock = self.stream.socket
        offset = 0
        while offset < size:
            try:
                sent = os.sendfile(sock.fileno(), f.fileno(), offset, size - offset)
            except BlockingIOError:
                with trio.fail_after(self.config.idle_timeout):
                    await trio.lowlevel.wait_writable(sock)
                continue
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise trio.BrokenResourceError(str(exc)) from exc
            if sent == 0:
                raise trio.BrokenResourceError("the file ended early")
            offset += sent
            self.bytes_sent += sent
            await trio.lowlevel.checkpoint()

    async def _send_message(self, action: s.SendMessage) -> None:
        assert self.maildrop is not None
        maildrop = self.maildrop
        stuffer = p.DotStuffer(action.top_lines, crlf=True)  # the stores serve CRLF form

        def first_read() -> tuple[BinaryIO, bytes]:
            f = maildrop.open(action.key)
            try:
                return f, f.read(READ_CHUNK)
            except BaseException:
                f.close()
                raise

        if (
            action.top_lines is None
            and action.size is not None
            and action.size >= SENDFILE_MIN
            and isinstance(self.stream, trio.SocketStream)
        ):
            try:
                f = await trio.to_thread.run_sync(_open_for_sendfile, maildrop, action.key, action.size)
            except (OSError, KeyError, ValueError):
                f = None
            if f is not None:
                try:
                    await self.flush()
                    await self._sendfile(f, action.size)
                finally:
                    f.close()
                self.out.append(b".\r\n")
                return
        try:
            if action.size is not None and action.size <= INLINE_READ:
                # A small message is read right here: a page-cache read of a few KiB costs less than
                # handing it to a worker thread and back.
                f, chunk = first_read()
            else:
                f, chunk = await trio.to_thread.run_sync(first_read)
        except (OSError, KeyError) as exc:
            # The file vanished under us (another tool deleted it). The +OK is queued already, so the
            # only honest answer is to end the multi-line reply empty and log it.
            log.error("cannot read message %s of %r: %s", action.key, self.session.user, exc)
            self.out.append(stuffer.finish())
            return
        try:
            total = 0
            while chunk:
                total += len(chunk)
                self.out.append(stuffer.feed(chunk))
                if stuffer.done or (action.size is not None and total >= action.size):
                    break  # no further read (and thread hop) just to learn that the file ended
                await self.flush()
                chunk = await trio.to_thread.run_sync(f.read, READ_CHUNK)
            self.out.append(stuffer.finish())
        finally:
            f.close()


def _open_for_sendfile(maildrop: Maildrop, key: str, size: int) -> BinaryIO | None:
    """The message's own file when it can go to the socket as it is: a plain file of exactly ``size``
    octets (CRLF form, as the store serves it) that ends with CRLF and has no line starting with '.'."""
    f = maildrop.open(key)
    try:
        if not isinstance(f, io.BufferedReader) or f.tell() != 0 or os.fstat(f.fileno()).st_size != size:
            f.close()
            return None
        # Scanned in pieces through one buffer: mapping the file would count it in our resident size.
        buffer = bytearray(1 << 20)
        view = memoryview(buffer)
        last = b"\n"  # as if a line ended just before the file: a leading '.' counts
        tail = b""
        while n := f.readinto(buffer):
            piece = bytes(view[:n])
            if (last + piece).find(b"\n.") >= 0:
                f.close()
                return None
            last = piece[-1:]
            tail = (tail + piece)[-2:]
        if tail != b"\r\n":
            f.close()
            return None
        f.seek(0)
        return f
    except BaseException:
        f.close()
        raise


async def handle_stream(state: ServerState, stream: trio.abc.Stream, *, implicit_tls: bool = False) -> None:
    """Serve one client; never raises."""
    state.stats["sessions"] += 1
    started = time.monotonic()
    conn: _Connection | None = None
    try:
        _set_nodelay(stream)
        address = _peer_of(stream)[0]
        if state.sessions >= state.config.max_sessions:
            with trio.move_on_after(5):
                await stream.send_all(p.err("too many sessions, try again later", "SYS/TEMP"))
            return
        if state.per_address.get(address, 0) >= state.config.max_sessions_per_address:
            with trio.move_on_after(5):
                await stream.send_all(p.err("too many sessions from your address", "SYS/TEMP"))
            return
        state.sessions += 1
        state.per_address[address] = state.per_address.get(address, 0) + 1
        metrics.session_started()
        try:
            if implicit_tls:
                assert state.config.ssl_context is not None
                stream = trio.SSLStream(stream, state.config.ssl_context, server_side=True)
                with trio.fail_after(state.config.tls_handshake_timeout):
                    await stream.do_handshake()
            conn = _Connection(state, stream, tls_active=implicit_tls)
            await conn.run()
        finally:
            metrics.session_ended()
            state.sessions -= 1
            state.per_address[address] -= 1
            if not state.per_address[address]:
                del state.per_address[address]
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
        pass  # the client went away or was too slow; nothing to tell it
    except Exception:
        state.stats["errors"] += 1
        log.exception("session error")
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


def _set_nodelay(stream: trio.abc.Stream) -> None:
    sock = getattr(stream, "socket", None)
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


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
