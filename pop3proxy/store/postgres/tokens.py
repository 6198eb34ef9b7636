"""OAuth2 tokens of a cluster in PostgreSQL: `PostgresTokenStore`, the `TokenStore` of ``store.tokens_api``.

One row per account in ``oauth_tokens`` (schema version 3): the record as JSON text and the local
password's hash. Every write is one statement in autocommit on a pooled connection: atomic (a reader sees
the old record or the new one) and durable once it returns. A record that is not a JSON object (damaged
by hand, or by a bug) is refused with ValueError on reading and left as it is; nothing here deletes a row.

`renewing` holds a session-level advisory lock on the account's key (`schema.lock_key` in the namespace
``"pop3proxy tokens"``) on a connection of its own, opened for the ``with`` block and closed after it: one
renewal per account at a time across threads, processes and nodes. ``pg_advisory_lock`` waits in the
server while another holder has it; a holder that dies loses its connection, and the server frees its
lock at once (a node whose machine vanishes keeps it until the server's ``tcp_keepalives_*`` end its
connection). A holder's saves are committed before it lets go, so the next holder loads them.

An account is any non-empty string: what PostgreSQL's text cannot hold (NUL, a lone surrogate) and ``%``
are percent-encoded in the ``account`` column (`stored_name`), so that every name has a row of its own and
ordinary names read as they are. The database's errors (unreachable, a pool timeout, a refused statement)
become `TokenStoreUnavailable`, an OSError, as the protocol says. Secrets: the rows are readable by
whoever may read the table; give the service's database role alone access to it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import Any, LiteralString

import psycopg
from psycopg_pool import ConnectionPool

from pop3proxy.store.postgres.connections import dedicated, single_statements
from pop3proxy.store.postgres.schema import check_schema, lock_key

__all__ = ["TOKENS_NAMESPACE", "PostgresTokenStore", "TokenStoreUnavailable", "renewal_key", "stored_name"]

TOKENS_NAMESPACE = "pop3proxy tokens"


class TokenStoreUnavailable(OSError):
    """The token database cannot be used now (unreachable, a pool timeout, a refused statement)."""


def renewal_key(account: str) -> int:
    """The advisory lock key of an account's renewal."""
    return lock_key(TOKENS_NAMESPACE, account)


def _escaped(char: str) -> str:
    if char in "%\0":
        return f"%{ord(char):02X}"
    return f"%u{ord(char):04X}" if "\ud800" <= char <= "\udfff" else char


def stored_name(account: str) -> str:
    """The ``account`` column of a name: the name itself unless it holds ``%``, NUL or a lone surrogate,
    which become ``%25``, ``%00`` and ``%uXXXX`` (every ``%`` starts one: no two names meet). ValueError
    for the empty name."""
    if not account:
        raise ValueError("empty account name")
    return "".join(map(_escaped, account))


class PostgresTokenStore:
    """OAuth2 accounts' tokens and local password hashes in the database `pool` connects to.

    The database must have this code's schema (``apply_schema``): otherwise the constructor raises
    `SchemaTooOld` or `SchemaTooNew` (both `StateError`), unless ``check=False``."""

    def __init__(self, pool: ConnectionPool, *, check: bool = True) -> None:
        self.pool = pool
        if check:
            with self._statements("schema") as conn:
                check_schema(conn)

    @contextmanager
    def _statements(self, what: str) -> Iterator[psycopg.Connection]:
        try:
            with single_statements(self.pool) as conn:
                yield conn
        except psycopg.Error as exc:
            raise TokenStoreUnavailable(f"token database ({what}): {exc}") from exc

    def _column(self, account: str, sql: LiteralString) -> str | None:
        """The value of one column of the account's row (None: no row, or NULL)."""
        name = stored_name(account)
        with self._statements(account) as conn:
            found = conn.execute(sql, (name,)).fetchone()
        return None if found is None else found[0]

    def load(self, account: str) -> dict[str, Any] | None:
        text = self._column(account, "SELECT record FROM oauth_tokens WHERE account = %s")
        if text is None:
            return None
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"cannot read the token record of {account!r}: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"cannot read the token record of {account!r}: not a JSON object")
        return data

    def save(self, account: str, record: Mapping[str, Any]) -> None:
        name = stored_name(account)
        text = json.dumps(dict(record))  # ASCII: NUL and surrogates are escaped
        with self._statements(account) as conn:
            conn.execute("INSERT INTO oauth_tokens (account, record) VALUES (%s, %s)"
                         " ON CONFLICT (account) DO UPDATE SET record = EXCLUDED.record, updated_at = now()",
                         (name, text))

    @contextmanager
    def renewing(self, account: str) -> Iterator[None]:
        key = renewal_key(stored_name(account))
        try:
            conn = dedicated(self.pool, "pop3proxy token renewal")
        except psycopg.Error as exc:
            raise TokenStoreUnavailable(f"token database (renewal of {account!r}): {exc}") from exc
        try:
            try:
                conn.execute("SELECT pg_advisory_lock(%s)", (key,))
            except psycopg.Error as exc:
                raise TokenStoreUnavailable(f"token database (renewal of {account!r}): {exc}") from exc
            yield
            with suppress(psycopg.Error):  # a connection that is gone took its lock with it
                conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
        finally:
            conn.close()  # frees the lock whatever happened in the block

    def local_password_hash(self, account: str) -> str | None:
        return self._column(account, "SELECT password_hash FROM oauth_tokens WHERE account = %s")

    def set_local_password_hash(self, account: str, password_hash: str) -> None:
        name = stored_name(account)
        if not password_hash or not password_hash.isprintable() or password_hash != password_hash.strip():
            raise ValueError("a password hash is one line of printable text, without spaces around it")
        password_hash.encode("ascii")  # UnicodeEncodeError is a ValueError
        with self._statements(account) as conn:
            conn.execute("INSERT INTO oauth_tokens (account, password_hash) VALUES (%s, %s)"
                         " ON CONFLICT (account) DO UPDATE SET password_hash = EXCLUDED.password_hash,"
                         " updated_at = now()", (name, password_hash))
