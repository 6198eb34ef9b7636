"""Failed-login throttling, per client address and per user name.

Each failed login (the provider or the users file said no) is remembered for ``window`` seconds. The
answer to a failure is delayed, doubling from ``base_delay`` up to ``max_delay``; once ``max_failures``
are counted for the address or for the name, further logins are refused at once with
``-ERR [LOGIN-DELAY]`` — without asking the provider, so the proxy cannot be used to guess passwords or
to get a user's account locked at the provider. A successful login clears the name's failures.

Pure bookkeeping with an injectable clock; memory is bounded (oldest keys are dropped first).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from typing import Callable

MAX_KEYS = 100_000


class Throttle:
    def __init__(
        self,
        max_failures: int = 5,
        window: float = 900.0,
        base_delay: float = 0.5,
        max_delay: float = 8.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_failures = max_failures
        self.window = window
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, key: str) -> int:
        stamps = self._failures.get(key)
        if not stamps:
            return 0
        cutoff = self.clock() - self.window
        while stamps and stamps[0] < cutoff:
            stamps.popleft()
        if not stamps:
            del self._failures[key]
            return 0
        return len(stamps)

    @staticmethod
    def _keys(address: str, user: str) -> tuple[str, str]:
        return f"addr:{address}", f"user:{user.lower()}"

    def blocked(self, address: str, user: str) -> bool:
        """True when this login must be refused without asking anyone."""
        return any(self._recent(key) >= self.max_failures for key in self._keys(address, user))

    def failed(self, address: str, user: str) -> float:
        """Record a failure; returns the delay to wait before answering it."""
        now = self.clock()
        count = 0
        for key in self._keys(address, user):
            stamps = self._failures.setdefault(key, deque())
            self._failures.move_to_end(key)
            stamps.append(now)
            count = max(count, self._recent(key))
        while len(self._failures) > MAX_KEYS:
            self._failures.popitem(last=False)
        return min(self.max_delay, self.base_delay * (2 ** max(0, count - 1)))

    def succeeded(self, address: str, user: str) -> None:
        self._failures.pop(self._keys(address, user)[1], None)
