"""Tests for pop3proxy.store.state_pool: state databases kept open between sessions, and given up as
soon as their file changes."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from pop3proxy.store.api import LocalStateStore
from pop3proxy.store.state import StateError
from pop3proxy.store.state_pool import StatePool


def account(tmp_path: Path, name: str = "a") -> Path:
    (tmp_path / name).mkdir(exist_ok=True)
    return tmp_path / name / "state.db"


def test_a_closed_database_is_handed_out_again_while_its_file_is_unchanged(tmp_path: Path) -> None:
    pool, path = StatePool(), account(tmp_path)
    first = pool.open(path)
    first.set_meta("last_sync", "1")
    first.close()
    again = pool.open(path)
    assert again is first
    assert again.get_meta("last_sync") == "1"
    again.close()


def test_a_session_and_its_sync_each_get_their_own_and_both_are_kept(tmp_path: Path) -> None:
    pool, path = StatePool(), account(tmp_path)
    session, sync = pool.open(path), pool.open(path)
    assert session is not sync
    sync.set_meta("x", "from the sync")
    assert session.get_meta("x") == "from the sync"
    session.close()
    sync.close()
    assert {id(pool.open(path)), id(pool.open(path))} == {id(session), id(sync)}


def test_a_database_damaged_while_kept_is_checked_and_rebuilt_at_the_next_open(tmp_path: Path) -> None:
    pool, path = StatePool(), account(tmp_path)
    state = pool.open(path)
    assert state.begin_fetch("u1", "d1")
    state.finish_fetch("u1", "k1", 100)
    state.sync_to_disk()
    state.close()
    path.write_bytes(b"this is no database" * 300)  # damaged where it lies: same inode
    rebuilt = pool.open(path)
    assert rebuilt is not state
    assert rebuilt.rebuilt_from is not None
    assert [row.key for row in rebuilt.rows()] == ["k1"]
    rebuilt.close()


def test_a_removed_cache_is_not_served_from_a_database_kept_open(tmp_path: Path) -> None:
    pool, path = StatePool(), account(tmp_path)
    state = pool.open(path)
    state.set_meta("user", "a")
    state.close()
    shutil.rmtree(path.parent)
    account(tmp_path)
    fresh = pool.open(path)
    assert fresh is not state
    assert fresh.get_meta("user") is None
    fresh.close()
    with pytest.raises(sqlite3.ProgrammingError):  # the stale one was really closed
        state._db.execute("SELECT 1")


def test_at_most_limit_databases_are_kept_the_least_recently_used_go_first(tmp_path: Path) -> None:
    pool = StatePool(limit=2)
    states = {name: pool.open(account(tmp_path, name)) for name in "abc"}
    for name in "abc":
        states[name].close()
    with pytest.raises(sqlite3.ProgrammingError):
        states["a"]._db.execute("SELECT 1")
    assert pool.open(account(tmp_path, "b")) is states["b"]
    assert pool.open(account(tmp_path, "c")) is states["c"]
    assert pool.open(account(tmp_path, "a")) is not states["a"]


def test_a_database_that_failed_is_closed_for_good(tmp_path: Path) -> None:
    pool, path = StatePool(), account(tmp_path)
    state = pool.open(path)
    with pytest.raises(StateError):
        state._run("SELECT * FROM no_such_table")
    state.close()
    assert pool.open(path) is not state
    with pytest.raises(sqlite3.ProgrammingError):
        state._db.execute("SELECT 1")


def test_the_local_state_store_keeps_databases_until_its_pool_is_cleared(tmp_path: Path) -> None:
    store = LocalStateStore(tmp_path)
    store.path("a").parent.mkdir()
    state = store.open("a")
    state.close()
    assert store.open("a") is state
    state.close()
    store.pool.clear()
    with pytest.raises(sqlite3.ProgrammingError):
        state._db.execute("SELECT 1")
