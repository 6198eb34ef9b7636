"""Upstream → filters → cache, and carrying out the deletions `deletion.plan_deletions` decides.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from pop3proxy.filtering.api import WARNING_HEADER, FilterResult
from pop3proxy.filtering.headers import format_header
from pop3proxy.filtering.pipeline import Pipeline
from pop3proxy.net.endpoint import UpstreamTooLarge
from pop3proxy.net.pop3_client import UpstreamClient
from pop3proxy.ops import metrics
from pop3proxy.proxy.deletion import DeletionPlan, check_policies, plan_deletions
from pop3proxy.proxy.stages import FilterStage, Item, digest, store_batch  # noqa: F401  (digest: re-exported)
from pop3proxy.proxy.stages import Window as _Window
from pop3proxy.proxy.stages import unlink as _unlink
from pop3proxy.store.api import AccountState
from pop3proxy.store.base import Mailbox
from pop3proxy.store.spool import Spool, Spooled
from pop3proxy.store.state import Row

log = logging.getLogger("pop3proxy.proxy.sync")

PIPELINE_DEPTH = 64  # fetched messages waiting to be filtered or stored
QUEUED_BYTES = 64 << 20  # octets of fetched messages waiting to be filtered or stored
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


def recover(mailbox: Mailbox, state: AccountState) -> tuple[int, int]:
    """Resolve ``fetching`` rows a crash left behind; drop files of ``deleted`` rows.

    Returns (claimed, dropped). Runs with the mailbox lock held and no sync in progress.
    """
    claimed = dropped = 0
    if hasattr(mailbox, "clean_tmp"):
        mailbox.clean_tmp()
    pending, deleted, cached = state.recovery_view()  # one read (nobody else writes: the lock is held)
    infos = mailbox.list()
    present = {info.key for info in infos}
    hidden = [key for key in deleted if key in present]
    if hidden:
        mailbox.delete(hidden)
    # Cached messages whose files vanished (a hand-edited cache): fetch them again while the provider
    # still has them.
    vanished = [key for key in cached if key not in present]
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


@dataclass
class _Listing:
    """What the provider lists and what the state knows, at the start of a pass."""

    ids: dict[int, str]  # message number -> uid
    rows: dict[str, Row]

    @property
    def present(self) -> set[str]:
        return set(self.ids.values())

    def new(self, refused: dict[str, dict], now: float) -> list[tuple[int, str]]:
        """Messages without a row, but for those the provider refused that are not due again yet."""
        return [(number, uid) for number, uid in sorted(self.ids.items())
                if uid not in self.rows and refused.get(uid, {}).get("next", 0) <= now]

    def orphans(self) -> dict[str, list[str]]:
        """Rows whose UIDL the provider no longer lists, by the digest of the message as it was received
        (rows from before that digest was kept: by the digest of the cached copy, equal when no filter
        changed the message): a new UIDL whose message has one of these digests is that message again."""
        orphans: dict[str, list[str]] = {}
        present = self.present
        for uid, row in self.rows.items():
            if uid not in present and row.status in ("cached", "held", "deleted"):
                mark = row.source or row.digest
                if mark:
                    orphans.setdefault(mark, []).append(uid)
        return orphans


@dataclass
class StateView:
    """What a pass reads from the state before it asks the provider: every row, and the messages the
    provider refused. Read with the account held (nobody else writes it), in the worker-thread hop that
    opens the state (`read_view`), or by the pass itself."""

    rows: dict[str, Row]
    refused: str | None


def read_view(state: AccountState) -> StateView:
    return StateView({row.uid: row for row in state.rows()}, state.get_meta(REFUSED))


def _load_refused(view: StateView, listing: _Listing) -> tuple[dict[str, dict], str]:
    """Messages the provider refused (-ERR to RETR), still listed and still unknown: uid -> {"tries",
    "next", "reason"}. They are skipped, and asked for again with back-off. And the setting as stored
    ("{}" for none): the pass writes it back only when it changes."""
    raw = view.refused
    try:
        refused: dict[str, dict] = json.loads(raw) if raw else {}
    except ValueError:
        refused = {}
    present = listing.present
    return ({uid: entry for uid, entry in refused.items() if uid in present and uid not in listing.rows},
            raw or "{}")


async def sync_mailbox(
    client: UpstreamClient,
    mailbox: Mailbox,
    state: AccountState,
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
    view: StateView | None = None,
) -> SyncResult:
    """One pass over a logged-in upstream session. Ends with QUIT unless ``quit`` is False. ``view``: the
    state as read when it was opened (read here when not given)."""
    check_policies(policy, vanished)
    result = SyncResult()
    if view is None:
        view = await trio.to_thread.run_sync(read_view, state)
    listing = _Listing(await upstream_ids(client), view.rows)
    now = time.time()
    plan = plan_deletions(listing.ids, listing.rows, policy=policy, now=now,
                          delete_after_days=delete_after_days, vanished=vanished)
    if plan.gone:  # known messages that vanished upstream (another client, the provider's expiry)
        await trio.to_thread.run_sync(state.upstream_gone, list(plan.gone))
    refused, refused_stored = _load_refused(view, listing)
    new = listing.new(refused, now)
    result.remaining = len(new)
    deleted_uids: list[str] = []
    for number, uid in plan.upstream:
        await client.dele(number)
        deleted_uids.append(uid)

    # The sizes the provider announces: a message announced bigger than max_filtered_size is spooled to
    # disk from its first octet (an announced size is only a hint: the limit holds whatever comes).
    sizes = await client.list() if new else {}
    fetcher = _Fetcher(client, mailbox, state, result, user=user, pipeline=pipeline, new=new, sizes=sizes,
                       refused=refused, refused_stored=refused_stored, orphans=listing.orphans(),
                       max_filtered_size=max_filtered_size, hold=hold, removed_dir=removed_dir, progress=progress)
    await fetcher.run()
    deleted_uids += await _delete_after_fetch(client, plan, fetcher, result, user)
    await _drop_vanished(mailbox, state, plan, result, user)
    if quit:
        await _quit(client, state, deleted_uids, result)
    return result


class _Fetcher:
    """The new messages of one pass, from the provider to the cache. Fetching (network), filtering
    (threads, pool processes) and storing (disk, fsync) overlap: while messages are filtered, later ones
    keep arriving, and while a batch is written and fsync'ed, the next ones are filtered. They are stored
    in provider order. What waits between receiving and storing is bounded by count and by octets (a
    message bigger than max_filtered_size waits on disk, not here)."""

    def __init__(self, client: UpstreamClient, mailbox: Mailbox, state: AccountState, result: SyncResult, *,
                 user: str, pipeline: Pipeline, new: list[tuple[int, str]], sizes: dict[int, int],
                 refused: dict[str, dict], refused_stored: str, orphans: dict[str, list[str]],
                 max_filtered_size: int, hold: Callable[[bytes, str, FilterResult], str] | None,
                 removed_dir: Path | None, progress: Callable[[int, int], None] | None) -> None:
        self.client, self.mailbox, self.state, self.result = client, mailbox, state, result
        self.user, self.new, self.sizes = user, new, sizes
        self.refused, self.refused_stored, self.orphans = refused, refused_stored, orphans
        self.max_filtered_size, self.hold, self.progress = max_filtered_size, hold, progress
        self.adopted: list[tuple[int, str, str]] = []  # (number, new uid, status of the row adopted)
        self.stored: list[tuple[int, str]] = []
        self.send, self.receive = trio.open_memory_channel[Item](STORE_BATCH)
        self.waiting = _Window(QUEUED_BYTES, PIPELINE_DEPTH)
        self.filtering = FilterStage(pipeline, self.waiting, user, removed_dir, PIPELINE_DEPTH)
        self.unfiltered_mark = (format_header(WARNING_HEADER, f"not filtered: larger than {max_filtered_size} octets")
                                if pipeline.filters else b"")
        self.todo: dict[int, str] = {}
        self.receiving: tuple[int, Spool] | None = None  # the message being received
        self.nursery: trio.Nursery | None = None

    async def run(self) -> None:
        if self.progress is not None:
            self.progress(0, len(self.new))
        try:
            if self.new:  # most logins find no new mail: no stages to start
                async with trio.open_nursery() as nursery:
                    self.nursery = nursery
                    nursery.start_soon(self.fetch)
                    nursery.start_soon(self.filtering.in_order, self.send)
                    nursery.start_soon(self.keep)
        except BaseException as exc:
            # Callers handle UpstreamError, OSError and StateError: hand them the first real error, not a
            # group of the fetcher's and the keeper's (whichever trio version groups them).
            first = _first_error(exc)
            if first is exc:
                raise
            raise first from None
        finally:
            self.result.refused = len(self.refused)
            refused = json.dumps(self.refused)
            if refused != self.refused_stored:  # most passes refuse nothing, as the last one: no write
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self.state.set_meta, REFUSED, refused)

    def refuse(self, uid: str, exc: Exception) -> None:
        entry = self.refused.get(uid, {})
        tries = int(entry.get("tries", 0)) + 1
        delay = min(RETRY_FIRST * 2 ** (tries - 1), RETRY_MAX)
        self.refused[uid] = {"tries": tries, "next": time.time() + delay, "reason": str(exc)}
        self.result.remaining -= 1
        log.warning("provider refused message %s of %r (try %d), skipped; retried in %g s: %s",
                    uid, self.user, tries, delay, exc)

    async def fetch(self) -> None:
        """RETR the new messages, pipelined when the provider allows it: each goes into memory, or into
        a spool file once past max_filtered_size (from its first octet when LIST announced more)."""
        seen: set[str] = set()
        for number, uid in self.new:
            if uid not in seen:  # two upstream messages with one id (header digests of twins)
                seen.add(uid)
                self.todo[number] = uid
        async with self.filtering.send:
            try:
                await self.client.retr_many(list(self.todo), self.begin, self.end, sizes=self.sizes)
            except UpstreamTooLarge as exc:
                if self.receiving is not None:  # the session is out of step; later passes skip this message
                    self.refuse(self.todo[self.receiving[0]], exc)
                raise
            finally:
                if self.receiving is not None:  # a fragment: thrown away
                    spool, self.receiving = self.receiving[1], None
                    with trio.CancelScope(shield=True):
                        await trio.to_thread.run_sync(spool.discard)

    def begin(self, number: int, index: int):
        spool = Spool(self.mailbox.spool_path(), self.max_filtered_size, self.unfiltered_mark,
                      self.sizes.get(number, 0))
        self.receiving = (number, spool)

        async def sink(chunk: bytes) -> None:
            if spool.add(chunk):
                await trio.to_thread.run_sync(spool.flush)

        return sink

    async def end(self, number: int, error: Exception | None) -> None:
        if error is not None:
            self.refuse(self.todo[number], error)
            return
        assert self.receiving is not None
        spool, self.receiving = self.receiving[1], None
        message = await trio.to_thread.run_sync(spool.finish) if spool.spilled else spool.finish()
        await self.take(number, self.todo[number], message, spool.source.hexdigest())

    async def take(self, number: int, uid: str, message: bytes | Spooled, source: str) -> None:
        """A message received whole: known under an old UIDL, too big to filter, or to be filtered."""
        assert self.nursery is not None
        self.refused.pop(uid, None)
        if self.orphans.get(source):
            row = await trio.to_thread.run_sync(self.state.adopt, self.orphans[source].pop(0), uid)
            if row is not None:
                self.adopted.append((number, uid, row.status))
                self.result.remaining -= 1
                if isinstance(message, Spooled):
                    await trio.to_thread.run_sync(_unlink, message.path)
                return
        if isinstance(message, Spooled):
            log.warning("message %s of %r (%d octets) stored unfiltered: larger than "
                        "sync.max_filtered_size (%d)", uid, self.user, message.size, self.max_filtered_size)
            await self.filtering.add(self.nursery, Item(number, uid, source, spooled=message), None)
            return
        await self.filtering.add(self.nursery, Item(number, uid, source), message)

    async def keep(self) -> None:
        """Store the filtered messages in provider order, a batch per flush."""
        async with self.receive:
            while True:
                try:
                    batch = [await self.receive.receive()]
                except trio.EndOfChannel:
                    return
                while len(batch) < STORE_BATCH:  # whatever else is ready goes into the same flush
                    try:
                        batch.append(self.receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                try:
                    mine = await trio.to_thread.run_sync(store_batch, self.state, self.mailbox, self.hold, batch)
                finally:
                    await self.waiting.release(sum(item.reserved for item in batch), len(batch))
                self.stored_batch(mine)

    def stored_batch(self, mine: list[Item]) -> None:
        for item in mine:
            self.stored.append((item.number, item.uid))
            if item.held:
                self.result.held += 1
            self.result.fetched += 1
            self.result.fetched_bytes += item.size
            metrics.synced(1, item.size)
            self.result.remaining -= 1
        if self.progress is not None:
            self.progress(len(self.stored), len(self.new))


async def _delete_after_fetch(client: UpstreamClient, plan: DeletionPlan, fetcher: _Fetcher, result: SyncResult,
                              user: str) -> list[str]:
    """DELE what the plan says of the messages this pass adopted and stored; returns their uids."""
    deleted: list[str] = []
    if fetcher.adopted:
        result.adopted = len(fetcher.adopted)
        log.warning("%d new UIDLs of %r are messages already known under UIDLs the provider no longer lists "
                    "(a mailbox re-created at the provider?): kept once", len(fetcher.adopted), user)
    for number, uid, status in fetcher.adopted:  # the deletion policy applies to them as to any known message
        if plan.delete_adopted(status):
            await client.dele(number)
            deleted.append(uid)
    if plan.delete_fetched:  # each of these is cached and fsync'ed by now
        for number, uid in fetcher.stored:
            await client.dele(number)
            deleted.append(uid)
    return deleted


async def _drop_vanished(mailbox: Mailbox, state: AccountState, plan: DeletionPlan, result: SyncResult,
                         user: str) -> None:
    """Drop the cached copies of messages the provider no longer lists (vanished = "drop")."""
    if not plan.drop:
        return
    gone = [row for row in await trio.to_thread.run_sync(state.rows)
            if row.uid in plan.drop and row.status == "cached" and row.key]
    if gone:
        # The files first: a crash in between leaves rows without files, which the next pass drops.
        await trio.to_thread.run_sync(mailbox.delete, [row.key for row in gone if row.key])
        await trio.to_thread.run_sync(state.drop_rows, [row.uid for row in gone])
        result.dropped = len(gone)
        log.info("dropped %d cached messages of %r that the provider no longer lists", len(gone), user)


async def _quit(client: UpstreamClient, state: AccountState, deleted_uids: list[str], result: SyncResult) -> None:
    if not deleted_uids:
        await client.quit(wait=False)  # nothing to apply: its reply is not waited for
        return
    # What the deletions rely on must be on disk before the provider acts on them.
    await trio.to_thread.run_sync(state.sync_to_disk)
    await client.quit()  # upstream deletions take effect only now
    await trio.to_thread.run_sync(state.upstream_gone, deleted_uids)
    result.deleted_upstream = len(deleted_uids)


async def delete_upstream(client: UpstreamClient, state: AccountState, uids: set[str]) -> int:
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
