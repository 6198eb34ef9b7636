"""The gate kept by a parent process and asked by workers over a stream (here: in-memory streams)."""

from __future__ import annotations

import os

import pytest
import trio
import trio.testing

from pop3proxy.config import MAX_WORKERS, Settings
from pop3proxy.net.gate import Gate
from pop3proxy.net.shared import GateServer, RemoteGate
from pop3proxy.net.throttle import Throttle


async def worker(nursery: trio.Nursery, server: GateServer) -> tuple[RemoteGate, trio.abc.Stream]:
    ours, theirs = trio.testing.memory_stream_pair()
    remote = RemoteGate(ours)
    nursery.start_soon(remote.run)
    nursery.start_soon(server.serve, theirs)
    return remote, theirs


async def test_workers_share_the_session_limits():
    gate = Gate(Throttle(), max_per_address=2, max_sessions=3)
    server = GateServer(gate)
    async with trio.open_nursery() as nursery:
        one, _ = await worker(nursery, server)
        two, _ = await worker(nursery, server)
        assert await one.admit("10.0.0.1") == "ok"
        assert await two.admit("10.0.0.1") == "ok"
        assert await two.admit("10.0.0.1") == "address"  # the third from one address, on any worker
        assert await one.admit("10.0.0.2") == "ok"
        assert await two.admit("10.0.0.3") == "full"  # max_sessions counts all workers
        assert await two.admit("10.0.0.3", force=True) == "ok"  # room being made
        one.leave("10.0.0.1")
        await trio.testing.wait_all_tasks_blocked()
        assert gate.per_address["10.0.0.1"] == 1 and gate.sessions == 3
        nursery.cancel_scope.cancel()


async def test_a_dead_worker_gives_back_its_sessions_and_logins():
    gate = Gate(Throttle(max_failures=1), max_per_address=5, max_sessions=10)
    server = GateServer(gate)
    async with trio.open_nursery() as nursery:
        ours, theirs = trio.testing.memory_stream_pair()
        remote = RemoteGate(ours)
        nursery.start_soon(remote.run)
        served = trio.Event()

        async def serve() -> None:
            await server.serve(theirs)
            served.set()

        nursery.start_soon(serve)
        assert await remote.admit("10.0.0.1") == "ok"
        entered, release = trio.Event(), trio.Event()

        async def login_in_flight() -> None:
            async with remote.login("10.0.0.1", "acct") as attempt:
                assert not attempt.blocked
                entered.set()
                await release.wait()

        nursery.start_soon(login_in_flight)
        await entered.wait()
        # The attempt in flight counts: a second one of the pair is refused (max_failures = 1).
        assert gate.throttle.blocked("10.0.0.1", "acct")
        await theirs.aclose()  # the worker died
        await served.wait()
        assert gate.sessions == 0 and not gate.per_address
        assert not gate.throttle.blocked("10.0.0.1", "acct")
        nursery.cancel_scope.cancel()


async def test_failures_reported_by_workers_are_counted_once_for_all():
    gate = Gate(Throttle(max_failures=2, base_delay=0, max_delay=0), max_per_address=5)
    server = GateServer(gate)
    async with trio.open_nursery() as nursery:
        one, _ = await worker(nursery, server)
        two, _ = await worker(nursery, server)
        for remote in (one, two):
            async with remote.login("10.0.0.1", "acct") as attempt:
                assert not attempt.blocked
                assert await attempt.failed() == 0
            await trio.testing.wait_all_tasks_blocked()  # the end of the attempt has reached the parent
        async with one.login("10.0.0.1", "acct") as attempt:
            assert attempt.blocked
        nursery.cancel_scope.cancel()


async def test_a_request_cancelled_while_waiting_holds_nothing():
    gate = Gate(Throttle(), max_per_address=5)
    server = GateServer(gate)
    async with trio.open_nursery() as nursery:
        ours, theirs = trio.testing.memory_stream_pair()
        remote = RemoteGate(ours)
        nursery.start_soon(remote.run)
        with trio.move_on_after(0) as scope:  # cancelled before the parent has answered
            await remote.admit("10.0.0.1")
        assert scope.cancelled_caught
        nursery.start_soon(server.serve, theirs)  # the parent reads the request and the give-back
        assert await remote.admit("10.0.0.9") == "ok"
        await trio.testing.wait_all_tasks_blocked()
        assert dict(gate.per_address) == {"10.0.0.9": 1}
        nursery.cancel_scope.cancel()


async def test_a_worker_stops_when_the_parent_goes_away():
    ours, theirs = trio.testing.memory_stream_pair()
    remote = RemoteGate(ours)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(remote.run)
        pending = trio.Event()

        async def ask() -> None:
            with pytest.raises(Exception, match="gone"):
                pending.set()
                await remote.admit("10.0.0.1")

        nursery.start_soon(ask)
        await pending.wait()
        await theirs.aclose()
    # run() returned (the nursery closed) and the waiting request failed instead of hanging


def test_the_worker_count_is_bounded():
    Settings(listen={"port": 0, "workers": MAX_WORKERS})
    with pytest.raises(ValueError, match="workers"):
        Settings(listen={"port": 0, "workers": MAX_WORKERS + 1})


def test_worker_processes_share_the_check_that_skips_scrypt(tmp_path, monkeypatch):
    # Two backends of one service (two worker processes, one memo key): after one of them checked a
    # password against the offline hash, the other does not pay scrypt again for the same password.
    from pop3proxy.proxy import offline as backend_module
    from pop3proxy.proxy.backend import ProxyBackend
    from pop3proxy.proxy.offline import OFFLINE_HASH, remember_offline_password
    from pop3proxy.store.state import UserState

    settings = Settings(listen={"port": 0}, upstream={"host": "127.0.0.1", "tls": "none"},
                        cache={"root": tmp_path / "cache"})
    first, second = ProxyBackend(settings), ProxyBackend(settings)
    second.memo_key = first.memo_key
    calls = []
    real = backend_module.verify_password
    monkeypatch.setattr(backend_module, "verify_password", lambda *a: calls.append(a) or real(*a))
    with UserState(tmp_path / "state.db") as state:
        remember_offline_password(state, "secret", first.auth_cache.keyed)  # first login ever: hashed, no check
        stored = state.get_meta(OFFLINE_HASH)
        remember_offline_password(state, "secret", second.auth_cache.keyed)
        assert calls == [] and state.get_meta(OFFLINE_HASH) == stored
        remember_offline_password(state, "other", second.auth_cache.keyed)  # a changed password is checked and stored
        assert len(calls) == 1 and state.get_meta(OFFLINE_HASH) != stored
        stranger = ProxyBackend(settings)  # another service (new key): checks once
        remember_offline_password(state, "other", stranger.auth_cache.keyed)
        assert len(calls) == 2


def test_a_worker_gets_its_share_of_the_per_process_limits():
    from pop3proxy.config import usable_cpus
    from pop3proxy.workers import worker_settings

    settings = Settings(listen={"port": 0, "max_unauthenticated": 201}, upstream={"host": "h", "early_connections": 64},
                        sync={"filter_processes": "auto"})
    share = worker_settings(settings, 2)
    assert share.listen.max_unauthenticated == 101 and share.upstream.early_connections == 32
    assert share.listen.max_sessions == settings.listen.max_sessions  # held by the parent for all workers
    assert share.sync.filter_processes == max(1, usable_cpus() // 2)
    assert worker_settings(settings.model_copy(update={"sync": settings.sync.model_copy(
        update={"filter_processes": 3})}), 2).sync.filter_processes == 3


def test_metrics_directories_of_killed_supervisors_are_removed(tmp_path, monkeypatch):
    import subprocess
    import sys
    import tempfile

    from pop3proxy import workers

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"{workers.METRICS_PREFIX}{int(dead.stdout)}-abc"
    live = tmp_path / f"{workers.METRICS_PREFIX}{os.getpid()}-def"
    for path in (stale, live):
        path.mkdir()
        (path / "counter_1.db").write_bytes(b"x")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    # Recorded as set, then removed: the variable prepare_metrics sets is gone after the test (a plain
    # delenv of an absent variable records nothing, and later tests in this process saw multiprocess mode).
    monkeypatch.setenv(workers.METRICS_ENV, "")
    monkeypatch.delenv(workers.METRICS_ENV)
    made = workers.prepare_metrics()
    assert os.environ[workers.METRICS_ENV] == made and os.path.isdir(made)
    assert not stale.exists() and live.exists()
