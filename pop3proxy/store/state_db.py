"""Opening an account's state database (``state.db``, see `store.state.UserState`): its mode, SQLite's
settings, the integrity check and the schema; and the errors that say whether a file is damaged.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

from pop3proxy.store.journal import private_fd

SCHEMA_VERSION = 1
BUSY_TIMEOUT = 30.0  # seconds to wait for another connection's write lock

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    uid        TEXT PRIMARY KEY,
    key        TEXT,
    status     TEXT NOT NULL CHECK (status IN ('fetching', 'cached', 'deleted', 'held')),
    digest     TEXT,
    size       INTEGER,
    fetched_at REAL,
    upstream   INTEGER NOT NULL DEFAULT 1,
    source     TEXT
);
CREATE INDEX IF NOT EXISTS messages_key ON messages (key);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT);
"""


class StateError(Exception):
    """The state files cannot be used now (locked, unreadable, unwritable, an I/O error, or corrupt beyond
    rebuilding). Callers answer ``-ERR [SYS/TEMP]``; the files are left as they are."""


class Corrupt(Exception):
    """The database file is damaged or not ours: only then may it be moved aside and rebuilt."""


# SQLite's primary result codes that mean the file itself is damaged or is no database at all. Every
# other error on opening (locked, read-only, unable to open, out of memory, I/O) is a transient error.
_CORRUPTION_CODES = {11: "SQLITE_CORRUPT", 26: "SQLITE_NOTADB"}
_COLUMNS = {"uid", "key", "status", "digest", "size", "fetched_at", "upstream"}


def is_corruption(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in _CORRUPTION_CODES


def _tighten_modes(path: Path) -> None:
    """The database holds the offline password hash: 0600 whatever the umask (SQLite gives its -wal and
    -shm files the database's mode)."""
    try:
        os.close(private_fd(path))
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.close(private_fd(Path(str(path) + suffix), create=False))
    except OSError as exc:
        raise StateError(f"cannot open state database {path.name}: {exc}") from exc


def _check_and_create(db: sqlite3.Connection) -> None:
    db.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode: a commit is in the OS's hands when the call returns (safe against the
    # process dying); sync_to_disk() makes it durable against power loss where that matters.
    db.execute("PRAGMA synchronous=NORMAL")
    check = db.execute("PRAGMA quick_check(1)").fetchone()
    if not check or check[0] != "ok":
        raise Corrupt(f"integrity check failed: {check[0] if check else 'no answer'}")
    columns = {row[1] for row in db.execute("PRAGMA table_info(messages)")}
    if columns and not columns >= _COLUMNS:
        raise Corrupt("not a pop3proxy state database (its messages table differs)")
    db.executescript(_SCHEMA)
    if columns and "source" not in columns:  # a database from before messages were matched by content
        db.execute("ALTER TABLE messages ADD COLUMN source TEXT")
    db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))


def open_database(path: Path) -> sqlite3.Connection:
    """Open and check the database. Raises `Corrupt` when the file is damaged or not ours, `StateError`
    for any other failure (which leaves the files as they are)."""
    _tighten_modes(path)
    try:
        db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT)
    except sqlite3.Error as exc:
        raise StateError(f"cannot open state database {path.name}: {exc}") from exc
    try:
        _check_and_create(db)
    except sqlite3.Error as exc:
        db.close()
        if is_corruption(exc):
            raise Corrupt(str(exc)) from exc
        raise StateError(f"cannot open state database {path.name}: {exc}") from exc
    except BaseException:
        db.close()
        raise
    return db
