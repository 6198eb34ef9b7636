"""What the store knows of a message's lines starting with "." (MessageInfo.dot_lines): kept in the Maildir
name when the message is stored (added in memory or from a spool file), not known for older names and mbox,
and handed to the session's RETR and TOP actions."""

from __future__ import annotations

import pytest

from pop3proxy.pop3.actions import SendMessage
from pop3proxy.pop3.session import Session
from pop3proxy.store import open_store
from pop3proxy.store.base import MessageInfo
from pop3proxy.store.crlf import has_dot_lines, normalise
from pop3proxy.store.maildir import MaildirMailbox
from pop3proxy.store.spool import Spool, Spooled

WITH_DOTS = [
    b".first line\r\n\r\nbody\r\n",
    b"Subject: x\r\n\r\nline\r\n.dot\r\n",
    b"Subject: x\r\n\r\n.",  # becomes ".\r\n" at the very end
    b"Subject: x\n\n..\n",  # bare LF on the way in
]
WITHOUT_DOTS = [b"Subject: x\r\n\r\nno . at a line start\r\n", b"", b"Subject: x\r\n\r\n .\r\n"]


def test_has_dot_lines() -> None:
    assert all(has_dot_lines(normalise(data)) for data in WITH_DOTS)
    assert not any(has_dot_lines(normalise(data)) for data in WITHOUT_DOTS)


def test_maildir_names_carry_the_mark_and_a_new_listing_reads_it(tmp_path) -> None:
    box = MaildirMailbox(tmp_path / "Maildir")
    infos = box.add_many(WITH_DOTS + WITHOUT_DOTS)
    marks = [True] * len(WITH_DOTS) + [False] * len(WITHOUT_DOTS)
    assert [info.dot_lines for info in infos] == marks
    assert [info.key[-4:] for info in infos] == [",D=1" if mark else ",D=0" for mark in marks]
    assert box.add(b".x\r\n").dot_lines is True
    listed = MaildirMailbox(tmp_path / "Maildir").list()
    assert [info.dot_lines for info in listed] == [*marks, True]
    assert [info.key for info in listed[:-1]] == [info.key for info in infos]


def test_older_names_and_foreign_files_are_not_known(tmp_path) -> None:
    box = MaildirMailbox(tmp_path / "Maildir")
    new = tmp_path / "Maildir" / "new"
    (new / "1700000000.M1P1Q1.old,S=10,W=10").write_bytes(b"x: y\r\n\r\nz\r\n"[:10])
    (new / "1700000001.M1P1Q1.old,S=5,W=5,D=2").write_bytes(b"a\r\nb\r\n"[:5])  # not a mark we write
    (new / "1700000002.foreign").write_bytes(b"a\nb\n")
    assert [info.dot_lines for info in box.list()] == [None, None, None]


def test_mbox_does_not_know(tmp_path) -> None:
    with open_store(tmp_path, "alice", "mbox") as box:
        box.add(b"Subject: x\r\n\r\n.dot\r\n")
        assert [info.dot_lines for info in box.list()] == [None]


@pytest.mark.parametrize("data, dots", [
    (b"Subject: big\r\n\r\n" + b"a" * 100 + b"\r\n.b\r\n", True),
    (b".Subject: big\r\n\r\n" + b"a" * 100 + b"\r\n", True),
    (b"Subject: big\n\n" + b"a" * 100 + b"\n.", True),  # converted, the last line a lone dot
    (b"Subject: big\r\n\r\n" + b"a." * 100 + b"\r\n", False),
])
@pytest.mark.parametrize("chunk", [1, 2, 7, 1000])
def test_a_spooled_message_knows_its_dot_lines_across_chunks(tmp_path, data, dots, chunk) -> None:
    with open_store(tmp_path, "alice", "maildir") as box:
        spool = Spool(box.spool_path(), 10, b"")
        for start in range(0, len(data), chunk):
            if spool.add(data[start:start + chunk]):
                spool.flush()
        spooled = spool.finish()
        assert isinstance(spooled, Spooled) and spooled.dot_lines is dots
        info = box.add_file(spooled.path, spooled.size, spooled.dot_lines)
        assert info.dot_lines is dots and box.list()[0].dot_lines is dots


def test_the_session_hands_the_mark_to_retr_and_top() -> None:
    session = Session()
    session.receive_data(b"USER a\r\n")
    session.next_actions()
    session.receive_data(b"PASS b\r\n")
    session.next_actions()
    messages = [MessageInfo("k1", "k1", 5, False), MessageInfo("k2", "k2", 5, True), MessageInfo("k3", "k3", 5)]
    session.login_succeeded("a", messages)
    session.receive_data(b"RETR 1\r\nRETR 2\r\nRETR 3\r\nTOP 1 0\r\nTOP 2 0\r\nTOP 3 0\r\n")
    sent = []
    while (actions := session.next_actions()) is not None:
        sent += [a for a in actions if isinstance(a, SendMessage)]
    assert [(a.key, a.top_lines, a.dot_lines) for a in sent] == [
        ("k1", None, False), ("k2", None, True), ("k3", None, None), ("k1", 0, False), ("k2", 0, True), ("k3", 0, None)]
