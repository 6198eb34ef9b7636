"""Assemble a running service from settings: backend, TLS, listeners, signals."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import trio

from pop3proxy.config import Settings
from pop3proxy.errors import ListenError, StartupError
from pop3proxy.net.backend_api import Backend
from pop3proxy.net.gate import Gate
from pop3proxy.net.listeners import drain, listener_port, open_listeners, serve_listeners
from pop3proxy.net.pop3_server import ServerConfig, ServerState
from pop3proxy.net.port_claim import bind_error, claim_bound
from pop3proxy.net.proxied import ProxyPolicy
from pop3proxy.net.throttle import Throttle
from pop3proxy.net.tls import server_context
from pop3proxy.proxy.local import LocalBackend
from pop3proxy.store.api import Stores
from pop3proxy.store.engines import open_stores

log = logging.getLogger("pop3proxy")


@dataclass
class Ports:
    plain: int | None
    tls: int | None
    smtp: int | None = None
    metrics: int | None = None
    web: int | None = None
    state: ServerState | None = None


def build_backend(settings: Settings) -> Backend:
    """The backend the settings ask for, on the engines they name (`open_stores`: a cluster's database,
    or files under the cache root); the engines close with the backend."""
    if settings.standalone and settings.local.users_file is None:
        raise StartupError("nothing to serve: set upstream.host (proxy mode) or local.users_file (standalone mode)")
    stores = open_stores(settings)
    try:
        backend = _backend_on(settings, stores)
    except BaseException:
        stores.close()
        raise
    backend.stores = stores
    backend.close_with(stores.close)
    return backend


def _backend_on(settings: Settings, stores: Stores) -> Backend:
    if settings.standalone:
        assert settings.local.users_file is not None
        try:
            return LocalBackend(settings.local.users_file, settings.cache.root, settings.cache.backend,
                                locks=stores.locks)
        except Exception as exc:
            raise StartupError(str(exc)) from None
    from pop3proxy.filtering.api import FilterConfigError
    from pop3proxy.proxy.backend import (
        ProxyBackend,  # the proxy is only imported when configured
    )

    try:
        return ProxyBackend(settings, stores=stores)
    except (FilterConfigError, ValueError) as exc:
        raise StartupError(str(exc)) from None


def build_server_config(settings: Settings) -> ServerConfig:
    listen = settings.listen
    throttle = settings.throttle
    return ServerConfig(
        idle_timeout=listen.idle_timeout,
        login_timeout=listen.login_timeout,
        max_unauthenticated=listen.max_unauthenticated,
        max_output=listen.output_buffer,
        tls_handshake_timeout=listen.tls_handshake_timeout,
        max_sessions=listen.max_sessions,
        max_sessions_per_address=listen.max_sessions_per_address,
        max_bad_commands=listen.max_bad_commands,
        allow_plaintext_auth=listen.allow_plaintext_auth,
        ssl_context=build_ssl_context(settings),
        proxy=ProxyPolicy.of(listen.trusted_proxies, listen.proxy_protocol_timeout) if listen.proxy_protocol else None,
        throttle=Throttle(
            throttle.max_failures,
            throttle.window,
            throttle.base_delay,
            throttle.max_delay,
            address_failures=throttle.address_failures,
        ),
    )


def build_ssl_context(settings: Settings):
    listen = settings.listen
    if listen.certfile is None:
        return None
    try:
        return server_context(listen.certfile, listen.keyfile, listen.tls_min_version)
    except (OSError, ValueError) as exc:
        raise StartupError(f"cannot load listen.certfile/keyfile: {exc}") from None


async def open_pop3_listeners(
    settings: Settings,
) -> tuple[list[trio.SocketListener], list[trio.SocketListener], list[socket.socket]]:
    """The POP3 listeners the settings ask for: (plain, implicit TLS, the claims of their addresses,
    to be closed with them); a clear error naming the holder if a port is in use."""
    listen = settings.listen
    plain: list[trio.SocketListener] = []
    tls: list[trio.SocketListener] = []
    claims: list[socket.socket] = []
    port = listen.port
    try:
        if listen.port is not None:
            plain = await open_listeners(listen.host, listen.port)
            claims += claim_bound([listener.socket.getsockname() for listener in plain])
        if listen.tls_port is not None:
            port = listen.tls_port
            tls = await open_listeners(listen.host, listen.tls_port)
            claims += claim_bound([listener.socket.getsockname() for listener in tls])
    except OSError as exc:
        for listener in plain + tls:
            await listener.aclose()
        for claim in claims:
            claim.close()
        raise ListenError(f"cannot listen on {listen.host}:{port}: {bind_error(exc, port or 0)}") from None
    return plain, tls, claims


def log_listening(settings: Settings, ports: Ports, stls: bool) -> None:
    host = settings.listen.host
    if ports.plain is not None:
        log.info("listening for POP3 on %s port %d%s", host, ports.plain, " (STLS available)" if stls else "")
    if ports.tls is not None:
        log.info("listening for POP3S on %s port %d", host, ports.tls)
    if settings.listen.proxy_protocol:
        log.info("POP3 connections must start with a PROXY protocol header from %s",
                 ", ".join(settings.listen.trusted_proxies))


def cluster_gate(backend: Backend, node: Gate | None, max_sessions: int) -> Gate | None:
    """In a cluster, the gate that counts sessions per address and failed logins with every other node
    (`ClusterGate` over this process's counters), keeping ``max_sessions`` in ``node`` (this process's
    `Gate`, or the supervisor's through a `RemoteGate`); on one machine ``node`` itself."""
    stores = backend.stores
    if stores is None or stores.counters is None:
        return node
    from pop3proxy.net.cluster_gate import ClusterGate

    return ClusterGate(stores.counters, node, max_sessions=max_sessions)


async def start_services(nursery: trio.Nursery, settings: Settings, backend: Backend, gate: Gate,
                         tls_context: Callable[[], ssl.SSLContext | None], ports: Ports) -> None:
    """What runs once per service whatever the number of POP3 workers: the SMTP relay with its queue
    runner, the metrics endpoint and the web console (which shares the POP3 logins' gate). In a cluster
    both show its nodes, through one `ClusterWatch` of this node's directory."""
    cluster = None
    if settings.cluster is not None and (settings.metrics.port is not None or settings.web.port is not None):
        from pop3proxy.admin.cluster_view import cluster_watch

        cluster = cluster_watch(settings, backend.stores)
    if settings.smtp.port is not None:
        from pop3proxy.submission.bridge import run_smtp

        # the POP3 side's TLS context, asked per connection: a certificate reload applies to both
        ports.smtp = await nursery.start(partial(run_smtp, settings, backend, tls_context=tls_context))
    if settings.metrics.port is not None:
        from pop3proxy.admin.metrics_http import serve_metrics

        ports.metrics = await nursery.start(serve_metrics, settings, cluster)
    if settings.web.port is not None:
        from pop3proxy.web import serve_web

        ports.web = await nursery.start(partial(serve_web, settings, backend, gate, cluster=cluster))


async def keep_heartbeat(backend: Backend, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                         ) -> None:
    """A cluster node's entry in the ``nodes`` table: registered now, a heartbeat every
    ``cluster.heartbeat`` seconds while the service runs, marked stopped when it ends. A database that
    cannot be reached is logged once (and once more when it is back); the node keeps serving what it can."""
    stores = backend.stores
    directory = stores.directory if stores is not None else None
    if directory is None:
        task_status.started()
        return
    from pop3proxy import __version__
    from pop3proxy.store.api import StateError

    try:
        await trio.to_thread.run_sync(directory.register, __version__)
    except StateError as exc:
        log.warning("cluster: node %s not registered yet: %s", directory.node, exc)
    task_status.started()
    reachable = True
    try:
        while True:
            await trio.sleep(directory.heartbeat)
            try:
                await trio.to_thread.run_sync(directory.beat, getattr(backend, "node_state", "serving"))
            except StateError as exc:
                if reachable:
                    log.warning("cluster: the database cannot be reached (heartbeat of %s): %s", directory.node, exc)
                reachable = False
                continue
            if not reachable:
                log.info("cluster: the database is reachable again")
                await trio.to_thread.run_sync(directory.register, __version__)
            reachable = True
    finally:
        with trio.CancelScope(shield=True), contextlib.suppress(StateError):
            await trio.to_thread.run_sync(directory.stopped)


async def run_service(
    settings: Settings,
    backend: Backend | None = None,
    *,
    listeners: tuple[list[trio.SocketListener], list[trio.SocketListener]] | None = None,
    gate: Gate | None = None,
    primary: bool = True,
    task_status: trio.TaskStatus[Ports] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run until cancelled. ``task_status.started`` reports the bound ports (port 0 works).

    A worker process of a multi-process service passes the ``listeners`` it inherited, the parent's
    ``gate``, and ``primary=False``: the services that run once (SMTP, metrics, web, prefetch) are
    the parent's."""
    backend = backend or build_backend(settings)
    from pop3proxy.ops.logs import add_secrets

    add_secrets(getattr(backend, "passwords", {}).values())  # masked should they ever reach a log line
    state = ServerState(build_server_config(settings), backend,
                        gate=cluster_gate(backend, gate, settings.listen.max_sessions))
    claims: list[socket.socket] = []
    if listeners is None:
        plain, tls, claims = await open_pop3_listeners(settings)
    else:
        plain, tls = listeners
    ports = Ports(listener_port(plain) if plain else None, listener_port(tls) if tls else None, state=state)
    try:
        async with trio.open_nursery() as nursery:
            backend.attach(nursery, background=primary)
            nursery.start_soon(serve_listeners, state, plain, tls)
            if primary:
                assert state.gate is not None
                await nursery.start(keep_heartbeat, backend)
                await start_services(nursery, settings, backend, state.gate,
                                     lambda: state.config.ssl_context, ports)
                # last, as with worker processes: whoever waits for this line finds every listener up
                log_listening(settings, ports, state.config.ssl_context is not None)
            task_status.started(ports)
    finally:
        with trio.CancelScope(shield=True):
            await backend.aclose()
        for claim in claims:
            claim.close()


async def reload_tls(settings: Settings, state: ServerState) -> None:
    """SIGHUP: load the certificate and key again; sessions in progress keep their TLS."""
    try:
        ctx = await trio.to_thread.run_sync(build_ssl_context, settings)
    except StartupError as exc:
        log.error("SIGHUP: keeping the old certificate: %s", exc)
        return
    state.config.ssl_context = ctx
    log.info("SIGHUP: certificate reloaded" if ctx else "SIGHUP: no certificate configured")


def raise_file_limit(wanted: int = 65536) -> int:
    """Raise the soft limit on open files towards the hard one (each session needs a few)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        except (ValueError, OSError):
            pass
    return soft


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Worker threads (scrypt, disk I/O) would each keep a glibc malloc arena of freed memory;
    two arenas keep the resident size of a busy server small. No effect outside glibc."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, arenas)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


async def run_until_signal(settings: Settings, backend: Backend | None = None, on_ready=None) -> None:
    """Run the service in the foreground; SIGINT or SIGTERM stops it cleanly, SIGHUP reloads TLS."""
    raise_file_limit()
    limit_malloc_arenas()
    # All three signals are caught from the start: a SIGHUP during startup must not kill the process.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            ports = await nursery.start(run_service, settings, backend)
            if on_ready is not None:
                on_ready(ports)
            await until_stopped(signals, nursery, settings, ports.state)


def notify_systemd(state: str) -> None:
    """Tell systemd (``Type=notify``) how the service is: ``READY=1`` once every POP3 listener (every
    worker process's) and every other service accepts connections, ``STOPPING=1`` when it shuts down.
    Nothing without $NOTIFY_SOCKET; a socket that cannot be reached is logged, never fatal."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.send(state.encode())
    except OSError as exc:
        log.warning("cannot tell systemd %s: %s", state, exc.strerror or exc)


async def until_stopped(signals, nursery: trio.Nursery, settings: Settings, state: ServerState,
                        on_reload: Callable[[], None] = lambda: None) -> None:
    """Act on signals until one stops the service: SIGHUP reloads the certificate (and calls
    ``on_reload``); SIGINT or SIGTERM cancels ``nursery``."""
    async for signum in signals:
        if signum == signal.SIGHUP:
            nursery.start_soon(reload_tls, settings, state)
            on_reload()
            continue
        log.info("received %s, shutting down", signal.Signals(signum).name)
        notify_systemd("STOPPING=1")
        if signum == signal.SIGTERM:
            await drain_node(settings, state)
        nursery.cancel_scope.cancel()
        return


async def drain_node(settings: Settings, state: ServerState, *, report: bool = True) -> None:
    """A cluster node stopping (SIGTERM): say so in the ``nodes`` table (``report``), stop accepting and
    let the sessions finish for ``cluster.drain_timeout`` seconds (`net.listeners.drain`). One machine
    stops at once, as it always has."""
    if settings.cluster is None or settings.cluster.drain_timeout <= 0:
        return
    stores = state.backend.stores
    if report and stores is not None and stores.directory is not None:
        from pop3proxy.store.api import StateError

        state.backend.node_state = "draining"  # type: ignore[attr-defined]  # the heartbeat's word
        try:
            await trio.to_thread.run_sync(stores.directory.beat, "draining")
        except StateError as exc:
            log.warning("cluster: cannot say that this node drains: %s", exc)
    await drain(state, settings.cluster.drain_timeout)
