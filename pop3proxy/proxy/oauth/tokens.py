"""Where an OAuth2 account's tokens and local password live: beside its cache, mode 0600.

``<cache root>/<user dir>/oauth2-token.json`` holds the token set (access token, refresh token,
expiry) and its state ("ok", or "needs_authorisation" after the authorization server answered
``invalid_grant``). ``<user dir>/local-password`` holds the scrypt hash of the password the legacy
client logs in to pop3proxy with. Both are replaced atomically (write, fsync, rename) and nothing
here ever deletes them: a refused refresh only changes the state.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pop3proxy.proxy.credentials import hash_password, verify_password
from pop3proxy.store.fsutil import fsync_dir, write_new_file
from pop3proxy.store.paths import make_user_dir, user_dir

TOKEN_FILE = "oauth2-token.json"
LOCAL_PASSWORD_FILE = "local-password"
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
    def from_response(cls, token: dict, previous: "TokenSet | None" = None, now: float | None = None) -> "TokenSet":
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

    def valid_for(self, now: float | None = None) -> float:
        """Seconds the access token is still good for (negative once expired)."""
        return self.expires_at - (time.time() if now is None else now)


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    write_new_file(tmp, data)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def token_path(root: str | os.PathLike[str], account: str) -> Path:
    return user_dir(root, account) / TOKEN_FILE


def load_tokens(root: str | os.PathLike[str], account: str) -> TokenSet | None:
    """The account's stored tokens, None when it never authorised. A damaged file raises ValueError."""
    path = token_path(root, account)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path.name} of {account!r}: {exc}") from None
    known = {k: v for k, v in data.items() if k in TokenSet.__dataclass_fields__}
    return TokenSet(**known)


def save_tokens(root: str | os.PathLike[str], account: str, tokens: TokenSet) -> None:
    make_user_dir(root, account)
    _replace(token_path(root, account), json.dumps(asdict(tokens), indent=1).encode("utf-8"))


def set_local_password(root: str | os.PathLike[str], account: str, password: str) -> None:
    if not password or any(c in password for c in "\r\n\0"):
        raise ValueError("the password must not be empty or hold line breaks or NUL")
    directory = make_user_dir(root, account)
    _replace(directory / LOCAL_PASSWORD_FILE, (hash_password(password) + "\n").encode("ascii"))


def has_local_password(root: str | os.PathLike[str], account: str) -> bool:
    return (user_dir(root, account) / LOCAL_PASSWORD_FILE).is_file()


def check_local_password(root: str | os.PathLike[str], account: str, password: str) -> bool:
    """Whether `password` is the account's local password (scrypt; slow: run in a worker thread).

    No local password set means no login: the token is never used without one.
    """
    try:
        stored = (user_dir(root, account) / LOCAL_PASSWORD_FILE).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return False
    return verify_password(password, stored)
