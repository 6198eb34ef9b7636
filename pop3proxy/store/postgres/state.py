"""Accounts' sync state in PostgreSQL: `StateStore` and `AccountState` (see ``store.api``) for a cluster.

The same rows, statuses and promises as `store.state.UserState` (read its docstring), in shared tables
keyed by (account, uid): ``messages`` and ``account_meta`` (see ``schema.py``), one ``accounts`` row per
account. Every method runs in one transaction on a connection borrowed from the pool and returns after
its COMMIT: what it wrote survives this process dying (and, with the server's default ``fsync`` and
``synchronous_commit``, the server's machine losing power), so ``sync_to_disk`` has nothing left to do.
A method of one statement runs it in autocommit mode, where the statement is its own transaction (as
atomic, and as durable when it returns): one round trip instead of three (BEGIN, it, COMMIT).
Nothing is held between calls: ``close`` gives nothing back, and any node's objects see the same rows.

The database's errors (unreachable, a pool timeout, a refused statement) become `StateError`.
Synchronous code, safe to call from several worker threads at once.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, LiteralString

import psycopg
from psycopg_pool import ConnectionPool

from pop3proxy.store.postgres.connections import single_statements
from pop3proxy.store.postgres.schema import check_schema
from pop3proxy.store.state import Row, StateError

__all__ = ["PostgresAccountState", "PostgresStateStore"]


def _row(found: tuple[Any, ...]) -> Row:
    uid, key, status, digest, size, fetched_at, upstream, source = found
    return Row(uid, key, status, digest, size, fetched_at, bool(upstream), source)


def _check_name(cache_id: str) -> None:
    """The empty name is refused, as the engines on files refuse it (ValueError)."""
    if not cache_id:
        raise ValueError("empty cache id")


@contextmanager
def _transaction(pool: ConnectionPool, what: str) -> Iterator[psycopg.Connection]:
    """A pooled connection in a transaction, committed on leaving the block; psycopg's errors (the pool's
    timeouts included) become `StateError`."""
    try:
        with pool.connection() as conn, conn.transaction():
            yield conn
    except psycopg.Error as exc:
        raise StateError(f"state database ({what}): {exc}") from exc


@contextmanager
def _statement(pool: ConnectionPool, what: str) -> Iterator[psycopg.Connection]:
    """A pooled connection for **one** statement, in autocommit mode (`single_statements`): the statement
    is a transaction of its own, committed when it returns, in one round trip. Errors as `_transaction`."""
    try:
        with single_statements(pool) as conn:
            yield conn
    except psycopg.Error as exc:
        raise StateError(f"state database ({what}): {exc}") from exc


class PostgresStateStore:
    """Where accounts' states live in a cluster: the tables of one PostgreSQL database, through `pool`.

    The database must have this code's schema (``apply_schema``): otherwise the constructor raises
    `SchemaTooOld` or `SchemaTooNew` (both `StateError`), unless ``check=False``.
    """

    def __init__(self, pool: ConnectionPool, *, check: bool = True) -> None:
        self.pool = pool
        if check:
            with _transaction(pool, "schema") as conn:
                check_schema(conn)

    def open(self, cache_id: str) -> PostgresAccountState:
        """The account's state, created (its ``accounts`` row) when it has none yet."""
        _check_name(cache_id)
        with _statement(self.pool, cache_id) as conn:
            conn.execute("INSERT INTO accounts (account) VALUES (%s) ON CONFLICT DO NOTHING", (cache_id,))
        return PostgresAccountState(self.pool, cache_id)

    def open_existing(self, cache_id: str) -> PostgresAccountState | None:
        """The account's state, or None when it has none (nothing is created)."""
        _check_name(cache_id)
        with _statement(self.pool, cache_id) as conn:
            found = conn.execute("SELECT 1 FROM accounts WHERE account = %s", (cache_id,)).fetchone()
        return PostgresAccountState(self.pool, cache_id) if found else None


class PostgresAccountState:
    """One account's rows and settings (see the module's docstring and `store.state.UserState`)."""

    def __init__(self, pool: ConnectionPool, account: str) -> None:
        self.pool = pool
        self.account = account
        self._closed = False

    @contextmanager
    def _tx(self) -> Iterator[psycopg.Connection]:
        """A transaction, for the methods of several statements."""
        if self._closed:
            raise StateError(f"the state of {self.account!r} was closed")
        with _transaction(self.pool, self.account) as conn:
            yield conn

    @contextmanager
    def _single(self) -> Iterator[psycopg.Connection]:
        """One statement, a transaction of its own (one round trip)."""
        if self._closed:
            raise StateError(f"the state of {self.account!r} was closed")
        with _statement(self.pool, self.account) as conn:
            yield conn

    def _all(self, sql: LiteralString, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """The rows one statement returns."""
        with self._single() as conn:
            return conn.execute(sql, params).fetchall()

    def _run(self, sql: LiteralString, params: tuple[Any, ...]) -> None:
        """Run one statement that returns nothing."""
        with self._single() as conn:
            conn.execute(sql, params)

    def sync_to_disk(self) -> None:
        """Nothing to do: every method returned after its COMMIT, which the server has made durable."""

    def close(self) -> None:
        """Nothing is held between calls (connections go back to the pool after each); later calls raise
        `StateError`, as they do on a closed `UserState`."""
        self._closed = True

    def __enter__(self) -> PostgresAccountState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ---------------------------------------------------------------------------------

    def rows(self) -> list[Row]:
        return [_row(found) for found in self._all(
            "SELECT uid, key, status, digest, size, fetched_at, upstream, source FROM messages"
            " WHERE account = %s", (self.account,))]

    def cached_keys(self, upstream_only: bool = False) -> set[str]:
        if upstream_only:
            sql = ("SELECT key FROM messages WHERE account = %s AND status = 'cached' AND key IS NOT NULL"
                   " AND upstream")
        else:
            sql = "SELECT key FROM messages WHERE account = %s AND status = 'cached' AND key IS NOT NULL"
        return {key for (key,) in self._all(sql, (self.account,))}

    def hidden_keys(self) -> set[str]:
        """Cache keys a session must not see: deleted (removal may be pending after a crash)."""
        return {key for (key,) in self._all(
            "SELECT key FROM messages WHERE account = %s AND status = 'deleted' AND key IS NOT NULL",
            (self.account,))}

    def uids_for_keys(self, keys: Iterable[str]) -> dict[str, str]:
        return {key: uid for uid, key in self._all(
            "SELECT uid, key FROM messages WHERE account = %s AND key = ANY(%s::text[])",
            (self.account, list(keys)))}

    def known_uids_among(self, uids: list[str]) -> set[str]:
        return {uid for (uid,) in self._all(
            "SELECT uid FROM messages WHERE account = %s AND uid = ANY(%s::text[])", (self.account, list(uids)))}

    def fetching(self) -> list[Row]:
        return [_row(found) for found in self._all(
            "SELECT uid, key, status, digest, size, fetched_at, upstream, source FROM messages"
            " WHERE account = %s AND status = 'fetching'", (self.account,))]

    def recovery_view(self) -> tuple[list[Row], set[str], set[str]]:
        """``fetching()``, ``hidden_keys()``, ``cached_keys(upstream_only=True)`` in one statement."""
        rows = [_row(found) for found in self._all(
            "SELECT uid, key, status, digest, size, fetched_at, upstream, source FROM messages"
            " WHERE account = %s AND (status IN ('fetching', 'deleted') OR (status = 'cached' AND upstream))",
            (self.account,))]
        return ([row for row in rows if row.status == "fetching"],
                {row.key for row in rows if row.status == "deleted" and row.key is not None},
                {row.key for row in rows if row.status == "cached" and row.key is not None})

    # -- fetching --------------------------------------------------------------------------------

    def begin_fetch(self, uid: str, digest: str) -> bool:
        """Claim ``uid`` for fetching; False when some row for it exists already (on any node)."""
        return bool(self._all(
            "INSERT INTO messages (account, uid, status, digest, upstream) VALUES (%s, %s, 'fetching', %s, true)"
            " ON CONFLICT DO NOTHING RETURNING uid", (self.account, uid, digest)))

    def begin_fetch_many(self, claims: list[tuple[str, str]], sources: list[str | None] | None = None) -> list[bool]:
        """``begin_fetch`` for several (uid, digest) pairs in one transaction; a uid listed twice is
        claimed by its first pair. ``sources``: the digest of each message as the provider sent it.

        The rows are inserted in the order of their uids, whatever the order of ``claims``: two nodes
        claiming overlapping uids wait for each other in the same order and never deadlock."""
        sources = sources or [None] * len(claims)
        first: dict[str, tuple[str, str | None]] = {}
        for (uid, digest), source in zip(claims, sources, strict=False):
            first.setdefault(uid, (digest, source))
        granted: set[str] = set()
        if first:
            granted = {uid for (uid,) in self._all(
                "INSERT INTO messages (account, uid, status, digest, upstream, source)"
                " SELECT %s, c.uid, 'fetching', c.digest, true, c.source"
                " FROM unnest(%s::text[], %s::text[], %s::text[]) AS c (uid, digest, source)"
                " ORDER BY c.uid ON CONFLICT DO NOTHING RETURNING uid",
                (self.account, list(first), [d for d, _ in first.values()], [s for _, s in first.values()]))}
        answer: list[bool] = []
        for uid, _ in claims:
            answer.append(uid in granted)
            granted.discard(uid)  # a second pair for the same uid is refused
        return answer

    def adopt(self, old_uid: str, new_uid: str) -> Row | None:
        """The row of ``old_uid`` moves to ``new_uid`` (see `UserState.adopt`); None when ``old_uid`` has
        no settled row or ``new_uid`` has a row already."""
        try:
            found = self._all(
                "UPDATE messages SET uid = %s, upstream = true"
                " WHERE account = %s AND uid = %s AND status <> 'fetching'"
                " AND NOT EXISTS (SELECT 1 FROM messages WHERE account = %s AND uid = %s)"
                " RETURNING uid, key, status, digest, size, fetched_at, upstream, source",
                (new_uid, self.account, old_uid, self.account, new_uid))
        except StateError as exc:
            if isinstance(exc.__cause__, psycopg.errors.UniqueViolation):
                return None  # another node claimed new_uid meanwhile
            raise
        return _row(found[0]) if found else None

    def drop_rows(self, uids: Iterable[str]) -> None:
        """Forget these messages entirely (see `UserState.drop_rows`)."""
        self._run("DELETE FROM messages WHERE account = %s AND uid = ANY(%s::text[])",
                  (self.account, list(uids)))

    def finish_fetch_many(self, settled: list[tuple[str, str, int, str]]) -> None:
        """``finish_fetch`` for several (uid, key, size, status) in one transaction."""
        now = time.time()
        with self._tx() as conn, conn.cursor() as cursor:
            cursor.executemany(
                "UPDATE messages SET status = %s, key = %s, size = %s, fetched_at = %s"
                " WHERE account = %s AND uid = %s",
                [(status, key, size, now, self.account, uid) for uid, key, size, status in settled])

    def finish_fetch(self, uid: str, key: str, size: int, status: str = "cached") -> None:
        self.finish_fetch_many([(uid, key, size, status)])

    def abandon_fetch(self, uid: str) -> None:
        self._run("DELETE FROM messages WHERE account = %s AND uid = %s AND status = 'fetching'",
                  (self.account, uid))

    def release_held(self, held_key: str, uid: str | None, key: str, size: int) -> None:
        """The held message ``held_key`` is served now under ``key`` (see `UserState.release_held`)."""
        with self._tx() as conn:
            conn.execute("UPDATE messages SET status = 'cached', key = %s, size = %s"
                         " WHERE account = %s AND key = %s AND status = 'held'",
                         (key, size, self.account, held_key))
            if uid:
                conn.execute("INSERT INTO messages (account, uid, key, status, size, fetched_at, upstream)"
                             " VALUES (%s, %s, %s, 'cached', %s, %s, true) ON CONFLICT DO NOTHING",
                             (self.account, uid, key, size, time.time()))

    # -- deletions -------------------------------------------------------------------------------

    def mark_deleted(self, keys: Iterable[str]) -> None:
        """The client deleted these cached messages (UPDATE state)."""
        self._run("UPDATE messages SET status = 'deleted'"
                  " WHERE account = %s AND key = ANY(%s::text[]) AND status = 'cached'",
                  (self.account, list(keys)))

    def restore_deleted(self, keys: Iterable[str]) -> None:
        """Undo `mark_deleted` for these keys (their cached copies could not be removed)."""
        self._run("UPDATE messages SET status = 'cached'"
                  " WHERE account = %s AND key = ANY(%s::text[]) AND status = 'deleted'",
                  (self.account, list(keys)))

    def forget_keys(self, keys: Iterable[str]) -> None:
        """Drop rows whose cached copy vanished although nobody deleted it through us."""
        self._run("DELETE FROM messages WHERE account = %s AND key = ANY(%s::text[]) AND status = 'cached'",
                  (self.account, list(keys)))

    def upstream_gone(self, uids: Iterable[str]) -> None:
        self._run("UPDATE messages SET upstream = false WHERE account = %s AND uid = ANY(%s::text[])",
                  (self.account, list(uids)))

    # -- meta ------------------------------------------------------------------------------------

    def get_meta(self, name: str) -> str | None:
        found = self._all("SELECT value FROM account_meta WHERE account = %s AND name = %s", (self.account, name))
        return found[0][0] if found else None

    def get_metas(self, names: Iterable[str]) -> dict[str, str | None]:
        """Several settings in one statement."""
        names = list(names)
        found = dict(self._all("SELECT name, value FROM account_meta WHERE account = %s AND name = ANY(%s::text[])",
                               (self.account, names)))
        return {name: found.get(name) for name in names}

    def set_metas(self, values: Mapping[str, str | None]) -> None:
        """Several settings in one statement (None deletes one); the rows are written in the order of their
        names, so that two writers never wait for each other in opposite orders."""
        if not values:
            return
        kept = sorted((name, value) for name, value in values.items() if value is not None)
        self._run("WITH gone AS (DELETE FROM account_meta WHERE account = %s AND name = ANY(%s::text[]))"
                  " INSERT INTO account_meta (account, name, value)"
                  " SELECT %s, m.name, m.value FROM unnest(%s::text[], %s::text[]) AS m (name, value) ORDER BY m.name"
                  " ON CONFLICT (account, name) DO UPDATE SET value = EXCLUDED.value",
                  (self.account, [name for name, value in values.items() if value is None], self.account,
                   [name for name, _ in kept], [value for _, value in kept]))

    def set_meta(self, name: str, value: str | None) -> None:
        """Set a setting; None deletes it."""
        if value is None:
            self._run("DELETE FROM account_meta WHERE account = %s AND name = %s",
                      (self.account, name))
        else:
            self._run("INSERT INTO account_meta (account, name, value) VALUES (%s, %s, %s)"
                      " ON CONFLICT (account, name) DO UPDATE SET value = EXCLUDED.value",
                      (self.account, name, value))
