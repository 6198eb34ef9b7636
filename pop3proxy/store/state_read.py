"""Reading a state database from outside the service (``status``, the metrics endpoint), read-only."""

from __future__ import annotations

import sqlite3
import urllib.parse
from pathlib import Path

from pop3proxy.store.paths import decode_user
from pop3proxy.store.state import StateError


def _connect_ro(path: Path) -> sqlite3.Connection:
    """Open a state database read-only without creating anything next to it: with no write-ahead log
    present the file is complete and is opened as immutable (otherwise SQLite would create -wal/-shm
    files, owned by whoever runs `status`, which the service might then be unable to write)."""
    wal = path.with_name(path.name + "-wal")
    query = "?mode=ro" if wal.exists() else "?mode=ro&immutable=1"
    return sqlite3.connect("file:" + urllib.parse.quote(str(path)) + query, uri=True, timeout=5)


def read_state(path: Path) -> tuple[dict[str, str], dict[str, int], set[str]]:
    """(meta, row counts by status, keys hidden from sessions) of a state database, read-only; `StateError`
    when it cannot be read."""
    try:
        db = _connect_ro(path)
        try:
            meta = {name: value for name, value in db.execute("SELECT name, value FROM meta")}
            counts = {status: n for status, n in db.execute("SELECT status, count(*) FROM messages GROUP BY status")}
            hidden = {
                key for (key,) in db.execute("SELECT key FROM messages WHERE status = 'deleted' AND key IS NOT NULL")
            }
            return meta, counts, hidden
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise StateError(str(exc)) from exc


def account_name(directory: Path) -> str:
    """The user name of a cache directory: decoded, else the state database's ``user``, else as stored."""
    decoded = decode_user(directory.name)
    if decoded is not None:
        return decoded
    state = directory / "state.db"
    if state.is_file():
        try:
            meta, _, _ = read_state(state)
            if meta.get("user"):
                return meta["user"]
        except StateError:
            pass
    return directory.name
