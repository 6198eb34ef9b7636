"""The contract of `StateStore` and `AccountState` (pop3proxy/store/api.py), run against every engine:
``sqlite`` (`LocalStateStore`, one machine) and ``postgres`` (`PostgresStateStore`, a cluster; a real
PostgreSQL started for the test session, a new database for each test). What the sync and the sessions
rely on: claims granted once, settled rows, deletions and their undoing, the provider's vanished
messages, adoption, held messages, settings; accounts apart; and what one store object (one node) wrote
seen by another, also after the writing process was killed. To check another engine, add it to
helpers/state_engines.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.state_engines import ENGINES, Engine, engine_for

from pop3proxy.store.api import AccountState, StateError

ROOT = Path(__file__).resolve().parents[2]
WAIT = 30.0  # seconds: the bound of every wait for another process


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    yield from engine_for(request, tmp_path)


@pytest.fixture
def state(engine: Engine) -> AccountState:
    return engine.states().open("alice")


def by_uid(state: AccountState) -> dict[str, tuple]:
    """uid -> (key, status, digest, size, upstream, source) of every row."""
    return {row.uid: (row.key, row.status, row.digest, row.size, row.upstream, row.source) for row in state.rows()}


def settle(state: AccountState, uid: str, key: str, size: int = 100, status: str = "cached") -> None:
    assert state.begin_fetch(uid, f"digest-{uid}")
    state.finish_fetch(uid, key, size, status)


# -- accounts -------------------------------------------------------------------------------------------


def test_open_existing_finds_nothing_for_a_new_account_and_creates_nothing(engine):
    states = engine.states()
    assert states.open_existing("newcomer") is None
    assert states.open_existing("newcomer") is None  # asking created nothing
    assert engine.states().open_existing("newcomer") is None
    opened = states.open("newcomer")
    assert opened.rows() == [] and opened.get_meta("offline_hash") is None
    found = engine.states().open_existing("newcomer")
    assert found is not None and found.rows() == []
    assert states.open_existing("someone else") is None


def test_the_empty_account_name_is_refused(engine):
    states = engine.states()
    with pytest.raises(ValueError):
        states.open("")
    with pytest.raises(ValueError):
        states.open_existing("")


def test_two_accounts_never_see_each_others_rows(engine):
    states = engine.states()
    alice, bob = states.open("alice"), states.open("bob")
    settle(alice, "u1", "k1")
    assert bob.begin_fetch("u1", "bob's digest")  # the same uid is bob's own claim
    bob.finish_fetch("u1", "k1", 7)
    settle(alice, "u2", "k2")
    alice.set_meta("offline_hash", "alice's")
    bob.mark_deleted(["k1"])
    bob.upstream_gone(["u1"])
    assert by_uid(alice) == {"u1": ("k1", "cached", "digest-u1", 100, True, None),
                             "u2": ("k2", "cached", "digest-u2", 100, True, None)}
    assert by_uid(bob) == {"u1": ("k1", "deleted", "bob's digest", 7, False, None)}
    assert alice.hidden_keys() == set() and bob.hidden_keys() == {"k1"}
    assert alice.known_uids_among(["u1", "u2"]) == {"u1", "u2"} and bob.known_uids_among(["u2"]) == set()
    assert bob.get_meta("offline_hash") is None
    alice.drop_rows(["u1"])
    assert set(by_uid(bob)) == {"u1"}


def test_what_one_node_wrote_another_sees(engine):
    first = engine.states().open("alice")
    assert first.begin_fetch_many([("u1", "d1"), ("u2", "d2")], ["s1", None]) == [True, True]
    first.finish_fetch("u1", "k1", 10)
    first.set_meta("last_sync", "1700000000")
    second = engine.states().open_existing("alice")
    assert second is not None
    assert by_uid(second) == {"u1": ("k1", "cached", "d1", 10, True, "s1"),
                              "u2": (None, "fetching", "d2", None, True, None)}
    assert second.get_meta("last_sync") == "1700000000"
    assert not second.begin_fetch("u2", "d2 again")  # claimed by the first node
    assert second.begin_fetch_many([("u1", "x"), ("u3", "d3")]) == [False, True]
    assert not first.begin_fetch("u3", "d3")


# The other process: opens the engine's store, writes, says so, and waits to be killed.
WRITER = """
import sys
from helpers.state_engines import Engine
engine = Engine(sys.argv[1], sys.argv[2])
state = engine.states().open("alice")
assert state.begin_fetch_many([("u1", "d1"), ("u2", "d2")]) == [True, True]
state.finish_fetch("u1", "k1", 10)
state.mark_deleted(["k1"])
state.set_meta("offline_hash", "$scrypt$x")
print("written", flush=True)
sys.stdin.readline()
"""


def test_what_a_method_returned_having_written_survives_the_process_dying(engine):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, engine.name, engine.where], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"})
    try:
        stdout = proc.stdout
        assert stdout is not None
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(WAIT)
        assert line == ["written\n"], (line, proc.poll())
    finally:
        proc.kill()  # no close(), no clean exit
        proc.wait(WAIT)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()
    assert proc.returncode == -9
    state = engine.states().open_existing("alice")
    assert state is not None
    assert by_uid(state) == {"u1": ("k1", "deleted", "d1", 10, True, None),
                             "u2": (None, "fetching", "d2", None, True, None)}
    assert state.get_meta("offline_hash") == "$scrypt$x"


def test_a_closed_state_is_written_and_can_be_opened_again(engine):
    state = engine.states().open("alice")
    settle(state, "u1", "k1")
    state.sync_to_disk()
    assert state.close() is None
    again = engine.states().open("alice")
    assert set(by_uid(again)) == {"u1"}


def test_storage_that_cannot_be_reached_raises_state_error(engine, tmp_path):
    with pytest.raises(StateError):
        engine.unreachable(tmp_path / "unreachable", "alice").open("alice")


# -- claims --------------------------------------------------------------------------------------------


def test_begin_fetch_claims_a_uid_once(state):
    assert state.begin_fetch("u1", "d1")
    assert not state.begin_fetch("u1", "another digest")
    assert state.begin_fetch("u2", "d2")
    assert by_uid(state) == {"u1": (None, "fetching", "d1", None, True, None),
                             "u2": (None, "fetching", "d2", None, True, None)}
    state.finish_fetch("u1", "k1", 10)
    assert not state.begin_fetch("u1", "d1")  # a settled row is never claimed again


def test_begin_fetch_many_grants_each_uid_once(state):
    assert state.begin_fetch("taken", "d0")
    claims = [("u1", "d1"), ("taken", "dx"), ("u2", "d2"), ("u1", "d1 again")]
    assert state.begin_fetch_many(claims, ["s1", "sx", None, "s1 again"]) == [True, False, True, False]
    assert by_uid(state) == {"taken": (None, "fetching", "d0", None, True, None),
                             "u1": (None, "fetching", "d1", None, True, "s1"),
                             "u2": (None, "fetching", "d2", None, True, None)}
    assert state.begin_fetch_many([]) == []
    assert state.begin_fetch_many([("u1", "d1"), ("u3", "d3")]) == [False, True]  # without sources


def test_finish_fetch_settles_rows_as_cached_or_held(state):
    assert state.begin_fetch_many([("u1", "d1"), ("u2", "d2"), ("u3", "d3")]) == [True, True, True]
    state.finish_fetch("u1", "k1", 11)
    state.finish_fetch_many([("u2", "k2", 22, "cached"), ("u3", "h3", 33, "held")])
    state.finish_fetch("nobody", "k9", 99)  # no row: nothing happens
    assert by_uid(state) == {"u1": ("k1", "cached", "d1", 11, True, None),
                             "u2": ("k2", "cached", "d2", 22, True, None),
                             "u3": ("h3", "held", "d3", 33, True, None)}
    assert all(row.fetched_at is not None and row.fetched_at > 0 for row in state.rows())
    assert state.fetching() == []
    assert state.cached_keys() == {"k1", "k2"}


def test_fetching_lists_the_claims_in_flight_with_their_digests(state):
    assert state.begin_fetch_many([("u1", "d1"), ("u2", "d2")]) == [True, True]
    settle(state, "u3", "k3")
    assert {(row.uid, row.status, row.digest, row.key) for row in state.fetching()} == {
        ("u1", "fetching", "d1", None), ("u2", "fetching", "d2", None)}


def test_abandon_fetch_drops_only_a_claim(state):
    assert state.begin_fetch("u1", "d1")
    settle(state, "u2", "k2")
    state.abandon_fetch("u1")
    state.abandon_fetch("u2")  # settled: kept
    state.abandon_fetch("nobody")
    assert set(by_uid(state)) == {"u2"}
    assert state.begin_fetch("u1", "d1 again")  # claimable again


# -- reading -------------------------------------------------------------------------------------------


def test_recovery_view_is_what_the_three_reads_of_recover_return(state):
    settle(state, "u1", "k1")
    settle(state, "u2", "k2")
    settle(state, "u3", "k3", status="held")
    settle(state, "u5", "k5")
    state.upstream_gone(["u5"])
    state.mark_deleted(["k2"])
    assert state.begin_fetch("u4", "digest-u4")
    fetching, hidden, cached = state.recovery_view()
    assert [(row.uid, row.status, row.digest) for row in fetching] == [("u4", "fetching", "digest-u4")]
    assert fetching == state.fetching()
    assert hidden == state.hidden_keys() == {"k2"}
    assert cached == state.cached_keys(upstream_only=True) == {"k1"}


def test_cached_keys_and_the_provider_s_vanished_messages(state):
    settle(state, "u1", "k1")
    settle(state, "u2", "k2")
    settle(state, "u3", "h3", status="held")
    assert state.begin_fetch("u4", "d4")
    state.upstream_gone(["u2", "u3", "nobody"])
    assert state.cached_keys() == {"k1", "k2"}
    assert state.cached_keys(upstream_only=True) == {"k1"}
    assert {row.uid: row.upstream for row in state.rows()} == {"u1": True, "u2": False, "u3": False, "u4": True}
    state.upstream_gone([])


def test_uids_for_keys_and_known_uids_among(state):
    settle(state, "u1", "k1")
    settle(state, "u2", "k2")
    assert state.begin_fetch("u3", "d3")
    assert state.uids_for_keys(["k1", "k2", "unknown"]) == {"k1": "u1", "k2": "u2"}
    assert state.uids_for_keys(iter(["k2"])) == {"k2": "u2"}
    assert state.uids_for_keys([]) == {}
    assert state.known_uids_among(["u1", "u3", "u9"]) == {"u1", "u3"}
    assert state.known_uids_among([]) == set()
    many = [f"m{i}" for i in range(1200)]  # more than one statement's worth on SQLite
    assert state.begin_fetch_many([(uid, "d") for uid in many]) == [True] * len(many)
    assert state.known_uids_among([*many, "u1", "none"]) == {*many, "u1"}


# -- deletions -----------------------------------------------------------------------------------------


def test_mark_deleted_hides_cached_messages_and_restore_deleted_undoes_it(state):
    settle(state, "u1", "k1")
    settle(state, "u2", "k2")
    settle(state, "u3", "h3", status="held")
    assert state.begin_fetch("u4", "d4")
    state.mark_deleted(["k1", "h3", "unknown"])  # only cached rows are deleted
    assert state.hidden_keys() == {"k1"}
    assert state.cached_keys() == {"k2"}
    assert {row.uid: row.status for row in state.rows()} == {"u1": "deleted", "u2": "cached", "u3": "held",
                                                             "u4": "fetching"}
    assert not state.begin_fetch("u1", "d1")  # a deleted message is never fetched again
    state.restore_deleted(["k1", "k2"])
    assert state.hidden_keys() == set()
    assert state.cached_keys() == {"k1", "k2"}
    assert {row.uid: row.status for row in state.rows()} == {"u1": "cached", "u2": "cached", "u3": "held",
                                                             "u4": "fetching"}


def test_forget_keys_drops_only_cached_rows(state):
    settle(state, "u1", "k1")
    settle(state, "u2", "k2")
    settle(state, "u3", "h3", status="held")
    state.mark_deleted(["k2"])
    state.forget_keys(["k1", "k2", "h3", "unknown"])
    assert {row.uid: row.status for row in state.rows()} == {"u2": "deleted", "u3": "held"}
    assert state.begin_fetch("u1", "d1")  # fetched again while the provider has it


def test_drop_rows_forgets_messages_whatever_their_status(state):
    settle(state, "u1", "k1")
    settle(state, "u2", "k2")
    settle(state, "u3", "h3", status="held")
    state.mark_deleted(["k2"])
    assert state.begin_fetch("u4", "d4")
    state.drop_rows(["u1", "u2", "u3", "nobody"])
    assert set(by_uid(state)) == {"u4"}
    state.drop_rows([])
    assert state.hidden_keys() == set()


# -- adoption and held messages --------------------------------------------------------------------------


def test_adopt_moves_a_row_to_its_new_uid(state):
    assert state.begin_fetch_many([("old", "cached-digest")], ["source-digest"]) == [True]
    state.finish_fetch("old", "key1", 10)
    state.mark_deleted(["key1"])
    state.upstream_gone(["old"])
    moved = state.adopt("old", "new")
    assert moved is not None
    assert (moved.uid, moved.key, moved.status, moved.digest, moved.size, moved.upstream, moved.source) == (
        "new", "key1", "deleted", "cached-digest", 10, True, "source-digest")
    assert by_uid(state) == {"new": ("key1", "deleted", "cached-digest", 10, True, "source-digest")}
    assert state.adopt("old", "other") is None  # nothing left under the old uid
    assert state.begin_fetch("taken", "d")
    assert state.adopt("new", "taken") is None  # never onto a uid that has a row
    assert state.adopt("taken", "elsewhere") is None  # a claim in flight is not adopted
    assert set(by_uid(state)) == {"new", "taken"}


def test_release_held_serves_a_held_message(state):
    settle(state, "u1", "held-1", size=50, status="held")
    state.release_held("held-1", "u1", "k1", 52)
    assert by_uid(state) == {"u1": ("k1", "cached", "digest-u1", 52, True, None)}
    # A held message whose row is gone (no "held" row for it) but whose uid is known: a cached row is
    # written, so it is not fetched again.
    state.release_held("held-2", "u2", "k2", 60)
    assert by_uid(state)["u2"] == ("k2", "cached", None, 60, True, None)
    assert not state.begin_fetch("u2", "d2")
    # An uid that has a row already keeps it; no uid: nothing is written.
    state.release_held("held-3", "u1", "k3", 70)
    state.release_held("held-4", None, "k4", 80)
    assert set(by_uid(state)) == {"u1", "u2"} and by_uid(state)["u1"][0] == "k1"
    assert state.cached_keys() == {"k1", "k2"}


# -- settings ------------------------------------------------------------------------------------------


def test_meta_is_set_replaced_and_deleted_by_none(state):
    assert state.get_meta("offline_hash") is None
    state.set_meta("offline_hash", "$scrypt$one")
    state.set_meta("last_sync", "1700000000.5")
    state.set_meta("offline_hash", "$scrypt$two")
    assert state.get_meta("offline_hash") == "$scrypt$two" and state.get_meta("last_sync") == "1700000000.5"
    state.set_meta("offline_hash", None)
    assert state.get_meta("offline_hash") is None and state.get_meta("last_sync") == "1700000000.5"
    state.set_meta("never set", None)
    state.set_meta("empty", "")
    assert state.get_meta("empty") == ""


def test_several_settings_are_read_and_written_at_once(state):
    state.set_meta("offline_hash", "$scrypt$one")
    state.set_meta("user", "alice")
    state.set_metas({"last_sync": "{}", "offline_hash": "$scrypt$two", "user": None, "never set": None})
    assert state.get_metas(["offline_hash", "last_sync", "user", "unknown"]) == {
        "offline_hash": "$scrypt$two", "last_sync": "{}", "user": None, "unknown": None}
    assert state.get_meta("offline_hash") == "$scrypt$two" and state.get_meta("user") is None
    state.set_metas({"last_sync": None})  # deletions only
    assert state.get_metas(["last_sync", "offline_hash"]) == {"last_sync": None, "offline_hash": "$scrypt$two"}
    state.set_metas({})
    assert state.get_metas([]) == {}


# -- two nodes at once -------------------------------------------------------------------------------------


def test_concurrent_claims_from_two_nodes_grant_each_uid_once(engine):
    uids = [f"u{i:03}" for i in range(300)]
    orders = {"first": uids, "second": uids[::-1]}  # the same claims at once, in opposite orders
    states = {name: engine.states().open("alice") for name in orders}
    start = threading.Barrier(len(orders))
    granted: dict[str, list[str]] = {}
    errors: list[BaseException] = []

    def claim(name: str) -> None:
        try:
            start.wait(WAIT)
            answer = states[name].begin_fetch_many([(uid, f"{name}-{uid}") for uid in orders[name]])
            granted[name] = [uid for uid, ok in zip(orders[name], answer, strict=True) if ok]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=claim, args=(name,), daemon=True) for name in orders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT * 2)
    assert errors == []
    assert sorted(granted["first"] + granted["second"]) == uids  # each uid once, none lost
    digests = {row.uid: row.digest for row in states["first"].rows()}
    assert all(digests[uid] == f"first-{uid}" for uid in granted["first"])
    assert all(digests[uid] == f"second-{uid}" for uid in granted["second"])
