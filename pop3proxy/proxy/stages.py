"""The stages between receiving a message from the provider and storing it: filtering (several messages
at once, while later ones keep arriving), putting them back in provider order, and storing a batch.

What waits anywhere between receiving and storing (being filtered, filtered and waiting to be stored) is
bounded by count and by octets (`Window`). The store stage is the only one that touches the state
database; a crash before it leaves nothing to undo, a crash inside it leaves claims that `recover`
settles.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from pop3proxy.filtering.api import FilterContext, FilterResult
from pop3proxy.filtering.pipeline import Pipeline
from pop3proxy.store.api import AccountState
from pop3proxy.store.base import Mailbox
from pop3proxy.store.crlf import normalise
from pop3proxy.store.spool import Spooled


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


@dataclass
class Item:
    """A fetched message on its way to the cache: filtered in memory, or spooled to a file."""

    number: int
    uid: str
    source: str  # digest of the message as the provider sent it
    outcome: FilterResult | None = None
    cached: bytes | None = None  # the filtered message in CRLF form
    spooled: Spooled | None = None
    held: bool = False
    reserved: int = 0  # octets it holds in the window
    ready: trio.Event = field(default_factory=trio.Event)  # set once filtered (or nothing to filter)

    @property
    def size(self) -> int:
        return self.spooled.size if self.spooled is not None else len(self.cached or b"")

    @property
    def digest(self) -> str:
        return self.spooled.cached if self.spooled is not None else digest(self.cached or b"")


class Window:
    """Messages received and not yet stored, bounded by octets (one message may always go) and by count."""

    def __init__(self, limit: int, count: float = math.inf) -> None:
        self.limit = limit
        self.count_limit = count
        self.used = 0
        self.count = 0
        self._changed = trio.Condition()

    async def reserve(self, size: int, items: int = 1) -> None:
        async with self._changed:
            while ((self.used and self.used + size > self.limit)
                   or (self.count and self.count + items > self.count_limit)):
                await self._changed.wait()
            self.used += size
            self.count += items

    def resize(self, old: int, new: int) -> None:
        """A message reserved at one size is now another (filtered); it never waits for that."""
        self.used += new - old

    async def release(self, size: int, items: int = 1) -> None:
        async with self._changed:
            self.used -= size
            self.count = max(0, self.count - items)
            self._changed.notify_all()


class FilterStage:
    """Filters received messages, up to the pipeline's parallelism at once, and hands them on in the order
    they were received."""

    def __init__(self, pipeline: Pipeline, window: Window, user: str, removed_dir: Path | None,
                 depth: int) -> None:
        self.pipeline = pipeline
        self.window = window
        self.user = user
        self.removed_dir = removed_dir
        self.limiter = trio.CapacityLimiter(max(1, pipeline.parallelism))
        self.send, self.receive = trio.open_memory_channel[Item](depth)

    async def add(self, nursery: trio.Nursery, item: Item, message: bytes | None) -> None:
        """Queue a received message (None: spooled, nothing to filter); waits while the window is full."""
        size = len(message) if message is not None else 0
        await self.window.reserve(size)
        item.reserved = size
        if message is None:
            item.ready.set()
        elif not self.pipeline:
            self._done(item, FilterResult(message))
        else:
            nursery.start_soon(self._filter, item, message)
        await self.send.send(item)

    def _done(self, item: Item, outcome: FilterResult) -> None:
        item.outcome = outcome
        item.cached = normalise(outcome.data)
        self.window.resize(item.reserved, len(item.cached))
        item.reserved = len(item.cached)
        item.ready.set()

    async def _filter(self, item: Item, message: bytes) -> None:
        context = FilterContext(user=self.user, uid=item.uid, removed_dir=self.removed_dir)
        async with self.limiter:  # FIFO: the oldest messages are filtered first
            outcome = await self.pipeline.run(message, context)
        del message
        self._done(item, outcome)

    async def in_order(self, out: trio.MemorySendChannel[Item]) -> None:
        """Each message once it is filtered, in the order received, until the input is closed."""
        async with self.receive, out:
            async for item in self.receive:
                await item.ready.wait()
                await out.send(item)


def store_batch(state: AccountState, mailbox: Mailbox, hold: Callable[[bytes, str, FilterResult], str] | None,
                batch: list[Item]) -> list[Item]:
    """Claim, write, settle, for the whole batch in one worker-thread hop: one flush to disk for all the
    messages. If this fails (or the process dies) between claim and settle, claims stay 'fetching' and
    recover() settles them. Returns the items this call stored (another claim wins over a duplicate)."""
    granted = state.begin_fetch_many([(item.uid, item.digest) for item in batch], [item.source for item in batch])
    mine = [item for item, ok in zip(batch, granted, strict=True) if ok]
    for item, ok in zip(batch, granted, strict=True):
        if not ok and item.spooled is not None:
            unlink(item.spooled.path)
    settled = []
    small: list[Item] = []
    datas: list[bytes] = []
    for item in mine:
        if item.outcome is None or item.cached is None:  # spooled: stored below (both are set together)
            continue
        if item.outcome.hold and hold is not None:
            item.held = True
            settled.append((item.uid, hold(item.cached, item.uid, item.outcome), item.size, "held"))
        else:
            small.append(item)
            datas.append(item.cached)
    infos = mailbox.add_many(datas)
    settled += [(item.uid, info.key, info.size, "cached") for item, info in zip(small, infos, strict=True)]
    for item in mine:
        if item.spooled is not None:
            info = mailbox.add_file(item.spooled.path, item.spooled.size, item.spooled.dot_lines)
            settled.append((item.uid, info.key, info.size, "cached"))
    state.finish_fetch_many(settled)
    return mine
