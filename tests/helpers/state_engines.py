"""The engines behind the seams ``StateStore`` and ``SessionLocks`` (pop3proxy/store/api.py) and
``TokenStore`` (pop3proxy/store/tokens_api.py), opened by name and one string, so that another process
(another "node") can open the same ones:

``sqlite``    ``where`` is the cache root (`LocalStateStore`, `LocalSessionLocks`; `FileTokenStore`, the
              one machine's token files)
``postgres``  ``where`` is a conninfo of a database with the schema applied (`PostgresStateStore` and
              `PostgresTokenStore`, each on a pool of its own, `PostgresSessionLocks`)

Used by the contract suites in tests/integration and by the processes they start.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pop3proxy.store.api import LocalSessionLocks, LocalStateStore, SessionLocks, StateStore
from pop3proxy.store.paths import make_user_dir
from pop3proxy.store.tokens_api import TokenStore, local_token_store

ENGINES = ("sqlite", "postgres")


@dataclass(frozen=True)
class SqliteStates:
    """`LocalStateStore` as the proxy uses it: the account's directory is made by opening its mailbox
    (``store.open_store``) before its state, so `open` makes it first."""

    inner: LocalStateStore

    def open(self, cache_id: str) -> Any:
        make_user_dir(self.inner.root, cache_id)
        return self.inner.open(cache_id)

    def open_existing(self, cache_id: str) -> Any:
        return self.inner.open_existing(cache_id)


@dataclass
class Engine:
    """One engine's stores; every object it opened is closed by `close`."""

    name: str
    where: str
    _closers: list[Any] = field(default_factory=list)

    def states(self) -> StateStore:
        """A new store object on the same storage: what another node would have."""
        if self.name == "sqlite":
            return SqliteStates(LocalStateStore(Path(self.where)))
        from pop3proxy.store.postgres import PostgresStateStore, open_pool

        pool = open_pool(self.where, min_size=1, max_size=4)
        self._closers.append(pool)
        return PostgresStateStore(pool)

    def locks(self) -> SessionLocks:
        if self.name == "sqlite":
            return LocalSessionLocks(Path(self.where))
        from pop3proxy.store.postgres import PostgresSessionLocks

        return PostgresSessionLocks(self.where)

    def tokens(self) -> TokenStore:
        """A new token store on the same storage: what another node would have."""
        if self.name == "sqlite":
            return local_token_store(self.where)
        from pop3proxy.store.postgres import PostgresTokenStore, open_pool

        pool = open_pool(self.where, min_size=1, max_size=4)
        self._closers.append(pool)
        return PostgresTokenStore(pool)

    def unreachable(self, where: Path, cache_id: str) -> StateStore:
        """A store that cannot open `cache_id`'s state: a directory in the place of its database file, or
        a server that does not listen (``where``: a path of the test's own, not yet used)."""
        if self.name == "sqlite":
            (make_user_dir(where, cache_id) / "state.db").mkdir()
            return LocalStateStore(where)
        from pop3proxy.store.postgres import PostgresStateStore, open_pool

        # A port nobody listens on: a loopback socket bound but never listening holds it meanwhile.
        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        self._closers.append(holder)
        port = holder.getsockname()[1]
        pool = open_pool(f"host=127.0.0.1 port={port} user=postgres dbname=nothing connect_timeout=2",
                         min_size=0, max_size=1, timeout=2.0)
        self._closers.append(pool)
        return PostgresStateStore(pool, check=False)

    def close(self) -> None:
        while self._closers:
            self._closers.pop().close()


def prepare(name: str, where: str) -> None:
    """Make ``where`` ready for the engine (the schema of a new PostgreSQL database)."""
    if name == "postgres":
        from pop3proxy.store.postgres import apply_schema

        apply_schema(where)


def engine_for(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """The body of a test module's ``engine`` fixture (parametrised over `ENGINES`): the engine
    ``request.param`` on storage of the test's own (PostgreSQL: a new database of the session's server,
    see helpers/postgres.py); closed after the test."""
    name = request.param
    where = request.getfixturevalue("postgres_db") if name == "postgres" else str(tmp_path / "cache")
    prepare(name, where)
    made = Engine(name, where)
    try:
        yield made
    finally:
        made.close()
