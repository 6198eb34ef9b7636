"""One session per account across a cluster: PostgreSQL advisory locks (`SessionLocks`, see ``store.api``).

`PostgresSessionLocks.try_lock` opens a connection of the lock's own and takes a session-level
``pg_try_advisory_lock`` on a 64-bit key derived from the account's cache id (`schema.lock_key`): the
lock lives exactly as long as that connection. `PostgresSessionLock.release` unlocks and closes it; a
process that dies loses its connection, and the server frees its locks at once. The keys are those of the
database the conninfo names: every node must name the same database.

A connection that breaks (the server restarted, the network cut) loses its lock without telling the
holder; keepalives bound how long a dead node's connection lingers on the server (``tcp_keepalives_*``
settings there). Connecting fails with `StateError`, a held account with `MailboxBusy`.
"""

from __future__ import annotations

import threading

import psycopg

from pop3proxy.store.locks import MailboxBusy
from pop3proxy.store.postgres.schema import lock_key
from pop3proxy.store.state import StateError

__all__ = ["SESSION_NAMESPACE", "PostgresSessionLock", "PostgresSessionLocks", "session_key"]

SESSION_NAMESPACE = "pop3proxy session"


def session_key(cache_id: str) -> int:
    """The advisory lock key of an account's session."""
    return lock_key(SESSION_NAMESPACE, cache_id)


class PostgresSessionLock:
    """An account held by this process: the advisory lock on a connection of its own."""

    def __init__(self, conn: psycopg.Connection, key: int, cache_id: str) -> None:
        self._conn: psycopg.Connection | None = conn
        self._mutex = threading.Lock()
        self.key = key
        self.cache_id = cache_id

    @property
    def held(self) -> bool:
        """True until `release` (a broken connection is not noticed here)."""
        return self._conn is not None

    def release(self) -> None:
        """Unlock and close the connection (idempotent; closing alone would free the lock too)."""
        with self._mutex:
            conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            conn.execute("SELECT pg_advisory_unlock(%s)", (self.key,))
        except psycopg.Error:
            pass  # the connection is gone already, and its lock with it
        finally:
            conn.close()

    def __enter__(self) -> PostgresSessionLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        conn = getattr(self, "_conn", None)
        if conn is not None:
            conn.close()  # the server frees the lock with the connection


class PostgresSessionLocks:
    """Session locks of a cluster: advisory locks in the database `conninfo` names."""

    def __init__(self, conninfo: str, *, connect_timeout: int = 10) -> None:
        self.conninfo = conninfo
        self.connect_timeout = connect_timeout

    def try_lock(self, cache_id: str) -> PostgresSessionLock:
        """Hold the account now, or raise `MailboxBusy` (held by any process on any node) or `StateError`
        (the database cannot be reached). The empty name raises ValueError, as it does for ``flock``."""
        if not cache_id:
            raise ValueError("empty cache id")
        key = session_key(cache_id)
        try:
            conn = psycopg.connect(self.conninfo, autocommit=True, connect_timeout=self.connect_timeout,
                                   application_name="pop3proxy session lock")
        except psycopg.Error as exc:
            raise StateError(f"cannot reach the database for the session lock: {exc}") from exc
        try:
            found = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
        except BaseException as exc:
            conn.close()
            if isinstance(exc, psycopg.Error):
                raise StateError(f"cannot take the session lock: {exc}") from exc
            raise
        if not found or not found[0]:
            conn.close()
            raise MailboxBusy(f"the mailbox of {cache_id!r} is in use")
        return PostgresSessionLock(conn, key, cache_id)
