"""Messages from the provider held in memory up to a limit, and in a spool file past it."""

from __future__ import annotations

import hashlib

import pytest
import trio
import trio.testing

from pop3proxy.proxy.sync import _Window
from pop3proxy.store import open_store
from pop3proxy.store.crlf import normalise
from pop3proxy.store.spool import Spool, Spooled

MARK = b"X-POP3Proxy-Warning: not filtered\r\n"


def feed(spool: Spool, data: bytes, size: int) -> bytes | Spooled:
    for start in range(0, len(data), size):
        if spool.add(data[start:start + size]):
            spool.flush()
    return spool.finish()


def test_a_message_of_exactly_the_limit_stays_in_memory(tmp_path):
    data = b"Subject: x\r\n\r\n" + b"a" * 986
    assert len(data) == 1000
    spool = Spool(tmp_path / "s", 1000, MARK)
    assert feed(spool, data, 7) == data
    assert not (tmp_path / "s").exists()
    assert spool.source.hexdigest() == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("chunk", [1, 2, 3, 1000, 1 << 20])
def test_one_octet_more_goes_to_a_file_in_crlf_form_with_the_mark(tmp_path, chunk):
    # bare LFs, a CRLF that a chunk boundary may split, and no line end at the end
    data = b"Subject: x\nFrom: y\r\n\r\n" + b"line\n" * 300 + b"last\r\nno end"
    spool = Spool(tmp_path / "s", len(data) - 1, MARK)
    spooled = feed(spool, data, chunk)
    assert isinstance(spooled, Spooled)
    expected = MARK + normalise(data)
    assert spooled.path.read_bytes() == expected and spooled.size == len(expected)
    assert spooled.cached == hashlib.sha256(expected).hexdigest()
    assert spool.source.hexdigest() == hashlib.sha256(data).hexdigest()  # as the provider sent it


def test_discard_removes_the_file(tmp_path):
    spool = Spool(tmp_path / "s", 10, b"")
    spool.add(b"x" * 100)
    assert spool.spilled
    spool.discard()
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("backend", ["maildir", "mbox"])
def test_a_spooled_message_is_stored_byte_exact(tmp_path, backend, monkeypatch):
    # Lines that mboxrd must quote, across the chunks in which the file is appended.
    monkeypatch.setattr("pop3proxy.store.mbox.CHUNK", 5)
    data = normalise(b"Subject: big\n\nFrom here\n>From there\nplain\n" + b"From x\n" * 50)
    with open_store(tmp_path, "alice", backend) as mailbox:
        mailbox.add(b"Subject: first\r\n\r\nbody\r\n")
        spool = Spool(mailbox.spool_path(), 10, b"")
        spooled = feed(spool, data, 64)
        info = mailbox.add_file(spooled.path, spooled.size)
        assert not spooled.path.exists() and info.size == len(data)
        mailbox.add(b"Subject: after\r\n\r\nbody\r\n")
    with open_store(tmp_path, "alice", backend) as mailbox:
        infos = mailbox.list()
        assert [i.key for i in infos][1] == info.key and len(infos) == 3
        with mailbox.open(info.key) as f:
            assert f.read() == data
        with mailbox.open(infos[2].key) as f:
            assert f.read() == b"Subject: after\r\n\r\nbody\r\n"


@pytest.mark.parametrize("backend", ["maildir", "mbox"])
def test_a_spool_file_left_by_a_crash_is_removed_at_recovery(tmp_path, backend):
    with open_store(tmp_path, "alice", backend) as mailbox:
        spool = Spool(mailbox.spool_path(), 10, b"")
        spool.add(b"x" * 100)
        spool.flush()
        path = spool.path  # the process dies here
        assert path.exists()
        assert mailbox.clean_tmp() >= 1
        assert not path.exists() and mailbox.list() == []


async def test_the_window_of_waiting_messages_is_bounded_by_octets():
    window = _Window(100)
    await window.reserve(60)
    await window.reserve(40)  # exactly the limit
    blocked = trio.Event()
    reserved = trio.Event()

    async def one_more() -> None:
        blocked.set()
        await window.reserve(1)  # one octet past the limit waits ...
        reserved.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one_more)
        await blocked.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert not reserved.is_set() and window.used == 100
        await window.release(60)  # ... until something is stored
        await reserved.wait()
    assert window.used == 41
    await window.release(41)
    await window.reserve(1000)  # alone, a message bigger than the window still goes (nothing would free it)
    assert window.used == 1000
