"""The mark a complete background prefetch leaves (``.prefetched`` in the account's cache directory, its
time the mtime), seen by every process of the service: a login with the account's configured password
is then served from the cache until the next interval, without asking the provider."""

from __future__ import annotations

import hmac
import os
import time

from pop3proxy.store.paths import user_dir

PREFETCHED = ".prefetched"


def mark_prefetched(root: str | os.PathLike[str], cache_id: str) -> None:
    (user_dir(root, cache_id) / PREFETCHED).touch()


def fresh_prefetch(root: str | os.PathLike[str], cache_id: str, configured: str | None, password: str,
                   interval: float) -> bool:
    """True when the account has a configured password, the client gave exactly it, and a prefetch
    completed within 1.5 ``interval``."""
    if configured is None:
        return False
    try:
        age = time.time() - (user_dir(root, cache_id) / PREFETCHED).stat().st_mtime
    except OSError:
        return False
    if age > interval * 1.5:
        return False
    return hmac.compare_digest(configured.encode("utf-8"), password.encode("utf-8"))
