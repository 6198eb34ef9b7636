"""Tests for pop3proxy.store.state: file modes, transient errors versus corruption, the journal."""

from __future__ import annotations

import contextlib
import os
import resource
import sqlite3
import stat
from pathlib import Path

import pytest

from pop3proxy.store import state as state_module
from pop3proxy.store import state_db
from pop3proxy.store.state import StateError, UserState


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_state_files_hold_the_offline_hash_and_are_private(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        path = tmp_path / "state.db"
        with UserState(path) as state:
            state.set_meta("offline_hash", "$scrypt$secret")
            files = [path, tmp_path / "state.journal", tmp_path / "state.db-wal", tmp_path / "state.db-shm"]
            assert {f.name: mode(f) for f in files} == {f.name: 0o600 for f in files}
    finally:
        os.umask(previous)


def test_state_files_of_an_older_version_are_made_private(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with UserState(path) as state:
        state.set_meta("offline_hash", "$scrypt$secret")
    for name in ("state.db", "state.journal"):
        os.chmod(tmp_path / name, 0o644)
    with UserState(path):
        assert mode(path) == mode(tmp_path / "state.journal") == 0o600


# --- a transient error is not corruption ---------------------------------------------------------


def filled_state(path: Path) -> None:
    with UserState(path) as state:
        assert state.begin_fetch("u1", "d1")
        state.finish_fetch("u1", "k1", 100)
        state.set_meta("offline_hash", "$scrypt$x")


def untouched(path: Path) -> None:
    """The database is where it was, nothing was moved aside, and it still knows its rows."""
    assert not list(path.parent.glob("state.db.corrupt-*"))
    with UserState(path) as state:
        assert state.rebuilt_from is None
        assert [(row.uid, row.key, row.status) for row in state.rows()] == [("u1", "k1", "cached")]
        assert state.get_meta("offline_hash") == "$scrypt$x"


def test_a_locked_database_is_an_error_not_corruption(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state_db, "BUSY_TIMEOUT", 0.1)
    path = tmp_path / "state.db"
    filled_state(path)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StateError, match="locked"):
            UserState(path)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    untouched(path)


def test_running_out_of_file_descriptors_is_an_error_not_corruption(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    filled_state(path)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    spare = []
    try:
        # Leave no descriptor free: SQLite cannot open the database ("unable to open database file").
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        with contextlib.suppress(OSError):
            while True:
                spare.append(os.open(os.devnull, os.O_RDONLY))
        with pytest.raises(StateError):
            UserState(path)
    finally:
        for fd in spare:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    untouched(path)


def test_a_database_sqlite_cannot_write_is_an_error_not_corruption(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    filled_state(path)
    # A directory in the place of the write-ahead log: SQLite cannot open it (a disk I/O error).
    (tmp_path / "state.db-wal").mkdir()
    with pytest.raises(StateError):
        UserState(path)
    (tmp_path / "state.db-wal").rmdir()
    untouched(path)


@pytest.mark.parametrize("damage", ["garbage", "header"])
def test_real_corruption_is_moved_aside_and_rebuilt(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "state.db"
    filled_state(path)
    if damage == "garbage":
        path.write_bytes(b"this is not a database\x00" * 500)
    else:
        data = bytearray(path.read_bytes())
        data[100:4096] = os.urandom(3996)  # the schema page
        path.write_bytes(bytes(data))
    with UserState(path) as state:
        assert state.rebuilt_from is not None and state.rebuilt_from.exists()
        assert [(row.uid, row.key, row.status) for row in state.rows()] == [("u1", "k1", "cached")]
        assert state.get_meta("offline_hash") == "$scrypt$x"


# --- the journal -----------------------------------------------------------------------------------


def test_claims_in_flight_survive_a_rebuild(tmp_path: Path) -> None:
    # A message claimed ('fetching', with the digest of its bytes) when the database was lost: the
    # rebuilt database still has the claim, so recover() can find the cached copy by its digest.
    path = tmp_path / "state.db"
    with UserState(path) as state:
        assert state.begin_fetch_many([("u1", "d1"), ("u2", "d2")]) == [True, True]
        state.finish_fetch("u1", "k1", 10)
        assert state.begin_fetch("u3", "d3")
        state.abandon_fetch("u3")
    path.unlink()
    with UserState(path) as state:
        rows = {row.uid: row for row in state.rows()}
        assert set(rows) == {"u1", "u2"}
        assert (rows["u1"].status, rows["u1"].key) == ("cached", "k1")
        assert (rows["u2"].status, rows["u2"].digest) == ("fetching", "d2")


def test_compaction_keeps_claims_in_flight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state_module, "JOURNAL_COMPACT_AT", 500)
    path = tmp_path / "state.db"
    with UserState(path) as state:
        assert state.begin_fetch("claimed", "digest-of-claimed")
        for i in range(20):
            state.set_meta("last_sync", str(i))
    UserState(path).close()  # compacts
    path.unlink()
    with UserState(path) as state:
        (row,) = state.rows()
        assert (row.uid, row.status, row.digest) == ("claimed", "fetching", "digest-of-claimed")


def test_compaction_keeps_notes_of_another_open_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The session holds its UserState open while a sync opens (and compacts) another one; the
    # session's QUIT deletions written after that must reach the journal that is kept.
    path = tmp_path / "state.db"
    with UserState(path) as state:
        for i in range(30):
            assert state.begin_fetch(f"u{i}", f"d{i}")
            state.finish_fetch(f"u{i}", f"k{i}", 100)
    session = UserState(path)
    try:
        monkeypatch.setattr(state_module, "JOURNAL_COMPACT_AT", 100)
        UserState(path).close()  # the sync's: compacts the journal under the session
        session.mark_deleted(["k3"])
        session.set_meta("offline_hash", "$scrypt$after")
    finally:
        session.close()
    path.unlink()
    with UserState(path) as state:
        rows = {row.uid: row.status for row in state.rows()}
        assert len(rows) == 30 and rows["u3"] == "deleted"
        assert state.get_meta("offline_hash") == "$scrypt$after"


def test_journal_is_fsynced_before_claimed_messages_are_written(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.db"
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    with UserState(path) as state:
        monkeypatch.setattr(os, "fsync", recording_fsync)
        state.begin_fetch_many([("u1", "d1")])
        assert str(tmp_path / "state.journal") in synced
        synced.clear()
        state.finish_fetch("u1", "k1", 10)
        state.mark_deleted(["k1"])  # the client's deletion (QUIT)
        assert str(tmp_path / "state.journal") in synced
        synced.clear()
        state.sync_to_disk()  # before upstream deletions
        assert str(tmp_path / "state.journal") in synced


def test_adopt_moves_a_row_to_its_new_uid_and_a_rebuild_keeps_it(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with UserState(path) as state:
        assert state.begin_fetch_many([("old", "cached-digest")], ["source-digest"]) == [True]
        state.finish_fetch("old", "key1", 10)
        state.mark_deleted(["key1"])
        moved = state.adopt("old", "new")
        assert moved is not None and (moved.uid, moved.key, moved.status, moved.source) == ("new", "key1", "deleted", "source-digest")
        assert state.adopt("old", "other") is None  # nothing left under the old uid
        state.begin_fetch("taken", "d")
        assert state.adopt("new", "taken") is None  # never onto a uid that has a row
        state.sync_to_disk()
    path.unlink()  # the database is lost: the journal rebuilds it, the adoption included
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    with UserState(path) as state:
        rows = {row.uid: row for row in state.rows()}
        assert set(rows) == {"new", "taken"}
        assert (rows["new"].key, rows["new"].status, rows["new"].source) == ("key1", "deleted", "source-digest")
        state.drop_rows(["new"])
        assert [row.uid for row in state.rows()] == ["taken"]


def test_a_database_from_before_the_source_column_gets_it(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE messages (uid TEXT PRIMARY KEY, key TEXT, status TEXT NOT NULL, digest TEXT, size INTEGER,"
        " fetched_at REAL, upstream INTEGER NOT NULL DEFAULT 1);"
        "INSERT INTO messages VALUES ('u1', 'k1', 'cached', 'd1', 5, 1.0, 1);"
        "CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT);"
    )
    db.close()
    with UserState(path) as state:
        assert [(r.uid, r.key, r.source) for r in state.rows()] == [("u1", "k1", None)]
        state.begin_fetch_many([("u2", "d2")], ["s2"])
        assert {r.uid: r.source for r in state.rows()} == {"u1": None, "u2": "s2"}
