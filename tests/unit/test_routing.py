"""Which provider account a login name reaches, and the cache id that names it."""

from __future__ import annotations

import pytest

from pop3proxy.config import Settings
from pop3proxy.errors import LoginError
from pop3proxy.proxy.routing import resolve


def settings(**upstream) -> Settings:
    return Settings.model_validate({
        "upstream": {"host": "pop.example.com", "tls": "implicit", **upstream},
        "routes": {"example.org": {"host": "pop.example.org", "tls": "implicit"}},
        "accounts": {"Shared": {"remote_user": "shared@example.com"}},
    })


def test_spellings_of_one_provider_account_share_one_cache_id():
    s = settings()
    ids = {resolve(name, s).cache_id for name in (
        "alice", "Alice", "ALICE", "alice#pop.example.com", "Alice#POP.example.com:995", "alice#pop.example.com:0995")}
    assert ids == {"alice"}
    assert {resolve(n, s).cache_id for n in ("bob@example.org", "Bob@Example.ORG")} == {"bob@example.org"}
    assert resolve("bob@example.org#pop.example.org", s).cache_id == "bob@example.org"
    # The same user name at another provider is another account.
    assert resolve("alice#pop.example.org", s).cache_id == "alice#pop.example.org:995"
    # A configured account is found whatever the case of the login, and keeps its own name.
    assert resolve("shared", s).cache_id == "Shared" and resolve("shared", s).remote_user == "shared@example.com"


def test_case_sensitive_providers_keep_one_cache_per_spelling():
    s = settings(case_sensitive_users=True)
    assert resolve("Alice", s).cache_id == "Alice" and resolve("alice", s).cache_id == "alice"
    assert resolve("Alice", s).remote_user == "Alice"
    assert resolve("Alice#pop.example.com", s).cache_id == "Alice"
    # Only the exact name is the configured account; "shared" is a user of the default provider.
    assert resolve("Shared", s).remote_user == "shared@example.com"
    assert (resolve("shared", s).cache_id, resolve("shared", s).remote_user) == ("shared", "shared")


def test_unknown_providers_are_still_refused():
    with pytest.raises(LoginError):
        resolve("alice#elsewhere.example.net", settings())
