"""An OAuth2 account's tokens and local password, read and written through a `TokenStore`.

`TokenSet` is the typed view of the record a store keeps: the token set (access token, refresh token,
expiry) and its state ("ok", or "needs_authorisation" after the authorization server answered
``invalid_grant``). The local password is kept as its scrypt hash: the password the legacy client logs
in to pop3proxy with. Nothing here ever deletes either: a refused refresh only changes the state.

The functions take a `TokenStore`, or a cache root for the one machine's store under it
(`local_token_store`: files beside the account's cache, mode 0600).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from pop3proxy.proxy.credentials import hash_password, verify_password
from pop3proxy.store.tokens_api import TokenStore, local_token_store

StoreOrRoot = TokenStore | str | os.PathLike[str]
"""A `TokenStore`, or a cache root: the one machine's store under it (`local_token_store`)."""

OK = "ok"
NEEDS_AUTHORISATION = "needs_authorisation"


@dataclass
class TokenSet:
    access_token: str = field(default="", repr=False)
    refresh_token: str | None = field(default=None, repr=False)
    expires_at: float = 0.0  # Unix time; 0: unknown (treated as expired)
    token_type: str = "Bearer"
    scope: str = ""
    state: str = OK
    error: str = ""  # the last refresh failure, for `pop3proxy oauth status` (never a token)
    updated: float = 0.0

    @classmethod
    def from_response(cls, token: dict, previous: TokenSet | None = None, now: float | None = None) -> TokenSet:
        """A token endpoint's answer; a refresh without a new refresh token keeps the old one."""
        now = time.time() if now is None else now
        expires_at = token.get("expires_at")
        if expires_at is None and token.get("expires_in") is not None:
            expires_at = now + float(token["expires_in"])
        refresh = token.get("refresh_token") or (previous.refresh_token if previous else None)
        return cls(
            access_token=str(token["access_token"]),
            refresh_token=refresh,
            expires_at=float(expires_at or 0),
            token_type=str(token.get("token_type") or "Bearer"),
            scope=str(token.get("scope") or ""),
            state=OK,
            updated=now,
        )

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> TokenSet:
        """The tokens of a stored record (keys this version does not know are left out)."""
        return cls(**{k: v for k, v in record.items() if k in cls.__dataclass_fields__})

    def to_record(self) -> dict[str, Any]:
        """The record a `TokenStore` keeps: plain JSON data."""
        return asdict(self)

    def valid_for(self, now: float | None = None) -> float:
        """Seconds the access token is still good for (negative once expired)."""
        return self.expires_at - (time.time() if now is None else now)


def token_store(store: StoreOrRoot) -> TokenStore:
    """`store`, or the one machine's token store under a cache root."""
    if isinstance(store, (str, os.PathLike)):
        return local_token_store(store)
    return store


def load_tokens(store: StoreOrRoot, account: str) -> TokenSet | None:
    """The account's stored tokens, None when it never authorised. A damaged record raises ValueError."""
    record = token_store(store).load(account)
    return None if record is None else TokenSet.from_record(record)


def save_tokens(store: StoreOrRoot, account: str, tokens: TokenSet) -> None:
    token_store(store).save(account, tokens.to_record())


def set_local_password(store: StoreOrRoot, account: str, password: str) -> None:
    if not password or any(c in password for c in "\r\n\0"):
        raise ValueError("the password must not be empty or hold line breaks or NUL")
    token_store(store).set_local_password_hash(account, hash_password(password))


def has_local_password(store: StoreOrRoot, account: str) -> bool:
    try:
        return token_store(store).local_password_hash(account) is not None
    except ValueError:  # set, but it cannot be read
        return True


def check_local_password(store: StoreOrRoot, account: str, password: str) -> bool:
    """Whether `password` is the account's local password (scrypt; slow: run in a worker thread).

    No local password set means no login: the token is never used without one.
    """
    try:
        stored = token_store(store).local_password_hash(account)
    except (OSError, ValueError):
        return False
    return stored is not None and verify_password(password, stored)
