"""The offline password check: a password against the scrypt hash kept in an account's state.

One check for every door: POP3 (and the web console's sign-in, which logs in through the backend) and
the SMTP relay. The hash is written by the backend after a sync with the provider (``offline_hash``
meta of the account's ``state.db``). Synchronous and memory-hungry (scrypt): an async caller runs it
in a worker thread under ``credentials.kdf_limiter()``.
"""

from __future__ import annotations

import os

from pop3proxy.proxy.credentials import verify_password
from pop3proxy.store.paths import user_dir
from pop3proxy.store.state import UserState

__all__ = ["OFFLINE_HASH", "check_offline_password"]

OFFLINE_HASH = "offline_hash"  # meta key of the state database


def check_offline_password(root: str | os.PathLike[str], cache_id: str, password: str) -> bool | None:
    """True or False when the account keeps an offline hash; None when it keeps none (no state file,
    or no hash in it). A state that cannot be read raises (``StateError``, ``OSError``): the caller
    decides what that means."""
    path = user_dir(root, cache_id) / "state.db"
    if not path.exists():
        return None
    with UserState(path) as state:
        stored = state.get_meta(OFFLINE_HASH)
    if stored is None:
        return None
    return verify_password(password, stored)
