"""The per-user sync state: which upstream message is which cached message.

One sqlite database per user (``state.db`` beside the mailbox), WAL mode, ``synchronous=FULL``: once a
call returns, what it wrote survives a crash. Each upstream message has one row, keyed by its UIDL:

``fetching``  the message is being written to the cache (``digest`` names its cached bytes)
``cached``    it is in the cache under ``key``
``deleted``   the client deleted it; the cached copy is (being) removed and it is never fetched again
``held``      a filter held it back; it is kept outside the served mailbox

``upstream`` is 1 while the provider is believed to hold the message, 0 once it is known gone.
A ``fetching`` row left by a crash is resolved by ``recover``: the cached copy is claimed if it was
written, otherwise the row is dropped and the message is fetched again — never lost, never twice.

Synchronous code; callers run it in worker threads. A lock serialises calls from several threads.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    uid        TEXT PRIMARY KEY,
    key        TEXT,
    status     TEXT NOT NULL CHECK (status IN ('fetching', 'cached', 'deleted', 'held')),
    digest     TEXT,
    size       INTEGER,
    fetched_at REAL,
    upstream   INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS messages_key ON messages (key);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT);
"""


class StateError(Exception):
    """The state database cannot be used (corrupt, unreadable)."""


@dataclass(frozen=True)
class Row:
    uid: str
    key: str | None
    status: str
    digest: str | None
    size: int | None
    fetched_at: float | None
    upstream: bool


class UserState:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            self._db.execute("SELECT count(*) FROM messages").fetchone()
        except sqlite3.DatabaseError as exc:
            raise StateError(f"state database {path.name} is unusable: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "UserState":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # sqlite's own errors (a full disk, I/O errors) become StateError, which callers handle; only a
    # constraint violation stays sqlite3.IntegrityError (begin_fetch relies on it).

    def _run(self, sql: str, params: Iterable = ()) -> list[tuple]:
        with self._lock:
            try:
                return self._db.execute(sql, tuple(params)).fetchall()
            except sqlite3.IntegrityError:
                raise
            except sqlite3.Error as exc:
                raise StateError(f"state database {self.path.name}: {exc}") from exc

    def _transaction(self, statements: list[tuple[str, tuple]]) -> None:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for sql, params in statements:
                        self._db.execute(sql, params)
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:  # also when COMMIT itself failed
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise StateError(f"state database {self.path.name}: {exc}") from exc

    # -- reading ---------------------------------------------------------------------------------

    def rows(self) -> list[Row]:
        return [
            Row(uid, key, status, digest, size, fetched, bool(upstream))
            for uid, key, status, digest, size, fetched, upstream in self._run(
                "SELECT uid, key, status, digest, size, fetched_at, upstream FROM messages"
            )
        ]

    def known_uids(self) -> set[str]:
        return {uid for (uid,) in self._run("SELECT uid FROM messages")}

    def hidden_keys(self) -> set[str]:
        """Cache keys a session must not see: deleted (removal may be pending after a crash)."""
        return {key for (key,) in self._run("SELECT key FROM messages WHERE status = 'deleted' AND key IS NOT NULL")}

    def uids_for_keys(self, keys: Iterable[str]) -> dict[str, str]:
        keys = list(keys)
        found: dict[str, str] = {}
        for start in range(0, len(keys), 500):
            part = keys[start : start + 500]
            marks = ",".join("?" * len(part))
            for uid, key in self._run(f"SELECT uid, key FROM messages WHERE key IN ({marks})", part):
                found[key] = uid
        return found

    # -- fetching --------------------------------------------------------------------------------

    def begin_fetch(self, uid: str, digest: str) -> bool:
        """Claim ``uid`` for fetching; False when some row for it exists already."""
        try:
            self._run(
                "INSERT INTO messages (uid, status, digest, upstream) VALUES (?, 'fetching', ?, 1)", (uid, digest)
            )
        except sqlite3.IntegrityError:
            return False
        return True

    def finish_fetch(self, uid: str, key: str, size: int, status: str = "cached") -> None:
        self._run(
            "UPDATE messages SET status = ?, key = ?, size = ?, fetched_at = ? WHERE uid = ?",
            (status, key, size, time.time(), uid),
        )

    def abandon_fetch(self, uid: str) -> None:
        self._run("DELETE FROM messages WHERE uid = ? AND status = 'fetching'", (uid,))

    def fetching(self) -> list[Row]:
        return [row for row in self.rows() if row.status == "fetching"]

    def release_held(self, held_key: str, uid: str | None, key: str, size: int) -> None:
        """The held message ``held_key`` is served now under ``key``: its row becomes ``cached``.

        When no row says ``held`` for it but its upstream ``uid`` has no row at all, a ``cached`` row is
        written, so the message is not fetched again.
        """
        statements = [
            ("UPDATE messages SET status = 'cached', key = ?, size = ? WHERE key = ? AND status = 'held'",
             (key, size, held_key)),
        ]
        if uid:
            statements.append((
                "INSERT OR IGNORE INTO messages (uid, key, status, size, fetched_at, upstream) "
                "VALUES (?, ?, 'cached', ?, ?, 1)",
                (uid, key, size, time.time()),
            ))
        self._transaction(statements)

    # -- deletions -------------------------------------------------------------------------------

    def mark_deleted(self, keys: Iterable[str]) -> None:
        """The client deleted these cached messages (UPDATE state)."""
        keys = list(keys)
        self._transaction(
            [("UPDATE messages SET status = 'deleted' WHERE key = ? AND status = 'cached'", (key,)) for key in keys]
        )

    def forget_keys(self, keys: Iterable[str]) -> None:
        """Drop rows whose cached copy vanished although nobody deleted it through us."""
        self._transaction([("DELETE FROM messages WHERE key = ? AND status = 'cached'", (key,)) for key in keys])

    def upstream_gone(self, uids: Iterable[str]) -> None:
        self._transaction([("UPDATE messages SET upstream = 0 WHERE uid = ?", (uid,)) for uid in uids])

    # -- meta ------------------------------------------------------------------------------------

    def get_meta(self, name: str) -> str | None:
        rows = self._run("SELECT value FROM meta WHERE name = ?", (name,))
        return rows[0][0] if rows else None

    def set_meta(self, name: str, value: str | None) -> None:
        if value is None:
            self._run("DELETE FROM meta WHERE name = ?", (name,))
        else:
            self._run("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (name, value))
