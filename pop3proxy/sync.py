"""Upstream → filters → cache, and the upstream deletion policies.

The rules that protect mail, in the order this module applies them:

1. A message is claimed in the state database (``fetching`` + the digest of the bytes to be cached)
   before it is written, and marked ``cached`` after the cache has it fsync'ed. ``recover`` resolves a
   claim left by a crash either way, so a crash never loses nor duplicates a message.
2. Nothing is deleted upstream unless its row says the cache has it (``cached``) or the client deleted it
   (``deleted``, policy ``mirror``). Upstream deletions become real only with a successful QUIT; only
   then are the rows marked gone from upstream.
3. A message the client deleted is never fetched again (its row stays).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import trio

from pop3proxy import metrics
from pop3proxy.filtering import FilterContext, FilterResult, Pipeline
from pop3proxy.state import UserState
from pop3proxy.store import Mailbox, normalise
from pop3proxy.upstream import UpstreamClient

log = logging.getLogger("pop3proxy.sync")

POLICIES = ("mirror", "after_fetch", "never")


@dataclass
class SyncResult:
    fetched: int = 0
    fetched_bytes: int = 0
    deleted_upstream: int = 0
    held: int = 0
    remaining: int = 0  # new upstream messages not fetched (budget, error)
    errors: list[str] = field(default_factory=list)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def recover(mailbox: Mailbox, state: UserState) -> tuple[int, int]:
    """Resolve ``fetching`` rows a crash left behind; drop files of ``deleted`` rows.

    Returns (claimed, dropped). Runs with the mailbox lock held and no sync in progress.
    """
    claimed = dropped = 0
    pending = state.fetching()
    infos = mailbox.list()
    present = {info.key for info in infos}
    hidden = [key for key in state.hidden_keys() if key in present]
    if hidden:
        mailbox.delete(hidden)
    # Cached messages whose files vanished (a hand-edited cache): fetch them again while the provider
    # still has them.
    vanished = [key for key in state.cached_keys(upstream_only=True) if key not in present]
    if vanished:
        state.forget_keys(vanished)
        log.warning("%d cached messages are missing from the cache; they will be fetched again", len(vanished))
    if pending:
        owned = {row.key for row in state.rows() if row.key}
        by_digest: dict[str, str] = {}
        for info in infos:
            if info.key in owned:
                continue
            with mailbox.open(info.key) as f:
                h = hashlib.sha256()
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            by_digest.setdefault(h.hexdigest(), info.key)
        for row in pending:
            key = by_digest.pop(row.digest or "", None)
            if key is not None:
                size = next(info.size for info in infos if info.key == key)
                state.finish_fetch(row.uid, key, size)
                claimed += 1
            else:
                state.abandon_fetch(row.uid)
                dropped += 1
    if claimed or dropped or hidden or vanished:
        log.info("recovered cache state: %d claimed, %d refetch, %d removed", claimed, dropped, len(hidden))
    return claimed, dropped


async def upstream_ids(client: UpstreamClient) -> dict[int, str]:
    """Message number → stable identifier (UIDL, or a header digest when the server has no UIDL)."""
    uids = await client.uidl()
    if uids is not None:
        return uids
    log.warning("upstream has no UIDL; identifying messages by a digest of their headers")
    listing = await client.list()
    return {n: await client.header_digest(n) for n in sorted(listing)}


async def sync_mailbox(
    client: UpstreamClient,
    mailbox: Mailbox,
    state: UserState,
    *,
    user: str,
    pipeline: Pipeline,
    policy: str,
    delete_after_days: float | None = None,
    hold: Callable[[bytes, str, FilterResult], str] | None = None,
    quarantine_dir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    quit: bool = True,
) -> SyncResult:
    """One pass over a logged-in upstream session. Ends with QUIT unless ``quit`` is False."""
    if policy not in POLICIES:
        raise ValueError(f"unknown deletion policy {policy!r}")
    result = SyncResult()
    ids = await upstream_ids(client)
    rows = {row.uid: row for row in await trio.to_thread.run_sync(state.rows)}
    present = set(ids.values())

    # Known messages that vanished upstream (another client, the provider's expiry).
    vanished = [uid for uid, row in rows.items() if row.upstream and uid not in present]
    if vanished:
        await trio.to_thread.run_sync(state.upstream_gone, vanished)

    to_delete: list[tuple[int, str]] = []
    now = time.time()
    for number, uid in sorted(ids.items()):
        row = rows.get(uid)
        if row is None:
            continue
        if row.status == "deleted" and policy == "mirror":
            to_delete.append((number, uid))
        elif row.status in ("cached", "held") and policy == "after_fetch":
            to_delete.append((number, uid))
        elif (
            row.status in ("cached", "held")
            and delete_after_days is not None
            and row.fetched_at is not None
            and now - row.fetched_at >= delete_after_days * 86400
        ):
            to_delete.append((number, uid))

    new = [(number, uid) for number, uid in sorted(ids.items()) if uid not in rows]
    result.remaining = len(new)
    deleted_uids: list[str] = []
    for number, uid in to_delete:
        await client.dele(number)
        deleted_uids.append(uid)

    seen_in_pass: set[str] = set()
    for done, (number, uid) in enumerate(new):
        if uid in seen_in_pass:  # two upstream messages with one id (header digests of twins)
            continue
        seen_in_pass.add(uid)
        data = await client.retr_bytes(number)
        outcome = await pipeline.run(data, FilterContext(user=user, uid=uid, quarantine_dir=quarantine_dir))
        cached = normalise(outcome.data)
        claimed = await trio.to_thread.run_sync(state.begin_fetch, uid, digest(cached))
        if not claimed:
            continue  # another sync took it meanwhile
        # If this fails or is cancelled, the claim stays 'fetching' and recover() settles it later.
        if outcome.hold and hold is not None:
            key = await trio.to_thread.run_sync(hold, cached, uid, outcome)
            await trio.to_thread.run_sync(state.finish_fetch, uid, key, len(cached), "held")
            result.held += 1
        else:
            info = await trio.to_thread.run_sync(mailbox.add, outcome.data)
            await trio.to_thread.run_sync(state.finish_fetch, uid, info.key, info.size)
        result.fetched += 1
        result.fetched_bytes += len(cached)
        metrics.synced(1, len(cached))
        result.remaining -= 1
        if policy == "after_fetch":
            await client.dele(number)
            deleted_uids.append(uid)
        if progress is not None:
            progress(done + 1, len(new))

    if quit:
        await client.quit()  # upstream deletions take effect only now
        if deleted_uids:
            await trio.to_thread.run_sync(state.upstream_gone, deleted_uids)
            result.deleted_upstream = len(deleted_uids)
    return result


async def delete_upstream(client: UpstreamClient, state: UserState, uids: set[str]) -> int:
    """Delete these upstream messages (mirror policy at the client's QUIT) and QUIT."""
    ids = await upstream_ids(client) if uids else {}
    numbers = [(n, uid) for n, uid in sorted(ids.items()) if uid in uids]
    for number, _ in numbers:
        await client.dele(number)
    await client.quit()
    gone = [uid for _, uid in numbers]
    if gone:
        await trio.to_thread.run_sync(state.upstream_gone, gone)
    return len(gone)
