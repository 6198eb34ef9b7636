"""The one place that picks the engines behind the store's seams from the settings: the embedded
defaults under ``cache.root`` (SQLite, ``flock``), or PostgreSQL with a ``[cluster]`` section.

`open_stores` is called once per process by the composition root (``app.py``) and by the commands that
read an account's state. In a cluster it opens a pool of ``cluster.pool_size`` connections and refuses
a database of another schema version (asking for ``pop3proxy db upgrade``) or one it cannot reach, as
a `StartupError` naming the database without its password.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from pop3proxy.config import ClusterSettings, Settings
from pop3proxy.errors import StartupError
from pop3proxy.store.api import Stores, local_stores
from pop3proxy.store.state import StateError
from pop3proxy.store.tokens_api import TokenStore, local_token_store

__all__ = ["database_conninfo", "database_name", "open_stores", "token_store", "upgrade_database"]

AUTH_KEY = "auth-digest"  # the name of the cluster key that keys password digests


def database_name(cluster: ClusterSettings) -> str:
    """The database as a person reads it: host, port and name, never a password."""
    parts = urlsplit(cluster.database)
    where = parts.hostname or "localhost"
    return f"{where}:{parts.port or 5432}{parts.path or '/'}"


def read_database_password(cluster: ClusterSettings) -> str | None:
    path = cluster.database_password_file
    if path is None:
        return None
    try:
        mode = Path(path).stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise StartupError(f"cluster.database_password_file: {path} is readable by others; chmod 600 it")
        return Path(path).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise StartupError(f"cluster.database_password_file: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise StartupError(f"cluster.database_password_file: {path} is not UTF-8 text") from None


def database_conninfo(cluster: ClusterSettings, purpose: str = "state") -> str:
    """The conninfo of the cluster's database: its URL, the password from its file, a connect timeout."""
    from psycopg.conninfo import make_conninfo

    extra: dict[str, str | int | None] = {"application_name": f"pop3proxy {purpose} {cluster.node}",
                                "connect_timeout": max(1, round(cluster.database_timeout))}
    password = read_database_password(cluster)
    if password is not None:
        extra["password"] = password
    try:
        return make_conninfo(cluster.database, **extra)
    except Exception as exc:  # psycopg's ProgrammingError for a URL it cannot read
        raise StartupError(f"cluster.database: cannot read the URL: {type(exc).__name__}") from None


def _cluster_stores(settings: Settings, cluster: ClusterSettings) -> Stores:
    try:
        from pop3proxy.store.postgres import (
            PostgresCounters,
            PostgresSessionLocks,
            PostgresStateStore,
            PostgresTokenStore,
            open_pool,
        )
        from pop3proxy.store.postgres.nodes import NodeDirectory
    except ImportError as exc:
        raise StartupError(f"cluster mode needs the cluster extra (pip install 'pop3proxy[cluster]'): {exc}") from None
    conninfo = database_conninfo(cluster)
    pool = open_pool(conninfo, min_size=1, max_size=cluster.pool_size, timeout=cluster.database_timeout)
    throttle = settings.throttle
    try:
        states = PostgresStateStore(pool)
        tokens = PostgresTokenStore(pool, check=False)  # the version was checked just now
        counters = PostgresCounters(
            pool, max_per_address=settings.listen.max_sessions_per_address, max_failures=throttle.max_failures,
            window=throttle.window, base_delay=throttle.base_delay, max_delay=throttle.max_delay,
            address_failures=throttle.address_failures, check=False)
        directory = NodeDirectory(pool, cluster.node, cluster.heartbeat)
        shared_key = directory.shared_key(AUTH_KEY)
    except (StateError, OSError) as exc:
        pool.close()
        raise StartupError(f"cluster database {database_name(cluster)}: {exc}") from None
    locks = PostgresSessionLocks(database_conninfo(cluster, "locks"), node=cluster.node,
                                 connect_timeout=max(1, round(cluster.database_timeout)))

    def close() -> None:
        locks.close()
        counters.close()  # its owner connection: what this process counted is given back
        pool.close()

    return Stores(states=states, locks=locks, tokens=tokens, counters=counters, node=cluster.node,
                  directory=directory, shared_key=shared_key, close=close)


@contextmanager
def token_store(settings: Settings) -> Iterator[TokenStore]:
    """The OAuth2 token store the settings name, for a command (`oauth`, `passwd`, `status`): the files
    below the cache root, or a cluster's database (a `StartupError` when it cannot be used)."""
    if settings.cluster is None:
        yield local_token_store(settings.cache.root)
        return
    stores = _cluster_stores(settings, settings.cluster)
    try:
        yield stores.tokens
    finally:
        stores.close()


def open_stores(settings: Settings) -> Stores:
    """The engines the settings ask for (close them with ``stores.close()``)."""
    if settings.cluster is None:
        return local_stores(settings.cache.root)
    return _cluster_stores(settings, settings.cluster)


def upgrade_database(settings: Settings) -> str:
    """``pop3proxy db upgrade``: bring the cluster's database to this code's schema; what was done."""
    if settings.cluster is None:
        raise StartupError("no [cluster] section: one machine keeps its state in files, nothing to upgrade")
    try:
        from pop3proxy.store.postgres import SCHEMA_VERSION, apply_schema
    except ImportError as exc:
        raise StartupError(f"cluster mode needs the cluster extra (pip install 'pop3proxy[cluster]'): {exc}") from None
    where = database_name(settings.cluster)
    try:
        before = apply_schema(database_conninfo(settings.cluster, "upgrade"))
    except StateError as exc:
        raise StartupError(f"cluster database {where}: {exc}") from None
    if before == SCHEMA_VERSION:
        return f"{where}: schema version {SCHEMA_VERSION}, up to date"
    if before == 0:
        return f"{where}: schema version {SCHEMA_VERSION} created"
    return f"{where}: schema upgraded from version {before} to {SCHEMA_VERSION}"
