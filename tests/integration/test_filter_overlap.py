"""A cold sync through the filter process pool, against the real Dovecot: messages keep arriving while
earlier ones are filtered, several are filtered at once, and they are stored in provider order, each once.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from pop3proxy.filtering.pipeline import build_pipeline
from pop3proxy.net.endpoint import Endpoint
from pop3proxy.net.pop3_client import connect
from pop3proxy.proxy.sync import sync_mailbox
from pop3proxy.store import open_store
from pop3proxy.store.paths import user_dir
from pop3proxy.store.spool import Spool
from pop3proxy.store.state import UserState

pytestmark = pytest.mark.dovecot

USER = "alice"
P = "plugins.pool_filters"
COUNT = 24


def sample(i: int) -> bytes:
    body = b"".join(b"line %d of message %d\r\n" % (n, i) for n in range(200))
    return b"From: a@example.org\r\nSubject: message %d\r\nMessage-ID: <%d@example.org>\r\n\r\n" % (i, i) + body


def subject(data: bytes) -> str:
    start = data.index(b"Subject: ") + 9
    return data[start:data.index(b"\r\n", start)].decode()


@pytest.mark.parametrize("backend", ["maildir", "mbox"])
async def test_later_messages_arrive_while_one_is_filtered_and_all_are_stored_in_order(
    dovecot, tmp_path, monkeypatch, backend
):
    user, password = dovecot.new_user()
    for i in range(COUNT):
        dovecot.deliver(user, sample(i))
    fifo = tmp_path / "gate"
    os.mkfifo(fifo)
    record = tmp_path / "calls"
    pipeline = build_pipeline([
        {"use": f"{P}:FifoGate", "fifo": str(fifo), "subject": "message 0", "timeout": 30},
        {"use": f"{P}:Where", "seconds": 0.05, "record": str(record)},
        {"use": "attachments"},
    ], processes=2)

    # Every received message passes Spool.finish; count them to see fetching go on past message 0.
    received = 0
    all_received = trio.Event()
    real_finish = Spool.finish

    def finish(self):
        nonlocal received
        received += 1
        if received == COUNT:
            trio.from_thread.run_sync(all_received.set) if _in_thread() else all_received.set()
        return real_finish(self)

    monkeypatch.setattr(Spool, "finish", finish)

    mailbox = open_store(tmp_path / "cache", USER, backend)
    state = UserState(user_dir(tmp_path / "cache", USER) / "state.db")
    added: list[str] = []
    real_add_many = mailbox.add_many

    def add_many(messages):
        added.extend(subject(m) for m in messages)
        return real_add_many(messages)

    mailbox.add_many = add_many
    endpoint = Endpoint(dovecot.host, dovecot.tls_port, "implicit", ca_file=str(dovecot.ca_file), timeout=10)
    client = await connect(endpoint)
    try:
        async with client:
            await client.login(user, password)
            async with trio.open_nursery() as nursery:
                results = []

                async def run_sync() -> None:
                    results.append(await sync_mailbox(client, mailbox, state, user=USER, pipeline=pipeline,
                                                      policy="never"))

                nursery.start_soon(run_sync)
                with trio.fail_after(20):  # inline filtering would wait for message 0 for ever
                    await all_received.wait()
                assert added == []  # message 0 is still being filtered: nothing is stored before it
                await trio.to_thread.run_sync(lambda: open(fifo, "wb").close())
        result = results[0]
        assert (result.fetched, result.remaining, result.errors) == (COUNT, 0, [])
        assert added == [f"message {i}" for i in range(COUNT)]  # provider order, each once
        stored = []
        for info in mailbox.list():
            with mailbox.open(info.key) as f:
                stored.append(f.read())
        assert sorted(map(subject, stored)) == sorted(added)
        assert all(b"X-POP3Proxy-Warning" not in m for m in stored)
        pids = {line.split()[0] for line in record.read_text().splitlines()}
        assert str(os.getpid()) not in pids and 1 <= len(pids) <= 2
        assert sum(b"X-Gate: passed\r\n" in m for m in stored) == 1
    finally:
        mailbox.close()
        state.close()


def _in_thread() -> bool:
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return True
    return False
