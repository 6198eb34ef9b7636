"""aiosmtpd in an asyncio thread, bridged to the trio relay: the SMTP listener and its handler."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import socket
import ssl
import weakref
from collections.abc import Callable
from typing import Any

import trio
from aiosmtpd.proxy_protocol import AF, PROTO, V2_CMD, ProxyData
from aiosmtpd.smtp import SMTP, AuthResult, Session

from pop3proxy.config import queue_dir
from pop3proxy.net.addresses import is_loopback
from pop3proxy.net.proxied import ProxyPolicy
from pop3proxy.net.proxy_header import V2_MAX_LENGTH
from pop3proxy.submission.delivery import QueueRunner
from pop3proxy.submission.provider import EHLO_NAME
from pop3proxy.submission.queue import RetryPolicy
from pop3proxy.submission.relay import (
    MAX_RECIPIENTS,
    AuthVerdict,
    Relay,
    RelayClosed,
    _Login,
    load_passwords,
)

log = logging.getLogger("pop3proxy.smtp")

BRIDGE_THREADS = 32  # AUTH and DATA hand-overs from the asyncio loop in flight


class _Bridge:
    """Hands calls from the asyncio thread into trio and waits for the answer without blocking asyncio."""

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self.token = token
        self.executor = concurrent.futures.ThreadPoolExecutor(BRIDGE_THREADS, thread_name_prefix="pop3proxy-smtp")
        self.scopes: set[trio.CancelScope] = set()
        self.closed = False

    async def call(self, afn: Callable, *args: Any) -> Any:  # in the asyncio loop
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self._enter, afn, args)

    def _enter(self, afn: Callable, args: tuple) -> Any:  # in a bridge thread
        try:
            return trio.from_thread.run(self._guarded, afn, *args, trio_token=self.token)
        except (trio.Cancelled, trio.RunFinishedError):
            raise RelayClosed() from None

    async def _guarded(self, afn: Callable, *args: Any) -> Any:  # in trio
        if self.closed:
            raise RelayClosed()
        with trio.CancelScope() as scope:
            self.scopes.add(scope)
            try:
                return await afn(*args)
            finally:
                self.scopes.discard(scope)
        raise RelayClosed()

    def close(self) -> None:  # in trio
        self.closed = True
        for scope in list(self.scopes):
            scope.cancel()

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def _peer_host(session) -> str:
    peer = getattr(session, "peer", None)
    return str(peer[0]) if isinstance(peer, tuple) and peer else ""


class _Handler:
    """aiosmtpd hooks. Everything that decides goes through the bridge into trio."""

    def __init__(self, bridge: _Bridge, relay: Relay) -> None:
        self.bridge = bridge
        self.relay = relay

    async def handle_RCPT(self, server, session, envelope, address: str, rcpt_options: list[str]) -> str:  # noqa: N802
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return f"452 4.5.3 Too many recipients (at most {MAX_RECIPIENTS} per message)"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802
        login = session.auth_data
        if not isinstance(login, _Login):
            return "530 5.7.0 Authentication required"
        options = [o for o in envelope.mail_options if o.upper().startswith("BODY=")]
        try:
            return await self.bridge.call(
                self.relay.deliver, login, envelope.mail_from or "", list(envelope.rcpt_tos),
                bytes(envelope.original_content or b""), options, _peer_host(session),
            )
        except RelayClosed:
            return "451 4.3.2 pop3proxy is shutting down; the message was not accepted, try again later"
        except Exception as exc:
            log.error("relaying mail of %r failed: %s: %s", login.name, type(exc).__name__, exc)
            return "451 4.3.0 Internal error; the message was not accepted, try again later"

    async def handle_exception(self, error: Exception) -> str:
        log.error("smtp session error: %s: %s", type(error).__name__, error)
        return "500 5.3.0 Internal error"

    async def handle_PROXY(self, server, session, envelope, proxy_data: ProxyData) -> bool:  # noqa: N802
        """aiosmtpd parsed a valid PROXY header (``smtp.proxy_protocol``): take its client address."""
        return bool(server.take_proxy(proxy_data))


class _Session(Session):
    """aiosmtpd's session without its deprecation warning on every successful AUTH."""

    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


class _RelaySMTP(SMTP):
    """aiosmtpd's SMTP with the AUTH policy of pop3proxy and AUTH checked in trio."""

    def __init__(self, handler: _Handler, *, plaintext_auth: str, proxy: ProxyPolicy | None = None,
                 **kwargs: Any) -> None:
        super().__init__(handler, auth_required=True, auth_require_tls=True,
                         proxy_protocol_timeout=proxy.timeout if proxy is not None else None, **kwargs)
        self._plaintext_auth = plaintext_auth
        self._bridge = handler.bridge
        self._relay = handler.relay
        # PROXY protocol: the client's address once a header carried it (a STARTTLS session keeps it),
        # and whether the header was taken or the connection's refusal logged.
        self._proxy = proxy
        self._client: tuple[str, int] | None = None
        self._proxy_settled = proxy is None
        self._eof = False

    def _create_session(self) -> Session:
        return _Session(self.loop)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.session is None:
            return
        if self._client is not None:  # the session made anew after STARTTLS: the same client
            self.session.peer = self._client  # type: ignore[assignment]  # aiosmtpd: (host, port), typed str
        elif self._proxy is not None and not self._proxy.trusts(_peer_host(self.session)):
            self._refuse(f"{_peer_host(self.session) or 'its peer'} is not a trusted proxy (listen.trusted_proxies)")
            transport.close()
        self._auth_policy()

    def _auth_policy(self) -> None:
        if self._tls_protocol is None and self.session is not None:
            allowed = {"always": True, "never": False}.get(self._plaintext_auth, is_loopback(_peer_host(self.session)))
            self._auth_require_tls = not allowed

    def take_proxy(self, data: ProxyData) -> bool:
        """A valid header from a trusted proxy: its TCP client address is the session's peer from now on
        (LOCAL, UNKNOWN and other kinds of address keep the connection's own)."""
        if len(data.whole_raw) > V2_MAX_LENGTH:
            self._refuse(f"invalid PROXY header: longer than {V2_MAX_LENGTH} octets")
            return False
        self._proxy_settled = True
        if (data.command != V2_CMD.LOCAL and data.protocol == PROTO.STREAM and data.family in (AF.INET, AF.INET6)
                and data.src_addr is not None and data.src_port is not None and self.session is not None):
            address = getattr(data.src_addr, "ipv4_mapped", None) or data.src_addr
            self._client = (str(address), data.src_port)
            self.session.peer = self._client  # type: ignore[assignment]  # as in connection_made
            self._auth_policy()
        return True

    def _refuse(self, reason: str) -> None:
        self._proxy_settled = True
        peer = _peer_host(self.session)
        log.warning("SMTP connection from %s refused: %s", peer or "?", reason,
                    extra={"peer": peer, "result": "refused", "protocol": "smtp"})

    def eof_received(self) -> bool | None:
        self._eof = True
        return super().eof_received()

    def connection_lost(self, error: Exception | None) -> None:
        if not self._proxy_settled and self._proxy is not None:  # the header never came whole, or was invalid
            data = self.session.proxy_data if self.session is not None else None
            if data is not None and data.error:
                self._refuse(f"invalid PROXY header: {data.error}")
            elif self._eof or error is not None:
                self._refuse("closed before a complete PROXY header")
            else:
                self._refuse(f"no complete PROXY header within {self._proxy.timeout:g} s")
        super().connection_lost(error)

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:  # noqa: N802
        blob: object  # the challenge answer (bytes or aiosmtpd's MISSING) or the decoded argument (bytes or None)
        if len(args) == 1:
            blob = await self.challenge_auth("")
            if not isinstance(blob, bytes):
                return AuthResult(success=False, handled=True)
        else:
            blob = _b64(args[1])
            if blob is None:
                return AuthResult(success=False, handled=False, message="501 5.5.2 Cannot decode base64")
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            return AuthResult(success=False, handled=False, message="501 5.5.2 Cannot split the AUTH PLAIN value")
        return await self._check(parts[1], parts[2])

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:  # noqa: N802
        user: object  # as ``blob`` in auth_PLAIN
        if len(args) == 1:
            user = await self.challenge_auth("Username:")
            if not isinstance(user, bytes):
                return AuthResult(success=False, handled=True)
        else:
            user = _b64(args[1])
            if user is None:
                return AuthResult(success=False, handled=False, message="501 5.5.2 Cannot decode base64")
        password = await self.challenge_auth("Password:")
        if not isinstance(password, bytes):
            return AuthResult(success=False, handled=True)
        return await self._check(user, password)

    async def _check(self, user: bytes, password: bytes) -> AuthResult:
        try:
            name, secret = user.decode("utf-8"), password.decode("utf-8")
        except UnicodeDecodeError:
            return AuthResult(success=False, handled=False, message="501 5.5.2 Credentials are not UTF-8")
        if not name or not secret:
            return AuthResult(success=False, handled=False, message="535 5.7.8 Authentication credentials invalid")
        try:
            verdict: AuthVerdict = await self._bridge.call(
                self._relay.authenticate, name, secret, _peer_host(self.session))
        except RelayClosed:
            return AuthResult(success=False, handled=False, message="454 4.3.2 pop3proxy is shutting down")
        except Exception as exc:
            log.error("smtp AUTH check failed: %s: %s", type(exc).__name__, exc)
            return AuthResult(success=False, handled=False, message="454 4.3.0 Internal error, try again later")
        if verdict.login is None:
            return AuthResult(success=False, handled=False, message=verdict.reply)
        return AuthResult(success=True, handled=False, message=verdict.reply, auth_data=verdict.login)


def _b64(text: str) -> bytes | None:
    import base64
    import binascii

    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        return None


class _NoProxyLines(logging.Filter):
    """aiosmtpd's own lines about PROXY headers: the relay logs one line for each connection it refuses."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "proxy" not in record.getMessage().lower()


def _asyncio_error(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    exc = context.get("exception")
    detail = f"{type(exc).__name__}: {exc}" if exc is not None else context.get("message", "error")
    log.debug("smtp listener: %s", detail)


class _Listener:
    """aiosmtpd on an asyncio loop in a thread of its own, serving one bound socket."""

    def __init__(self, sock: socket.socket, factory: Callable[[asyncio.AbstractEventLoop], SMTP]) -> None:
        self.sock = sock
        self.factory = factory
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(_asyncio_error)
        self.thread: Any = None
        self.server: asyncio.AbstractServer | None = None
        self.protocols: weakref.WeakSet[SMTP] = weakref.WeakSet()

    def _make(self) -> SMTP:
        protocol = self.factory(self.loop)
        self.protocols.add(protocol)
        return protocol

    def start(self) -> None:  # blocking; run it in a worker thread
        import threading

        self.thread = threading.Thread(target=self._run, name="pop3proxy-smtp-listener", daemon=True)
        self.thread.start()
        future = asyncio.run_coroutine_threadsafe(self.loop.create_server(self._make, sock=self.sock), self.loop)
        self.server = future.result(30)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def stop(self) -> None:  # blocking; run it in a worker thread
        if self.thread is None:
            self.sock.close()
            return

        async def shutdown() -> None:
            if self.server is not None:
                self.server.close()
            for protocol in list(self.protocols):
                transport = getattr(protocol, "transport", None)
                if transport is not None:
                    transport.close()
            current = asyncio.current_task()
            for task in asyncio.all_tasks():
                if task is not current:
                    task.cancel()
            await asyncio.sleep(0.05)

        with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
            asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()
        self.sock.close()


def _bind(host: str, port: int) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def run_smtp(
    settings,
    backend=None,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    retry: RetryPolicy | None = None,
    tls_context: ssl.SSLContext | Callable[[], ssl.SSLContext | None] | None = None,
) -> None:
    """Run the submission listener and the queue runner until cancelled; ``started(port)``.

    ``backend`` is the running POP3 backend: a `ProxyBackend`'s ``passwords`` are used as the password
    sources; without one they are read from ``[accounts]``. ``tls_context`` is the STARTTLS context, or
    a function returning the current one (asked at every new connection, so certificates reloaded by the
    POP3 side apply here too); by default one is made from ``[listen] certfile/keyfile``.
    """
    from pop3proxy.errors import ListenError, StartupError
    from pop3proxy.net.tls import server_context

    smtp = settings.smtp
    if smtp.port is None:
        raise StartupError("smtp.port is not set: the SMTP relay is disabled")
    passwords = getattr(backend, "passwords", None)
    if passwords is None:
        try:
            passwords = load_passwords(settings)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
    try:
        stores = backend.stores if backend is not None else None  # the POP3 side's: a cluster's offline hashes
        relay = Relay(settings, passwords, retry, stores.states if stores is not None else None)
    except OSError as exc:
        raise StartupError(f"cannot use the outgoing queue {queue_dir(settings)}: {exc.strerror or exc}") from None
    listen = settings.listen
    if tls_context is None and listen.certfile is not None:
        try:
            tls_context = server_context(listen.certfile, listen.keyfile, listen.tls_min_version)
        except (OSError, ValueError) as exc:
            raise StartupError(f"cannot load listen.certfile/keyfile: {exc}") from None
    current_tls: Callable[[], ssl.SSLContext | None] = (
        tls_context if callable(tls_context) else (lambda: tls_context)
    )
    try:
        sock = _bind(smtp.host, smtp.port)
    except OSError as exc:
        raise ListenError(
            f"cannot listen for SMTP on {smtp.host}:{smtp.port}: {(exc.strerror or str(exc)).lower()}"
        ) from None
    port = sock.getsockname()[1]
    bridge = _Bridge(trio.lowlevel.current_trio_token())
    handler = _Handler(bridge, relay)

    proxy = ProxyPolicy.of(listen.trusted_proxies, listen.proxy_protocol_timeout) if smtp.proxy_protocol else None

    def factory(loop: asyncio.AbstractEventLoop) -> SMTP:
        return _RelaySMTP(
            handler,
            plaintext_auth=listen.allow_plaintext_auth,
            proxy=proxy,
            data_size_limit=smtp.max_message_size,
            hostname=EHLO_NAME,
            ident="pop3proxy ESMTP",
            tls_context=current_tls(),
            timeout=listen.idle_timeout,
            loop=loop,
        )

    listener = _Listener(sock, factory)
    mail_log = logging.getLogger("mail.log")
    mail_log.setLevel(max(logging.WARNING, mail_log.level))
    for name in ("mail.log", "mail.debug"):  # aiosmtpd's PROXY parser logs under mail.debug
        if not any(isinstance(f, _NoProxyLines) for f in logging.getLogger(name).filters):
            logging.getLogger(name).addFilter(_NoProxyLines())
    try:
        await trio.to_thread.run_sync(listener.start)
    except BaseException:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(listener.stop)
        bridge.shutdown()
        raise
    starttls = " (STARTTLS available)" if current_tls() is not None else ""
    if proxy is not None:
        log.info("SMTP connections must start with a PROXY protocol header from %s", ", ".join(listen.trusted_proxies))
    log.info("listening for SMTP on %s port %d%s", smtp.host, port, starttls)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(QueueRunner(relay).run)
            task_status.started(port)
            await trio.sleep_forever()
    finally:
        bridge.close()
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(listener.stop)
        bridge.shutdown()
