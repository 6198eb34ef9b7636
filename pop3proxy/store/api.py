"""The seams of the state that must be shared by everything that serves an account: small protocols,
the only names of the store that the layers above use, and the one place that picks an engine.

=================  ===========================================  =========================================
seam               what it holds                                embedded default (one machine)
=================  ===========================================  =========================================
`AccountState`     an account's rows (provider UIDL <-> cached  `store.state.UserState`: ``state.db``
                   key, deleted/held marks), its settings       (SQLite) and ``state.journal`` beside
                   (offline hash and digest, last sync, ...)    the account's cache
`StateStore`       opens an account's `AccountState`            `LocalStateStore`
`SessionLocks`     one session per account, across processes    `LocalSessionLocks`: ``flock`` on the
                   (``-ERR [IN-USE]`` elsewhere); a holder       account's ``.lock``
                   that dies holds nothing
`Counters`         sessions, sessions per address, the          ``net.gate.Gate`` (in the supervising
                   failed-login throttle                        process; workers ask it over a socket)
`CounterStore`     what a cluster's nodes count together:       none: a cluster's ``net.cluster_gate.
                   sessions per address, the throttle           ClusterGate`` asks one (PostgreSQL)
=================  ===========================================  =========================================

The message files themselves (Maildir, mbox) are the blob store: `store.open_store`. The OAuth2 tokens
have a seam of their own. `local_stores` builds today's engines; the composition root (``app.py``)
hands them to the proxy, which never learns which engine it has.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pop3proxy.store.locks import MailboxBusy, lock_mailbox
from pop3proxy.store.paths import user_dir
from pop3proxy.store.state import Row, StateError, UserState
from pop3proxy.store.state_pool import StatePool

__all__ = [
    "AccountState", "CounterStore", "Counters", "LocalSessionLocks", "LocalStateStore", "LoginAttempt", "MailboxBusy",
    "Row", "SessionLock", "SessionLocks", "StateError", "StateStore", "Stores", "local_stores",
]


class AccountState(Protocol):
    """One account's sync state (synchronous: run it in a worker thread). Every method may raise
    `StateError`; what a method returned having written survives the process dying."""

    def rows(self) -> list[Row]: ...
    def cached_keys(self, upstream_only: bool = False) -> set[str]: ...
    def hidden_keys(self) -> set[str]: ...
    def uids_for_keys(self, keys: Iterable[str]) -> dict[str, str]: ...
    def begin_fetch(self, uid: str, digest: str) -> bool: ...
    def begin_fetch_many(self, claims: list[tuple[str, str]],
                         sources: list[str | None] | None = None) -> list[bool]: ...
    def adopt(self, old_uid: str, new_uid: str) -> Row | None: ...
    def drop_rows(self, uids: Iterable[str]) -> None: ...
    def known_uids_among(self, uids: list[str]) -> set[str]: ...
    def finish_fetch_many(self, settled: list[tuple[str, str, int, str]]) -> None: ...
    def finish_fetch(self, uid: str, key: str, size: int, status: str = "cached") -> None: ...
    def abandon_fetch(self, uid: str) -> None: ...
    def fetching(self) -> list[Row]: ...

    def recovery_view(self) -> tuple[list[Row], set[str], set[str]]:
        """What `recover` reads, in one call: ``fetching()``, ``hidden_keys()`` and
        ``cached_keys(upstream_only=True)`` (one round trip where the state is in a database server)."""
        ...

    def release_held(self, held_key: str, uid: str | None, key: str, size: int) -> None: ...
    def mark_deleted(self, keys: Iterable[str]) -> None: ...
    def restore_deleted(self, keys: Iterable[str]) -> None: ...
    def forget_keys(self, keys: Iterable[str]) -> None: ...
    def upstream_gone(self, uids: Iterable[str]) -> None: ...
    def get_meta(self, name: str) -> str | None: ...
    def set_meta(self, name: str, value: str | None) -> None: ...

    def get_metas(self, names: Iterable[str]) -> dict[str, str | None]:
        """Several settings in one call (one round trip where the state is in a database server)."""
        ...

    def set_metas(self, values: Mapping[str, str | None]) -> None:
        """Several settings in one transaction (None deletes one)."""
        ...

    def sync_to_disk(self) -> None:
        """Make everything written so far survive a power loss (before anything is deleted upstream)."""

    def close(self) -> None: ...


class StateStore(Protocol):
    """Where accounts' states live."""

    def open(self, cache_id: str) -> AccountState:
        """The account's state, created when it has none yet."""
        ...

    def open_existing(self, cache_id: str) -> AccountState | None:
        """The account's state, or None when it has none (nothing is created)."""
        ...


class SessionLock(Protocol):
    def release(self) -> None:
        """Give the account back (idempotent)."""

    def confirm(self) -> bool:
        """True when the lock is certainly still held, asked before deletions are applied (synchronous;
        a cluster's lock asks its server: its connection may have broken and freed it)."""
        ...


class SessionLocks(Protocol):
    def try_lock(self, cache_id: str) -> SessionLock:
        """Hold the account now, or raise `MailboxBusy` (synchronous: run it in a worker thread)."""
        ...


class LoginAttempt(Protocol):
    blocked: bool  # refuse without asking anyone
    delay: float  # wait this long before asking the provider

    async def failed(self) -> float:
        """Count a failed guess; the seconds to wait before answering it."""
        ...

    def succeeded(self) -> None: ...


class Counters(Protocol):
    """Admission and the failed-login throttle, for the whole service (see ``net.gate``)."""

    max_sessions: int

    def try_admit(self, address: str, force: bool = False) -> str:
        """"ok" (counted), "full" or "address": see ``net.gate.Gate.try_admit``."""
        ...

    async def admit(self, address: str, force: bool = False) -> str: ...
    def leave(self, address: str) -> None: ...
    def login(self, address: str, account: str) -> AbstractAsyncContextManager[LoginAttempt]: ...


class CounterStore(Protocol):
    """What the nodes of a cluster count together (``store.postgres.PostgresCounters``): sessions per client
    address and the failed-login throttle, with the bookkeeping of ``net.throttle.Throttle``. Synchronous
    (run it in a worker thread); every method may raise `StateError`. A process that dies stops counting
    at once: its sessions and attempts in flight are given back by the store, not by the process.

    A give-back (`leave`, `end`) or failure (`failed`) that cannot be written is not lost: it is kept
    (`owes`) and written before the next operation, or by `settle`; the error is raised all the same."""

    max_per_address: int
    max_delay: float

    def admit(self, address: str, leaving: int = 0) -> bool:
        """Count a session from `address`; False (not counted) when it has ``max_per_address`` already.
        `leaving`: sessions of this process from `address` that ended meanwhile, given back first."""
        ...

    def leave(self, address: str, count: int = 1) -> None: ...

    def begin(self, address: str, account: str) -> tuple[bool, float]:
        """(blocked, delay) of a new login; one that is not blocked is in flight until `failed` or `end`."""
        ...

    def failed(self, address: str, account: str, in_flight: bool = True) -> float:
        """Count a failed guess, replacing its attempt in flight in one step; the seconds to wait."""
        ...

    def end(self, address: str, account: str, ok: bool) -> None: ...
    def owes(self) -> bool: ...
    def settle(self) -> None: ...


# -- the embedded default --------------------------------------------------------------------------

STATE_FILE = "state.db"


@dataclass(frozen=True)
class LocalStateStore:
    """``state.db`` (SQLite) in each account's cache directory; databases `open` hands out are kept open
    between sessions (`store.state_pool`)."""

    root: Path
    pool: StatePool = field(default_factory=StatePool, compare=False)

    def path(self, cache_id: str) -> Path:
        return user_dir(self.root, cache_id) / STATE_FILE

    def open(self, cache_id: str) -> UserState:
        return self.pool.open(self.path(cache_id))

    def open_existing(self, cache_id: str) -> UserState | None:
        path = self.path(cache_id)
        return UserState(path) if path.exists() else None


@dataclass(frozen=True)
class LocalSessionLocks:
    """An ``flock`` on each account's ``.lock``: released when its holder closes it or dies."""

    root: Path

    def try_lock(self, cache_id: str) -> SessionLock:
        return lock_mailbox(self.root, cache_id)


def _nothing() -> None:
    pass


@dataclass(frozen=True)
class Stores:
    """The engines a service runs on (the composition root picks them: ``store.engines.open_stores``).
    In a cluster, ``node`` names this node, ``directory`` is its view of the cluster
    (``store.postgres.nodes.NodeDirectory``) and ``shared_key`` the key every node keys its password
    digests with; ``close`` lets go of what the engines hold (connections)."""

    states: StateStore
    locks: SessionLocks
    tokens: Any = None  # store.tokens_api.TokenStore (None: files below the cache root)
    counters: Any = None  # CounterStore in a cluster (None: the supervisor's Gate counts)
    node: str | None = None
    directory: Any = None
    shared_key: bytes | None = None
    close: Callable[[], None] = field(default=_nothing, compare=False)


def local_stores(root: str | os.PathLike[str]) -> Stores:
    """One machine's engines, under the cache root."""
    path = Path(root)
    states = LocalStateStore(path)
    return Stores(states=states, locks=LocalSessionLocks(path), close=states.pool.clear)

