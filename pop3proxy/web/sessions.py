"""Console sign-in sessions: random tokens held in memory, each with its CSRF token and expiry.

Bounded: at most ``max_sessions`` are kept; the oldest is dropped (signed out) beyond that.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Session:
    user: str
    admin: bool
    expires: float
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))

    def may_see(self, account: str) -> bool:
        return self.admin or account == self.user

    def csrf_ok(self, token: str | None) -> bool:
        if not token:
            return False
        return hmac.compare_digest(token.encode(), self.csrf.encode())


class Sessions:
    def __init__(self, lifetime: float, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.lifetime, self.limit, self.clock = lifetime, limit, clock
        self._by_token: OrderedDict[str, Session] = OrderedDict()

    def create(self, user: str, admin: bool) -> str:
        token = secrets.token_urlsafe(32)
        self._by_token[token] = Session(user, admin, self.clock() + self.lifetime)
        while len(self._by_token) > self.limit:
            self._by_token.popitem(last=False)
        return token

    def get(self, token: str | None) -> Session | None:
        if not token:
            return None
        session = self._by_token.get(token)
        if session is None:
            return None
        if self.clock() >= session.expires:
            del self._by_token[token]
            return None
        return session

    def end(self, token: str | None) -> None:
        if token:
            self._by_token.pop(token, None)
