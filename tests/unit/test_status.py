"""``pop3proxy status``: per account, from a cache and a queue laid out as the service leaves them."""

from __future__ import annotations

import io
import json
import os
import time

from helpers.common import write_config
from hypothesis import given
from hypothesis import strategies as st

from pop3proxy.admin.status import collect_status, status_command
from pop3proxy.config import load_settings, queue_dir
from pop3proxy.store import open_store
from pop3proxy.store.paths import decode_user as decode_user_dir
from pop3proxy.store.paths import encode_user as _encode_user
from pop3proxy.store.paths import removed_parts_dir, user_dir
from pop3proxy.store.state import UserState
from pop3proxy.submission.queue import OutQueue

M1 = b"Subject: one\r\n\r\nfirst\r\n"
M2 = b"Subject: two\r\n\r\nsecond message\r\n"
LONG = "a-very-long-user-name." * 10 + "@example.org"


@given(st.text(min_size=1, max_size=60))
def test_decoding_a_directory_name_gives_the_user_back(name):
    try:
        encoded = _encode_user(name)
    except ValueError:
        return
    assert decode_user_dir(encoded) == (name if "~" not in encoded else None)


def test_names_that_are_no_encoding_are_not_decoded():
    for name in ("%zz", "a%2", "a b", "caf\xe9", "%61", ".hidden", "x~" + "0" * 64, ""):
        assert decode_user_dir(name) is None, name


def make_account(root, user, backend="maildir", messages=(), last_sync=None, held_rows=0, deleted=0, meta_user=None):
    keys = []
    with open_store(root, user, backend) as mailbox:
        for data in messages:
            keys.append(mailbox.add(data).key)
    with UserState(user_dir(root, user) / "state.db") as state:
        for i, key in enumerate(keys):
            state.begin_fetch(f"uid{i}", "digest")
            state.finish_fetch(f"uid{i}", key, len(messages[i]))
        state.mark_deleted(keys[:deleted])
        for i in range(held_rows):
            state.begin_fetch(f"held{i}", "digest")
            state.finish_fetch(f"held{i}", f"heldkey{i}", 10, "held")
        if last_sync is not None:
            state.set_meta("last_sync", json.dumps(last_sync))
        if meta_user is not None:
            state.set_meta("user", meta_user)


def test_status_reports_every_account(tmp_path):
    root = tmp_path / "cache"
    config = write_config(
        tmp_path / "pop3proxy.toml",
        {"cache": {"root": str(root)}, 'accounts."dave"': {"remote_user": "dave@example.com"}},
    )
    settings = load_settings(config)
    now = time.time()
    make_account(root, "alice", messages=[M1, M2, M1], deleted=1, held_rows=2,
                 last_sync={"time": now - 120, "result": "ok", "fetched": 3, "fetched_bytes": 75,
                            "deleted_upstream": 1, "held": 2})
    held = user_dir(root, "alice") / "held"
    for sub in ("new", "cur", "tmp"):
        (held / sub).mkdir(parents=True)
    (held / "new" / "1.held").write_bytes(M1)  # the held/ Maildir wins over the state rows
    make_account(root, "bob smith/x", backend="mbox", messages=[M1],
                 last_sync={"time": now - 7200, "result": "failed: UpstreamUnavailable"})
    make_account(root, LONG, messages=[M2], meta_user=LONG)
    (root / "stray").mkdir()  # no state.db: not an account
    queue = OutQueue(queue_dir(settings))
    queue.add(login="alice", cache_id="alice", sender="alice@example.com", recipients=["x@example.net"],
              data=b"Subject: q\r\n\r\nqueued\r\n")
    queue.add(login="erin", cache_id="erin", sender="erin@example.com", recipients=["y@example.net"],
              data=b"Subject: q2\r\n\r\nqueued too\r\n")
    before = sorted(os.listdir(root))
    dirs = {user: os.listdir(user_dir(root, user)) for user in ("alice", "bob smith/x", LONG)}

    accounts = {a.name: a for a in collect_status(settings)}
    assert set(accounts) == {"alice", "bob smith/x", LONG, "dave", "erin"}
    alice = accounts["alice"]
    assert (alice.messages, alice.octets) == (2, len(M2) + len(M1))  # the deleted one is not counted
    assert alice.held == 1
    assert alice.last_sync["fetched"] == 3
    assert [e.recipients for e in alice.queued] == [["x@example.net"]]
    bob = accounts["bob smith/x"]
    assert bob.messages == 1 and bob.last_sync["result"].startswith("failed")
    assert accounts[LONG].messages == 1  # a hashed directory name: the name comes from the state database
    assert accounts["dave"].directory is None and accounts["dave"].last_sync is None
    assert len(accounts["erin"].queued) == 1 and accounts["erin"].directory is None

    out = io.StringIO()
    assert status_command(settings, out=out) == 0
    text = out.getvalue()
    block = text[text.index("\nalice\n"):].split("\n\n")[0]
    assert "last sync   " in block and "(2 min ago): ok: 3 new" in block
    assert "cached      2 messages" in block
    assert "held        1" in block
    assert "queued      1 outgoing message" in block
    assert "\nbob smith/x\n" in text and "failed: UpstreamUnavailable" in text
    dave = text[text.index("\ndave\n"):].split("\n\n")[0]
    assert "last sync   never" in dave and "cached      nothing yet" in dave and "queued      none" in dave
    assert sorted(os.listdir(root)) == before  # nothing created
    for user in ("alice", "bob smith/x", LONG):  # not even SQLite's companions, owned by whoever ran it
        assert sorted(os.listdir(user_dir(root, user))) == sorted(dirs[user])


def test_status_of_an_empty_installation(tmp_path):
    settings = load_settings(write_config(tmp_path / "c.toml", {"cache": {"root": str(tmp_path / "none")}}))
    out = io.StringIO()
    assert status_command(settings, out=out) == 0
    assert "no accounts yet" in out.getvalue()
    assert not (tmp_path / "none").exists()


def test_unreadable_state_is_reported_not_fatal(tmp_path):
    root = tmp_path / "cache"
    make_account(root, "alice", messages=[M1])
    (user_dir(root, "alice") / "state.db").write_bytes(b"this is not a database" * 100)
    for companion in ("state.db-wal", "state.db-shm"):
        (user_dir(root, "alice") / companion).unlink(missing_ok=True)
    settings = load_settings(write_config(tmp_path / "c.toml", {"cache": {"root": str(root)}}))
    out = io.StringIO()
    assert status_command(settings, out=out) == 1
    assert "problem     state database unreadable" in out.getvalue()
    assert "cached      1 message," in out.getvalue()


def test_stripped_parts_are_counted_in_the_new_and_the_old_directory(tmp_path):
    root = tmp_path / "cache"
    settings = load_settings(write_config(tmp_path / "pop3proxy.toml", {"cache": {"root": str(root)}}))
    make_account(root, "alice", messages=[M1])
    make_account(root, "bob", messages=[M1])
    alice, bob = user_dir(root, "alice"), user_dir(root, "bob")
    assert removed_parts_dir(alice) == alice / "removed"  # a new cache keeps them in removed/
    (alice / "removed").mkdir()
    (alice / "removed" / "a.exe").write_bytes(b"MZ")
    (bob / "quarantine").mkdir()  # a cache from before the rename goes on using its quarantine/
    for name in ("b.exe", "b.mime", "c.exe"):  # a part is kept decoded and as its MIME text (.mime)
        (bob / "quarantine" / name).write_bytes(b"MZ")
    assert removed_parts_dir(bob) == bob / "quarantine"
    accounts = {a.name: a for a in collect_status(settings)}
    assert (accounts["alice"].removed_parts, accounts["bob"].removed_parts) == (1, 2)
    out = io.StringIO()
    status_command(settings, out=out)
    assert "held        0, stripped parts kept 2" in out.getvalue()
