"""The cluster's tables in PostgreSQL, versioned.

``schema_version`` holds one row per version applied (the database's version is the highest). Each
version's statements are in `MIGRATIONS`: a released version is never edited, a change is the next
version. `apply_schema` brings a database up to this code's `SCHEMA_VERSION` (creating it all on an
empty database), in one transaction under an advisory lock, so that concurrent callers apply each version
once and a failure leaves the database as it was; run again, it changes nothing. The engines refuse a
database whose version differs from the code's (`check_schema`): an older one asks for ``pop3proxy db
upgrade`` (which calls `apply_schema`), a newer one for a newer pop3proxy.
"""

from __future__ import annotations

import hashlib
from typing import LiteralString

import psycopg

from pop3proxy.store.postgres.schema_v3 import VERSION_3
from pop3proxy.store.state import StateError

__all__ = [
    "MIGRATIONS", "SCHEMA_VERSION", "SchemaError", "SchemaTooNew", "SchemaTooOld", "apply_schema",
    "check_schema", "database_version", "lock_key",
]

SCHEMA_VERSION = 3

MIGRATIONS: dict[int, tuple[LiteralString, ...]] = {
    1: (
        # An account has a row from its first `StateStore.open` on: `open_existing` asks for it.
        """CREATE TABLE accounts (
            account    text PRIMARY KEY,
            created_at timestamptz NOT NULL DEFAULT now()
        )""",
        # The rows of `store.state.UserState`, keyed by (account, the provider's UIDL).
        """CREATE TABLE messages (
            account    text NOT NULL REFERENCES accounts (account) ON DELETE CASCADE,
            uid        text NOT NULL,
            key        text,
            status     text NOT NULL CHECK (status IN ('fetching', 'cached', 'deleted', 'held')),
            digest     text,
            size       bigint,
            fetched_at double precision,
            upstream   boolean NOT NULL DEFAULT true,
            source     text,
            PRIMARY KEY (account, uid)
        )""",
        "CREATE INDEX messages_key ON messages (account, key)",
        # An account's settings (offline hash and digest, last sync, ...).
        """CREATE TABLE account_meta (
            account text NOT NULL REFERENCES accounts (account) ON DELETE CASCADE,
            name    text NOT NULL,
            value   text NOT NULL,
            PRIMARY KEY (account, name)
        )""",
    ),
    2: (
        # The nodes of the cluster: each node's supervising process registers at start and beats.
        """CREATE TABLE nodes (
            node         text PRIMARY KEY,
            pid          integer NOT NULL,
            version      text NOT NULL,
            state        text NOT NULL CHECK (state IN ('serving', 'draining', 'stopped')),
            started_at   timestamptz NOT NULL DEFAULT now(),
            heartbeat_at timestamptz NOT NULL DEFAULT now()
        )""",
        # Which node serves which account now: written with the session lock, removed with it; a row
        # whose advisory lock (lock_key) is not held any more is stale (its process died).
        """CREATE TABLE serving (
            account  text PRIMARY KEY,
            lock_key bigint NOT NULL,
            node     text NOT NULL,
            pid      integer NOT NULL,
            since    timestamptz NOT NULL DEFAULT now()
        )""",
        # Secrets every node shares (the key of the auth cache's and offline memo's digests).
        """CREATE TABLE cluster_keys (
            name  text PRIMARY KEY,
            value bytea NOT NULL
        )""",
    ),
    # The OAuth2 tokens and the counters (the throttle, sessions per address): see schema_v3.py.
    3: VERSION_3,
}


class SchemaError(StateError):
    """The database's schema is not the one this code was written for."""

    def __init__(self, message: str, found: int, expected: int) -> None:
        super().__init__(message)
        self.found = found
        self.expected = expected


class SchemaTooOld(SchemaError):
    """The database is older than the code (or has no schema at all): ``pop3proxy db upgrade``."""


class SchemaTooNew(SchemaError):
    """The database was upgraded by a newer pop3proxy than this one."""


def lock_key(namespace: str, name: str) -> int:
    """A 64-bit advisory lock key (a signed bigint) for ``name`` in ``namespace``: the first 8 bytes of
    the SHA-256 of both. Two names share a key with a chance of 2**-64."""
    digest = hashlib.sha256(f"{namespace}\0{name}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


_SCHEMA_LOCK = lock_key("pop3proxy schema", "")


def database_version(conn: psycopg.Connection) -> int:
    """The schema version of the database ``conn`` is connected to; 0 when it has none. Runs in the
    connection's transaction (a missing table aborts it: call it first, or in a transaction of its own)."""
    exists = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return 0
    row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
    return int(row[0]) if row else 0


def _mismatch(found: int) -> SchemaError | None:
    if found < SCHEMA_VERSION:
        what = "has no pop3proxy schema" if found == 0 else f"has schema version {found}"
        return SchemaTooOld(f"the database {what}; this pop3proxy needs version {SCHEMA_VERSION}: "
                            "run `pop3proxy db upgrade`", found, SCHEMA_VERSION)
    if found > SCHEMA_VERSION:
        return SchemaTooNew(f"the database has schema version {found}, newer than this pop3proxy's "
                            f"{SCHEMA_VERSION}: run the pop3proxy that upgraded it", found, SCHEMA_VERSION)
    return None


def check_schema(conn: psycopg.Connection) -> None:
    """Raise `SchemaTooOld` or `SchemaTooNew` unless the database has this code's version."""
    problem = _mismatch(database_version(conn))
    if problem is not None:
        raise problem


def apply_schema(conninfo: str) -> int:
    """Create or upgrade the schema to `SCHEMA_VERSION`; idempotent. Returns the version the database
    had before. Raises `SchemaTooNew` for a database newer than the code, `StateError` when the
    database cannot be reached or refuses a statement (nothing is changed then)."""
    try:
        with psycopg.connect(conninfo) as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version ("
                         " version integer PRIMARY KEY,"
                         " applied_at timestamptz NOT NULL DEFAULT now())")
            found = database_version(conn)
            problem = _mismatch(found)
            if isinstance(problem, SchemaTooNew):
                raise problem
            for version in range(found + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[version]:
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
            return found
    except psycopg.Error as exc:
        raise StateError(f"cannot apply the database schema: {exc}") from exc
