"""Several processes serving POP3 (``listen.workers``): a supervising parent and its workers.

The parent reserves the POP3 ports (bound, not listening), keeps the `Gate` (sessions, sessions per
address, the login throttle) and runs what must run once per service (SMTP relay and queue runner,
metrics, web console, the prefetch loop and OAuth2 renewals). Each worker is ``python -m
pop3proxy.workers`` started with the addresses and one end of a socket pair to the parent; it listens
on the same ports with SO_REUSEPORT (the kernel spreads new connections evenly over the workers'
sockets; with one shared socket the worker that happens to be awake takes nearly every connection),
serves its clients, and asks the parent's gate over that pair. Only processes of the same user can
join those ports, and the parent claims them (net/port_claim.py) so that no other service of that user
does. A worker that dies is replaced (after a pause that grows while workers keep dying
young); the sessions of the other workers go on. When the parent goes away, its
workers stop. Counters and gauges of all processes are added up by prometheus_client's multiprocess
mode (``PROMETHEUS_MULTIPROC_DIR``, a private directory the parent sets up and removes).

``max_unauthenticated`` and ``upstream.early_connections`` are shared out among the workers (each
worker evicts its own idle pre-login connections); ``max_sessions``, the per-address and the login
limits hold for the whole service.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio

from pop3proxy.config import Settings, usable_cpus
from pop3proxy.errors import ListenError, StartupError, sole_exception
from pop3proxy.net.gate import Gate
from pop3proxy.net.port_claim import bind_error, check_not_served, claim_bound
from pop3proxy.net.shared import GateServer, RemoteGate

log = logging.getLogger("pop3proxy")

METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"
STARTUP_TIMEOUT = 60.0  # seconds a new worker has to start serving
STOP_TIMEOUT = 10.0  # seconds a worker has to stop after SIGTERM before it is killed
RESTART_FIRST = 0.5  # pause before replacing a worker that died young, doubling up to RESTART_MAX
RESTART_MAX = 30.0
YOUNG = 10.0  # a worker that dies within this many seconds of its start died young


def worker_count(settings: Settings) -> int:
    """``listen.workers``, with 0 meaning one per CPU this process may run on."""
    return settings.listen.workers or usable_cpus()


METRICS_PREFIX = "pop3proxy-metrics-"


def prepare_metrics() -> str:
    """Point prometheus_client at a fresh private directory (before it is imported); returns it.
    Directories left by a supervisor that was killed (its pid is in the name) are removed first."""
    base = Path(tempfile.gettempdir())
    for stale in base.glob(METRICS_PREFIX + "*"):
        pid = stale.name[len(METRICS_PREFIX):].split("-", 1)[0]
        try:
            if pid.isdigit() and stale.stat().st_uid == os.getuid() and not Path(f"/proc/{pid}").exists():
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            continue
    path = tempfile.mkdtemp(prefix=f"{METRICS_PREFIX}{os.getpid()}-")
    os.environ[METRICS_ENV] = path
    return path


def worker_settings(settings: Settings, workers: int) -> Settings:
    """A worker's share of the per-process limits."""
    listen = settings.listen.model_copy(update={
        "max_unauthenticated": math.ceil(settings.listen.max_unauthenticated / workers),
    })
    upstream = settings.upstream.model_copy(update={
        "early_connections": math.ceil(settings.upstream.early_connections / workers),
    })
    sync = settings.sync
    if sync.filter_processes == "auto":  # the CPUs shared among the workers, one filter process each at least
        sync = sync.model_copy(update={"filter_processes": max(1, usable_cpus() // workers)})
    return settings.model_copy(update={"listen": listen, "upstream": upstream, "sync": sync})


# -- the parent ------------------------------------------------------------------------------------


class Worker:
    """One worker slot: its current process, replaced when it dies."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: trio.Process | None = None
        self.ready = trio.Event()


class Supervisor:
    def __init__(self, settings: Settings, workers: int, addresses: list[tuple[int, Any, bool]], gate: Gate,
                 memo_key: bytes | None = None) -> None:
        self.settings = settings
        self.memo_key = memo_key
        self.count = workers
        self.addresses = addresses  # (family, address, implicit TLS)
        self.server = GateServer(gate)
        self.workers = [Worker(i) for i in range(workers)]
        self.stopping = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep ``count`` workers running; started once all of them serve (a StartupError if one dies
        first)."""
        async with trio.open_nursery() as nursery:
            for worker in self.workers:
                nursery.start_soon(self._keep, worker)
            with trio.fail_after(STARTUP_TIMEOUT):
                for worker in self.workers:
                    await worker.ready.wait()
            task_status.started()

    def signal_all(self, signum: int) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                worker.process.send_signal(signum)

    async def _keep(self, worker: Worker) -> None:
        pause = RESTART_FIRST
        while True:
            started = time.monotonic()
            code = await self._run_one(worker)
            if self.stopping:
                return
            if not worker.ready.is_set():
                raise StartupError(f"worker process {worker.index} stopped before serving ({_exit(code)})")
            young = time.monotonic() - started < YOUNG
            wait = pause if young else 0.0
            pause = min(RESTART_MAX, pause * 2) if young else RESTART_FIRST
            log.warning("worker process %d stopped (%s); starting a new one%s", worker.index, _exit(code),
                        f" in {wait:g} s" if wait else "")
            await trio.sleep(wait)

    async def _run_one(self, worker: Worker) -> int:
        ours, theirs = socket.socketpair()
        theirs_fd = theirs.fileno()
        try:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "pop3proxy.workers"], stdin=subprocess.PIPE, pass_fds=[theirs_fd])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        worker.process = process
        payload = pickle.dumps({
            "settings": worker_settings(self.settings, self.count), "index": worker.index,
            "addresses": self.addresses, "control": theirs_fd, "memo_key": self.memo_key,
        })
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
        try:
            assert process.stdin is not None
            async with process.stdin:
                await process.stdin.send_all(payload)
            await self.server.serve(stream, worker.ready.set)
            return await process.wait()
        finally:
            with trio.CancelScope(shield=True):
                # before its channel closes: a worker told to stop is not "orphaned"
                await _stop(process, stop_timeout(self.settings))
                await stream.aclose()
                _metrics_gone(process.pid)


def stop_timeout(settings: Settings) -> float:
    """Seconds a worker has to stop after SIGTERM: a cluster node's workers drain first."""
    cluster = settings.cluster
    return STOP_TIMEOUT + (cluster.drain_timeout if cluster is not None else 0.0)


async def _stop(process: trio.Process, timeout: float = STOP_TIMEOUT) -> None:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(timeout):
            await process.wait()
    if process.returncode is None:
        process.kill()
        await process.wait()


def _exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _metrics_gone(pid: int) -> None:
    path = os.environ.get(METRICS_ENV)
    if path:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, path)  # its live gauges (sessions open) no longer count


def _port_socket(family: int, proto: int) -> trio.socket.SocketType:
    sock = trio.socket.socket(family, socket.SOCK_STREAM, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    return sock


async def reserve(host: str, port: int) -> list[trio.socket.SocketType]:
    """Bound sockets (not listening) on every address of ``host``: the port stays ours while workers
    come and go. Port 0: the port the first address got, on all of them."""
    found = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    reserved: list[trio.socket.SocketType] = []
    try:
        for family, _, proto, _, address in found:
            sock = _port_socket(family, proto)
            reserved.append(sock)
            if port == 0 and len(reserved) > 1:
                address = (address[0], reserved[0].getsockname()[1], *address[2:])
            await sock.bind(address)
    except BaseException:
        for sock in reserved:
            sock.close()
        raise
    return reserved


async def reserve_ports(settings: Settings) -> tuple[list[Any], list[tuple[int, Any, bool]]]:
    """The POP3 ports reserved (with the claims of their addresses: the workers of no other service
    may join them), and the (family, address, implicit TLS) the workers listen on."""
    listen = settings.listen
    reserved: list[Any] = []
    addresses: list[tuple[int, Any, bool]] = []
    for port, tls in ((listen.port, False), (listen.tls_port, True)):
        if port is None:
            continue
        try:
            socks = await reserve(listen.host, port)
            reserved += socks
            reserved += claim_bound([sock.getsockname() for sock in socks])
            for sock in socks:  # our workers do not listen yet: a listener is someone else's
                check_not_served(sock.getsockname()[0], sock.getsockname()[1])
        except OSError as exc:
            for sock in reserved:
                sock.close()
            raise ListenError(f"cannot listen on {listen.host}:{port}: {bind_error(exc, port)}") from None
        addresses += [(sock.family, sock.getsockname(), tls) for sock in socks]
    return reserved, addresses


async def run_supervised(settings: Settings, workers: int,
                         on_ready: Callable[[Any], None] | None = None) -> None:
    """The parent of a multi-process service, in the foreground; SIGINT/SIGTERM stop it and its workers,
    SIGHUP reloads the certificate here and in every worker."""
    from pop3proxy.app import (
        Ports,
        build_backend,
        build_server_config,
        keep_heartbeat,
        log_listening,
        start_services,
        until_stopped,
    )
    from pop3proxy.net.pop3_server import ServerState
    from pop3proxy.ops.logs import add_secrets

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        backend = build_backend(settings)
        add_secrets(getattr(backend, "passwords", {}).values())
        state = ServerState(build_server_config(settings), backend)
        assert state.gate is not None
        reserved, addresses = await reserve_ports(settings)
        supervisor = Supervisor(settings, workers, addresses, state.gate, getattr(backend, "memo_key", None))
        plain = next((address[1][1] for address in addresses if not address[2]), None)
        tls = next((address[1][1] for address in addresses if address[2]), None)
        ports = Ports(plain, tls, state=state)
        try:
            # The heartbeat outlives the service's nursery: a cluster node goes on saying it drains until
            # its workers have stopped, and only then that it stopped.
            async with trio.open_nursery() as outer:
                await outer.start(keep_heartbeat, backend)
                try:
                    async with trio.open_nursery() as nursery:
                        backend.attach(nursery)
                        await nursery.start(supervisor.run)
                        await start_services(nursery, settings, backend, state.gate,
                                             lambda: state.config.ssl_context, ports)
                        log_listening(settings, ports, state.config.ssl_context is not None)
                        log.info("serving with %d worker processes", workers)
                        if on_ready is not None:
                            on_ready(ports)
                        await until_stopped(signals, nursery, settings, state,
                                            lambda: supervisor.signal_all(signal.SIGHUP))
                        supervisor.stopping = True  # before the cancellation reaches the workers' keepers
                finally:
                    outer.cancel_scope.cancel()
        finally:
            supervisor.stopping = True
            with trio.CancelScope(shield=True):
                await backend.aclose()
                for sock in reserved:
                    sock.close()


def serve(settings: Settings, workers: int, run: Callable[[Callable[[], Any]], None],
          on_ready: Callable[[Any], None] | None = None) -> None:
    """`pop3proxy serve` with ``workers`` > 1; ``run`` runs a trio main function (the CLI's runner),
    ``on_ready`` is called once every worker accepts connections."""
    metrics_dir = prepare_metrics()
    try:
        from pop3proxy.app import limit_malloc_arenas, raise_file_limit

        raise_file_limit()
        limit_malloc_arenas()
        run(partial(run_supervised, settings, workers, on_ready))
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


# -- a worker --------------------------------------------------------------------------------------


def _stream_from(fd: int) -> trio.SocketStream:
    return trio.SocketStream(trio.socket.from_stdlib_socket(socket.socket(fileno=fd)))


async def _listen(family: int, address: Any) -> trio.SocketListener:
    sock = _port_socket(family, 0)
    try:
        await sock.bind(address)
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


async def run_worker(payload: dict[str, Any]) -> None:
    from pop3proxy.app import build_backend, drain_node, reload_tls, run_service

    settings: Settings = payload["settings"]
    backend = build_backend(settings)
    if payload.get("memo_key") is not None and hasattr(backend, "memo_key"):
        backend.memo_key = payload["memo_key"]
    gate = RemoteGate(_stream_from(payload["control"]))
    plain = [await _listen(family, address) for family, address, tls in payload["addresses"] if not tls]
    tls = [await _listen(family, address) for family, address, tls in payload["addresses"] if tls]
    # SIGINT (^C in a terminal reaches the whole process group) is the parent's to act on: it stops
    # the workers itself, after it has stopped replacing them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def watch_parent() -> None:
                await gate.run()
                nursery.cancel_scope.cancel()  # the parent is gone: stop

            nursery.start_soon(watch_parent)
            ports = await nursery.start(partial(run_service, settings, backend, listeners=(plain, tls), gate=gate,
                                                primary=False))
            gate.ready()
            async for signum in signals:
                if signum == signal.SIGHUP:
                    nursery.start_soon(reload_tls, settings, ports.state)
                    continue
                await drain_node(settings, ports.state, report=False)  # the parent reports the node's state
                nursery.cancel_scope.cancel()
                break


def main() -> int:
    payload = pickle.load(sys.stdin.buffer)
    sys.stdin.close()
    from pop3proxy.app import limit_malloc_arenas, raise_file_limit
    from pop3proxy.ops.logs import setup_logging

    setup_logging(payload["settings"].log)
    raise_file_limit()
    limit_malloc_arenas()
    try:
        trio.run(run_worker, payload)
    except KeyboardInterrupt:
        pass
    except Exception as exc:  # logged in one line: no traceback on the user's terminal
        error = sole_exception(exc)
        log.error("worker process %d failed: %s: %s", payload.get("index", -1), type(error).__name__, error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
