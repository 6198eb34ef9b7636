"""Tests for pop3proxy.store: the Maildir and mbox backends, user directories and mailbox locks."""

from __future__ import annotations

import mailbox
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pop3proxy.proxy.sync import recover
from pop3proxy.store import maildir as maildir_module
from pop3proxy.store import open_store
from pop3proxy.store.base import Mailbox
from pop3proxy.store.locks import MailboxBusy, lock_mailbox
from pop3proxy.store.maildir import MaildirMailbox
from pop3proxy.store.mbox import MboxMailbox
from pop3proxy.store.paths import user_dir
from pop3proxy.store.state import UserState

REPO = Path(__file__).resolve().parents[2]


def crlf(data: bytes) -> bytes:
    """What a message becomes in CRLF form (the expected result of add + open)."""
    data = re.sub(rb"(?<!\r)\n", b"\r\n", data)
    return data if not data or data.endswith(b"\r\n") else data + b"\r\n"


def read(box: Mailbox, key: str) -> bytes:
    with box.open(key) as f:
        return f.read()


MESSAGES = [
    b"Subject: plain\r\n\r\nHello\r\n",
    b"Subject: bare lf\n\nline 1\nline 2\n",
    b"Subject: mixed\r\n\nCRLF line\r\nLF line\nlone CR\rstays\r\n",
    b"From someone@example.com Mon Jan  1 00:00:00 2024\r\nSubject: starts with From\r\n\r\nbody\r\n",
    b"Subject: from lines\n\nFrom here\n>From quoted\n>>From twice\n>From\nFrom\n Not From x\nFrom \n",
    b"",
    b"Subject: no final newline\r\n\r\nlast line",
    b"Subject: blank lines at end\r\n\r\nbody\r\n\r\n\r\n",
    b"Subject: cr before crlf\r\n\r\nx\r\r\ny\r",
    b"\n",
    b".\r\n..\r\n.dot\r\n",
]


@pytest.fixture(params=["maildir", "mbox"])
def reopen(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Mailbox]:
    """A factory that opens a new mailbox object on the same storage each time it is called."""
    if request.param == "maildir":
        return lambda: MaildirMailbox(tmp_path / "Maildir")
    return lambda: MboxMailbox(tmp_path / "mbox")


# --- the contract, for both backends -----------------------------------------------------------------


def test_round_trip_is_byte_exact_in_crlf_form(reopen: Callable[[], Mailbox]) -> None:
    box = reopen()
    infos = [box.add(m) for m in MESSAGES]
    for message, info in zip(MESSAGES, infos):
        assert info.uidl == info.key
        assert info.size == len(crlf(message))
        assert read(box, info.key) == crlf(message)
    assert box.list() == infos
    fresh = reopen()
    assert fresh.list() == infos
    for message, info in zip(MESSAGES, infos):
        assert read(fresh, info.key) == crlf(message)


def test_a_small_message_is_read_whole_as_open_serves_it(reopen: Callable[[], Mailbox]) -> None:
    box = reopen()
    infos = box.add_many(MESSAGES)
    for message, info in zip(MESSAGES, infos):
        assert box.read(info.key, info.size) == read(box, info.key) == crlf(message)
        assert box.read(info.key, 5) == crlf(message)[:5]  # never more than asked for
    box.delete([infos[0].key])
    with pytest.raises(KeyError):
        reopen().read(infos[0].key, 100)


def test_add_many_stores_a_batch_and_nothing_for_an_empty_one(reopen: Callable[[], Mailbox]) -> None:
    box = reopen()
    assert box.add_many([]) == []
    infos = box.add_many(MESSAGES[:4])
    assert box.add_many([]) == []
    assert reopen().list() == infos
    assert [read(box, info.key) for info in infos] == [crlf(m) for m in MESSAGES[:4]]


def test_add_normalises_line_endings(reopen: Callable[[], Mailbox]) -> None:
    box = reopen()
    lf = box.add(b"A: 1\n\nx\ny\n")
    assert read(box, lf.key) == b"A: 1\r\n\r\nx\r\ny\r\n"
    assert lf.size == 14
    unterminated = box.add(b"A: 1\r\n\r\nend")
    assert read(box, unterminated.key) == b"A: 1\r\n\r\nend\r\n"
    empty = box.add(b"")
    assert empty.size == 0 and read(box, empty.key) == b""


def test_large_message_is_streamed_exactly(reopen: Callable[[], Mailbox]) -> None:
    box = reopen()
    # lines that straddle the 64 KiB chunks, including quoted From lines and a CR before an LF
    lines = [b">" * (i % 5) + b"From line %d\r" % i if i % 7 == 0 else b"x" * (i % 300) for i in range(3000)]
    message = b"Subject: big\n\n" + b"\n".join(lines) + b"\n"
    info = box.add(message)
    assert info.size == len(crlf(message))
    with box.open(info.key) as f:
        pieces = []
        while piece := f.read(1000):
            pieces.append(piece)
    assert b"".join(pieces) == crlf(message)
    assert reopen().list()[0].size == info.size


@pytest.mark.parametrize("shift", range(10))
def test_quoted_from_lines_across_read_chunks(tmp_path: Path, shift: int) -> None:
    box = MboxMailbox(tmp_path / "mbox")
    # the second line begins `shift` octets before the 64 KiB boundary of the message's on-disk body
    message = b"x" * (64 * 1024 - 1 - shift) + b"\n>From y\nFrom z\n>>From w\n"
    info = box.add(message)
    assert read(box, info.key) == crlf(message)
    assert info.size == len(crlf(message)) == box.list()[0].size == MboxMailbox(box.path).list()[0].size
    # a chunk that begins in the middle of a line with '>From ' must not be unquoted
    mid_line = b"a" * (64 * 1024 - shift) + b">From mid-line\n"
    info = box.add(mid_line)
    assert read(box, info.key) == crlf(mid_line)


def test_maildir_crlf_across_read_chunks(tmp_path: Path) -> None:
    box = MaildirMailbox(tmp_path / "Maildir")
    message = b"a" * (64 * 1024 - 1) + b"\r\n" + b"b" * (64 * 1024 - 1) + b"\n" + b"\r\nc\n"
    (tmp_path / "Maildir" / "cur" / "1500000000.M3P3.other:2,").write_bytes(message)
    [info] = box.list()
    assert read(box, info.key) == crlf(message)
    assert info.size == len(crlf(message))


def test_list_is_oldest_first(reopen: Callable[[], Mailbox]) -> None:
    box = reopen()
    infos = [box.add(b"Subject: %d\r\n\r\n" % i) for i in range(20)]
    assert [i.key for i in reopen().list()] == [i.key for i in infos]


def test_delete_some_then_list(reopen: Callable[[], Mailbox]) -> None:
    box = reopen()
    infos = [box.add(b"Subject: %d\r\n\r\nbody\r\n" % i) for i in range(6)]
    box.delete([infos[0].key, infos[3].key, infos[5].key])
    remaining = [infos[1], infos[2], infos[4]]
    assert box.list() == remaining
    assert reopen().list() == remaining
    for info in remaining:
        assert read(box, info.key) == b"Subject: %d\r\n\r\nbody\r\n" % infos.index(info)
    with pytest.raises(KeyError):
        box.open(infos[0].key)
    box.delete([infos[0].key, "no-such-key"])  # already gone: not an error
    assert box.list() == remaining
    box.delete([i.key for i in remaining])
    assert box.list() == [] and reopen().list() == []


def test_uids_are_stable_across_reopening_and_deleting_others(reopen: Callable[[], Mailbox]) -> None:
    box = reopen()
    infos = [box.add(m) for m in MESSAGES]
    assert [i.key for i in reopen().list()] == [i.key for i in infos]
    box.delete([infos[2].key])
    later = reopen()
    assert [i.key for i in later.list()] == [i.key for i in infos if i is not infos[2]]
    added = later.add(b"Subject: after\r\n\r\n")
    assert [i.key for i in reopen().list()][-1] == added.key


def test_identical_messages_get_distinct_uids(reopen: Callable[[], Mailbox]) -> None:
    box = reopen()
    infos = [box.add(b"Subject: same\r\n\r\nsame\r\n") for _ in range(3)]
    assert len({i.key for i in infos}) == 3
    assert [i.key for i in reopen().list()] == [i.key for i in infos]
    for info in infos:
        assert read(box, info.key) == b"Subject: same\r\n\r\nsame\r\n"


@settings(max_examples=40, deadline=None)
@given(messages=st.lists(st.binary(max_size=200), min_size=1, max_size=4))
def test_any_bytes_round_trip(tmp_path_factory: pytest.TempPathFactory, messages: list[bytes]) -> None:
    root = tmp_path_factory.mktemp("any")
    for box in (MaildirMailbox(root / "Maildir"), MboxMailbox(root / "mbox")):
        infos = [box.add(m) for m in messages]
        for again in (box, type(box)(box.path)):
            assert again.list() == infos
            for message, info in zip(messages, infos):
                assert info.size == len(crlf(message))
                assert read(again, info.key) == crlf(message)


# --- Maildir -----------------------------------------------------------------------------------------


def test_maildir_layout_is_readable_by_stdlib(tmp_path: Path) -> None:
    box = MaildirMailbox(tmp_path / "Maildir")
    infos = [box.add(m) for m in MESSAGES[:4]]
    theirs = mailbox.Maildir(tmp_path / "Maildir", factory=None, create=False)
    assert sorted(theirs.keys()) == sorted(i.key for i in infos)
    for message, info in zip(MESSAGES, infos):
        assert theirs.get_bytes(info.key) == crlf(message)
        assert f",S={info.size},W={info.size}" in info.key
    assert os.listdir(tmp_path / "Maildir" / "tmp") == []
    for sub in ("", "tmp", "new", "cur"):
        assert stat.S_IMODE((tmp_path / "Maildir" / sub).stat().st_mode) == 0o700
    for name in os.listdir(tmp_path / "Maildir" / "new"):
        assert stat.S_IMODE((tmp_path / "Maildir" / "new" / name).stat().st_mode) == 0o600


def test_maildir_serves_messages_dropped_by_other_tools(tmp_path: Path) -> None:
    box = MaildirMailbox(tmp_path / "Maildir")
    ours = box.add(b"Subject: ours\r\n\r\n")
    message = b"Subject: theirs\n\nline\n" + b"y" * 100_000 + b"\n"
    (tmp_path / "Maildir" / "new" / "1500000000.M1P1.other").write_bytes(message)
    (tmp_path / "Maildir" / "new" / ".hidden").write_bytes(b"ignored")
    (tmp_path / "Maildir" / "tmp" / "1400000000.M1P1.other").write_bytes(b"not delivered yet")
    stdlib_key = mailbox.Maildir(tmp_path / "Maildir", factory=None).add(b"Subject: stdlib\n\nx\n")

    listed = {i.key: i for i in box.list()}
    assert set(listed) == {ours.key, "1500000000.M1P1.other", stdlib_key}
    assert box.list()[0].key == "1500000000.M1P1.other"  # oldest delivery time first
    assert listed["1500000000.M1P1.other"].size == len(crlf(message))
    assert read(box, "1500000000.M1P1.other") == crlf(message)
    assert listed[stdlib_key].size == len(b"Subject: stdlib\r\n\r\nx\r\n")
    assert read(box, stdlib_key) == b"Subject: stdlib\r\n\r\nx\r\n"
    # Read whole (a small RETR): a file of another tool, in LF form, is served in CRLF form all the same.
    assert box.read(stdlib_key, listed[stdlib_key].size) == b"Subject: stdlib\r\n\r\nx\r\n"
    assert box.read("1500000000.M1P1.other", listed["1500000000.M1P1.other"].size) == crlf(message)


def test_maildir_uid_survives_flag_changes(tmp_path: Path) -> None:
    box = MaildirMailbox(tmp_path / "Maildir")
    info = box.add(b"Subject: flagged\r\n\r\n")
    (tmp_path / "Maildir" / "new" / "1500000000.M2P2.other").write_bytes(b"Subject: lf\n\n")
    box.list()
    new, cur = tmp_path / "Maildir" / "new", tmp_path / "Maildir" / "cur"
    os.rename(new / info.key, cur / f"{info.key}:2,S")
    os.rename(new / "1500000000.M2P2.other", cur / "1500000000.M2P2.other:2,RS")
    for box_now in (box, MaildirMailbox(tmp_path / "Maildir")):
        assert [i.key for i in box_now.list()] == ["1500000000.M2P2.other", info.key]
        assert read(box_now, info.key) == b"Subject: flagged\r\n\r\n"
        assert read(box_now, "1500000000.M2P2.other") == b"Subject: lf\r\n\r\n"
    box.delete([info.key])
    assert os.listdir(cur) == ["1500000000.M2P2.other:2,RS"]


def test_maildir_listing_is_never_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A directory's mtime does not change when a file arrives within the same timestamp tick as the
    # previous change (coarse file-system clocks). A listing made within that tick must not be reused
    # later on the strength of an unchanged mtime, or a delivered message is missing from it (and
    # recover() would then forget its row, so it is fetched twice).
    path = tmp_path / "Maildir"
    box = MaildirMailbox(path)
    first = box.add(b"Subject: one\r\n\r\n")
    new, cur = path / "new", path / "cur"
    tick = time.time_ns() - 60 * 10**9
    for sub in (new, cur):
        os.utime(sub, ns=(tick, tick))
    clock = [tick + 5 * 10**8]  # the listing runs half a second after the last change
    monkeypatch.setattr(time, "time_ns", lambda: clock[0])
    assert [i.key for i in box.list()] == [first.key]
    second = "1700000000.M1P1.other,S=20,W=20"
    (new / second).write_bytes(b"Subject: two\r\n\r\nx\r\n")
    os.utime(new, ns=(tick, tick))  # the same tick: the mtime is unchanged
    clock[0] = tick + 10 * 10**9
    state = UserState(tmp_path / "state.db")
    try:
        assert state.begin_fetch("u2", "d2")
        state.finish_fetch("u2", second, 20)
        fresh = MaildirMailbox(path)
        assert sorted(i.key for i in fresh.list()) == sorted([first.key, second])
        recover(fresh, state)
        assert [(row.uid, row.status) for row in state.rows()] == [("u2", "cached")]
    finally:
        state.close()
    # A listing made when the directories had been quiet for a while is kept and reused while they stay so.
    assert maildir_module._SCANS[str(path)][0] == (tick, tick)
    assert [i.key for i in MaildirMailbox(path).list()] == [i.key for i in fresh.list()]


def test_maildir_without_create_needs_an_existing_maildir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a Maildir"):
        MaildirMailbox(tmp_path / "missing", create=False)


# --- mbox --------------------------------------------------------------------------------------------


def test_mbox_is_mboxrd_readable_by_stdlib(tmp_path: Path) -> None:
    box = MboxMailbox(tmp_path / "mbox")
    infos = [box.add(m) for m in MESSAGES]
    on_disk = (tmp_path / "mbox").read_bytes()
    assert on_disk.count(b"\r") == sum(crlf(m).count(b"\r") - crlf(m).count(b"\n") for m in MESSAGES)
    assert b"\n>From here\n>>From quoted\n>>>From twice\n>From\nFrom\n Not From x\n>From \n" in on_disk
    theirs = mailbox.mbox(tmp_path / "mbox", create=False)
    assert len(theirs) == len(infos)
    for key, message in zip(theirs.keys(), MESSAGES):
        quoted = re.sub(rb"(?m)^(>*From )", rb">\1", crlf(message).replace(b"\r\n", b"\n"))
        assert theirs.get_bytes(key) == quoted
    assert stat.S_IMODE((tmp_path / "mbox").stat().st_mode) == 0o600


def test_mbox_reads_what_stdlib_wrote(tmp_path: Path) -> None:
    theirs = mailbox.mbox(tmp_path / "mbox")
    bodies = [b"Subject: one\n\nfirst\n", b"Subject: two\n\nsecond\n\nwith a blank line\n"]
    for body in bodies:
        theirs.add(body)
    theirs.flush()
    theirs.close()
    box = MboxMailbox(tmp_path / "mbox", create=False)
    infos = box.list()
    assert [read(box, i.key) for i in infos] == [crlf(b) for b in bodies]
    assert [i.size for i in infos] == [len(crlf(b)) for b in bodies]
    added = box.add(b"Subject: three\n\n")
    assert [i.key for i in MboxMailbox(tmp_path / "mbox").list()] == [i.key for i in infos] + [added.key]


def test_mbox_delete_keeps_other_messages_byte_identical(tmp_path: Path) -> None:
    path = tmp_path / "mbox"
    path.write_bytes(
        b"junk before the first message\n"
        b"From a@example.com Mon Jan  1 00:00:00 2024\nSubject: a\n\nkeep\n\n"
        b"From b@example.com Mon Jan  1 00:00:00 2024\nSubject: b\n\ndrop\n\n"
        b"From c@example.com Mon Jan  1 00:00:00 2024 extra\nSubject: c\n\n>From keep\n"
    )
    os.chmod(path, 0o640)
    box = MboxMailbox(path, create=False)
    a, b, c = box.list()
    assert read(box, c.key) == b"Subject: c\r\n\r\nFrom keep\r\n"
    box.delete([b.key])
    assert path.read_bytes() == (
        b"junk before the first message\n"
        b"From a@example.com Mon Jan  1 00:00:00 2024\nSubject: a\n\nkeep\n\n"
        b"From c@example.com Mon Jan  1 00:00:00 2024 extra\nSubject: c\n\n>From keep\n"
    )
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert box.list() == [a, c]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".mbox.committed", "mbox"]  # no temporary file left


def test_mbox_rewrite_is_seen_by_an_object_holding_an_old_index(tmp_path: Path) -> None:
    first, second = MboxMailbox(tmp_path / "mbox"), MboxMailbox(tmp_path / "mbox")
    infos = [first.add(b"Subject: %d\r\n\r\n" % i) for i in range(3)]
    assert second.list() == infos
    first.delete([infos[0].key])
    assert read(second, infos[2].key) == b"Subject: 2\r\n\r\n"
    with pytest.raises(KeyError):
        second.open(infos[0].key)


# --- user directories --------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(user=st.text(min_size=1))
def test_user_dir_is_always_a_plain_child_of_root(user: str) -> None:
    root = Path("/srv/cache")
    path = user_dir(root, user)
    assert path.parent == root
    assert path.name not in ("", ".", "..")
    assert not path.name.startswith(".")
    assert re.fullmatch(r"[A-Za-z0-9_.@+%~-]+", path.name)
    assert len(path.name.encode()) <= 150


@settings(max_examples=50, deadline=None)
@given(users=st.lists(st.text(min_size=1, max_size=300), min_size=2, max_size=20, unique=True))
def test_user_dir_encoding_is_injective(users: list[str]) -> None:
    names = {user_dir(Path("/r"), u).name for u in users}
    assert len(names) == len(users)


@pytest.mark.parametrize(
    "user",
    ["../x", "..", ".", "/etc/passwd", "a\x00b", "%00", "x" * 10_000, "é" * 5000, "a/../../b", ".hidden"],
)
def test_hostile_user_names_stay_inside_root(tmp_path: Path, user: str) -> None:
    root = tmp_path / "root"
    box = open_store(root, user)
    box.add(b"Subject: x\r\n\r\n")
    assert [p.parent for p in root.iterdir()] == [root]
    assert user_dir(root, user).parent == root
    assert stat.S_IMODE(user_dir(root, user).stat().st_mode) == 0o700
    assert len(list(tmp_path.iterdir())) == 1


def test_user_dir_distinguishes_similar_names() -> None:
    root = Path("/r")
    pairs = [
        ("Alice", "alice"),
        ("a.b", "a%2Eb"),
        (".x", "%2Ex"),
        ("%00", "\x00"),
        ("x" * 10_000, "x" * 9_999 + "y"),
        ("x" * 200, "x" * 201),
        ("a~b", "a%7Eb"),
    ]
    for a, b in pairs:
        assert user_dir(root, a) != user_dir(root, b), (a, b)
    assert user_dir(root, "alice@example.com").name == "alice@example.com"
    assert user_dir(root, "Jörg Ü").name == "J%C3%B6rg%20%C3%9C"


def test_user_dir_rejects_an_empty_name() -> None:
    with pytest.raises(ValueError, match="empty user name"):
        user_dir(Path("/r"), "")


def test_open_store_layout_and_backends(tmp_path: Path) -> None:
    maildir = open_store(tmp_path, "bob")
    assert isinstance(maildir, MaildirMailbox)
    assert (tmp_path / "bob" / "Maildir" / "new").is_dir()
    mbox = open_store(tmp_path, "bob", backend="mbox")
    assert isinstance(mbox, MboxMailbox)
    assert (tmp_path / "bob" / "mbox").is_file()
    with pytest.raises(ValueError, match="unknown mailbox backend 'mh'"):
        open_store(tmp_path, "bob", backend="mh")


# --- locking -----------------------------------------------------------------------------------------


def test_lock_is_exclusive_per_user(tmp_path: Path) -> None:
    lock = lock_mailbox(tmp_path, "alice")
    with pytest.raises(MailboxBusy, match="alice"):
        lock_mailbox(tmp_path, "alice")
    with lock_mailbox(tmp_path, "Alice"), lock_mailbox(tmp_path, "bob"):
        pass
    lock.release()
    lock.release()  # releasing twice is harmless
    with lock_mailbox(tmp_path, "alice") as again:
        assert again.held
        with pytest.raises(MailboxBusy):
            lock_mailbox(tmp_path, "alice")
    assert not again.held
    lock_mailbox(tmp_path, "alice").release()


def test_lock_held_by_another_process_is_busy_until_it_dies(tmp_path: Path) -> None:
    code = (
        "import sys, time\n"
        "from pop3proxy.store import lock_mailbox\n"
        "lock = lock_mailbox(sys.argv[1], 'carol')\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n"
    )
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, env=env)
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"locked\n"
        with pytest.raises(MailboxBusy):
            lock_mailbox(tmp_path, "carol")
        lock_mailbox(tmp_path, "dave").release()
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    lock_mailbox(tmp_path, "carol").release()

