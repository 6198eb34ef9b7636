"""What only the PostgreSQL session locks do (the contract both engines keep is in
test_session_locks_contract.py): one connection per process whatever the number of accounts held,
which node serves which account, and a lock lost with its connection."""

from __future__ import annotations

import psycopg
import pytest
from helpers.waiting import eventually

from pop3proxy.store.api import MailboxBusy, StateError
from pop3proxy.store.postgres import apply_schema, open_pool
from pop3proxy.store.postgres.locks import PostgresSessionLocks
from pop3proxy.store.postgres.nodes import NodeDirectory


def lock_connections(conninfo: str) -> int:
    with psycopg.connect(conninfo) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE "
                           "'pop3proxy session locks%%' AND datname = current_database()").fetchone()
    return int(row[0]) if row else 0


def test_many_accounts_are_held_on_one_connection(postgres_db):
    locks = PostgresSessionLocks(postgres_db)
    held = [locks.try_lock(f"user{i}") for i in range(20)]
    assert lock_connections(postgres_db) == 1
    with pytest.raises(MailboxBusy):
        locks.try_lock("user3")  # held by this very process: refused, as flock does
    for lock in held:
        lock.release()
    again = PostgresSessionLocks(postgres_db).try_lock("user3")  # given back for everyone
    again.release()
    locks.close()


def test_the_serving_table_names_the_node_while_the_lock_is_held(postgres_db):
    apply_schema(postgres_db)
    pool = open_pool(postgres_db, min_size=1, max_size=2)
    try:
        directory = NodeDirectory(pool, "alpha")
        locks = PostgresSessionLocks(postgres_db, node="alpha")
        lock = locks.try_lock("alice")
        assert [(entry.account, entry.node) for entry in directory.serving()] == [("alice", "alpha")]
        lock.release()
        assert directory.serving() == []
        # A holder that vanished without giving the lock back leaves a row that is not shown.
        lost = locks.try_lock("bob")
        locks.close()
        assert not lost.held
        # the server frees the lock once its backend has seen the connection close: soon, not at once
        eventually(lambda: directory.serving() == [], message="the closed connection's lock is still shown")
    finally:
        pool.close()


def test_a_broken_connection_loses_its_locks_and_the_next_lock_connects_anew(postgres_db):
    locks = PostgresSessionLocks(postgres_db)
    lock = locks.try_lock("alice")
    assert lock.held
    with psycopg.connect(postgres_db, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE application_name LIKE 'pop3proxy session locks%%'")
    with pytest.raises(StateError):
        locks.try_lock("bob")  # the break is seen here ...
    assert not lock.held  # ... and the lock taken on that connection is known lost
    other = PostgresSessionLocks(postgres_db).try_lock("alice")  # the server freed it
    other.release()
    bob = locks.try_lock("bob")  # a new connection
    assert bob.held
    lock.release()  # lost: nothing to give back, no error
    bob.release()
    locks.close()
