"""A cluster's counters across nodes and owners, on a real PostgreSQL (`PostgresCounters`, `ClusterGate`):
two nodes count guesses and sessions together; an owner killed with SIGKILL stops counting at once; an
owner whose connection was ended takes its lock again; a database that cannot be reached refuses logins
with ``-ERR [SYS/TEMP]`` and keeps what it could not write; the tables stay bounded; and a login costs a
few round trips. The contract both engines share is in test_counters_contract.py.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import trio
import trio.testing
from helpers.counter_engines import Clock, CounterEngine
from helpers.waiting import eventually
from psycopg import pq

from pop3proxy.net.backend_api import Backend, Maildrop
from pop3proxy.net.cluster_gate import UNAVAILABLE, ClusterGate
from pop3proxy.net.pop3_server import ServerConfig, ServerState, handle_stream
from pop3proxy.store.postgres import PostgresCounters, apply_schema, open_pool
from pop3proxy.store.state import StateError

ROOT = Path(__file__).resolve().parents[2]
WAIT = 30.0


@pytest.fixture
def cluster(postgres_db: str) -> Iterator[CounterEngine]:
    """Nodes on one database: each `gate` or `counters` is another process's, on a pool of its own."""
    apply_schema(postgres_db)
    made = CounterEngine("postgres", postgres_db)
    yield made
    made.close()


def rows(conninfo: str, table: str) -> int:
    with psycopg.connect(conninfo) as conn:
        found = conn.execute(f"SELECT count(*) FROM {table}").fetchone()  # a table name of ours
    assert found is not None
    return int(found[0])


# -- two nodes -----------------------------------------------------------------------------------------


async def test_two_nodes_count_guesses_together(cluster):
    one, two = (cluster.gate(max_failures=3, base_delay=0, max_delay=0) for _ in range(2))
    for gate in (one, two):  # a wrong password on each node, each answered before the next
        async with gate.login("10.0.0.1", "acct") as attempt:
            assert not attempt.blocked
            await attempt.failed()
    # The third wrong password, on the first node again, is asked (-ERR [AUTH]), not refused.
    async with one.login("10.0.0.1", "acct") as attempt:
        assert not attempt.blocked
        await attempt.failed()
    for gate in (one, two):
        async with gate.login("10.0.0.1", "acct") as attempt:
            assert attempt.blocked


async def test_an_attempt_in_flight_on_one_node_counts_on_the_other(cluster):
    one, two = (cluster.gate(max_failures=1) for _ in range(2))
    async with one.login("10.0.0.1", "acct") as attempt:
        assert not attempt.blocked
        async with two.login("10.0.0.1", "acct") as second:
            assert second.blocked
    async with two.login("10.0.0.1", "acct") as attempt:  # ended: counted before the client is answered
        assert not attempt.blocked


async def test_a_login_after_a_success_on_another_node_is_not_refused(cluster):
    one, two = (cluster.gate(max_failures=3, base_delay=0, max_delay=0) for _ in range(2))
    for _ in range(2):
        async with one.login("10.0.0.1", "acct") as attempt:
            await attempt.failed()
    async with one.login("10.0.0.1", "acct") as attempt:
        assert not attempt.blocked
        attempt.succeeded()
    for _ in range(2):  # the client got +OK, logged out, and logs in on the other node: no failures left
        async with two.login("10.0.0.1", "acct") as attempt:
            assert not attempt.blocked
            await attempt.failed()


async def test_nodes_share_the_per_address_limit_but_not_max_sessions(cluster):
    one, two = (cluster.gate(max_per_address=2, max_sessions=2) for _ in range(2))
    assert await one.admit("10.0.0.1") == "ok"
    assert await two.admit("10.0.0.1") == "ok"
    assert await two.admit("10.0.0.1") == "address"  # the third from one address, on any node
    assert await one.admit("10.0.0.1") == "address"
    assert await one.admit("10.0.0.2") == "ok"
    assert await one.admit("10.0.0.3") == "full"  # max_sessions: this node's two
    assert await two.admit("10.0.0.3") == "ok"  # the other node has room
    one.leave("10.0.0.1")
    await one.given_back()
    assert await two.admit("10.0.0.1", force=True) == "ok"


# -- owners that die ----------------------------------------------------------------------------------

# Another process (another node): holds a session from 10.0.0.1 and a login of (10.0.0.1, acct) in flight,
# says "holding", and waits to be killed.
HOLDER = """
import sys
from pop3proxy.store.postgres import PostgresCounters, open_pool
counters = PostgresCounters(open_pool(sys.argv[1], max_size=1), max_per_address=1, max_failures=1)
assert counters.admit("10.0.0.1")
assert counters.begin("10.0.0.1", "acct") == (False, 0.0)
print("holding", flush=True)
sys.stdin.readline()
"""


def test_a_killed_owner_stops_counting_at_once(cluster):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, cluster.where], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
        here = cluster.counters(max_per_address=1, max_failures=1)
        assert here.admit("10.0.0.1") is False  # its session counts here
        assert here.begin("10.0.0.1", "acct") == (True, 0.0)  # and so does its login in flight
        holder.send_signal(signal.SIGKILL)  # no clean exit, nothing given back by the process
        assert holder.wait(WAIT) == -signal.SIGKILL
        # As soon as the server has ended its connection (no one deletes its rows first):
        eventually(lambda: here.admit("10.0.0.1"), message="the dead owner's session to stop counting")
        assert here.begin("10.0.0.1", "acct") == (False, 0.0)
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait(WAIT)
    assert rows(cluster.where, "throttle_in_flight") == 4 and rows(cluster.where, "address_sessions") == 2
    here.reap()  # the dead owner's rows go; ours stay
    assert rows(cluster.where, "throttle_in_flight") == 2 and rows(cluster.where, "address_sessions") == 1


def test_an_owner_whose_connection_was_ended_takes_its_lock_again(cluster):
    one, two = (cluster.counters(max_per_address=2) for _ in range(2))
    assert one.admit("10.0.0.1") and one.admit("10.0.0.1")
    assert two.admit("10.0.0.1") is False
    owner, conn = one.owner, one._owner_conn
    assert conn is not None
    with psycopg.connect(cluster.where, autocommit=True) as admin:  # as an administrator would
        admin.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
    eventually(lambda: two.admit("10.0.0.1"), message="the ended owner's sessions to stop counting")
    # Its next operation learns it from the server, takes the lock again under the same id, and goes on.
    assert one.begin("10.0.0.1", "acct") == (False, 0.0)
    assert one.owner == owner and one._owner_conn is not conn
    assert two.admit("10.0.0.1") is False  # its sessions count again
    one.close()  # and stop counting with its connection
    eventually(lambda: two.admit("10.0.0.1"), message="the closed owner's sessions to stop counting")


# -- a database that cannot be reached ----------------------------------------------------------------


@pytest.fixture
def unreachable() -> Iterator[str]:
    """The conninfo of a server that does not listen (a loopback port bound, never listening)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        yield f"host=127.0.0.1 port={holder.getsockname()[1]} user=postgres dbname=none connect_timeout=2"


class NoLogins(Backend):
    async def login(self, user, password, peer, *, mechanism="USER", early=None) -> Maildrop:
        raise AssertionError("the provider must not be asked")


async def test_a_login_is_refused_with_sys_temp_when_the_database_cannot_be_reached(unreachable, caplog):
    pool = open_pool(unreachable, min_size=0, max_size=1, timeout=1.0)
    try:
        gate = ClusterGate(PostgresCounters(pool, check=False), max_sessions=10)
        state = ServerState(ServerConfig(allow_plaintext_auth="always"), NoLogins(), gate=gate)
        client, server = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(handle_stream, state, server)
            await client.send_all(b"USER alice\r\nPASS secret\r\n")
            received = b""
            while received.count(b"\r\n") < 3:  # the greeting (admitted on the node's limits), USER, PASS
                received += await client.receive_some(4096)
            await client.send_all(b"QUIT\r\n")
        assert received.splitlines()[2] == b"-ERR [SYS/TEMP] " + UNAVAILABLE.encode()
        assert gate.node.sessions == 0  # the session left
        assert "cluster counters unavailable" in caplog.text
    finally:
        pool.close()


def test_what_cannot_be_written_is_kept_and_written_later(cluster, unreachable):
    here, there = (cluster.counters(max_failures=1, max_per_address=1) for _ in range(2))
    assert here.admit("10.0.0.1") and here.begin("10.0.0.1", "acct") == (False, 0.0)
    reachable, here.pool = here.pool, open_pool(unreachable, min_size=0, max_size=1, timeout=1.0)
    try:
        with pytest.raises(StateError, match="kept to be written later"):
            here.end("10.0.0.1", "acct", ok=True)
        with pytest.raises(StateError, match="kept to be written later"):
            here.leave("10.0.0.1")
        assert here.owes()
        assert there.begin("10.0.0.1", "acct")[0] and not there.admit("10.0.0.1")  # still counted
    finally:
        here.pool.close()
        here.pool = reachable
    here.settle()
    assert not here.owes()
    assert there.begin("10.0.0.1", "acct") == (False, 0.0) and there.admit("10.0.0.1")


async def test_a_gate_retries_what_it_could_not_give_back(cluster, unreachable):
    gate = cluster.gate(max_failures=1)
    assert isinstance(gate, ClusterGate)
    counters = gate.counters
    async with gate.login("10.0.0.1", "acct") as attempt:
        reachable, counters.pool = counters.pool, open_pool(unreachable, min_size=0, max_size=1, timeout=1.0)
        attempt.succeeded()
    assert counters.owes()  # the session was answered all the same
    counters.pool.close()
    counters.pool = reachable
    with trio.fail_after(WAIT):
        await gate.given_back()
    assert not counters.owes()
    async with cluster.gate(max_failures=1).login("10.0.0.1", "acct") as attempt:
        assert not attempt.blocked


# -- bounds and costs ---------------------------------------------------------------------------------


def test_old_failures_are_pruned_and_their_number_is_bounded(cluster):
    clock = Clock()
    counters = cluster.counters(clock=clock, window=900, max_failure_rows=6)
    for i in range(4):  # four failures, three rows each
        clock.now += 1
        counters.failed(f"10.0.0.{i}", "acct", in_flight=False)
    assert rows(cluster.where, "throttle_failures") == 12
    counters.reap()
    with psycopg.connect(cluster.where) as conn:
        assert conn.execute("SELECT count(*), min(at) FROM throttle_failures").fetchone() == (6, 1003.0)
    clock.now += 901
    counters.reap()
    assert rows(cluster.where, "throttle_failures") == 0


def test_a_warm_login_costs_three_round_trips(cluster, tmp_path):
    # Counted in libpq's trace of the one pooled connection: admission, the login's begin and its end;
    # the session's leave after QUIT is a fourth; a failed login is begin and failure.
    trace = tmp_path / "libpq.trace"
    pool = open_pool(cluster.where, min_size=1, max_size=1)
    try:
        counters = PostgresCounters(pool, reap_every=3600)
        counters.admit("10.0.0.9")  # warm: the owner's connection made, the first pruning done
        counters.leave("10.0.0.9")
        with trace.open("w") as sink, pool.connection() as conn:
            conn.pgconn.trace(os.dup(sink.fileno()))
            conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
        counters.admit("10.0.0.1")
        assert counters.begin("10.0.0.1", "alice") == (False, 0.0)
        counters.end("10.0.0.1", "alice", ok=True)
        login = round_trips(trace)
        counters.leave("10.0.0.1")
        session = round_trips(trace)
        assert counters.begin("10.0.0.1", "bob") == (False, 0.0)
        counters.failed("10.0.0.1", "bob")
        failed = round_trips(trace) - session
    finally:
        pool.close()
    assert (login, session, failed) == (3, 4, 2), trace.read_text()


def round_trips(trace: Path) -> int:
    """Round trips in a libpq trace: the client's messages after which it waits for the server."""
    return sum(1 for line in trace.read_text().splitlines() if line.split("\t")[:3:2] in (["F", "Sync"],
                                                                                        ["F", "Query"]))
