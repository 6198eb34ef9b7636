"""The deletion plan of a sync pass: which provider messages go, under each policy, decided without I/O."""

from __future__ import annotations

import pytest

from pop3proxy.proxy.deletion import DAY, DeletionPlan, plan_deletions
from pop3proxy.store.state import Row

NOW = 1_800_000_000.0


def row(uid: str, status: str = "cached", *, key: str | None = "k", fetched_at: float | None = NOW,
        upstream: bool = True) -> Row:
    return Row(uid=uid, key=key if status in ("cached", "deleted") else None, status=status, digest="d",
               size=10, fetched_at=fetched_at, upstream=upstream)


def rows(*items: Row) -> dict[str, Row]:
    return {item.uid: item for item in items}


def plan(listing, state, policy, **kw) -> DeletionPlan:
    return plan_deletions(listing, state, policy=policy, now=NOW, **kw)


STATE = rows(row("cached"), row("held", "held"), row("deleted", "deleted"), row("fetching", "fetching"))
LISTING = {1: "cached", 2: "held", 3: "deleted", 4: "fetching", 5: "new"}


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("mirror", [(3, "deleted")]),
        ("after_fetch", [(1, "cached"), (2, "held"), (3, "deleted")]),
        ("never", []),
    ],
)
def test_each_policy_deletes_only_what_the_cache_has_or_the_client_deleted(policy, expected):
    result = plan(LISTING, STATE, policy)
    assert list(result.upstream) == expected
    # Never what is not durably cached: a message being fetched, or one without a row.
    assert not {uid for _, uid in result.upstream} & {"fetching", "new"}


def test_what_this_pass_stores_is_deleted_only_after_fetch():
    assert plan(LISTING, STATE, "after_fetch").delete_fetched
    assert not plan(LISTING, STATE, "mirror").delete_fetched
    assert not plan(LISTING, STATE, "never").delete_fetched


@pytest.mark.parametrize(
    ("policy", "status", "expected"),
    [
        ("mirror", "deleted", True),
        ("mirror", "cached", False),
        ("mirror", "held", False),
        ("after_fetch", "deleted", True),
        ("after_fetch", "cached", True),
        ("after_fetch", "held", True),
        ("never", "deleted", False),
        ("never", "cached", False),
    ],
)
def test_a_message_found_again_under_a_new_uidl_follows_the_policy(policy, status, expected):
    assert plan({}, {}, policy).delete_adopted(status) is expected


@pytest.mark.parametrize("policy", ["mirror", "never"])
def test_delete_after_days_expires_cached_and_held_messages(policy):
    old, young = NOW - 3 * DAY, NOW - 3 * DAY + 1
    state = rows(row("old", fetched_at=old), row("old-held", "held", fetched_at=old),
                 row("young", fetched_at=young), row("unknown-age", fetched_at=None),
                 row("old-fetching", "fetching", fetched_at=old))
    listing = {1: "old", 2: "old-held", 3: "young", 4: "unknown-age", 5: "old-fetching"}
    result = plan(listing, state, policy, delete_after_days=3)
    assert list(result.upstream) == [(1, "old"), (2, "old-held")]
    assert plan(listing, state, policy).upstream == ()


def test_a_fraction_of_a_day_counts():
    state = rows(row("a", fetched_at=NOW - DAY / 2))
    assert plan({1: "a"}, state, "never", delete_after_days=0.5).upstream == ((1, "a"),)
    assert plan({1: "a"}, state, "never", delete_after_days=0.6).upstream == ()


def test_messages_already_gone_upstream_are_not_deleted_again_but_marked_gone():
    state = rows(row("listed", "deleted"), row("gone", "deleted"), row("gone-cached"),
                 row("gone-before", "deleted", upstream=False))
    result = plan({7: "listed"}, state, "mirror")
    assert result.upstream == ((7, "listed"),)
    assert set(result.gone) == {"gone", "gone-cached"}  # not the row already marked gone


def test_message_numbers_are_taken_from_the_listing_in_order():
    state = rows(row("b", "deleted"), row("a", "deleted"))
    assert plan({9: "a", 2: "b"}, state, "mirror").upstream == ((2, "b"), (9, "a"))


@pytest.mark.parametrize("vanished", ["keep", "drop"])
def test_vanished_cached_copies_are_dropped_only_when_asked(vanished):
    state = rows(row("listed"), row("gone"), row("gone-held", "held"), row("gone-deleted", "deleted"),
                 row("gone-no-file", key=None))
    result = plan({1: "listed"}, state, "never", vanished=vanished)
    assert result.drop == ({"gone"} if vanished == "drop" else set())
    assert result.upstream == ()


def test_an_empty_listing_deletes_nothing():
    result = plan({}, STATE, "after_fetch", delete_after_days=0)
    assert result.upstream == ()
    assert set(result.gone) == {"cached", "held", "deleted", "fetching"}


@pytest.mark.parametrize(("policy", "vanished"), [("sometimes", "keep"), ("mirror", "forget")])
def test_an_unknown_policy_is_refused(policy, vanished):
    with pytest.raises(ValueError, match="unknown"):
        plan({}, {}, policy, vanished=vanished)
