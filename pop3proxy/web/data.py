"""What the console shows and does, through the same functions as the CLI commands.

Synchronous (disk and sqlite): the routes call these in a worker thread. Every function takes the
account it acts on; the routes check beforehand that the signed-in user may see that account.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pop3proxy.admin.cluster_view import ClusterView, cluster_json
from pop3proxy.admin.status import AccountStatus, collect_status
from pop3proxy.config import Settings, masked
from pop3proxy.errors import LoginError
from pop3proxy.filtering.loader import load_filter
from pop3proxy.proxy.routing import resolve
from pop3proxy.store.held import HeldItem, HeldStore, held_owners
from pop3proxy.store.maildir import MaildirMailbox
from pop3proxy.store.paths import user_dir

DAYS = 30  # the plots cover the last 30 days
MAX_SCANNED = 5000  # newest cached messages whose headers the plots and the mail list read
HEADER_BYTES = 16384  # of each message, for From, Subject and the spam filter's headers
MAX_TEXT = 200_000  # characters of a message's plain-text part shown in the detail view
MAX_SHOWN_SERVED = 100  # accounts listed under each node on the overview (the JSON API has them all)


def accounts(settings: Settings, user: str, admin: bool, stores: Any = None) -> list[AccountStatus]:
    """`pop3proxy status`'s accounts: all of them for an admin, else the user's own. ``stores``: the
    service's engines; in a cluster the accounts' state and tokens are read from its database."""
    if settings.cluster is None or stores is None:
        found = collect_status(settings)
    else:
        found = collect_status(settings, stores.states, stores.tokens)
    return [a for a in found if admin or a.name == user]


def own_cache_ids(settings: Settings, user: str) -> set[str]:
    """The accounts (cache ids: what locks, caches and the cluster's ``serving`` name) a login reaches."""
    ids = {user}
    if not settings.standalone:
        with contextlib.suppress(LoginError):  # a name no provider takes: only the name itself
            ids.add(resolve(user, settings).cache_id)
    return ids


def serving_nodes(settings: Settings, view: ClusterView, user: str) -> list[str]:
    """The nodes serving the user's own account now (one, or none): what a non-admin sees of a cluster."""
    ids = own_cache_ids(settings, user)
    return sorted({entry.node for entry in view.serving if entry.account in ids})


def cluster_data(settings: Settings, view: ClusterView, user: str, admin: bool) -> dict[str, Any]:
    """The cluster for the JSON API: every node and its accounts for an admin, else which node serves
    the user's own account now (``served_by``: a node name, or null)."""
    if admin:
        return cluster_json(view)
    if view.problem:
        return {"user": user, "served_by": None, "problem": "the cluster's state cannot be read now"}
    nodes = serving_nodes(settings, view, user)
    return {"user": user, "served_by": nodes[0] if nodes else None}


def status_json(status: AccountStatus) -> dict[str, Any]:
    return {
        "name": status.name,
        "last_sync": status.last_sync,
        "messages": status.messages,
        "octets": status.octets,
        "held": status.held,
        "removed_parts": status.removed_parts,
        "queued": len(status.queued),
        "queued_octets": status.queued_octets,
        "problem": status.problem,
        "oauth2": status.oauth2,
    }


def held_store(settings: Settings, account: str) -> HeldStore:
    return HeldStore(settings.cache.root, account, settings.cache.backend)


def held_list(settings: Settings, user: str, admin: bool) -> list[tuple[str, HeldItem]]:
    """(account, item) for every held message the user may see, as `pop3proxy held list`."""
    root, backend = settings.cache.root, settings.cache.backend
    if admin:
        return [(o.user, item) for o in held_owners(root) if o.user is not None
                for item in o.store(root, backend).list()]
    return [(user, item) for item in held_store(settings, user).list()]


def held_item(settings: Settings, account: str, key: str) -> HeldItem | None:
    """The held message with exactly this key (keys come from the listing, never from a path)."""
    return next((i for i in held_store(settings, account).list() if i.key == key), None)


def held_json(account: str, item: HeldItem) -> dict[str, Any]:
    return {"account": account, **asdict(item), "reasons": list(item.reasons)}


def _maildir(settings: Settings, account: str) -> Path | None:
    if settings.cache.backend != "maildir":
        return None
    path = user_dir(settings.cache.root, account) / "Maildir"
    return path if path.is_dir() else None


def cached_message(settings: Settings, account: str, key: str) -> bytes | None:
    path = _maildir(settings, account)
    if path is None:
        return None
    mailbox = MaildirMailbox(path, create=False)
    try:
        if key not in {info.key for info in mailbox.list()}:
            return None
        with mailbox.open(key) as f:
            return f.read()
    finally:
        mailbox.close()


def _headers(raw: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)


def _text(value: object) -> str:
    try:
        return str(value or "")
    except Exception:  # noqa: BLE001  a header the email package cannot decode (hostile input): shown raw
        return repr(value)


def cached_list(settings: Settings, account: str, limit: int = 50) -> list[dict[str, Any]]:
    """The newest cached messages of the account, with From, Subject and the spam filter's verdict."""
    return [
        {k: v for k, v in m.items() if k != "day"}
        for m in sorted(_scan(settings, account), key=lambda m: m["time"], reverse=True)[:limit]
    ]


def _scan(settings: Settings, account: str) -> list[dict[str, Any]]:
    path = _maildir(settings, account)
    if path is None:
        return []
    files = []
    for sub in ("new", "cur"):
        try:
            with os.scandir(path / sub) as entries:
                for entry in entries:
                    if not entry.name.startswith(".") and entry.is_file():
                        stat = entry.stat()
                        files.append((stat.st_mtime, stat.st_size, entry.path, entry.name))
        except FileNotFoundError:
            continue
    files.sort(reverse=True)
    found = []
    for mtime, size, file, name in files[:MAX_SCANNED]:
        try:
            with open(file, "rb") as f:
                head = f.read(HEADER_BYTES).split(b"\n\n", 1)[0].split(b"\r\n\r\n", 1)[0]
        except OSError:
            continue
        msg = _headers(head + b"\n\n")
        try:
            score = float(str(msg.get("X-Spam-Score", "")))
        except ValueError:
            score = None
        found.append({
            "key": name.split(":", 1)[0],
            "time": mtime,
            "day": int(mtime // 86400),
            "size": size,
            "sender": _text(msg.get("From")),
            "subject": _text(msg.get("Subject")),
            "spam": str(msg.get("X-Spam-Flag", "")).strip().upper() == "YES",
            "score": score,
        })
    return found


def plot_data(settings: Settings, account: str, now: float | None = None) -> dict[str, Any]:
    """Messages received and spam tagged per day (last 30 days), the spam score distribution, and the
    cache size by day (cumulative octets of what is cached, by the day it arrived)."""
    now = time.time() if now is None else now
    today = int(now // 86400)
    days = [today - DAYS + 1 + i for i in range(DAYS)]
    received = dict.fromkeys(days, 0)
    spam = dict.fromkeys(days, 0)
    scores: dict[int, int] = {}
    growth: dict[int, int] = {}
    before = 0
    for m in _scan(settings, account):
        if m["day"] in received:
            received[m["day"]] += 1
            spam[m["day"]] += m["spam"]
            growth[m["day"]] = growth.get(m["day"], 0) + m["size"]
        elif m["day"] < days[0]:
            before += m["size"]
        if m["score"] is not None:
            bucket = max(-5, min(15, int(m["score"] // 1)))
            scores[bucket] = scores.get(bucket, 0) + 1
    labels = [time.strftime("%m-%d", time.gmtime(d * 86400)) for d in days]
    size, sizes = before, []
    for d in days:
        size += growth.get(d, 0)
        sizes.append(size)
    return {
        "days": labels,
        "received": [received[d] for d in days],
        "spam": [spam[d] for d in days],
        "scores": {"buckets": list(range(-5, 16)), "counts": [scores.get(b, 0) for b in range(-5, 16)]},
        "cache_octets": sizes,
    }


def message_view(raw: bytes) -> dict[str, Any]:
    """Headers and the plain-text part only: HTML is never rendered (the template escapes all of it)."""
    msg = _headers(raw)
    headers = [(name, _text(value)) for name, value in msg.items()]
    text = ""
    try:
        part = msg.get_body(preferencelist=("plain",))
        if part is not None:
            text = part.get_content()
    except (LookupError, ValueError, AttributeError):
        text = ""
    if not text and msg.get_content_maintype() != "multipart" and msg.get_content_type() != "text/plain":
        text = "(no plain-text part)"
    return {"headers": headers, "text": text[:MAX_TEXT]}


def spam_filter(settings: Settings):
    """The configured spam filter instance, or None when the pipeline has none."""
    for index, table in enumerate(settings.filters):
        if table.get("use") == "spam":
            return load_filter(table, index)[0]
    return None


def train(settings: Settings, message: bytes, label: str, account: str = "") -> bool:
    """Teach the spam filter's backend the message; False when it already knew it so. A backend that
    refuses or cannot be reached raises ValueError with its reason."""
    found = spam_filter(settings)
    if found is None:
        raise ValueError("no spam filter is configured")
    return found.learn(message, label, account)


def trained(settings: Settings) -> dict[str, Any] | None:
    """What the spam filter's backend has learnt: ``spam``, ``ham`` and ``backend`` (builtin, spamd:
    the messages taught through pop3proxy, rspamd: its own counts), or ``error`` when they cannot be
    read; None without a spam filter."""
    found = spam_filter(settings)
    if found is None:
        return None
    backend = getattr(getattr(found, "config", None), "backend", "builtin")
    try:
        spam, ham = found.trained()
    except ValueError as exc:
        return {"backend": backend, "error": str(exc)}
    return {"backend": backend, "spam": spam, "ham": ham}


def config_view(settings: Settings) -> dict[str, Any]:
    """The effective configuration with secrets masked, as `pop3proxy check-config` prints it."""
    return masked(settings)
