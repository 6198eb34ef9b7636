"""A cluster's counters in PostgreSQL: `PostgresCounters`, the `CounterStore` of ``store.api`` (what
``net.cluster_gate.ClusterGate`` asks): sessions per client address, and the failed-login throttle, for
every node at once. ``max_sessions`` is not here: it stays a limit of each node.

The throttle's bookkeeping is that of ``net.throttle.Throttle`` (read its docstring): failures under three
keys (the pair of client address and account, the address, the account; accounts case-folded), kept for
``window`` seconds; attempts in flight counted for the pair, and for the address once it has failed
lately; a failure replaces its attempt in flight in one step; a success clears the pair and the account;
the answer to a failure is delayed, doubling from ``base_delay`` up to ``max_delay``. Each operation is one
server-side function (schema_v3.py) called in one statement: one round trip, one transaction. Two
nodes' logins from one address wait for each other in the server (an advisory lock per address, then per
pair, for the length of the statement), so a limit is never passed by two nodes checking at once. Times
are the server's clock (``clock`` replaces it in tests).

**Dead owners.** A row counted for someone (an attempt in flight, a session) carries its owner's id: one
per `PostgresCounters` (one per process), which holds a session-level advisory lock on that id on a
connection of its own for as long as it lives. A count takes only the rows whose owner still holds its
lock: a process that dies (a crash, SIGKILL, a machine gone) stops counting the moment the server ends
its connection, without waiting for anyone to clean up, and `reap` deletes its rows later. Chosen over
rows that expire unless a heartbeat renews them: nothing to renew (sessions last hours), no clock skew
between nodes, and no window during which a dead node's sessions still count — the same rule as the
session locks (`locks.py`) and the token renewals (`tokens.py`). The price: a connection per process,
and a lock probe per row counted (a few per login). When that connection is lost (the server restarted,
an administrator ended it), the next operation learns it from the server (SQLSTATE `OWNER_LOST`), takes
the lock again under the same id (its rows count again) and retries once.

**Bounds.** `reap` (run every ``reap_every`` seconds by the operations themselves) deletes failures older
than the window, the oldest failures beyond ``max_failure_rows`` in all, and dead owners' rows; a count
reads at most ``max(max_failures, address_failures, 64)`` failures of a key. Rows in flight and sessions
are one per key (or address) and owner.

**Errors.** The database's errors become `StateError`. A give-back (`leave`, `end`) or a failure
(`failed`) that cannot be written is kept (`owes`) and written before the next operation, or by `settle`:
it is not lost, and the error is raised all the same, for the caller to log. Synchronous (worker threads),
safe to call from several threads at once.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, LiteralString

import psycopg
from psycopg_pool import ConnectionPool

from pop3proxy.store.postgres.connections import dedicated, single_statements
from pop3proxy.store.postgres.schema import check_schema, lock_key
from pop3proxy.store.postgres.schema_v3 import OWNER_LOST
from pop3proxy.store.state import StateError

__all__ = ["MAX_FAILURE_ROWS", "REAP_EVERY", "PostgresCounters", "sessions_key", "throttle_keys"]

MAX_FAILURE_ROWS = 1_000_000  # failures kept in all, across the cluster (three rows per failed login)
REAP_EVERY = 60.0  # seconds between two prunings by one process
MIN_COUNT_CAP = 64  # failures of a key counted at most: past it the delay is max_delay anyway

THROTTLE_NAMESPACE = "pop3proxy throttle"
SESSIONS_NAMESPACE = "pop3proxy sessions"
OWNER_NAMESPACE = "pop3proxy counters owner"
_REAP_LOCK = lock_key("pop3proxy counters", "reap")

_ADMIT: LiteralString = "SELECT pop3proxy_admit(%s::bigint, %s::text, %s::bigint, %s::integer, %s::integer)"
_LEAVE: LiteralString = "SELECT pop3proxy_leave(%s::bigint, %s::text, %s::integer)"
_BEGIN: LiteralString = (
    "SELECT blocked, delay FROM pop3proxy_login_begin(%s::bigint, %s::bigint, %s::bigint, %s::bigint,"
    " %s::float8, %s::float8, %s::integer, %s::integer, %s::float8)")
_FAILED: LiteralString = (
    "SELECT pop3proxy_login_failed(%s::bigint, %s::bigint, %s::bigint, %s::bigint, %s::boolean, %s::float8,"
    " %s::float8, %s::integer, %s::float8, %s::float8)")
_END: LiteralString = "SELECT pop3proxy_login_end(%s::bigint, %s::bigint, %s::bigint, %s::bigint, %s::boolean)"
_REAP: LiteralString = "SELECT pop3proxy_counters_reap(%s::bigint, %s::float8, %s::float8, %s::bigint)"


def throttle_keys(address: str, account: str) -> tuple[int, int, int]:
    """The 64-bit keys of (the pair, the address, the account), as ``Throttle`` names them; also the keys
    of their advisory locks."""
    account = account.lower()
    return (lock_key(THROTTLE_NAMESPACE, f"pair:{address}\0{account}"), lock_key(THROTTLE_NAMESPACE, f"addr:{address}"),
            lock_key(THROTTLE_NAMESPACE, f"acct:{account}"))


def sessions_key(address: str) -> int:
    """The advisory lock key of an address's admissions."""
    return lock_key(SESSIONS_NAMESPACE, address)


def _new_owner() -> int:
    return lock_key(OWNER_NAMESPACE, f"{os.getpid()} {secrets.token_hex(16)}")


class PostgresCounters:
    """Sessions per address and the failed-login throttle of a whole cluster, in the database `pool`
    connects to; the limits are those of ``[throttle]`` and ``listen.max_sessions_per_address``.

    The database must have this code's schema (``apply_schema``): otherwise the constructor raises
    `SchemaTooOld` or `SchemaTooNew` (both `StateError`), unless ``check=False``. The owner's connection is
    opened by the first operation (in its worker thread); `close` ends it, and with it everything this
    object counted."""

    def __init__(self, pool: ConnectionPool, *, max_per_address: int = 50, max_failures: int = 5,
                 window: float = 900.0, base_delay: float = 0.5, max_delay: float = 8.0,
                 address_failures: int | None = None, clock: Callable[[], float] | None = None,
                 max_failure_rows: int = MAX_FAILURE_ROWS, reap_every: float = REAP_EVERY,
                 check: bool = True) -> None:
        self.pool = pool
        self.max_per_address = max_per_address
        self.max_failures = max_failures
        self.address_failures = address_failures if address_failures is not None else 4 * max_failures
        self.window = window
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.clock = clock
        self.max_failure_rows = max_failure_rows
        self.reap_every = reap_every
        self._cap = max(max_failures, self.address_failures, MIN_COUNT_CAP)
        self._owner_lock = threading.Lock()
        self._owner_conn: psycopg.Connection | None = None
        self.owner: int | None = None
        self._generation = 0
        self._closed = False
        self._owed: deque[tuple[LiteralString, tuple[Any, ...]]] = deque()
        self._owed_lock = threading.Lock()
        self._next_reap = 0.0
        if check:
            with self._connection("schema") as conn:
                check_schema(conn)

    # -- the owner ---------------------------------------------------------------------------------

    def _owner(self, lost: int | None = None) -> tuple[int, int]:
        """(owner id, generation), registering it when there is none yet, or again when generation `lost`
        lost its lock (another thread may have done so already)."""
        with self._owner_lock:
            if self._closed:
                raise StateError("the counters were closed")
            if self.owner is not None and lost != self._generation:
                return self.owner, self._generation
            if self._owner_conn is not None:
                self._owner_conn.close()
                self._owner_conn = None
            wanted = self.owner if self.owner is not None else _new_owner()
            try:
                conn = dedicated(self.pool, "pop3proxy counters owner")
            except psycopg.Error as exc:
                raise StateError(f"counters database (owner): {exc}") from exc
            try:
                for key in (wanted, _new_owner()):  # the same id again, unless a probe holds it just now
                    found = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
                    if found and found[0]:
                        break
                else:
                    raise StateError("counters database (owner): no lock could be taken")
            except BaseException as exc:
                conn.close()
                if isinstance(exc, psycopg.Error):
                    raise StateError(f"counters database (owner): {exc}") from exc
                raise
            self._owner_conn, self.owner = conn, key
            self._generation += 1
            return key, self._generation

    def close(self) -> None:
        """End the owner's connection: everything counted here stops counting at once. Later operations
        raise `StateError`."""
        with self._owner_lock:
            self._closed = True
            if self._owner_conn is not None:
                self._owner_conn.close()
                self._owner_conn = None

    # -- statements --------------------------------------------------------------------------------

    @contextmanager
    def _connection(self, what: str) -> Iterator[psycopg.Connection]:
        try:
            with single_statements(self.pool) as conn:
                yield conn
        except psycopg.Error as exc:
            raise StateError(f"counters database ({what}): {exc}") from exc

    def _now(self) -> float | None:
        return None if self.clock is None else float(self.clock())

    def _prepare(self, conn: psycopg.Connection) -> None:
        """Before an operation: what is owed, then a pruning when one is due (its failure is no error)."""
        self._pay(conn)
        if time.monotonic() >= self._next_reap:
            self._next_reap = time.monotonic() + self.reap_every
            with suppress(psycopg.Error):  # the next one prunes; the operation learns whether the database answers
                self._reap(conn)

    def _counting(self, what: str, statement: LiteralString, params: Callable[[int], tuple[Any, ...]]) -> Any:
        """The first row of a statement that counts for this owner (`params` of its id); once more after
        taking the lock again when the server says the owner holds none."""
        owner, generation = self._owner()
        for last in (False, True):
            try:
                with single_statements(self.pool) as conn:
                    self._prepare(conn)
                    return conn.execute(statement, params(owner)).fetchone()
            except psycopg.Error as exc:
                if exc.sqlstate != OWNER_LOST or last:
                    raise StateError(f"counters database ({what}): {exc}") from exc
            owner, generation = self._owner(lost=generation)
        raise AssertionError("unreachable")

    def _giving_back(self, what: str, statement: LiteralString, params: tuple[Any, ...]) -> Any:
        """The first row of a give-back; kept for later (`owes`) when the database cannot take it now."""
        try:
            with single_statements(self.pool) as conn:
                self._pay(conn)
                return conn.execute(statement, params).fetchone()
        except psycopg.Error as exc:
            with self._owed_lock:
                self._owed.append((statement, params))
            raise StateError(f"counters database ({what}; kept to be written later): {exc}") from exc

    def _pay(self, conn: psycopg.Connection) -> None:
        while True:
            with self._owed_lock:
                if not self._owed:
                    return
                statement, params = self._owed.popleft()
            try:
                conn.execute(statement, params)
            except BaseException:
                with self._owed_lock:
                    self._owed.appendleft((statement, params))
                raise

    def owes(self) -> bool:
        """True while give-backs or failures wait to be written."""
        return bool(self._owed)

    def settle(self) -> None:
        """Write what is owed now; `StateError` when the database still cannot take it."""
        with self._connection("settling") as conn:
            self._pay(conn)

    def reap(self) -> None:
        """Prune now (see the module's docstring); at most one process of the cluster at a time does."""
        with self._connection("pruning") as conn:
            self._reap(conn)

    def _reap(self, conn: psycopg.Connection) -> None:
        conn.execute(_REAP, (_REAP_LOCK, self._now(), self.window, self.max_failure_rows))

    # -- sessions per address ----------------------------------------------------------------------

    def admit(self, address: str, leaving: int = 0) -> bool:
        """Count a session from `address` unless it has ``max_per_address`` on all nodes (False). `leaving`:
        sessions of this process from that address that ended meanwhile, given back first."""
        try:
            found = self._counting(f"admission of {address}", _ADMIT, lambda owner: (
                owner, address, sessions_key(address), self.max_per_address, leaving))
        except StateError:
            if leaving and self.owner is not None:
                with self._owed_lock:
                    self._owed.append((_LEAVE, (self.owner, address, leaving)))
            raise
        return bool(found[0])

    def leave(self, address: str, count: int = 1) -> None:
        """`count` sessions from `address` ended."""
        if self.owner is not None:
            self._giving_back(f"sessions of {address} ending", _LEAVE, (self.owner, address, count))

    # -- logins ------------------------------------------------------------------------------------

    def begin(self, address: str, account: str) -> tuple[bool, float]:
        """(blocked, delay) for a new login; one not blocked is in flight until `failed` or `end`."""
        pair, addr, acct = throttle_keys(address, account)
        found = self._counting("login", _BEGIN, lambda owner: (
            owner, pair, addr, acct, self._now(), self.window, self.max_failures, self.address_failures,
            self.max_delay))
        return bool(found[0]), float(found[1])

    def failed(self, address: str, account: str, in_flight: bool = True) -> float:
        """Count a failed guess (replacing its attempt in flight); the seconds to wait before answering."""
        pair, addr, acct = throttle_keys(address, account)
        found = self._giving_back("failed login", _FAILED, (
            self.owner or 0, pair, addr, acct, in_flight and self.owner is not None, self._now(), self.window,
            self._cap, self.base_delay, self.max_delay))
        return float(found[0])

    def end(self, address: str, account: str, ok: bool) -> None:
        """An attempt in flight ended; ``ok``: it succeeded (the pair's and the account's failures go)."""
        if self.owner is not None:
            pair, addr, acct = throttle_keys(address, account)
            self._giving_back("end of a login", _END, (self.owner, pair, addr, acct, ok))
