"""Caches named by a login's spelling become the cache of their provider account (see `routing.cache_id`).

Before cache ids were canonical, ``Alice`` and ``alice`` (or ``alice#host:995`` for the default
provider) each had a cache of their own, holding the same provider messages. At startup each such
directory is renamed to its account's canonical id; when several spellings of one account have caches,
the most recently used one becomes the account's cache and the others are left where they are (no longer
served, never deleted), with a warning naming them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pop3proxy.config import Settings
from pop3proxy.errors import LoginError
from pop3proxy.proxy.routing import resolve
from pop3proxy.store.fsutil import fsync_dir
from pop3proxy.store.paths import user_dir
from pop3proxy.store.state_read import account_name

log = logging.getLogger("pop3proxy.proxy")


def _last_used(directory: Path) -> float:
    try:
        return (directory / "state.db").stat().st_mtime
    except OSError:
        return 0.0


def migrate_cache_ids(settings: Settings, root: Path) -> list[tuple[str, str]]:
    """Rename caches named by a login spelling to their canonical cache id; returns (old, new) names."""
    root = Path(root)
    try:
        entries = [e for e in root.iterdir() if e.is_dir() and (e / "state.db").is_file()]
    except OSError:
        return []
    groups: dict[str, list[tuple[Path, str]]] = {}
    for entry in entries:
        name = account_name(entry)
        if name in settings.accounts:
            continue
        try:
            route = resolve(name, settings)
        except LoginError:
            continue
        if route.cache_id in settings.accounts or user_dir(root, route.cache_id) == entry:
            continue  # a configured account's cache is its own; a canonical one stays
        groups.setdefault(route.cache_id, []).append((entry, name))
    renamed: list[tuple[str, str]] = []
    for canonical, spellings in sorted(groups.items()):
        target = user_dir(root, canonical)
        spellings.sort(key=lambda item: _last_used(item[0]), reverse=True)
        if not target.exists():
            entry, name = spellings.pop(0)
            try:
                os.rename(entry, target)
                fsync_dir(root)
            except OSError as exc:
                log.error("cannot rename the cache of %r to that of its account %r: %s", name, canonical, exc)
                continue
            renamed.append((name, canonical))
            log.warning("the cache of %r is now the cache of %r (the same provider account)", name, canonical)
        for entry, name in spellings:
            log.warning("the cache of %r (%s) is another spelling of %r, whose cache is in use: "
                        "left as it is, no longer served", name, entry.name, canonical)
    return renamed
