"""One session per account across a cluster: PostgreSQL advisory locks (`SessionLocks`, see ``store.api``).

`PostgresSessionLocks` keeps **one connection per process** (made on first use) and takes a
session-level ``pg_try_advisory_lock`` on it for each account the process serves, on a 64-bit key derived
from the account's cache id (`schema.lock_key`). A lock lives as long as that connection: a process that
dies loses it, and the server frees every lock it held at once. One connection, not one per session: a
node serving a thousand sessions holds a thousand locks on one connection, and taking a lock is one round
trip, never a new connection. Advisory locks are re-entrant within a database session, so the process
keeps the keys it holds and refuses a second holder of its own (`MailboxBusy`), as ``flock`` does.

Given a ``node`` name, taking a lock also records which node serves the account (a row of ``serving``,
written by the same statement); giving it back removes the row. A row whose lock is no longer held (its
process died) means nothing: `pop3proxy.store.postgres.nodes.serving` lists only rows whose lock is held.

The connection breaking (the server restarted, the network cut) frees its locks without telling the
holders: every lock taken on it is then *lost* (`PostgresSessionLock.held` turns False once the break
is seen) and the next `try_lock` connects anew. Keepalives bound how long a vanished machine's connection
lingers on the server (``tcp_keepalives_*`` there). Connecting fails with `StateError`, a held account
with `MailboxBusy`.
"""

from __future__ import annotations

import os
import threading
from typing import Any, LiteralString

import psycopg

from pop3proxy.store.locks import MailboxBusy
from pop3proxy.store.postgres.schema import lock_key
from pop3proxy.store.state import StateError

__all__ = ["SESSION_NAMESPACE", "PostgresSessionLock", "PostgresSessionLocks", "session_key"]

SESSION_NAMESPACE = "pop3proxy session"

_TAKE: LiteralString = "SELECT pg_try_advisory_lock(%s)"
# The lock and the record of who serves the account, in one statement (one round trip).
_TAKE_RECORDED: LiteralString = """
    WITH got AS (SELECT pg_try_advisory_lock(%(key)s) AS ok)
    INSERT INTO serving (account, lock_key, node, pid, since)
    SELECT %(account)s, %(key)s, %(node)s, %(pid)s, now() FROM got WHERE got.ok
    ON CONFLICT (account) DO UPDATE
        SET lock_key = excluded.lock_key, node = excluded.node, pid = excluded.pid, since = excluded.since
    RETURNING true"""
_GIVE: LiteralString = "SELECT pg_advisory_unlock(%s)"
_GIVE_RECORDED: LiteralString = """
    WITH gone AS (DELETE FROM serving WHERE account = %(account)s AND node = %(node)s AND pid = %(pid)s)
    SELECT pg_advisory_unlock(%(key)s)"""


def session_key(cache_id: str) -> int:
    """The advisory lock key of an account's session."""
    return lock_key(SESSION_NAMESPACE, cache_id)


class PostgresSessionLock:
    """An account held by this process: an advisory lock on the process's lock connection."""

    def __init__(self, owner: PostgresSessionLocks, key: int, cache_id: str, generation: int) -> None:
        self._owner: PostgresSessionLocks | None = owner
        self.key = key
        self.cache_id = cache_id
        self.generation = generation

    @property
    def held(self) -> bool:
        """True until `release`, or until the connection it was taken on is seen to have broken."""
        owner = self._owner
        return owner is not None and owner._still_held(self)

    def confirm(self) -> bool:
        """Ask the server (one round trip on the lock connection): False when the connection broke, and
        the lock with it, since it was taken."""
        owner = self._owner
        return owner is not None and owner._confirm(self)

    def release(self) -> None:
        """Give the account back (idempotent)."""
        owner, self._owner = self._owner, None
        if owner is not None:
            owner._release(self)

    def __enter__(self) -> PostgresSessionLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class PostgresSessionLocks:
    """Session locks of a cluster: advisory locks in the database `conninfo` names, on one connection of
    this object's (one object per process); ``node`` records who serves each account."""

    def __init__(self, conninfo: str, *, node: str | None = None, connect_timeout: int = 10) -> None:
        self.conninfo = conninfo
        self.node = node
        self.connect_timeout = connect_timeout
        self._mutex = threading.Lock()
        self._conn: psycopg.Connection | None = None
        self._generation = 0  # one more each time a new connection is made
        self._held: dict[int, PostgresSessionLock] = {}

    def _connection(self) -> psycopg.Connection:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        self._drop()
        try:
            self._conn = psycopg.connect(self.conninfo, autocommit=True, connect_timeout=self.connect_timeout,
                                         application_name=f"pop3proxy session locks {self.node or ''}".rstrip())
        except psycopg.Error as exc:
            raise StateError(f"cannot reach the database for the session lock: {exc}") from exc
        self._generation += 1
        return self._conn

    def _drop(self) -> None:
        """The connection is gone: so are the locks taken on it."""
        if self._conn is not None:
            self._conn.close()
        self._conn = None
        self._held.clear()

    def _execute(self, query: LiteralString, params: Any) -> tuple[Any, ...] | None:
        conn = self._connection()
        try:
            return conn.execute(query, params).fetchone()
        except psycopg.OperationalError as exc:  # the connection broke: its locks went with it
            self._drop()
            raise StateError(f"the database connection of the session locks broke: {exc}") from exc
        except psycopg.Error as exc:
            raise StateError(f"cannot take the session lock: {exc}") from exc

    def try_lock(self, cache_id: str) -> PostgresSessionLock:
        """Hold the account now, or raise `MailboxBusy` (held by any process on any node, this one
        included) or `StateError` (the database cannot be reached). The empty name raises ValueError."""
        if not cache_id:
            raise ValueError("empty cache id")
        key = session_key(cache_id)
        with self._mutex:
            if key in self._held:
                raise MailboxBusy(f"the mailbox of {cache_id!r} is in use")
            if self.node is None:
                found = self._execute(_TAKE, (key,))
            else:
                found = self._execute(_TAKE_RECORDED, {"key": key, "account": cache_id, "node": self.node,
                                                       "pid": os.getpid()})
            if not found or not found[0]:
                raise MailboxBusy(f"the mailbox of {cache_id!r} is in use")
            lock = self._held[key] = PostgresSessionLock(self, key, cache_id, self._generation)
            return lock

    def _still_held(self, lock: PostgresSessionLock) -> bool:
        with self._mutex:
            conn = self._conn
            if conn is None or conn.closed or conn.broken:
                return False
            return self._held.get(lock.key) is lock and lock.generation == self._generation

    def _confirm(self, lock: PostgresSessionLock) -> bool:
        with self._mutex:
            if self._held.get(lock.key) is not lock or lock.generation != self._generation:
                return False
            try:
                self._execute("SELECT 1", None)
            except StateError:
                return False
            return self._held.get(lock.key) is lock

    def _release(self, lock: PostgresSessionLock) -> None:
        with self._mutex:
            if self._held.get(lock.key) is not lock or lock.generation != self._generation:
                return  # lost with its connection: nothing to give back
            del self._held[lock.key]
            try:
                if self.node is None:
                    self._execute(_GIVE, (lock.key,))
                else:
                    self._execute(_GIVE_RECORDED, {"key": lock.key, "account": lock.cache_id, "node": self.node,
                                                   "pid": os.getpid()})
            except StateError:
                pass  # the connection broke, and its locks with it

    def close(self) -> None:
        """Give back every lock of this process (by closing its connection)."""
        with self._mutex:
            self._drop()
