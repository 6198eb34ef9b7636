"""A corrupted state database or a hand-edited cache is detected and rebuilt without losing mail."""

from __future__ import annotations

import os
import poplib
import sqlite3
import threading
from pathlib import Path

import pytest
from helpers.common import HOST
from helpers.proxy import Proxy, cached, retr_all, sample
from helpers.waiting import eventually

from pop3proxy.store import open_store
from pop3proxy.store.paths import user_dir
from pop3proxy.store.state import UserState

pytestmark = pytest.mark.dovecot


@pytest.fixture
def proxy(server_process, tmp_path, dovecot):
    made = Proxy(server_process, tmp_path, dovecot)
    yield made
    made.stop()


def corrupt_garbage(db: Path) -> None:
    db.write_bytes(b"this is not a database\x00" * 500)


def corrupt_truncate(db: Path) -> None:
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 3])


def corrupt_pages(db: Path) -> None:
    data = bytearray(db.read_bytes())
    for offset in range(4096, len(data), 512):  # leave the header, scramble the pages
        data[offset : offset + 64] = os.urandom(64)
    db.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [corrupt_garbage, corrupt_truncate, corrupt_pages])
def test_corrupt_state_database_is_rebuilt_without_duplicates(proxy, dovecot, damage):
    messages = [sample(i, 3000) for i in range(6)]
    for m in messages:
        dovecot.deliver(dovecot.user, m)
    proxy.start()
    client = proxy.client(dovecot.user, dovecot.password)
    client.dele(2)
    client.quit()  # mirror: message 2 is gone upstream too
    proxy.stop()
    db = user_dir(proxy.root, dovecot.user) / "state.db"
    for suffix in ("-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    damage(db)
    proxy.start()
    client = proxy.client(dovecot.user, dovecot.password)
    expected = [m for i, m in enumerate(messages) if i != 1]
    # Every message once: nothing fetched again, nothing lost.
    assert retr_all(client) == expected
    uids = client.uidl()[1]
    client.dele(1)  # the rebuilt state still knows which upstream message this is
    client.quit()
    assert cached(proxy, dovecot.user) == expected[1:]
    assert dovecot.messages(dovecot.user) == expected[1:]
    assert "rebuilt" in proxy.output()
    assert list(db.parent.glob("state.db.corrupt-*")), "the damaged database is kept for inspection"
    assert len(uids) == len(expected)


def test_journal_is_compacted_and_still_rebuilds(tmp_path, monkeypatch):
    import pop3proxy.store.state as state_module

    monkeypatch.setattr(state_module, "JOURNAL_COMPACT_AT", 2000)
    path = tmp_path / "state.db"
    with UserState(path) as state:
        for i in range(50):
            assert state.begin_fetch(f"u{i}", "d")
            state.finish_fetch(f"u{i}", f"k{i}", 100)
        state.mark_deleted(["k3"])
        state.set_meta("offline_hash", "$scrypt$x")
        for i in range(40):
            state.set_meta("last_sync", f"{{\"n\": {i}}}")
    before = (tmp_path / "state.journal").stat().st_size
    UserState(path).close()  # opening compacts
    assert (tmp_path / "state.journal").stat().st_size < before
    path.unlink()
    with UserState(path) as state:  # a lost database is rebuilt from the journal
        rows = {row.uid: row for row in state.rows()}
        assert len(rows) == 50 and rows["u3"].status == "deleted" and rows["u7"].key == "k7"
        assert state.get_meta("offline_hash") == "$scrypt$x"
        assert state.get_meta("last_sync") == '{"n": 39}'


def test_hand_edited_maildir(proxy, dovecot):
    messages = [sample(i) for i in range(4)]
    for m in messages:
        dovecot.deliver(dovecot.user, m)
    proxy.start(upstream={"delete": "never"})
    proxy.client(dovecot.user, dovecot.password).quit()
    maildir = user_dir(proxy.root, dovecot.user) / "Maildir"
    files = sorted((maildir / "new").iterdir())
    assert len(files) == 4
    # Someone deletes one file by hand, marks another as seen (moved to cur/ with flags), and drops a
    # message of their own into new/ with LF line endings.
    files[0].unlink()
    files[1].rename(maildir / "cur" / (files[1].name + ":2,S"))
    (maildir / "new" / "1.handmade.host").write_bytes(b"Subject: by hand\n\nwritten by hand\n")
    client = proxy.client(dovecot.user, dovecot.password)
    got = retr_all(client)
    client.quit()
    # The vanished message came back from the provider; the flagged one kept its identity (not fetched
    # again); the hand-made one is served, in CRLF form.
    assert sorted(got) == sorted(messages + [b"Subject: by hand\r\n\r\nwritten by hand\r\n"])
    with open_store(proxy.root, dovecot.user) as box:
        assert len(box.list()) == 5
    with UserState(user_dir(proxy.root, dovecot.user) / "state.db") as state:
        assert sum(row.status == "cached" for row in state.rows()) == 4


def test_state_database_of_another_program_is_not_trusted(tmp_path):
    path = tmp_path / "state.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE messages (x)")
    db.commit()
    db.close()
    with UserState(path) as state:  # incompatible schema: moved aside, fresh database
        assert state.rows() == []
        assert state.rebuilt_from is not None and state.rebuilt_from.exists()


def test_kill_while_a_big_message_is_appended_to_the_mbox(server_process, tmp_path, dovecot):
    # The proxy is SIGKILLed while it writes a 30 MB message into the mbox (the file is seen growing):
    # the bytes written so far are never served, and the next login stores the message once, whole.
    small, big = sample(1, 2000), sample(2, 30_000_000)
    for m in (small, big):
        dovecot.deliver(dovecot.user, m)
    proxy = Proxy(server_process, tmp_path, dovecot, cache={"backend": "mbox"})
    proxy.start(upstream={"delete": "after_fetch"}, sync={"login_budget": 120})
    mbox = user_dir(proxy.root, dovecot.user) / "mbox"

    def login() -> None:
        try:
            client = poplib.POP3(HOST, proxy.process.port, timeout=120)
            client.user(dovecot.user)
            client.pass_(dovecot.password)
            client.quit()
        except (OSError, poplib.error_proto, EOFError):
            pass  # the proxy dies under it

    thread = threading.Thread(target=login, daemon=True)
    thread.start()
    try:
        seen = eventually(lambda: mbox.exists() and mbox.stat().st_size > len(small) + 1_000_000 and mbox.stat().st_size,
                        timeout=120, interval=0)
        proxy.kill()
    finally:
        thread.join(30)
    print(f"killed with {seen:,} bytes of the mbox written, {mbox.stat().st_size:,} on disk after the kill")
    assert cached(proxy, dovecot.user, "mbox") in ([small], [small, big])  # never a fragment
    assert sorted(dovecot.messages(dovecot.user)) == sorted([small, big])  # nothing deleted upstream yet
    proxy.start(upstream={"delete": "after_fetch"}, sync={"login_budget": 120})
    client = proxy.client(dovecot.user, dovecot.password)
    assert retr_all(client) == [small, big]
    client.quit()
    proxy.stop()
    assert cached(proxy, dovecot.user, "mbox") == [small, big]
    assert dovecot.messages(dovecot.user) == []
    assert [p.name for p in mbox.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_a_state_database_that_cannot_be_opened_is_a_temporary_error(proxy, dovecot):
    # Not corruption: the database is fine, SQLite just cannot open its write-ahead log (here a
    # directory stands in its place). The login is refused for now and nothing is moved or rebuilt.
    messages = [sample(i, 3000) for i in range(3)]
    for m in messages:
        dovecot.deliver(dovecot.user, m)
    proxy.start(upstream={"delete": "never"})
    client = proxy.client(dovecot.user, dovecot.password)
    assert retr_all(client) == messages
    client.quit()
    proxy.stop()
    db = user_dir(proxy.root, dovecot.user) / "state.db"
    before = db.read_bytes()
    wal = Path(str(db) + "-wal")
    wal.unlink(missing_ok=True)
    wal.mkdir()
    proxy.start(upstream={"delete": "never"})
    with pytest.raises(poplib.error_proto, match=r"^b'-ERR \[SYS/TEMP\]"):
        proxy.client(dovecot.user, dovecot.password)
    assert db.read_bytes() == before
    assert not list(db.parent.glob("state.db.corrupt-*"))
    wal.rmdir()
    client = proxy.client(dovecot.user, dovecot.password)
    assert retr_all(client) == messages  # nothing fetched twice
    client.quit()
    assert "rebuilt" not in proxy.output()
