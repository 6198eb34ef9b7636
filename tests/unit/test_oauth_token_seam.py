"""The OAuth2 code works with any `TokenStore`: here one in memory, which records what it was asked."""

from __future__ import annotations

import threading
from contextlib import contextmanager

import pytest
import trio

from pop3proxy.config import OAuth2Settings
from pop3proxy.proxy.oauth import TokenManager, flows, login, tokens
from pop3proxy.proxy.oauth.manager import IDLE_CHECK, TokenUnavailable


class MemoryTokenStore:
    def __init__(self) -> None:
        self.records: dict[str, dict] = {}
        self.hashes: dict[str, str] = {}
        self.lock = threading.Lock()
        self.holding: set[str] = set()
        self.calls: list[tuple[str, str, bool]] = []  # (method, account, inside renewing)

    def _call(self, method: str, account: str) -> None:
        self.calls.append((method, account, account in self.holding))

    def load(self, account):
        self._call("load", account)
        return dict(self.records[account]) if account in self.records else None

    def save(self, account, record):
        self._call("save", account)
        self.records[account] = dict(record)

    @contextmanager
    def renewing(self, account):
        with self.lock:
            self.holding.add(account)
            try:
                yield
            finally:
                self.holding.discard(account)

    def local_password_hash(self, account):
        return self.hashes.get(account)

    def set_local_password_hash(self, account, password_hash):
        self.hashes[account] = password_hash


SERVICE = OAuth2Settings(client_id="c", client_secret="s", grant="client_credentials",
                         token_url="https://auth.example/token")


async def test_the_manager_renews_through_the_store_it_was_given(tmp_path, monkeypatch):
    store = MemoryTokenStore()
    monkeypatch.setattr(flows, "client_credentials",
                        lambda settings: {"access_token": "NEW", "expires_in": 3600, "token_type": "Bearer"})
    manager = TokenManager(store, {"svc": SERVICE})
    assert manager.store is store
    assert await manager.token("svc") == "NEW"
    assert ("save", "svc", True) in store.calls  # saved while holding the renewal
    assert store.records["svc"]["access_token"] == "NEW"
    store.calls.clear()
    assert await manager.token("svc") == "NEW"  # still valid: no renewal
    assert store.calls == [("load", "svc", False)]
    assert list(tmp_path.iterdir()) == []


def test_login_status_and_local_password_go_through_the_store(monkeypatch):
    store = MemoryTokenStore()
    monkeypatch.setattr(flows, "client_credentials", lambda settings: {"access_token": "A", "expires_in": 60})
    login.login(store, "svc", SERVICE, "client_credentials", lambda line: None)
    assert store.records["svc"]["access_token"] == "A"
    [row] = login.status(store, {"svc": SERVICE})
    assert row["state"] == "valid" and not row["local_password"]
    tokens.set_local_password(store, "svc", "pw 1")
    assert tokens.has_local_password(store, "svc")
    assert tokens.check_local_password(store, "svc", "pw 1") and not tokens.check_local_password(store, "svc", "pw")


class UnreachableTokenStore(MemoryTokenStore):
    """A store whose database cannot be reached: every call raises OSError, as the protocol says."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = 0

    def _call(self, method: str, account: str) -> None:
        self.asked += 1
        raise OSError(f"token database ({method}): connection refused")

    @contextmanager
    def renewing(self, account):
        self._call("renewing", account)
        yield


async def test_a_store_that_cannot_be_reached_leaves_the_token_unavailable(autojump_clock, monkeypatch):
    monkeypatch.setattr(flows, "client_credentials", lambda settings: {"access_token": "A", "expires_in": 60})
    store = UnreachableTokenStore()
    manager = TokenManager(store, {"svc": SERVICE})
    with pytest.raises(TokenUnavailable, match="connection refused"):  # the login goes offline or SYS/TEMP
        await manager.token("svc")
    async with trio.open_nursery() as nursery:  # the background renewal keeps trying, and keeps running
        nursery.start_soon(manager.run)
        while store.asked < 5:
            await trio.sleep(IDLE_CHECK)
        nursery.cancel_scope.cancel()
