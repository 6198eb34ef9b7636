"""Upstream → filters → cache, and the upstream deletion policies.

The rules that protect mail, in the order this module applies them:

1. A message is claimed in the state database (``fetching`` + the digest of the bytes to be cached)
   before it is written, and marked ``cached`` after the cache has it fsync'ed. ``recover`` resolves a
   claim left by a crash either way, so a crash never loses nor duplicates a message.
2. Nothing is deleted upstream unless its row says the cache has it (``cached``) or the client deleted it
   (``deleted``, policy ``mirror``). Upstream deletions become real only with a successful QUIT; only
   then are the rows marked gone from upstream.
3. A message the client deleted is never fetched again (its row stays).
4. A message the provider lists under a new UIDL while its old UIDL is gone (a mailbox re-created at the
   provider, a server migration) is recognised by the digest of its bytes and keeps its row, its cached
   copy and its status: it is neither cached twice nor, once deleted by the client, served again.
5. Cached messages the provider stops listing are kept (``upstream.vanished = "keep"``: Gmail hides
   popped mail from later POP3 sessions, so disappearance is not deletion) or dropped (``"drop"``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import trio

from pop3proxy.filtering.api import WARNING_HEADER, FilterContext, FilterResult
from pop3proxy.filtering.headers import format_header
from pop3proxy.filtering.pipeline import Pipeline
from pop3proxy.net.endpoint import UpstreamTooLarge
from pop3proxy.net.pop3_client import UpstreamClient
from pop3proxy.ops import metrics
from pop3proxy.store.base import Mailbox
from pop3proxy.store.crlf import normalise
from pop3proxy.store.spool import Spool, Spooled
from pop3proxy.store.state import UserState

log = logging.getLogger("pop3proxy.proxy.sync")

POLICIES = ("mirror", "after_fetch", "never")
VANISHED = ("keep", "drop")
PIPELINE_DEPTH = 64  # fetched messages waiting to be stored
QUEUED_BYTES = 64 << 20  # octets of fetched messages waiting to be stored
MAX_FILTERED_SIZE = 32 << 20  # default of sync.max_filtered_size
STORE_BATCH = 32  # messages made durable with one flush
REFUSED = "refused_messages"  # state meta, JSON: uid -> {"tries", "next", "reason"}
RETRY_FIRST = 60.0  # seconds before a message the provider refused is asked for again; doubles per try
RETRY_MAX = 6 * 3600.0


@dataclass
class SyncResult:
    fetched: int = 0
    fetched_bytes: int = 0
    deleted_upstream: int = 0
    held: int = 0
    remaining: int = 0  # new upstream messages not fetched (budget, error)
    refused: int = 0  # new upstream messages the provider refused to send (retried later, backing off)
    adopted: int = 0  # new UIDLs found to be messages known under a UIDL the provider no longer lists
    dropped: int = 0  # cached messages removed because the provider no longer lists them (vanished=drop)
    errors: list[str] = field(default_factory=list)


def _first_error(exc: BaseException) -> BaseException:
    """The first exception in a (possibly nested) group that is not a cancellation."""
    inner = getattr(exc, "exceptions", None)
    if not inner:
        return exc
    for candidate in inner:
        found = _first_error(candidate)
        if not isinstance(found, trio.Cancelled):
            return found
    return exc


@dataclass
class _Item:
    """A fetched message on its way to the cache: filtered in memory, or spooled to a file."""

    number: int
    uid: str
    source: str  # digest of the message as the provider sent it
    outcome: FilterResult | None = None
    cached: bytes | None = None  # the filtered message in CRLF form
    spooled: Spooled | None = None
    held: bool = False

    @property
    def size(self) -> int:
        return self.spooled.size if self.spooled is not None else len(self.cached or b"")

    @property
    def digest(self) -> str:
        return self.spooled.cached if self.spooled is not None else digest(self.cached or b"")


class _Window:
    """Octets of fetched messages waiting to be stored, bounded (one message may always go)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._changed = trio.Condition()

    async def reserve(self, size: int) -> None:
        async with self._changed:
            while self.used and self.used + size > self.limit:
                await self._changed.wait()
            self.used += size

    async def release(self, size: int) -> None:
        async with self._changed:
            self.used -= size
            self._changed.notify_all()


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def recover(mailbox: Mailbox, state: UserState) -> tuple[int, int]:
    """Resolve ``fetching`` rows a crash left behind; drop files of ``deleted`` rows.

    Returns (claimed, dropped). Runs with the mailbox lock held and no sync in progress.
    """
    claimed = dropped = 0
    if hasattr(mailbox, "clean_tmp"):
        mailbox.clean_tmp()
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
    vanished: str = "keep",
    max_filtered_size: int = MAX_FILTERED_SIZE,
    hold: Callable[[bytes, str, FilterResult], str] | None = None,
    removed_dir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    quit: bool = True,
) -> SyncResult:
    """One pass over a logged-in upstream session. Ends with QUIT unless ``quit`` is False."""
    if policy not in POLICIES:
        raise ValueError(f"unknown deletion policy {policy!r}")
    if vanished not in VANISHED:
        raise ValueError(f"unknown vanished policy {vanished!r}")
    result = SyncResult()
    ids = await upstream_ids(client)
    rows = {row.uid: row for row in await trio.to_thread.run_sync(state.rows)}
    present = set(ids.values())

    # Known messages that vanished upstream (another client, the provider's expiry).
    newly_gone = [uid for uid, row in rows.items() if row.upstream and uid not in present]
    if newly_gone:
        await trio.to_thread.run_sync(state.upstream_gone, newly_gone)

    # Rows whose UIDL the provider no longer lists, by the digest of the message as it was received
    # (rows from before that digest was kept: by the digest of the cached copy, equal when no filter
    # changed the message): a new UIDL whose message has one of these digests is that message again.
    orphans: dict[str, list[str]] = {}
    for uid, row in rows.items():
        if uid not in present and row.status in ("cached", "held", "deleted"):
            mark = row.source or row.digest
            if mark:
                orphans.setdefault(mark, []).append(uid)
    adopted: list[tuple[int, str, str]] = []

    to_delete: list[tuple[int, str]] = []
    now = time.time()
    for number, uid in sorted(ids.items()):
        row = rows.get(uid)
        if row is None:
            continue
        if row.status == "deleted" and policy in ("mirror", "after_fetch"):
            # after_fetch too: a message the client deleted before its post-fetch QUIT went through
            # (or cached under another policy) must not stay at the provider for ever.
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

    # Messages the provider refused (-ERR to RETR) are skipped, and asked for again with back-off.
    raw = await trio.to_thread.run_sync(state.get_meta, REFUSED)
    try:
        refused: dict[str, dict] = json.loads(raw) if raw else {}
    except ValueError:
        refused = {}
    refused = {uid: entry for uid, entry in refused.items() if uid in present and uid not in rows}
    new = [(number, uid) for number, uid in sorted(ids.items())
           if uid not in rows and refused.get(uid, {}).get("next", 0) <= now]
    result.remaining = len(new)
    deleted_uids: list[str] = []
    for number, uid in to_delete:
        await client.dele(number)
        deleted_uids.append(uid)

    # Fetching (network) and storing (disk, fsync) overlap: while one message is written and fsync'ed in
    # a worker thread, the next ones are already being fetched and filtered. What waits in between is
    # bounded by count and by octets (a message bigger than max_filtered_size waits on disk, not here).
    stored: list[tuple[int, str]] = []
    send, receive = trio.open_memory_channel[_Item](PIPELINE_DEPTH)
    waiting = _Window(QUEUED_BYTES)
    unfiltered_mark = (format_header(WARNING_HEADER, f"not filtered: larger than {max_filtered_size} octets")
                       if pipeline.filters else b"")

    # The sizes the provider announces: a message announced bigger than max_filtered_size is spooled to
    # disk from its first octet (an announced size is only a hint: the limit holds whatever comes).
    sizes = await client.list() if new else {}

    def refuse(uid: str, exc: Exception) -> None:
        entry = refused.get(uid, {})
        tries = int(entry.get("tries", 0)) + 1
        delay = min(RETRY_FIRST * 2 ** (tries - 1), RETRY_MAX)
        refused[uid] = {"tries": tries, "next": time.time() + delay, "reason": str(exc)}
        result.remaining -= 1
        log.warning("provider refused message %s of %r (try %d), skipped; retried in %g s: %s",
                    uid, user, tries, delay, exc)

    async def take(number: int, uid: str, message: bytes | Spooled, source: str) -> None:
        """A message received whole: known under an old UIDL, too big to filter, or filtered now."""
        refused.pop(uid, None)
        if orphans.get(source):
            row = await trio.to_thread.run_sync(state.adopt, orphans[source].pop(0), uid)
            if row is not None:
                adopted.append((number, uid, row.status))
                result.remaining -= 1
                if isinstance(message, Spooled):
                    await trio.to_thread.run_sync(_unlink, message.path)
                return
        if isinstance(message, Spooled):
            log.warning("message %s of %r (%d octets) stored unfiltered: larger than "
                        "sync.max_filtered_size (%d)", uid, user, message.size, max_filtered_size)
            await send.send(_Item(number, uid, source, spooled=message))
            return
        context = FilterContext(user=user, uid=uid, removed_dir=removed_dir)
        outcome = await pipeline.run(message, context)
        del message
        cached = normalise(outcome.data)
        await waiting.reserve(len(cached))
        await send.send(_Item(number, uid, source, outcome=outcome, cached=cached))

    async def fetch() -> None:
        """RETR the new messages, pipelined when the provider allows it: each goes into memory, or into
        a spool file once past max_filtered_size (from its first octet when LIST announced more)."""
        todo: dict[int, str] = {}
        seen: set[str] = set()
        for number, uid in new:
            if uid not in seen:  # two upstream messages with one id (header digests of twins)
                seen.add(uid)
                todo[number] = uid
        receiving: dict[str, tuple[int, Spool]] = {}

        def begin(number: int, index: int):
            spool = Spool(mailbox.spool_path(), max_filtered_size, unfiltered_mark, sizes.get(number, 0))
            receiving["now"] = (number, spool)

            async def sink(chunk: bytes) -> None:
                if spool.add(chunk):
                    await trio.to_thread.run_sync(spool.flush)

            return sink

        async def end(number: int, error: Exception | None) -> None:
            if error is not None:
                refuse(todo[number], error)
                return
            _, spool = receiving.pop("now")
            message = await trio.to_thread.run_sync(spool.finish) if spool.spilled else spool.finish()
            await take(number, todo[number], message, spool.source.hexdigest())

        async with send:
            try:
                await client.retr_many(list(todo), begin, end, sizes=sizes)
            except UpstreamTooLarge as exc:
                if "now" in receiving:  # the session is out of step; later passes skip this message
                    refuse(todo[receiving["now"][0]], exc)
                raise
            finally:
                if "now" in receiving:  # a fragment: thrown away
                    with trio.CancelScope(shield=True):
                        await trio.to_thread.run_sync(receiving.pop("now")[1].discard)

    async def keep() -> None:
        async with receive:
            while True:
                try:
                    batch = [await receive.receive()]
                except trio.EndOfChannel:
                    return
                while len(batch) < STORE_BATCH:  # whatever else is ready goes into the same flush
                    try:
                        batch.append(receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break

                def store() -> list[_Item]:
                    """Claim, write, settle, for the whole batch in one worker-thread hop: one flush to
                    disk for all the messages. If this fails (or the process dies) between claim and
                    settle, claims stay 'fetching' and recover() settles them."""
                    granted = state.begin_fetch_many([(item.uid, item.digest) for item in batch],
                                                     [item.source for item in batch])
                    mine = [item for item, ok in zip(batch, granted) if ok]
                    for item, ok in zip(batch, granted):
                        if not ok and item.spooled is not None:
                            _unlink(item.spooled.path)
                    settled = []
                    small = []
                    for item in mine:
                        if item.outcome is not None and item.outcome.hold and hold is not None:
                            item.held = True
                            settled.append((item.uid, hold(item.cached, item.uid, item.outcome), item.size, "held"))
                        elif item.outcome is not None:
                            small.append(item)
                    infos = mailbox.add_many([item.cached for item in small])
                    settled += [(item.uid, info.key, info.size, "cached") for item, info in zip(small, infos)]
                    for item in mine:
                        if item.spooled is not None:
                            info = mailbox.add_file(item.spooled.path, item.spooled.size)
                            settled.append((item.uid, info.key, info.size, "cached"))
                    state.finish_fetch_many(settled)
                    return mine

                try:
                    mine = await trio.to_thread.run_sync(store)
                finally:
                    await waiting.release(sum(len(item.cached) for item in batch if item.cached is not None))
                for item in mine:
                    stored.append((item.number, item.uid))
                    if item.held:
                        result.held += 1
                    result.fetched += 1
                    result.fetched_bytes += item.size
                    metrics.synced(1, item.size)
                    result.remaining -= 1
                if progress is not None:
                    progress(len(stored), len(new))

    if progress is not None:
        progress(0, len(new))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetch)
            nursery.start_soon(keep)
    except BaseException as exc:
        # Callers handle UpstreamError, OSError and StateError: hand them the first real error, not a
        # group of the fetcher's and the keeper's (whichever trio version groups them).
        first = _first_error(exc)
        if first is exc:
            raise
        raise first from None
    finally:
        result.refused = len(refused)
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(state.set_meta, REFUSED, json.dumps(refused))

    if adopted:
        result.adopted = len(adopted)
        log.warning("%d new UIDLs of %r are messages already known under UIDLs the provider no longer lists "
                    "(a mailbox re-created at the provider?): kept once", len(adopted), user)
    for number, uid, status in adopted:  # the deletion policy applies to them as to any known message
        if (status == "deleted" and policy in ("mirror", "after_fetch")) or policy == "after_fetch":
            await client.dele(number)
            deleted_uids.append(uid)

    if policy == "after_fetch":  # each of these is cached and fsync'ed by now
        for number, uid in stored:
            await client.dele(number)
            deleted_uids.append(uid)

    if vanished == "drop":
        gone = [row for row in await trio.to_thread.run_sync(state.rows)
                if row.uid not in present and row.status == "cached" and row.key]
        if gone:
            # The files first: a crash in between leaves rows without files, which the next pass drops.
            await trio.to_thread.run_sync(mailbox.delete, [row.key for row in gone])
            await trio.to_thread.run_sync(state.drop_rows, [row.uid for row in gone])
            result.dropped = len(gone)
            log.info("dropped %d cached messages of %r that the provider no longer lists", len(gone), user)

    if quit:
        if deleted_uids:
            # What the deletions rely on must be on disk before the provider acts on them.
            await trio.to_thread.run_sync(state.sync_to_disk)
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
