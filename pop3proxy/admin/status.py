"""``pop3proxy status``: what the cache and the outgoing queue hold, per account, read from disk.

Read-only: nothing is created or changed (state databases are opened read-only, and as immutable when
no write-ahead log is present). Works whether or not the service is running.

Held mail is counted in the ``held/`` Maildir of the user's directory (the filters' held and quarantined
messages), else from the state database's ``held`` rows; the parts filters stripped and kept
(``removed/``, ``quarantine/`` in older caches) are counted as files.

An account is a directory below ``cache.root`` holding a ``state.db`` (plus every ``[accounts]`` entry
and every sender with queued mail). Its name is the directory name decoded (`decode_user`); names
too long to encode reversibly are read from the state database's ``user`` entry, else shown as stored.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from pop3proxy.admin.cluster_view import cluster_view, format_cluster, last_sync, read_account_state
from pop3proxy.config import queue_dir
from pop3proxy.ops.units import human_age, human_size, utc
from pop3proxy.proxy.oauth.tokens import NEEDS_AUTHORISATION, load_tokens
from pop3proxy.store.api import StateError, StateStore
from pop3proxy.store.base import Mailbox
from pop3proxy.store.maildir import MaildirMailbox
from pop3proxy.store.mbox import MboxMailbox
from pop3proxy.store.paths import REMOVED_DIRS, decode_user, encode_user
from pop3proxy.store.state_read import account_name, read_state
from pop3proxy.store.tokens_api import TokenStore, local_token_store
from pop3proxy.submission.queue import OutQueue

__all__ = ["AccountStatus", "collect_status", "status_command"]

@dataclass
class AccountStatus:
    name: str
    directory: Path | None = None
    last_sync: dict | None = None
    messages: int = 0
    octets: int = 0
    held: int = 0
    removed_parts: int = 0  # files filters keep of the parts they stripped (removed/)
    queued: list = field(default_factory=list)  # outqueue.Entry objects
    problem: str = ""
    oauth2: str = ""  # an OAuth2 account's token state (never the token); empty for password accounts

    @property
    def queued_octets(self) -> int:
        return sum(entry.size for entry in self.queued)


def _count_files(path: Path) -> int:
    count = 0
    for _, _, files in os.walk(path):
        # a stripped attachment is kept twice: decoded, and as its original MIME part (.mime)
        count += sum(1 for name in files if not name.startswith(".") and not name.endswith(".mime"))
    return count


def _account(directory: Path, states: StateStore | None = None) -> AccountStatus:
    """One cache directory's account; ``states``: the cluster's state store (else its ``state.db``)."""
    status = AccountStatus(account_name(directory), directory)
    hidden: set[str] = set()
    try:
        if states is None:
            meta, counts, hidden = read_state(directory / "state.db")
        else:
            found = read_account_state(states, decode_user(directory.name) or directory.name)
            meta, counts, hidden = found if found is not None else ({}, {}, set())
            status.name = meta.get("user") or status.name
        status.last_sync = last_sync(meta)
        status.held = counts.get("held", 0)
    except StateError as exc:
        status.problem = f"state database unreadable: {exc}"
    try:
        mailbox: Mailbox | None
        if (directory / "Maildir").is_dir():
            mailbox = MaildirMailbox(directory / "Maildir", create=False)
        elif (directory / "mbox").is_file():
            mailbox = MboxMailbox(directory / "mbox", create=False)
        else:
            mailbox = None
        if mailbox is not None:
            with mailbox:
                infos = [info for info in mailbox.list() if info.key not in hidden]
            status.messages, status.octets = len(infos), sum(info.size for info in infos)
    except OSError as exc:
        status.problem = f"cache unreadable: {exc}"
    if (directory / "held").is_dir():
        status.held = sum(_count_files(directory / "held" / sub) for sub in ("new", "cur"))
    for name in REMOVED_DIRS:
        if (directory / name).is_dir():
            status.removed_parts += _count_files(directory / name)
    return status


def collect_status(settings, states: StateStore | None = None, tokens: TokenStore | None = None
                   ) -> list[AccountStatus]:
    """Every account the cache, the configuration or the queue knows, sorted by name; ``states`` and
    ``tokens``: the cluster's stores (an account is then a directory holding a Maildir)."""
    root = Path(settings.cache.root)
    found: dict[str, AccountStatus] = {}
    by_dir: dict[str, AccountStatus] = {}
    try:
        names = sorted(os.listdir(root))
    except OSError:
        names = []
    for name in names:
        directory = root / name
        if name.startswith(".") or not (directory / ("state.db" if states is None else "Maildir")).exists():
            continue
        status = _account(directory, states)
        found[status.name] = status
        by_dir[name] = status
    for name in settings.accounts:
        found.setdefault(name, AccountStatus(name))
    qdir = queue_dir(settings)
    if qdir.is_dir():
        for entry in OutQueue(qdir).entries():
            try:
                directory_name = encode_user(entry.cache_id)
            except ValueError:
                directory_name = ""
            owner = by_dir.get(directory_name) or found.get(entry.cache_id) or found.get(entry.login)
            if owner is None:
                owner = found[entry.cache_id] = AccountStatus(entry.cache_id)
            owner.queued.append(entry)
    now = time.time()
    for status in found.values():
        status.oauth2 = oauth2_state(settings, status.name, now, tokens)
    return sorted(found.values(), key=lambda s: s.name.lower())


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def format_status(accounts: list[AccountStatus], settings, now: float | None = None) -> str:
    now = time.time() if now is None else now
    lines = [f"cache {settings.cache.root} ({settings.cache.backend}), outgoing queue {queue_dir(settings)}"]
    if not accounts:
        lines.append("no accounts yet: nobody has logged in and no [accounts] are configured")
    for status in accounts:
        lines.append("")
        lines.append(status.name)
        sync = status.last_sync
        if sync is None:
            lines.append("  last sync   never")
        else:
            when = sync.get("time")
            text = f"{utc(when)} ({human_age(now - when)} ago)" if isinstance(when, (int, float)) else "unknown time"
            detail = f"{sync.get('result', 'unknown')}"
            if sync.get("result") == "ok":
                detail += (
                    f": {sync.get('fetched', 0)} new ({human_size(int(sync.get('fetched_bytes', 0)))}),"
                    f" {sync.get('deleted_upstream', 0)} deleted upstream, {sync.get('held', 0)} held"
                )
                if sync.get("adopted"):
                    detail += f", {sync['adopted']} known under new UIDLs (kept once)"
                if sync.get("dropped"):
                    detail += f", {sync['dropped']} gone at the provider (dropped from the cache)"
                if sync.get("refused"):
                    detail += f", {sync['refused']} refused by the provider (skipped, retried later)"
            lines.append(f"  last sync   {text}: {detail}")
        if status.directory is None:
            lines.append("  cached      nothing yet")
        else:
            lines.append(f"  cached      {_plural(status.messages, 'message')}, {human_size(status.octets)}")
        kept = f", stripped parts kept {status.removed_parts}" if status.removed_parts else ""
        lines.append(f"  held        {status.held}" + kept)
        if status.queued:
            soonest = min(entry.next_try for entry in status.queued)
            errors = [entry.last_error for entry in status.queued if entry.last_error]
            text = f"{_plural(len(status.queued), 'outgoing message')} ({human_size(status.queued_octets)})"
            text += f", next try {utc(soonest)}" if soonest > now else ", next try now"
            if errors:
                text += f", last error: {errors[-1]}"
            lines.append(f"  queued      {text}")
        else:
            lines.append("  queued      none")
        if status.oauth2:
            lines.append(f"  oauth2      {status.oauth2}")
        if status.problem:
            lines.append(f"  problem     {status.problem}")
    return "\n".join(lines)


def oauth2_state(settings, name: str, now: float, tokens: TokenStore | None = None) -> str:
    """An OAuth2 account's token state (never the token), empty for password accounts."""
    account = settings.accounts.get(name)
    if account is None or account.oauth2 is None:
        return ""
    try:
        found = load_tokens(tokens if tokens is not None else local_token_store(settings.cache.root), name)
    except ValueError as exc:
        return f"token file damaged: {exc}"
    except OSError as exc:  # a cluster's database away
        return f"token store unreadable: {exc}"
    if found is None:
        return f"not authorised yet: run `pop3proxy oauth login {name}`"
    if found.state == NEEDS_AUTHORISATION:
        return f"NEEDS AUTHORISATION: run `pop3proxy oauth login {name}` ({found.error})"
    if found.valid_for(now) <= 0:
        text = f"token expired {utc(found.expires_at)}"
    else:
        text = f"token valid until {utc(found.expires_at)}"
    return text + (f", last error: {found.error}" if found.error else "")


def status_command(settings, out: IO[str] | None = None) -> int:
    """Print the status of every account; 0, or 1 when some account's files cannot be read."""
    out = out or sys.stdout
    view, stores = cluster_view(settings)
    try:
        if view is not None:
            print("\n".join(format_cluster(view)) + "\n", file=out)
        accounts = collect_status(settings, stores.states if stores is not None else None,
                                  stores.tokens if stores is not None else None)
    finally:
        if stores is not None:
            stores.close()
    print(format_status(accounts, settings), file=out)
    return 1 if any(status.problem for status in accounts) or (view is not None and view.problem) else 0
