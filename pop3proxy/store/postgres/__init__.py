"""The cluster's engines on PostgreSQL (extra ``pop3proxy[cluster]``: psycopg 3 and psycopg-pool).

=======================  ==============================================================================
`PostgresStateStore`     `StateStore`/`AccountState`: accounts' rows and settings in shared tables
`PostgresSessionLocks`   `SessionLocks`: one session per account, an advisory lock on a connection of its own
`PostgresTokenStore`     `TokenStore`: OAuth2 tokens and local password hashes; one renewal per account
`PostgresCounters`       `CounterStore`: sessions per address and the failed-login throttle of all nodes
`apply_schema`           creates or upgrades the tables (``schema_version``); `check_schema` refuses others
=======================  ==============================================================================

Not imported by ``store`` or ``store.api``: only a composition root that picks these engines imports
this package, so a machine without psycopg runs the embedded default.
"""

from __future__ import annotations

from psycopg_pool import ConnectionPool

from pop3proxy.store.postgres.counters import PostgresCounters
from pop3proxy.store.postgres.locks import PostgresSessionLock, PostgresSessionLocks
from pop3proxy.store.postgres.schema import (
    SCHEMA_VERSION,
    SchemaError,
    SchemaTooNew,
    SchemaTooOld,
    apply_schema,
    check_schema,
    database_version,
)
from pop3proxy.store.postgres.state import PostgresAccountState, PostgresStateStore
from pop3proxy.store.postgres.tokens import PostgresTokenStore, TokenStoreUnavailable

__all__ = [
    "SCHEMA_VERSION", "PostgresAccountState", "PostgresCounters", "PostgresSessionLock", "PostgresSessionLocks",
    "PostgresStateStore", "PostgresTokenStore", "SchemaError", "SchemaTooNew", "SchemaTooOld", "TokenStoreUnavailable",
    "apply_schema", "check_schema", "database_version", "open_pool",
]


def open_pool(conninfo: str, *, min_size: int = 1, max_size: int = 8, timeout: float = 10.0) -> ConnectionPool:
    """A pool of connections for `PostgresStateStore`, opened (connections are made in the background;
    a call that waits longer than ``timeout`` seconds for one raises `StateError`). Close it with
    ``pool.close()``."""
    return ConnectionPool(conninfo, min_size=min_size, max_size=max_size, timeout=timeout, open=True,
                          name="pop3proxy state", kwargs={"application_name": "pop3proxy state"})
