"""Shared by the fault tests (tests/integration/test_proxy_faults.py, test_faulty_provider.py): reading
the cache's state and the provider's mailbox, checking that every message exists exactly once, logging
in in the background.
"""

from __future__ import annotations

import poplib
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

from helpers.common import HOST

from pop3proxy.store.paths import user_dir
from pop3proxy.store.state import UserState


# --- helpers --------------------------------------------------------------------------------------


def cache_rows(root: Path, user: str) -> list:
    with UserState(user_dir(root, user) / "state.db") as state:
        return state.rows()


def open_claims(root: Path, user: str) -> int:
    """Rows a crash left 'fetching' (read-only: the proxy's own restart must do the recovery)."""
    path = user_dir(root, user) / "state.db"
    if not path.exists():
        return 0
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute("SELECT count(*) FROM messages WHERE status = 'fetching'").fetchone()[0]
    except sqlite3.OperationalError:  # killed before the table was created
        return 0
    finally:
        db.close()


def check_copies(originals: list[bytes], upstream: list[bytes], cache: list[bytes]) -> list[str]:
    """What breaks "every message exists exactly once across provider and cache" (empty: nothing)."""
    problems = []
    up, local = Counter(upstream), Counter(cache)
    for index, message in enumerate(originals):
        if up[message] + local[message] == 0:
            problems.append(f"message {index} lost")
        if up[message] > 1 or local[message] > 1:
            problems.append(f"message {index} duplicated (provider {up[message]}, cache {local[message]})")
    known = set(originals)
    strangers = [m for m in list(up) + list(local) if m not in known]
    if strangers:
        problems.append(f"{len(strangers)} unknown (partial?) messages, e.g. {strangers[0][:80]!r}")
    return problems


def check_final(policy: str, originals: list[bytes], upstream: list[bytes], cache: list[bytes]) -> list[str]:
    """After a clean, complete sync: the cache holds each message once; the provider per policy."""
    problems = check_copies(originals, upstream, cache)
    if Counter(cache) != Counter(originals):
        problems.append(f"cache holds {len(cache)} messages, not the {len(originals)} delivered")
    expected_upstream = [] if policy == "after_fetch" else originals
    if Counter(upstream) != Counter(expected_upstream):
        problems.append(f"provider holds {len(upstream)} messages, expected {len(expected_upstream)}")
    return problems


def provider_messages(dovecot, user: str) -> list[bytes]:
    """`dovecot.messages`, robust against Dovecot moving a file from new/ to cur/ meanwhile."""
    for _ in range(50):
        try:
            return dovecot.messages(user)
        except FileNotFoundError:
            time.sleep(0.02)
    return dovecot.messages(user)


def login_in_background(port: int, user: str, password: str) -> threading.Thread:
    """A poplib login that triggers a sync; the proxy may die under it (errors are expected)."""

    def run() -> None:
        try:
            client = poplib.POP3(HOST, port, timeout=30)
            client.user(user)
            client.pass_(password)
            client.quit()
        except (OSError, poplib.error_proto, EOFError):
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread
