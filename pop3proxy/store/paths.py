"""User names to directory names below the cache root: the one encoder, never a path outside the root."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from pop3proxy.store.fsutil import DIR_MODE

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.@+-")
_MAX_NAME = 150
_PREFIX = _MAX_NAME - 1 - 64  # room for '~' and a SHA-256 hex digest
_HEX = frozenset("0123456789ABCDEF")


def encode_user(user: str) -> str:
    """A file name for `user`: injective, case-preserving, never special, at most 150 octets.

    Octets outside ``[A-Za-z0-9_.@+-]`` of the UTF-8 form, and a leading '.', become ``%XX``. A longer
    encoding becomes a prefix of it + '~' + the SHA-256 of the name ('~' never appears otherwise).
    """
    if not user:
        raise ValueError("empty user name")
    raw = user.encode("utf-8", "surrogatepass")
    name = "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in raw)
    if name.startswith("."):
        name = "%2E" + name[1:]
    if len(name) > _MAX_NAME:
        prefix = name[:_PREFIX]
        cut = prefix.rfind("%", len(prefix) - 2)
        if cut >= 0:  # do not split a %XX escape
            prefix = prefix[:cut]
        name = f"{prefix}~{hashlib.sha256(raw).hexdigest()}"
    return name


def _unquote(name: str) -> bytes | None:
    """The octets behind an encoded name, or None if it holds anything the encoder never writes."""
    raw = bytearray()
    i = 0
    while i < len(name):
        char = name[i]
        if char == "%":
            pair = name[i + 1 : i + 3]
            if len(pair) != 2 or not set(pair) <= _HEX:
                return None
            raw.append(int(pair, 16))
            i += 3
        elif ord(char) < 128 and ord(char) in _SAFE:
            raw.append(ord(char))
            i += 1
        else:
            return None
    return bytes(raw)


def decode_user(name: str) -> str | None:
    """The user name a directory was made for, or None if ``name`` is not a reversible encoding
    (long names are stored as a prefix and a digest). The inverse of `encode_user`."""
    if not name or "~" in name:
        return None
    raw = _unquote(name)
    if raw is None:
        return None
    try:
        user = raw.decode("utf-8", "surrogatepass")
        canonical = encode_user(user)
    except (UnicodeDecodeError, ValueError):
        return None
    return user if canonical == name else None


def user_label(name: str) -> str:
    """A directory name for people: the user name, else the readable start of a shortened one + '...'."""
    user = decode_user(name)
    if user is not None:
        return user
    raw = _unquote(name.split("~", 1)[0])
    return (raw.decode("utf-8", "replace") if raw is not None else name.split("~", 1)[0]) + "..."


def user_dir(root: str | os.PathLike[str], user: str) -> Path:
    """The directory of `user` under `root`: always a direct child of root. Raises ValueError for ''."""
    return Path(root) / encode_user(user)


REMOVED_DIRS = ("removed", "quarantine")
"""Where filters keep the parts they strip from messages, in a user's directory; ``quarantine/`` is
the name used before it was renamed and stays in use where it exists."""


def removed_parts_dir(directory: Path) -> Path:
    """The directory below a user's `directory` where filters keep the parts they remove."""
    for name in REMOVED_DIRS[1:]:
        if (directory / name).is_dir():
            return directory / name
    return directory / REMOVED_DIRS[0]


def make_user_dir(root: str | os.PathLike[str], user: str) -> Path:
    path = user_dir(root, user)
    Path(root).mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    path.mkdir(mode=DIR_MODE, exist_ok=True)
    return path
