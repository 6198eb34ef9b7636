"""Password hashes (scrypt) and the local users file.

The users file serves standalone mode (``pop3proxy serve`` without an upstream, and the demo's
built-in provider). Its lines are ``name:$scrypt$n=16384,r=8,p=1$<salt>$<hash>`` (base64), one user a
line; ``#`` starts a comment. The same hash format remembers a user's password for offline logins.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from pathlib import Path

import trio

from pop3proxy.store.fsutil import replace_file

SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
_PREFIX = "$scrypt$"


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=32)
    b64 = lambda b: base64.b64encode(b).decode("ascii")  # noqa: E731
    return f"{_PREFIX}n={n},r={r},p={p}${b64(salt)}${b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """True if ``password`` matches ``stored``; a malformed hash never matches."""
    try:
        if not stored.startswith(_PREFIX):
            return False
        params, salt_b64, digest_b64 = stored[len(_PREFIX):].split("$")
        values = dict(item.split("=", 1) for item in params.split(","))
        n, r, p = int(values["n"]), int(values["r"]), int(values["p"])
        if n > 2**20 or r > 64 or p > 16:
            return False
        salt = base64.b64decode(salt_b64, validate=True)
        expected = base64.b64decode(digest_b64, validate=True)
        digest = hashlib.scrypt(
            password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=len(expected), maxmem=2**27
        )
    except (ValueError, KeyError, TypeError):
        return False
    return hmac.compare_digest(digest, expected)


class UsersFileError(Exception):
    pass


def _check_name(name: str) -> None:
    if not name or ":" in name or any(ord(c) < 32 for c in name) or name != name.strip():
        raise UsersFileError(f"invalid user name {name!r}: no colon, control characters or outer spaces")


def read_users(path: Path) -> dict[str, str]:
    """Map of user name → stored hash. A missing file is an error naming it."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsersFileError(f"users file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsersFileError(f"cannot read users file {path}: {exc}") from None
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, stored = line.rpartition(":")
        if not sep or not name or not stored.startswith(_PREFIX):
            raise UsersFileError(f"{path}:{number}: expected 'name:$scrypt$...'")
        users[name] = stored
    return users


def set_password(path: Path, name: str, password: str) -> None:
    """Add ``name`` or change its password, atomically; the file is created mode 0600."""
    _check_name(name)
    users = read_users(path) if path.exists() else {}
    users[name] = hash_password(password)
    body = "".join(f"{user}:{stored}\n" for user, stored in users.items())
    replace_file(path, body.encode("utf-8"))


_KDF_LIMITER: trio.CapacityLimiter | None = None


def kdf_limiter() -> trio.CapacityLimiter:
    """Password hashing (scrypt, 16 MiB each) runs at most two at a time, bounding memory."""
    global _KDF_LIMITER
    if _KDF_LIMITER is None:
        _KDF_LIMITER = trio.CapacityLimiter(2)
    return _KDF_LIMITER
