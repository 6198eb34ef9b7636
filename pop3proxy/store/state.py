"""The per-user sync state: which upstream message is which cached message.

One sqlite database per user (``state.db`` beside the mailbox), WAL mode, ``synchronous=NORMAL``: once
a call returns, what it wrote survives the process dying; ``sync_to_disk`` (run before any upstream
deletion) makes it survive a power loss too. Each upstream message has one row, keyed by its UIDL:

``fetching``  the message is being written to the cache (``digest`` names its cached bytes)
``cached``    it is in the cache under ``key``
``deleted``   the client deleted it; the cached copy is (being) removed and it is never fetched again
``held``      a filter held it back; it is kept outside the served mailbox

``upstream`` is 1 while the provider is believed to hold the message, 0 once it is known gone.
A ``fetching`` row left by a crash is resolved by ``recover``: the cached copy is claimed if it was
written, otherwise the row is dropped and the message is fetched again — never lost, never twice.

Beside the database, ``state.journal`` records every settled row and setting, one JSON line each
(appended, not fsync'ed: it is a second copy, not the primary record). When the database is found
corrupt on opening, it is moved aside (``state.db.corrupt-<time>``) and rebuilt from the journal, so the
cache's messages stay known and nothing is fetched twice. The journal is compacted when it grows large.

Synchronous code; callers run it in worker threads. A lock serialises calls from several threads.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

from pop3proxy.store.fsutil import replace_file
from pop3proxy.store.paths import decode_user

log = logging.getLogger("pop3proxy.store.state")

SCHEMA_VERSION = 1
JOURNAL_COMPACT_AT = 4 * 1024 * 1024

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


class Row(NamedTuple):
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
        self.journal_path = path.with_name(path.stem + ".journal")
        self._lock = threading.Lock()
        self.rebuilt_from: Path | None = None  # where a corrupt database was moved, if it was
        lost = not path.exists() and self.journal_path.exists() and self.journal_path.stat().st_size > 0
        if lost:  # the database is gone but its journal is not: rebuild, do not start from nothing
            log.error("state database %s is missing: rebuilding from %s", path.name, self.journal_path.name)
            for suffix in ("-wal", "-shm"):
                Path(str(path) + suffix).unlink(missing_ok=True)
        try:
            self._db = self._open()
            if lost:
                self._replay_journal()
        except sqlite3.DatabaseError as exc:
            self.rebuilt_from = self._move_aside(exc)
            try:
                self._db = self._open()
            except sqlite3.DatabaseError as again:
                raise StateError(f"state database {path.name} is unusable: {again}") from again
            self._replay_journal()
        try:
            if self.journal_path.stat().st_size > JOURNAL_COMPACT_AT:
                self._compact_journal()
        except FileNotFoundError:
            pass
        self._journal = open(self.journal_path, "a", encoding="utf-8")

    def _compact_journal(self) -> None:
        """Rewrite the journal as one line per row and setting (atomically)."""

        def lines() -> Iterator[bytes]:
            for uid, key, status, size, fetched, upstream in self._db.execute(
                "SELECT uid, key, status, size, fetched_at, upstream FROM messages WHERE status != 'fetching'"
            ):
                yield (json.dumps({"u": uid, "k": key, "s": status, "z": size, "t": fetched, "up": upstream},
                                  separators=(",", ":")) + "\n").encode("utf-8")
            for name, value in self._db.execute("SELECT name, value FROM meta"):
                yield (json.dumps({"m": name, "v": value}, separators=(",", ":")) + "\n").encode("utf-8")

        replace_file(self.journal_path, lines())

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=30)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a commit is in the OS's hands when the call returns (safe against the
            # process dying); sync_to_disk() makes it durable against power loss where that matters.
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            check = db.execute("PRAGMA quick_check(1)").fetchone()
            if not check or check[0] != "ok":
                raise sqlite3.DatabaseError(f"integrity check failed: {check[0] if check else 'no answer'}")
            db.execute("SELECT uid, key, status, digest, size, fetched_at, upstream FROM messages LIMIT 1").fetchall()
        except BaseException:
            db.close()
            raise
        return db

    def _move_aside(self, exc: Exception) -> Path:
        """Keep a corrupt database for inspection and start a new one."""
        target = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
        for suffix in ("", "-wal", "-shm"):
            source = Path(str(self.path) + suffix)
            if source.exists():
                source.replace(Path(str(target) + suffix))
        log.error("state database %s is corrupt (%s): moved to %s, rebuilding from %s",
                  self.path, exc, target.name, self.journal_path.name)
        return target

    def _replay_journal(self) -> None:
        """Rebuild the rows from the journal: the last line about a uid wins."""
        rows: dict[str, tuple] = {}
        meta: dict[str, str | None] = {}
        try:
            with open(self.journal_path, encoding="utf-8") as journal:
                for line in journal:
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        continue  # a torn last line
                    if "m" in entry:
                        meta[entry["m"]] = entry.get("v")
                    elif "u" in entry:
                        if entry.get("s") == "forget":
                            rows.pop(entry["u"], None)
                        else:
                            old = rows.get(entry["u"])
                            upstream = entry.get("up", old[5] if old else 1)
                            rows[entry["u"]] = (entry["u"], entry.get("k"), entry["s"], entry.get("z"),
                                                entry.get("t"), upstream)
        except FileNotFoundError:
            pass
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO messages (uid, key, status, size, fetched_at, upstream) VALUES (?,?,?,?,?,?)",
                rows.values(),
            )
            self._db.executemany(
                "INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)",
                [(k, v) for k, v in meta.items() if v is not None],
            )
        log.warning("state database %s rebuilt: %d messages, %d settings", self.path.name, len(rows), len(meta))

    def _note(self, **entry) -> None:
        """Append to the journal (a second record, used only to rebuild a corrupt database)."""
        try:
            self._journal.write(json.dumps(entry, separators=(",", ":")) + "\n")
            self._journal.flush()
        except (OSError, ValueError) as exc:
            log.warning("cannot write %s: %s", self.journal_path.name, exc)

    def sync_to_disk(self) -> None:
        """Checkpoint the write-ahead log into the database file, fsync'ed."""
        self._run("PRAGMA wal_checkpoint(FULL)")

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._journal.close()

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

    def cached_keys(self, upstream_only: bool = False) -> set[str]:
        sql = "SELECT key FROM messages WHERE status = 'cached' AND key IS NOT NULL"
        return {key for (key,) in self._run(sql + (" AND upstream = 1" if upstream_only else ""))}

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

    def begin_fetch_many(self, claims: list[tuple[str, str]]) -> list[bool]:
        """``begin_fetch`` for several (uid, digest) pairs in one transaction."""
        known = self.known_uids_among([uid for uid, _ in claims])
        seen: set[str] = set()
        statements, granted = [], []
        for uid, d in claims:
            ok = uid not in known and uid not in seen
            seen.add(uid)
            granted.append(ok)
            if ok:
                statements.append(
                    ("INSERT OR IGNORE INTO messages (uid, status, digest, upstream) VALUES (?, 'fetching', ?, 1)",
                     (uid, d))
                )
        if statements:
            self._transaction(statements)
        return granted

    def known_uids_among(self, uids: list[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(uids), 500):
            part = uids[start : start + 500]
            marks = ",".join("?" * len(part))
            found.update(uid for (uid,) in self._run(f"SELECT uid FROM messages WHERE uid IN ({marks})", part))
        return found

    def finish_fetch_many(self, settled: list[tuple[str, str, int, str]]) -> None:
        """``finish_fetch`` for several (uid, key, size, status) in one transaction."""
        now = time.time()
        self._transaction(
            [("UPDATE messages SET status = ?, key = ?, size = ?, fetched_at = ? WHERE uid = ?",
              (status, key, size, now, uid)) for uid, key, size, status in settled]
        )
        for uid, key, size, status in settled:
            self._note(u=uid, k=key, s=status, z=size, t=now)

    def finish_fetch(self, uid: str, key: str, size: int, status: str = "cached") -> None:
        now = time.time()
        self._run(
            "UPDATE messages SET status = ?, key = ?, size = ?, fetched_at = ? WHERE uid = ?",
            (status, key, size, now, uid),
        )
        self._note(u=uid, k=key, s=status, z=size, t=now)

    def abandon_fetch(self, uid: str) -> None:
        self._run("DELETE FROM messages WHERE uid = ? AND status = 'fetching'", (uid,))

    def fetching(self) -> list[Row]:
        return [
            Row(uid, key, status, digest, size, fetched, bool(upstream))
            for uid, key, status, digest, size, fetched, upstream in self._run(
                "SELECT uid, key, status, digest, size, fetched_at, upstream FROM messages"
                " WHERE status = 'fetching'"
            )
        ]

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
        for uid_of_key in self.uids_for_keys([key]).values():
            self._note(u=uid_of_key, k=key, s="cached", z=size, t=time.time())

    # -- deletions -------------------------------------------------------------------------------

    def mark_deleted(self, keys: Iterable[str]) -> None:
        """The client deleted these cached messages (UPDATE state)."""
        keys = list(keys)
        self._transaction(
            [("UPDATE messages SET status = 'deleted' WHERE key = ? AND status = 'cached'", (key,)) for key in keys]
        )
        for key, uid in self.uids_for_keys(keys).items():
            self._note(u=uid, k=key, s="deleted")

    def forget_keys(self, keys: Iterable[str]) -> None:
        """Drop rows whose cached copy vanished although nobody deleted it through us."""
        keys = list(keys)
        uids = self.uids_for_keys(keys)
        self._transaction([("DELETE FROM messages WHERE key = ? AND status = 'cached'", (key,)) for key in keys])
        for uid in uids.values():
            self._note(u=uid, s="forget")

    def upstream_gone(self, uids: Iterable[str]) -> None:
        uids = list(uids)
        self._transaction([("UPDATE messages SET upstream = 0 WHERE uid = ?", (uid,)) for uid in uids])
        status = {row.uid: row for row in self.rows()} if uids else {}
        for uid in uids:
            row = status.get(uid)
            if row is not None:
                self._note(u=uid, k=row.key, s=row.status, z=row.size, t=row.fetched_at, up=0)

    # -- meta ------------------------------------------------------------------------------------

    def get_meta(self, name: str) -> str | None:
        rows = self._run("SELECT value FROM meta WHERE name = ?", (name,))
        return rows[0][0] if rows else None

    def set_meta(self, name: str, value: str | None) -> None:
        if value is None:
            self._run("DELETE FROM meta WHERE name = ?", (name,))
        else:
            self._run("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (name, value))
        self._note(m=name, v=value)


# --- reading a state database from outside the service (status, metrics) -------------------------


def _connect_ro(path: Path) -> sqlite3.Connection:
    """Open a state database read-only without creating anything next to it: with no write-ahead log
    present the file is complete and is opened as immutable (otherwise SQLite would create -wal/-shm
    files, owned by whoever runs `status`, which the service might then be unable to write)."""
    wal = path.with_name(path.name + "-wal")
    query = "?mode=ro" if wal.exists() else "?mode=ro&immutable=1"
    return sqlite3.connect("file:" + urllib.parse.quote(str(path)) + query, uri=True, timeout=5)


def read_state(path: Path) -> tuple[dict[str, str], dict[str, int], set[str]]:
    """(meta, row counts by status, keys hidden from sessions) of a state database, read-only."""
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
        except sqlite3.Error:
            pass
    return directory.name
