"""The two ways the cluster's engines use a connection besides `PostgresStateStore`'s transactions: a
pooled one for single statements, and one of their own for a lock that lives longer than a statement."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg.pq import TransactionStatus
from psycopg_pool import ConnectionPool

__all__ = ["dedicated", "single_statements"]


@contextmanager
def single_statements(pool: ConnectionPool) -> Iterator[psycopg.Connection]:
    """A pooled connection in autocommit for the block: each statement is a transaction of its own and one
    round trip to the server (no BEGIN, no COMMIT). Given back to the pool as it was lent."""
    with pool.connection() as conn:
        was = conn.autocommit
        conn.autocommit = True
        try:
            yield conn
        finally:
            if conn.pgconn.transaction_status == TransactionStatus.IDLE:  # a broken one is dropped by the pool
                conn.autocommit = was


def dedicated(pool: ConnectionPool, application_name: str) -> psycopg.Connection:
    """A new connection, not the pool's, made as the pool makes its own (the same conninfo and options), in
    autocommit: for a session-level advisory lock, which lives exactly as long as its connection (a pooled
    one may be closed or handed to someone else). The caller closes it."""
    conninfo = pool.conninfo() if callable(pool.conninfo) else pool.conninfo  # a pool's may be computed
    kwargs = pool.kwargs() if callable(pool.kwargs) else pool.kwargs or {}
    return psycopg.connect(conninfo, **{**kwargs, "autocommit": True, "application_name": application_name})
