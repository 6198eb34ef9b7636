"""Connections that never log in cannot starve real users.

A real server process (standalone mode). Attacks: many idle greeted connections, and connections
that trickle one byte at a time (each byte used to reset the idle timer). Each test prints the peak
resident size of the server it saw and the time a normal login took during the attack.
"""

from __future__ import annotations

import poplib
import socket
import time

import trio
from helpers.common import HOST, memory_kib, write_config
from helpers.waiting import eventually

from pop3proxy.net.pop3_server import EVICT_AFTER
from pop3proxy.proxy.credentials import set_password
from pop3proxy.store import open_store


def start(tmp_path, server_process, **listen):
    users = tmp_path / "users"
    set_password(users, "alice", "pw")
    with open_store(tmp_path / "cache", "alice") as box:
        box.add(b"Subject: hi\r\n\r\nhello\r\n")
    config = write_config(
        tmp_path / "pop3proxy.toml",
        {
            "listen": {"host": HOST, "port": 0, "max_sessions_per_address": 2000, **listen},
            "local": {"users_file": users},
            "cache": {"root": tmp_path / "cache"},
        },
    )
    return server_process(config).start()


def timed_login(port: int) -> float:
    started = time.monotonic()
    client = poplib.POP3(HOST, port, timeout=30)
    client.user("alice")
    assert client.pass_("pw").startswith(b"+OK")
    assert client.stat()[0] == 1
    client.quit()
    return time.monotonic() - started


def login_when_admitted(port: int) -> float | None:
    """`timed_login` once the server has room; None while it refuses the session ("too many sessions")."""
    try:
        return timed_login(port)
    except poplib.error_proto as exc:
        assert b"too many sessions" in exc.args[0], exc
        return None


def test_idle_greeted_connections_leave_room_for_a_real_login(tmp_path, server_process):
    # Default pre-login cap (200); the session cap lowered from 1000 so that the test needs fewer sockets.
    server = start(tmp_path, server_process, max_sessions=300)
    idle = []
    try:
        for _ in range(300):  # greeted and silent: every session the server allows
            sock = socket.create_connection((HOST, server.port), timeout=10)
            assert sock.recv(100).startswith(b"+OK")
            idle.append(sock)
        # Connections that have waited EVICT_AFTER seconds may be closed for room; a burst of real
        # clients (younger than that) never is: until the attack's connections are that old, a login
        # is refused ("too many sessions"). The server admitting one is the event waited for.
        peak = memory_kib(server.proc.pid)
        took = eventually(lambda: login_when_admitted(server.port), timeout=EVICT_AFTER + 30, interval=0.1,
                          message="a real login admitted (an idle connection older than EVICT_AFTER evicted)")
        peak = max(peak, memory_kib(server.proc.pid))
        # The oldest idle connections were closed with a reason, to make room.
        closed = 0
        for sock in idle[:1]:  # the oldest, closed to make room for the real login
            sock.settimeout(10)
            data = sock.recv(200)
            if b"too many connections waiting to log in" in data:
                closed += 1
        print(f"pre-login flood: 300 idle connections filling the session cap, the oldest evicted: {bool(closed)}; "
              f"peak RSS {peak} KiB; a normal login took {took * 1000:.0f} ms")
        assert closed == 1
    finally:
        for sock in idle:
            sock.close()


def test_trickling_connections_are_dropped_at_the_login_deadline(tmp_path, server_process):
    deadline = 1.5
    server = start(tmp_path, server_process, login_timeout=deadline, idle_timeout=60)
    outcome: dict[str, object] = {"closed": 0, "reasons": set()}

    async def trickle(port: int) -> None:
        stream = await trio.open_tcp_stream(HOST, port)
        async with stream:
            greeting = await stream.receive_some(200)
            assert greeting.startswith(b"+OK")
            started = trio.current_time()
            while True:
                try:
                    await stream.send_all(b"N")  # a byte at a time: never a whole command
                except trio.BrokenResourceError:
                    break
                with trio.move_on_after(0.2):  # the trickle's pace (the attack), not synchronisation
                    data = await stream.receive_some(200)
                    if not data:
                        break
                    outcome["reasons"].add(data.strip())
                    break
            outcome["closed"] += 1
            outcome.setdefault("longest", 0.0)
            outcome["longest"] = max(outcome["longest"], trio.current_time() - started)

    async def attack() -> None:
        with trio.fail_after(30):  # bound: every trickler must be gone long before this
            await run_attack()

    async def run_attack() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(100):
                nursery.start_soon(trickle, server.port)
            outcome["login"] = await trio.to_thread.run_sync(timed_login, server.port)
            outcome["peak"] = memory_kib(server.proc.pid)

    trio.run(attack)
    print(f"trickle: 100 connections dropped after at most {outcome['longest']:.1f} s "
          f"(deadline {deadline} s); peak RSS {outcome['peak']} KiB; a normal login took "
          f"{outcome['login'] * 1000:.0f} ms")
    assert outcome["closed"] == 100
    assert outcome["reasons"] == {b"-ERR login timeout, closing connection"}
    assert outcome["longest"] < deadline + 2
