"""What the cluster's state store costs in round trips to PostgreSQL (what bounds a node's logins, see
the sizing in docs/CLUSTER.md): a method of one statement is one round trip (autocommit: the statement
is its own transaction, no BEGIN nor COMMIT); a method of several statements is one transaction. The
pool's connections go back as the pool's other users expect them (out of autocommit mode), also after
an error. Counted from the client's side: libpq's trace of the pool's only connection, where each round
trip ends with one ReadyForQuery from the server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import pq
from psycopg_pool import ConnectionPool

from pop3proxy.store.api import StateError
from pop3proxy.store.postgres import PostgresStateStore, apply_schema


class Traced:
    """A store on a pool of one traced connection."""

    def __init__(self, conninfo: str, trace: Path) -> None:
        self.trace = trace
        self.fd = os.open(trace, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

        def configure(conn: psycopg.Connection) -> None:
            conn.pgconn.trace(self.fd)
            conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)

        self.pool = ConnectionPool(conninfo, min_size=1, max_size=1, configure=configure, open=True)
        self.states = PostgresStateStore(self.pool)

    def text(self) -> str:
        return self.trace.read_text()

    def round_trips(self, call) -> int:
        before = self.text().count("ReadyForQuery")
        call()
        return self.text().count("ReadyForQuery") - before

    def transactions(self, call) -> int:
        before = self.text().count('Query\t "BEGIN"')
        call()
        return self.text().count('Query\t "BEGIN"') - before

    def close(self) -> None:
        self.pool.close()
        os.close(self.fd)


@pytest.fixture
def traced(postgres_db: str, tmp_path: Path) -> Iterator[Traced]:
    apply_schema(postgres_db)
    made = Traced(postgres_db, tmp_path / "trace")
    yield made
    made.close()


def test_every_call_of_one_statement_is_one_round_trip(traced):
    states = traced.states
    assert traced.round_trips(lambda: states.open("alice")) == 1
    state = states.open("alice")
    calls = {
        "open_existing": lambda: states.open_existing("alice"),
        "begin_fetch": lambda: state.begin_fetch("u1", "d1"),
        "begin_fetch_many": lambda: state.begin_fetch_many([("u2", "d2"), ("u3", "d3")]),
        "rows": state.rows,
        "fetching": state.fetching,
        "recovery_view": state.recovery_view,
        "cached_keys": lambda: state.cached_keys(upstream_only=True),
        "hidden_keys": state.hidden_keys,
        "uids_for_keys": lambda: state.uids_for_keys(["k1"]),
        "known_uids_among": lambda: state.known_uids_among(["u1", "u9"]),
        "abandon_fetch": lambda: state.abandon_fetch("u3"),
        "mark_deleted": lambda: state.mark_deleted(["k1"]),
        "restore_deleted": lambda: state.restore_deleted(["k1"]),
        "forget_keys": lambda: state.forget_keys(["k9"]),
        "upstream_gone": lambda: state.upstream_gone(["u9"]),
        "adopt": lambda: state.adopt("u1", "u1-new"),
        "set_meta": lambda: state.set_meta("last_sync", "{}"),
        "get_meta": lambda: state.get_meta("last_sync"),
        "set_meta None": lambda: state.set_meta("last_sync", None),
        "set_metas": lambda: state.set_metas({"last_sync": "{}", "user": "alice", "offline_memo": None}),
        "get_metas": lambda: state.get_metas(["last_sync", "user"]),
        "drop_rows": lambda: state.drop_rows(["u2"]),
    }
    begun = traced.text().count('Query\t "BEGIN"')  # the schema's check, when the store was made
    trips = {name: traced.round_trips(call) for name, call in calls.items()}
    assert trips == dict.fromkeys(calls, 1)
    assert traced.text().count('Query\t "BEGIN"') == begun


def test_calls_of_several_statements_stay_one_transaction_and_what_they_wrote_is_there(traced):
    state = traced.states.open("alice")
    state.begin_fetch_many([("u1", "d1"), ("u2", "d2")])
    assert traced.transactions(lambda: state.finish_fetch_many([("u1", "k1", 10, "cached"),
                                                                ("u2", "k2", 20, "held")])) == 1
    assert traced.transactions(lambda: state.release_held("k2", "u3", "k3", 30)) == 1
    assert {row.uid: (row.key, row.status) for row in traced.states.open("alice").rows()} == {
        "u1": ("k1", "cached"), "u2": ("k3", "cached"), "u3": ("k3", "cached")}


def test_the_connection_goes_back_out_of_autocommit_also_after_an_error(traced):
    state = traced.states.open("alice")
    with traced.pool.connection() as conn:
        assert not conn.autocommit
    with pytest.raises(StateError):
        state._all("SELECT no_such_column FROM messages", ())
    with traced.pool.connection() as conn:
        assert not conn.autocommit
        with conn.transaction():  # the pool's other users still get their transactions
            conn.execute("SELECT 1")
    assert state.rows() == []
