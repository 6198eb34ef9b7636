"""The gate: what must hold across all connections of the service, whichever process serves them —
the number of sessions, sessions per client address and the failed-login throttle (see `throttle`).

`Gate` keeps that state here. With several worker processes (`listen.workers`) the supervising parent
keeps the one `Gate` and each worker asks it through a `RemoteGate` (`net.shared`): the limits hold
for the whole service, not once per worker.

A login is an attempt::

    async with gate.login(address, account) as attempt:
        if attempt.blocked: refuse at once
        await trio.sleep(attempt.delay)           # an account being guessed at is slowed
        ... ask the provider ...
        on a counted failure: await trio.sleep(await attempt.failed())
        on success: attempt.succeeded()
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from pop3proxy.net.throttle import Throttle


@dataclass
class Attempt:
    """One login in flight. ``blocked``: refuse without asking anyone; ``delay``: wait this long first."""

    blocked: bool
    delay: float = 0.0
    ok: bool = False
    _gate: Gate | None = None
    _address: str = ""
    _account: str = ""
    _ref: int = 0  # the parent's name for it (`RemoteGate`)
    in_flight: bool = True  # counted as in flight (until it ends, or its failure is counted instead)

    async def failed(self) -> float:
        """Count a failed guess; returns the seconds to wait before answering it. From then on the
        attempt counts as that failure, no longer as in flight: a finished attempt is never counted twice."""
        assert self._gate is not None
        return await self._gate.failed_login(self)

    def succeeded(self) -> None:
        self.ok = True


class Gate:
    """Admission and login throttling kept in this process."""

    def __init__(self, throttle: Throttle | None = None, max_per_address: int = 50,
                 max_sessions: int = 1000) -> None:
        self.throttle = throttle if throttle is not None else Throttle()
        self.max_per_address = max_per_address
        self.max_sessions = max_sessions
        self.sessions = 0
        self.per_address: Counter[str] = Counter()

    # -- sessions ------------------------------------------------------------------------------

    def try_admit(self, address: str, force: bool = False) -> str:
        """"ok" (counted), "full" (max_sessions reached; ``force`` admits anyway: the caller has just
        made room by closing a session that will leave soon) or "address" (that address has its limit)."""
        if self.sessions >= self.max_sessions and not force:
            return "full"
        if self.per_address[address] >= self.max_per_address:
            return "address"
        self.per_address[address] += 1
        self.sessions += 1
        return "ok"

    async def admit(self, address: str, force: bool = False) -> str:
        """Count a new session from ``address``: see `try_admit`."""
        return self.try_admit(address, force)

    def leave(self, address: str) -> None:
        self.sessions -= 1
        if self.per_address[address] <= 1:
            self.per_address.pop(address, None)
        else:
            self.per_address[address] -= 1

    # -- logins --------------------------------------------------------------------------------

    def begin(self, address: str, account: str) -> tuple[bool, float]:
        """(blocked, delay) for a new attempt; an attempt that is not blocked is in flight until `end`."""
        if self.throttle.blocked(address, account):
            return True, 0.0
        self.throttle.enter(address, account)
        return False, self.throttle.account_delay(account)

    async def failed_login(self, attempt: Attempt) -> float:
        if not attempt.in_flight:  # counted already
            return 0.0
        attempt.in_flight = False
        return self.throttle.failed_attempt(attempt._address, attempt._account)

    def end(self, address: str, account: str, ok: bool) -> None:
        self.throttle.leave(address, account)
        if ok:
            self.throttle.succeeded(address, account)

    @asynccontextmanager
    async def login(self, address: str, account: str) -> AsyncIterator[Attempt]:
        blocked, delay = self.begin(address, account)
        attempt = Attempt(blocked, delay, _gate=self, _address=address, _account=account)
        attempt.in_flight = not blocked  # only an attempt that was let through is in flight
        try:
            yield attempt
        finally:
            if attempt.in_flight:
                attempt.in_flight = False
                self.end(address, account, attempt.ok)
