"""Failed-login throttling without collateral damage.

Failures are counted on the *resolved account* (the provider and the remote user a login name
means, so that name variants reaching one account count as one) and remembered for ``window``
seconds, under three keys:

- the pair (client address, account): ``max_failures`` failures or attempts in flight refuse further
  attempts of that pair at once with ``-ERR [LOGIN-DELAY]``, without asking the provider. A success
  clears the pair. Other users behind the same address (a household or office behind one NAT) are
  not affected;
- the client address across accounts: ``address_failures`` (a higher threshold) refuse every login
  from that address, so one address cannot try many accounts;
- the account across addresses: never refuses (strangers must not be able to lock the real user
  out), but past ``max_failures`` every attempt on that account is delayed by ``max_delay`` before
  the provider is asked, which slows a distributed guess to a trickle.

Attempts in flight count like failures, for the pair, and for the address once it has failed lately
(twenty concurrent guesses of one account from one address get five through, not twenty-one; guesses
of many accounts from an address that has failed get ``address_failures`` through at most, while many
users logging in at once from one address with no recent failure are not held back); a failure
replaces its attempt in flight in one step, so a finished attempt is never counted twice. The answer
to a failure is delayed, doubling from ``base_delay`` up to ``max_delay``. Pure bookkeeping with an
injectable clock; memory is bounded (the oldest keys are dropped first).
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

MAX_KEYS = 100_000


class Throttle:
    def __init__(
        self,
        max_failures: int = 5,
        window: float = 900.0,
        base_delay: float = 0.5,
        max_delay: float = 8.0,
        clock: Callable[[], float] = time.monotonic,
        address_failures: int | None = None,
    ) -> None:
        self.max_failures = max_failures
        self.address_failures = address_failures if address_failures is not None else 4 * max_failures
        self.window = window
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._in_flight: Counter[str] = Counter()

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
    def _keys(address: str, account: str) -> tuple[str, str, str]:
        account = account.lower()
        return f"pair:{address}\0{account}", f"addr:{address}", f"acct:{account}"

    def blocked(self, address: str, account: str) -> bool:
        """True when this login must be refused without asking anyone."""
        pair, addr, _ = self._keys(address, account)
        failures = self._recent(addr)
        # An address's attempts in flight count once it has failed lately: many users logging in at once
        # from one address (NAT, a gateway) are not held back, a guesser's concurrent tries are.
        return (
            self._recent(pair) + self._in_flight[pair] >= self.max_failures
            or failures + (self._in_flight[addr] if failures else 0) >= self.address_failures
        )

    def quiet(self, address: str, account: str) -> bool:
        """No recent failure of the pair nor of the address: a login's end then changes no limit at once
        (its attempt in flight counts for nothing while it is being given back)."""
        pair, addr, _ = self._keys(address, account)
        return not self._recent(pair) and not self._recent(addr)

    def account_delay(self, account: str) -> float:
        """Seconds to wait before asking the provider about this account (it is being guessed at)."""
        return self.max_delay if self._recent(self._keys("", account)[2]) >= self.max_failures else 0.0

    def enter(self, address: str, account: str) -> None:
        """Count a login in flight while the provider is asked (until `leave`), for the pair and for
        the address: concurrent guesses count like failures against both limits."""
        for key in self._keys(address, account)[:2]:
            self._in_flight[key] += 1

    def leave(self, address: str, account: str) -> None:
        for key in self._keys(address, account)[:2]:
            self._in_flight[key] -= 1
            if self._in_flight[key] <= 0:
                del self._in_flight[key]

    @contextmanager
    def attempt(self, address: str, account: str) -> Iterator[None]:
        """Count a login in flight while the provider is asked."""
        self.enter(address, account)
        try:
            yield
        finally:
            self.leave(address, account)

    def failed_attempt(self, address: str, account: str) -> float:
        """An attempt in flight failed: it stops counting as in flight and counts as a failure in one
        step (never both at once, never neither); returns the delay, as `failed`."""
        self.leave(address, account)
        return self.failed(address, account)

    def failed(self, address: str, account: str) -> float:
        """Record a failure; returns the delay to wait before answering it."""
        now = self.clock()
        pair_count = 0
        for key in self._keys(address, account):
            stamps = self._failures.setdefault(key, deque())
            self._failures.move_to_end(key)
            stamps.append(now)
            if key.startswith("pair:"):
                pair_count = self._recent(key)
        while len(self._failures) > MAX_KEYS:
            self._failures.popitem(last=False)
        return min(self.max_delay, self.base_delay * (2 ** max(0, pair_count - 1)))

    def succeeded(self, address: str, account: str) -> None:
        pair, _, acct = self._keys(address, account)
        self._failures.pop(pair, None)
        self._failures.pop(acct, None)
