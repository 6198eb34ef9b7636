"""OAuth2 tokens in files beside each account's cache: the embedded `TokenStore` (see `store.tokens_api`).

In ``<root>/<encoded account>/`` (`store.paths.user_dir`; directories 0700, files 0600):

- ``oauth2-token.json``: the token record, as JSON (indented by one space);
- ``local-password``: the local password's hash and a line feed;
- ``oauth2-token.lock``: empty; an exclusive ``flock`` on it is held for one renewal, so two processes
  (the service and ``pop3proxy sync``) never spend the same refresh token twice. The lock goes with its
  descriptor: a process that dies holds nothing.

Both files are replaced atomically (`store.fsutil.replace_file`) and never deleted here. Reading creates
nothing (``pop3proxy status`` reads through this store).
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pop3proxy.store.fsutil import FILE_MODE, replace_file
from pop3proxy.store.paths import make_user_dir, user_dir

__all__ = ["LOCAL_PASSWORD_FILE", "LOCK_FILE", "TOKEN_FILE", "FileTokenStore", "token_path"]

TOKEN_FILE = "oauth2-token.json"
LOCAL_PASSWORD_FILE = "local-password"
LOCK_FILE = "oauth2-token.lock"


def token_path(root: str | os.PathLike[str], account: str) -> Path:
    """Where the token record of `account` is kept below `root`."""
    return user_dir(root, account) / TOKEN_FILE


@dataclass(frozen=True)
class FileTokenStore:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def load(self, account: str) -> dict[str, Any] | None:
        path = token_path(self.root, account)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read {path.name} of {account!r}: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"cannot read {path.name} of {account!r}: not a JSON object")
        return data

    def save(self, account: str, record: Mapping[str, Any]) -> None:
        data = json.dumps(dict(record), indent=1).encode("utf-8")
        replace_file(make_user_dir(self.root, account) / TOKEN_FILE, data)

    @contextmanager
    def renewing(self, account: str) -> Iterator[None]:
        path = make_user_dir(self.root, account) / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the only descriptor drops the flock

    def local_password_hash(self, account: str) -> str | None:
        path = user_dir(self.root, account) / LOCAL_PASSWORD_FILE
        try:
            return path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read {path.name} of {account!r}: {exc}") from None

    def set_local_password_hash(self, account: str, password_hash: str) -> None:
        if not password_hash or not password_hash.isprintable() or password_hash != password_hash.strip():
            raise ValueError("a password hash is one line of printable text, without spaces around it")
        data = (password_hash + "\n").encode("ascii")  # UnicodeEncodeError is a ValueError
        replace_file(make_user_dir(self.root, account) / LOCAL_PASSWORD_FILE, data)
