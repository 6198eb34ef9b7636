"""What a sync pass deletes: a pure decision over the provider's listing and the state rows.

No I/O here: `plan_deletions` takes the listing, the rows, the policies and the time, and returns a
`DeletionPlan`; `sync.sync_mailbox` carries it out. The rules:

- Only a message whose row says the cache has it (``cached``, ``held``) or the client deleted it
  (``deleted``) is ever deleted at the provider; a new message (no row) or one being fetched is not.
- ``mirror``: what the client deleted. ``after_fetch``: what is cached or held, and what the client
  deleted. ``never``: nothing. ``delete_after_days`` (any policy): what has been cached or held that long.
- Rows the provider no longer lists are marked gone from upstream, never deleted there again; with
  ``vanished = "drop"`` their cached copies are dropped from the cache.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pop3proxy.store.state import Row

POLICIES = ("mirror", "after_fetch", "never")
VANISHED = ("keep", "drop")
DAY = 86400.0


@dataclass(frozen=True)
class DeletionPlan:
    policy: str
    upstream: tuple[tuple[int, str], ...] = ()  # (message number, uid) of known messages to DELE now
    gone: tuple[str, ...] = ()  # uids the provider no longer lists: no longer upstream
    drop: frozenset[str] = frozenset()  # uids whose cached copies go (vanished = "drop")

    @property
    def delete_fetched(self) -> bool:
        """Whether what this pass stores (cached and fsync'ed) is deleted at the provider too."""
        return self.policy == "after_fetch"

    def delete_adopted(self, status: str) -> bool:
        """Whether a message found again under a new UIDL, whose row has this status, is deleted."""
        return self.policy == "after_fetch" or (status == "deleted" and self.policy == "mirror")


def check_policies(policy: str, vanished: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"unknown deletion policy {policy!r}")
    if vanished not in VANISHED:
        raise ValueError(f"unknown vanished policy {vanished!r}")


def plan_deletions(
    listing: Mapping[int, str],
    rows: Mapping[str, Row],
    *,
    policy: str,
    now: float,
    delete_after_days: float | None = None,
    vanished: str = "keep",
) -> DeletionPlan:
    """The deletions of one pass: ``listing`` is message number → uid as the provider lists them now,
    ``rows`` the state rows by uid, ``now`` the time (seconds since the epoch)."""
    check_policies(policy, vanished)
    present = set(listing.values())
    upstream = tuple(
        (number, uid)
        for number, uid in sorted(listing.items())
        if uid in rows and _delete_listed(rows[uid], policy, delete_after_days, now)
    )
    gone = tuple(uid for uid, row in rows.items() if row.upstream and uid not in present)
    drop = frozenset(vanished_rows(rows.values(), present)) if vanished == "drop" else frozenset()
    return DeletionPlan(policy, upstream, gone, drop)


def vanished_rows(rows: Iterable[Row], present: set[str]) -> list[str]:
    """The uids of cached messages (with a cached copy) that the provider no longer lists."""
    return [row.uid for row in rows if row.uid not in present and row.status == "cached" and row.key]


def _delete_listed(row: Row, policy: str, delete_after_days: float | None, now: float) -> bool:
    if row.status == "deleted" and policy in ("mirror", "after_fetch"):
        # after_fetch too: a message the client deleted before its post-fetch QUIT went through (or
        # cached under another policy) must not stay at the provider for ever.
        return True
    if row.status not in ("cached", "held"):
        return False
    if policy == "after_fetch":
        return True
    if delete_after_days is None or row.fetched_at is None:
        return False
    return now - row.fetched_at >= delete_after_days * DAY
