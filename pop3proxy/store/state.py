"""The per-user sync state: which upstream message is which cached message.

One sqlite database per user (``state.db`` beside the mailbox), WAL mode, ``synchronous=NORMAL``: once
a call returns, what it wrote survives the process dying; ``sync_to_disk`` (run before any upstream
deletion) makes it survive a power loss too. Each upstream message has one row, keyed by its UIDL at the
provider (``uid`` here and everywhere the provider's UIDL is meant; the local name of a cached message is
its ``key``, see `store.base.MessageInfo`):

``fetching``  the message is being written to the cache (``digest`` names its cached bytes)
``cached``    it is in the cache under ``key``
``deleted``   the client deleted it; the cached copy is (being) removed and it is never fetched again
``held``      a filter held it back; it is kept outside the served mailbox

``upstream`` is 1 while the provider is believed to hold the message, 0 once it is known gone.
A ``fetching`` row left by a crash is resolved by ``recover``: the cached copy is claimed if it was
written, otherwise the row is dropped and the message is fetched again — never lost, never twice.

Beside the database, ``state.journal`` (see ``journal.py``) records every claim (with its digest),
settled row and setting, one JSON line each. It is fsync'ed where a rebuild would otherwise fetch or
resurrect a message: claims before their messages are written, the client's deletions, and
``sync_to_disk``. Only a database that is really corrupt (``PRAGMA quick_check`` fails, SQLite says
"file is not a database" or "malformed", or the tables are not ours) is moved aside
(``state.db.corrupt-<time>``) and rebuilt from the journal; any other error on opening (locked,
read-only, unable to open, I/O) raises `StateError` and leaves every file as it is. The journal is
compacted when it grows large, without losing what other open `UserState` objects append meanwhile.

Synchronous code; callers run it in worker threads. A lock serialises calls from several threads.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

from pop3proxy.store.journal import Journal
from pop3proxy.store.state_db import Corrupt, StateError, open_database

log = logging.getLogger("pop3proxy.store.state")

JOURNAL_COMPACT_AT = 4 * 1024 * 1024


class Row(NamedTuple):
    uid: str
    key: str | None
    status: str
    digest: str | None
    size: int | None
    fetched_at: float | None
    upstream: bool
    source: str | None = None  # SHA-256 of the message as the provider sent it (CRLF form), when known


class UserState:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.journal_path = path.with_name(path.stem + ".journal")
        self._lock = threading.Lock()
        self._journal = Journal(self.journal_path)
        self.home: Callable[[UserState], None] | None = None  # a pool's: `close` gives the database back
        self.failed = False  # an SQLite error was seen: closed for good, not kept open by a pool
        self.rebuilt_from: Path | None = None  # where a corrupt database was moved, if it was
        lost = not path.exists() and self._journal.size() > 0
        if lost:  # the database is gone but its journal is not: rebuild, do not start from nothing
            log.error("state database %s is missing: rebuilding from %s", path.name, self.journal_path.name)
            for suffix in ("-wal", "-shm"):
                Path(str(path) + suffix).unlink(missing_ok=True)
        try:
            self._db = self._open()
            if lost:
                self._replay_journal()
        except Corrupt as exc:
            try:
                self.rebuilt_from = self._move_aside(exc)
            except OSError as cannot:
                raise StateError(f"state database {path.name} is corrupt and cannot be moved aside: {cannot}") from exc
            try:
                self._db = self._open()
            except Corrupt as again:
                raise StateError(f"state database {path.name} is unusable: {again}") from again
            self._replay_journal()
        try:
            if self._journal.size() > JOURNAL_COMPACT_AT:
                self._journal.compact(self._snapshot, JOURNAL_COMPACT_AT)
        except (OSError, sqlite3.Error) as exc:
            log.warning("cannot compact %s: %s", self.journal_path.name, exc)
        try:
            self._journal.open()
        except BaseException as exc:
            self._db.close()
            if isinstance(exc, OSError):
                raise StateError(f"cannot open {self.journal_path.name}: {exc}") from exc
            raise

    def _snapshot(self) -> Iterator[dict]:
        """What the database holds, as journal entries: every row (claims in flight with their digest)
        and every setting."""
        for uid, key, status, digest, size, fetched, upstream, source in self._db.execute(
            "SELECT uid, key, status, digest, size, fetched_at, upstream, source FROM messages"
        ):
            entry = {"u": uid, "k": key, "s": status, "z": size, "t": fetched, "up": upstream}
            if status == "fetching":
                entry["d"] = digest
            if source:
                entry["src"] = source
            yield entry
        for name, value in self._db.execute("SELECT name, value FROM meta"):
            yield {"m": name, "v": value}

    def _open(self) -> sqlite3.Connection:
        return open_database(self.path)

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
        for entry in self._journal.read():
            if "m" in entry:
                meta[entry["m"]] = entry.get("v")
            elif "u" in entry and "s" in entry:
                uid, status, old = entry["u"], entry["s"], rows.get(entry["u"])
                if status == "forget" or (status == "abandon" and old is not None and old[2] == "fetching"):
                    rows.pop(uid, None)
                elif status != "abandon":
                    upstream = entry.get("up", old[6] if old else 1)
                    source = entry.get("src", old[7] if old else None)
                    rows[uid] = (uid, entry.get("k"), status, entry.get("d"), entry.get("z"), entry.get("t"),
                                 upstream, source)
        try:
            with self._db:
                self._db.executemany(
                    "INSERT OR REPLACE INTO messages (uid, key, status, digest, size, fetched_at, upstream, source)"
                    " VALUES (?,?,?,?,?,?,?,?)",
                    rows.values(),
                )
                self._db.executemany(
                    "INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)",
                    [(k, v) for k, v in meta.items() if v is not None],
                )
        except sqlite3.Error as exc:
            self._db.close()
            raise StateError(f"cannot rebuild state database {self.path.name}: {exc}") from exc
        log.warning("state database %s rebuilt: %d messages, %d settings", self.path.name, len(rows), len(meta))

    def _note(self, *entries: dict, durable: bool = False) -> None:
        """Append to the journal (a second record, used only to rebuild a corrupt database)."""
        try:
            self._journal.append(entries, durable=durable)
        except OSError as exc:
            log.warning("cannot write %s: %s", self.journal_path.name, exc)

    def sync_to_disk(self) -> None:
        """Checkpoint the write-ahead log into the database file, fsync'ed, and fsync the journal."""
        self._run("PRAGMA wal_checkpoint(FULL)")
        self._note(durable=True)

    def close(self) -> None:
        """Close the files, or give the open database back to the pool it came from (`StatePool`)."""
        home, self.home = self.home, None
        if home is not None and not self.failed:
            home(self)
            return
        with self._lock:
            self._db.close()
            self._journal.close()

    def __enter__(self) -> UserState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # sqlite's own errors (a full disk, I/O errors) become StateError, which callers handle; only a
    # constraint violation stays sqlite3.IntegrityError.

    def _run(self, sql: str, params: Iterable = ()) -> list[tuple]:
        with self._lock:
            try:
                return self._db.execute(sql, tuple(params)).fetchall()
            except sqlite3.IntegrityError:
                raise
            except sqlite3.Error as exc:
                self.failed = True
                raise StateError(f"state database {self.path.name}: {exc}") from exc

    @contextlib.contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE: another connection writing waits), committed when the
        block ends, rolled back when it raises; sqlite's errors become `StateError`."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:  # also when COMMIT itself failed
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                self.failed = True
                raise StateError(f"state database {self.path.name}: {exc}") from exc

    def _transaction(self, statements: list[tuple[str, tuple]]) -> None:
        with self._writing() as db:
            for sql, params in statements:
                db.execute(sql, params)

    # -- reading ---------------------------------------------------------------------------------

    def rows(self) -> list[Row]:
        return [
            Row(uid, key, status, digest, size, fetched, bool(upstream), source)
            for uid, key, status, digest, size, fetched, upstream, source in self._run(
                "SELECT uid, key, status, digest, size, fetched_at, upstream, source FROM messages"
            )
        ]

    def cached_keys(self, upstream_only: bool = False) -> set[str]:
        sql = "SELECT key FROM messages WHERE status = 'cached' AND key IS NOT NULL"
        return {key for (key,) in self._run(sql + (" AND upstream = 1" if upstream_only else ""))}


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
        return self.begin_fetch_many([(uid, digest)])[0]

    def begin_fetch_many(self, claims: list[tuple[str, str]], sources: list[str | None] | None = None) -> list[bool]:
        """``begin_fetch`` for several (uid, digest) pairs in one transaction. ``sources``: the digest of
        each message as the provider sent it (see `adopt`)."""
        sources = sources or [None] * len(claims)
        seen: set[str] = set()
        granted: list[bool] = []
        notes: list[dict] = []
        # One write transaction for the check and the claims: another object (process, thread) claiming
        # the same uids at once waits for it, and is told no for every uid this one got.
        with self._writing() as db:
            for (uid, d), source in zip(claims, sources, strict=True):
                ok = uid not in seen and db.execute(
                    "INSERT OR IGNORE INTO messages (uid, status, digest, upstream, source) "
                    "VALUES (?, 'fetching', ?, 1, ?)", (uid, d, source)).rowcount == 1
                seen.add(uid)
                granted.append(ok)
                if ok:
                    notes.append({"u": uid, "s": "fetching", "d": d, **({"src": source} if source else {})})
        if notes:
            # Durable before the messages are written: a database rebuilt from the journal still has
            # the claims, and recover() finds their cached copies by digest.
            self._note(*notes, durable=True)
        return granted

    def adopt(self, old_uid: str, new_uid: str) -> Row | None:
        """The provider lists a message it had under ``old_uid`` (now gone) again, under ``new_uid`` (a
        mailbox re-created at the provider): the row moves to the new uid, with its cached copy, its
        status and everything else. Returns the moved row, or None when ``old_uid`` has no row (any more)
        or ``new_uid`` has one already."""
        with self._writing() as db:
            taken = db.execute("SELECT 1 FROM messages WHERE uid = ?", (new_uid,)).fetchone()
            moved = None if taken else db.execute(
                "UPDATE messages SET uid = ?, upstream = 1 WHERE uid = ? AND status != 'fetching' "
                "RETURNING key, status, digest, size, fetched_at, source", (new_uid, old_uid)).fetchone()
        if moved is None:
            return None
        key, status, d, size, fetched, source = moved
        self._note({"u": old_uid, "s": "forget"},
                   {"u": new_uid, "k": key, "s": status, "z": size, "t": fetched, "up": 1,
                    **({"src": source} if source else {})})
        return Row(new_uid, key, status, d, size, fetched, True, source)

    def drop_rows(self, uids: Iterable[str]) -> None:
        """Forget these messages entirely (the provider no longer has them and ``upstream.vanished`` is
        ``drop``; their cached copies are removed first by the caller)."""
        uids = list(uids)
        self._transaction([("DELETE FROM messages WHERE uid = ?", (uid,)) for uid in uids])
        self._note(*({"u": uid, "s": "forget"} for uid in uids))

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
        self._note(*({"u": uid, "k": key, "s": status, "z": size, "t": now} for uid, key, size, status in settled))

    def finish_fetch(self, uid: str, key: str, size: int, status: str = "cached") -> None:
        now = time.time()
        self._run(
            "UPDATE messages SET status = ?, key = ?, size = ?, fetched_at = ? WHERE uid = ?",
            (status, key, size, now, uid),
        )
        self._note({"u": uid, "k": key, "s": status, "z": size, "t": now})

    def abandon_fetch(self, uid: str) -> None:
        self._run("DELETE FROM messages WHERE uid = ? AND status = 'fetching'", (uid,))
        self._note({"u": uid, "s": "abandon"})

    def fetching(self) -> list[Row]:
        return [
            Row(uid, key, status, digest, size, fetched, bool(upstream))
            for uid, key, status, digest, size, fetched, upstream in self._run(
                "SELECT uid, key, status, digest, size, fetched_at, upstream FROM messages"
                " WHERE status = 'fetching'"
            )
        ]

    def recovery_view(self) -> tuple[list[Row], set[str], set[str]]:
        """``fetching()``, ``hidden_keys()``, ``cached_keys(upstream_only=True)`` (see `AccountState`)."""
        return self.fetching(), self.hidden_keys(), self.cached_keys(upstream_only=True)

    def release_held(self, held_key: str, uid: str | None, key: str, size: int) -> None:
        """The held message ``held_key`` is served now under ``key``: its row becomes ``cached``.

        When no row says ``held`` for it but its upstream ``uid`` has no row at all, a ``cached`` row is
        written, so the message is not fetched again.
        """
        statements: list[tuple[str, tuple]] = [
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
            self._note({"u": uid_of_key, "k": key, "s": "cached", "z": size, "t": time.time()})

    # -- deletions -------------------------------------------------------------------------------

    def mark_deleted(self, keys: Iterable[str]) -> None:
        """The client deleted these cached messages (UPDATE state)."""
        keys = list(keys)
        self._transaction(
            [("UPDATE messages SET status = 'deleted' WHERE key = ? AND status = 'cached'", (key,)) for key in keys]
        )
        self._note(*({"u": uid, "k": key, "s": "deleted"} for key, uid in self.uids_for_keys(keys).items()),
                   durable=True)

    def restore_deleted(self, keys: Iterable[str]) -> None:
        """Undo `mark_deleted` for these keys: their cached copies could not be removed, so the client's
        deletion is not applied (here or, later, at the provider)."""
        keys = set(keys)
        rows = [row for row in self.rows() if row.key in keys and row.status == "deleted"]
        self._transaction([("UPDATE messages SET status = 'cached' WHERE uid = ? AND status = 'deleted'", (row.uid,))
                           for row in rows])
        self._note(*({"u": row.uid, "k": row.key, "s": "cached", "z": row.size, "t": row.fetched_at} for row in rows),
                   durable=True)

    def forget_keys(self, keys: Iterable[str]) -> None:
        """Drop rows whose cached copy vanished although nobody deleted it through us."""
        keys = list(keys)
        uids = self.uids_for_keys(keys)
        self._transaction([("DELETE FROM messages WHERE key = ? AND status = 'cached'", (key,)) for key in keys])
        self._note(*({"u": uid, "s": "forget"} for uid in uids.values()))

    def upstream_gone(self, uids: Iterable[str]) -> None:
        uids = list(uids)
        self._transaction([("UPDATE messages SET upstream = 0 WHERE uid = ?", (uid,)) for uid in uids])
        status = {row.uid: row for row in self.rows()} if uids else {}
        self._note(*(
            {"u": uid, "k": row.key, "s": row.status, "z": row.size, "t": row.fetched_at, "up": 0}
            for uid in uids if (row := status.get(uid)) is not None
        ))

    # -- meta ------------------------------------------------------------------------------------

    def get_meta(self, name: str) -> str | None:
        rows = self._run("SELECT value FROM meta WHERE name = ?", (name,))
        return rows[0][0] if rows else None

    def set_meta(self, name: str, value: str | None) -> None:
        if value is None:
            self._run("DELETE FROM meta WHERE name = ?", (name,))
        else:
            self._run("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (name, value))
        self._note({"m": name, "v": value})

    def get_metas(self, names: Iterable[str]) -> dict[str, str | None]:
        return {name: self.get_meta(name) for name in names}

    def set_metas(self, values: Mapping[str, str | None]) -> None:
        self._transaction([("DELETE FROM meta WHERE name = ?", (name,)) if value is None else
                           ("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (name, value))
                           for name, value in values.items()])
        self._note(*({"m": name, "v": value} for name, value in values.items()))
