"""The PostgreSQL schema's versions (pop3proxy/store/postgres/schema.py), on a real server: created and
upgraded idempotently, once under concurrency, all or nothing; a database older or newer than the code
refused with an error that says what to do; the advisory lock keys."""

from __future__ import annotations

import hashlib
import socket
import threading
from collections.abc import Iterator

import psycopg
import pytest

from pop3proxy.store.postgres import (
    SCHEMA_VERSION,
    PostgresStateStore,
    SchemaTooNew,
    SchemaTooOld,
    apply_schema,
    open_pool,
)
from pop3proxy.store.postgres import schema as schema_module
from pop3proxy.store.postgres.locks import session_key
from pop3proxy.store.postgres.schema import lock_key
from pop3proxy.store.state import StateError


def versions(conninfo: str) -> list[int]:
    with psycopg.connect(conninfo) as conn:
        return [version for (version,) in conn.execute("SELECT version FROM schema_version ORDER BY version")]


def columns(conninfo: str, table: str) -> set[str]:
    with psycopg.connect(conninfo) as conn:
        return {name for (name,) in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = %s", (table,))}


@pytest.fixture
def pools() -> Iterator[list]:
    made: list = []
    yield made
    for pool in made:
        pool.close()


def store(conninfo: str, pools: list) -> PostgresStateStore:
    pool = open_pool(conninfo, max_size=2)
    pools.append(pool)
    return PostgresStateStore(pool)


def test_apply_schema_creates_it_once(postgres_db, pools):
    assert apply_schema(postgres_db) == 0
    assert apply_schema(postgres_db) == SCHEMA_VERSION  # nothing left to do
    assert versions(postgres_db) == list(range(1, SCHEMA_VERSION + 1))
    assert {"account", "uid", "key", "status", "digest", "size", "fetched_at", "upstream", "source"} <= columns(
        postgres_db, "messages")
    state = store(postgres_db, pools).open("alice")
    assert state.begin_fetch("u1", "d1")


def test_concurrent_callers_apply_each_version_once(postgres_db):
    start = threading.Barrier(4)
    found: list[int | BaseException] = []

    def apply() -> None:
        start.wait(30)
        try:
            found.append(apply_schema(postgres_db))
        except BaseException as exc:
            found.append(exc)

    threads = [threading.Thread(target=apply) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(found, key=str) == [0] + [SCHEMA_VERSION] * 3, found
    assert versions(postgres_db) == list(range(1, SCHEMA_VERSION + 1))


def test_a_database_without_the_schema_is_refused(postgres_db, pools):
    with pytest.raises(SchemaTooOld, match="pop3proxy db upgrade") as refused:
        store(postgres_db, pools)
    assert isinstance(refused.value, StateError)
    assert (refused.value.found, refused.value.expected) == (0, SCHEMA_VERSION)


def test_an_older_database_is_refused_until_it_is_upgraded(postgres_db, pools, monkeypatch):
    apply_schema(postgres_db)
    store(postgres_db, pools).open("alice").set_meta("offline_hash", "kept")
    monkeypatch.setattr(schema_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    monkeypatch.setitem(schema_module.MIGRATIONS, SCHEMA_VERSION + 1,
                        ("ALTER TABLE messages ADD COLUMN later text",))
    with pytest.raises(SchemaTooOld, match="pop3proxy db upgrade") as refused:
        store(postgres_db, pools)
    assert (refused.value.found, refused.value.expected) == (SCHEMA_VERSION, SCHEMA_VERSION + 1)
    assert apply_schema(postgres_db) == SCHEMA_VERSION
    assert "later" in columns(postgres_db, "messages")
    assert versions(postgres_db)[-1] == SCHEMA_VERSION + 1
    assert store(postgres_db, pools).open("alice").get_meta("offline_hash") == "kept"


def test_a_failed_upgrade_changes_nothing(postgres_db, monkeypatch):
    apply_schema(postgres_db)
    monkeypatch.setattr(schema_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    monkeypatch.setitem(schema_module.MIGRATIONS, SCHEMA_VERSION + 1,
                        ("ALTER TABLE messages ADD COLUMN half text", "SELECT no_such_function()"))
    with pytest.raises(StateError, match="no_such_function"):
        apply_schema(postgres_db)
    assert versions(postgres_db) == list(range(1, SCHEMA_VERSION + 1))
    assert "half" not in columns(postgres_db, "messages")


def test_a_newer_database_is_refused_and_left_alone(postgres_db, pools):
    apply_schema(postgres_db)
    with psycopg.connect(postgres_db) as conn:
        conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (SCHEMA_VERSION + 1,))
    with pytest.raises(SchemaTooNew, match="newer than this pop3proxy") as refused:
        store(postgres_db, pools)
    assert (refused.value.found, refused.value.expected) == (SCHEMA_VERSION + 1, SCHEMA_VERSION)
    with pytest.raises(SchemaTooNew):
        apply_schema(postgres_db)
    assert versions(postgres_db) == [*range(1, SCHEMA_VERSION + 1), SCHEMA_VERSION + 1]


def test_a_server_that_cannot_be_reached_is_a_state_error():
    with socket.socket() as unused:  # bound, never listening: connections are refused
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        with pytest.raises(StateError, match="cannot apply"):
            apply_schema(f"host=127.0.0.1 port={port} user=postgres dbname=none connect_timeout=2")


def test_lock_keys_are_signed_64_bit_and_kept_apart_by_namespace():
    key = session_key("alice@example.org")
    digest = hashlib.sha256(b"pop3proxy session\0alice@example.org").digest()
    assert key == int.from_bytes(digest[:8], "big", signed=True)
    assert -(2**63) <= key < 2**63
    assert session_key("alice@example.org") == key != session_key("Alice@example.org")
    assert lock_key("pop3proxy tokens", "alice@example.org") != key
    assert isinstance(session_key("\udcff surrogate"), int)
