"""The engines behind the seam ``Counters`` (pop3proxy/store/api.py): sessions, sessions per address and the
failed-login throttle, as the session code asks a gate for them.

``memory``    `net.gate.Gate` over a `net.throttle.Throttle`: one machine's counts, in its process
``postgres``  `net.cluster_gate.ClusterGate` over a `PostgresCounters` on a pool of its own, in a database
              of the test's own with the schema applied: every gate made is another node (another
              owner) counting with the others

`CounterEngine.gate` takes the limits of ``[throttle]`` and ``listen`` by their names and a ``clock`` (the
throttle's time: a fake one for tests that move it). Used by the contract suite
(tests/integration/test_counters_contract.py) and the cluster's tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from pop3proxy.net.gate import Gate
from pop3proxy.net.throttle import Throttle

GATE_ENGINES = ("memory", "postgres")

THROTTLE_LIMITS = ("max_failures", "window", "base_delay", "max_delay", "address_failures")


class Clock:
    """A fake clock: seconds, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class CounterEngine:
    """One engine's gates; every pool and store it opened is closed by `close`."""

    name: str
    where: str = ""  # the conninfo of the database (postgres)
    _closers: list[Any] = field(default_factory=list)

    def counters(self, *, clock: Callable[[], float] | None = None, pool_size: int = 4, **limits: Any) -> Any:
        """A `PostgresCounters` of its own (another process's, another node's) on a pool of its own."""
        from pop3proxy.store.postgres import PostgresCounters, open_pool

        pool = open_pool(self.where, min_size=1, max_size=pool_size)
        self._closers.append(pool)
        store = PostgresCounters(pool, clock=clock, **limits)
        self._closers.append(store)  # closed before its pool
        return store

    def gate(self, *, clock: Callable[[], float] | None = None, max_per_address: int = 50, max_sessions: int = 1000,
             **throttle: Any) -> Gate:
        """A gate with these limits (a new node each time, for ``postgres``)."""
        if self.name == "memory":
            made = Throttle(**throttle, clock=clock) if clock is not None else Throttle(**throttle)
            return Gate(made, max_per_address, max_sessions)
        from pop3proxy.net.cluster_gate import ClusterGate

        store = self.counters(clock=clock, max_per_address=max_per_address, **throttle)
        return ClusterGate(store, max_sessions=max_sessions)

    def close(self) -> None:
        while self._closers:
            self._closers.pop().close()


def counter_engine_for(request: pytest.FixtureRequest) -> Iterator[CounterEngine]:
    """The body of a test module's ``counter_engine`` fixture (parametrised over `GATE_ENGINES`): the engine
    ``request.param`` (PostgreSQL: a new database of the session's server with the schema applied)."""
    where = ""
    if request.param == "postgres":
        from pop3proxy.store.postgres import apply_schema

        where = request.getfixturevalue("postgres_db")
        apply_schema(where)
    made = CounterEngine(request.param, where)
    try:
        yield made
    finally:
        made.close()
