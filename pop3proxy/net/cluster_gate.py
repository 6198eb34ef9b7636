"""The gate of a node in a cluster: `ClusterGate`, a `Gate` for the session code (``ServerState.gate``,
the web console's sign-in) whose sessions per client address and failed-login throttle are counted with
every other node's in a `CounterStore` (``store.postgres.PostgresCounters``), while ``max_sessions``
stays a limit of the node.

How the composition root builds it (one `CounterStore` per process: each process is an owner of its own,
so a process that dies gives back its sessions and logins in flight at once):

- a node of one process: ``ClusterGate(PostgresCounters(pool, max_per_address=..., <[throttle]>),
  max_sessions=listen.max_sessions)``; the node's own `Gate` (``node``) keeps ``max_sessions``.
- a node of several worker processes: the supervisor keeps its `Gate` for ``max_sessions`` and serves it
  to the workers over their channels (``net.shared.GateServer``), as it does today; each worker builds
  ``ClusterGate(PostgresCounters(pool_of_the_worker, ...), node=RemoteGate(channel))`` (and still runs
  the RemoteGate's ``run``). The supervisor's throttle is then left unused (logins never reach it); its
  per-address limit still holds per node. The web console (run by the supervisor) signs in through a
  ClusterGate of the supervisor's own, on its `Gate` as ``node``. Never hand a ClusterGate to a
  ``GateServer``: it asks the database from worker threads, not in the supervisor's loop (`try_admit`,
  `begin` and `end` refuse to run).

The node is asked first: a session refused by the node (``"full"``, or its per-address limit) is never
counted in the cluster. Every call to the store runs in a worker thread (``trio.to_thread``).

When the database cannot be reached:

- a login is refused: `login` raises `LoginError` with ``SYS/TEMP``, which the session answers
  ``-ERR [SYS/TEMP]``; nothing is counted locally in its place;
- a session is admitted on the node's own limits (``max_sessions``, and the per-address limit of the
  node), and not counted in the cluster: it can only be refused at login meanwhile;
- a give-back (a session or a login ending) or a failure is kept by the store and written once the
  database answers again: a task retries, waiting 1 s, doubling up to 30 s;
- one error line says the counters are unavailable, one line that they are back.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import TypeVar

import trio

from pop3proxy.errors import LoginError
from pop3proxy.net.gate import Attempt, Gate
from pop3proxy.net.throttle import Throttle
from pop3proxy.store.api import CounterStore, StateError

__all__ = ["UNAVAILABLE", "ClusterGate"]

log = logging.getLogger("pop3proxy")

UNAVAILABLE = "the login limits cannot be checked now, try again later"
RETRY_FIRST = 1.0  # seconds before what the store owes is written again; doubling up to RETRY_MAX
RETRY_MAX = 30.0

T = TypeVar("T")


class ClusterGate(Gate):
    """Admission and the login throttle of a node in a cluster (see the module's docstring). `counters`:
    this process's `CounterStore`; `node`: the node's `Gate` for ``max_sessions`` (a `RemoteGate` in a
    worker process), by default one of its own with ``max_sessions`` and the store's per-address limit.
    The local throttle a `Gate` has is never used."""

    def __init__(self, counters: CounterStore, node: Gate | None = None, *, max_sessions: int = 1000) -> None:
        node = node if node is not None else Gate(Throttle(), counters.max_per_address, max_sessions)
        super().__init__(Throttle(), counters.max_per_address, node.max_sessions)
        self.counters = counters
        self.node = node
        self._leaving: Counter[str] = Counter()  # sessions ended, not yet given back to the store
        self._uncounted: Counter[str] = Counter()  # sessions admitted while the store could not count them
        self._giving_back = False
        self._given_back = trio.Event()  # set when the task giving back has nothing left to do
        self._given_back.set()
        self._down = False

    # -- sessions ------------------------------------------------------------------------------

    async def admit(self, address: str, force: bool = False) -> str:
        """"ok" (counted by the node and the cluster), "full" (the node's ``max_sessions``) or "address"
        (the address has its limit on the node or in the cluster)."""
        verdict = await self.node.admit(address, force)
        if verdict != "ok":
            return verdict
        leaving = self._leaving.pop(address, 0)  # given back in the same step (the store keeps them on error)
        try:
            counted = await trio.to_thread.run_sync(self.counters.admit, address, leaving)
        except StateError as exc:
            self._unavailable(exc)
            self._uncounted[address] += 1
            self._retry()
            return "ok"  # the node's own limits hold meanwhile; a login is refused
        except BaseException:
            self.node.leave(address)
            raise
        self._available()
        if not counted:
            self.node.leave(address)
            return "address"
        return "ok"

    def leave(self, address: str) -> None:
        """A session admitted by `admit` ended: the node counts it at once, the cluster as soon as a worker
        thread has told the store (or the next admission from `address` here, whichever comes first)."""
        self.node.leave(address)
        if self._uncounted[address] > 0:
            self._uncounted[address] -= 1
            if not self._uncounted[address]:
                del self._uncounted[address]
            return
        self._leaving[address] += 1
        self._retry()

    def try_admit(self, address: str, force: bool = False) -> str:
        raise NotImplementedError("a ClusterGate admits from a worker thread: await admit()")

    # -- logins --------------------------------------------------------------------------------

    def begin(self, address: str, account: str) -> tuple[bool, float]:
        raise NotImplementedError("a ClusterGate counts logins from a worker thread: async with login()")

    def end(self, address: str, account: str, ok: bool) -> None:
        raise NotImplementedError("a ClusterGate counts logins from a worker thread: async with login()")

    @asynccontextmanager
    async def login(self, address: str, account: str) -> AsyncIterator[Attempt]:
        """An attempt counted in the cluster (see ``net.gate``); `LoginError` (``SYS/TEMP``) when the
        database cannot be reached."""
        try:
            blocked, delay = await trio.to_thread.run_sync(self.counters.begin, address, account)
        except StateError as exc:
            self._unavailable(exc)
            raise LoginError(UNAVAILABLE, "SYS/TEMP") from None
        self._available()
        attempt = Attempt(blocked, delay, _gate=self, _address=address, _account=account)
        attempt.in_flight = not blocked
        try:
            yield attempt
        finally:
            if attempt.in_flight:
                attempt.in_flight = False
                # counted before the client is answered: its next login, on any node, finds it ended
                with trio.CancelScope(shield=True):
                    await self._store(partial(self.counters.end, address, account, attempt.ok))

    async def failed_login(self, attempt: Attempt) -> float:
        if not attempt.in_flight:  # counted already
            return 0.0
        attempt.in_flight = False  # the failure replaces it, in the same step
        written, delay = await self._store(partial(self.counters.failed, attempt._address, attempt._account))
        return delay if written and delay is not None else self.counters.max_delay

    # -- the store -----------------------------------------------------------------------------

    async def _store(self, call: Callable[[], T]) -> tuple[bool, T | None]:
        """(True, its result) of a give-back or failure run in a worker thread; (False, None) when the store
        could not write it and keeps it for later."""
        try:
            result = await trio.to_thread.run_sync(call)
        except StateError as exc:
            self._unavailable(exc)
            self._retry()
            return False, None
        self._available()
        return True, result

    def _retry(self) -> None:
        """Make sure a task gives back what ended and writes what the store owes."""
        if not self._giving_back:
            self._giving_back = True
            self._given_back = trio.Event()
            trio.lowlevel.spawn_system_task(self._give_back, name="cluster gate give-back")

    async def given_back(self) -> None:
        """Wait until the sessions that ended are given back to the store and what it owed is written (it
        waits for the database as long as that takes: bound it with a cancel scope)."""
        while self._giving_back:
            await self._given_back.wait()

    async def _give_back(self) -> None:
        pause = RETRY_FIRST
        try:
            while self._leaving or self.counters.owes():
                if self._leaving:
                    address, count = self._leaving.popitem()
                    written, _ = await self._store(partial(self.counters.leave, address, count))
                else:
                    await trio.sleep(pause)
                    written, _ = await self._store(self.counters.settle)
                pause = RETRY_FIRST if written else min(2 * pause, RETRY_MAX)
        except Exception:  # a system task must not raise: the service would stop
            log.exception("cluster counters: giving back failed")
        finally:
            self._giving_back = False
            self._given_back.set()

    def _unavailable(self, exc: StateError) -> None:
        if not self._down:
            self._down = True
            log.error("cluster counters unavailable: logins are refused until the database answers: %s", exc)

    def _available(self) -> None:
        if self._down:
            self._down = False
            log.warning("cluster counters available again")
