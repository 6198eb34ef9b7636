"""The order of the disk and the provider: no DELE reaches the provider before the message is durable.

A sync runs in-process against the real Dovecot; every os.fsync, rename and DELE is recorded in the
order it happened. For each DELE the record must show, before it, the message's bytes fsync'ed and
then the directory entry that makes them visible fsync'ed too (Maildir: file fsync'ed in tmp/, renamed
into new/, new/ fsync'ed; mbox: the mbox fsync'ed past the message's end, then the commit file that
covers it renamed into place and its directory fsync'ed).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from pop3proxy.filtering.pipeline import build_pipeline
from pop3proxy.net.endpoint import Endpoint
from pop3proxy.net.pop3_client import connect
from pop3proxy.proxy.sync import sync_mailbox, upstream_ids
from pop3proxy.store import open_store
from pop3proxy.store.mbox import MboxMailbox
from pop3proxy.store.paths import user_dir
from pop3proxy.store.state import UserState

pytestmark = pytest.mark.dovecot

USER = "alice"


def sample(i: int, size: int) -> bytes:
    body = b"".join(b"line %d of message %d\r\n" % (n, i) for n in range(max(1, size // 24)))
    return b"From: a@example.org\r\nSubject: message %d\r\nMessage-ID: <%d@example.org>\r\n\r\n" % (i, i) + body


class Recorder:
    """Records fsyncs (path, size), renames (source, target, and a commit file's content) and DELEs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple] = []
        self._lock = threading.Lock()
        real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

        def fsync(fd: int) -> None:
            real_fsync(fd)
            self.add("fsync", os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_size)

        def renamer(real):
            def rename(src, dst, *args, **kwargs) -> None:
                content = Path(src).read_bytes() if str(dst).endswith(".committed") else None
                real(src, dst, *args, **kwargs)
                self.add("rename", str(src), str(dst), content)

            return rename

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "rename", renamer(real_rename))
        monkeypatch.setattr(os, "replace", renamer(real_replace))

    def add(self, *event) -> None:
        with self._lock:
            self.events.append(event)

    def index(self, predicate, before: int, after: int = -1) -> int | None:
        """The position of the last event between `after` and `before` that matches, or None."""
        for position in range(before - 1, after, -1):
            if predicate(self.events[position]):
                return position
        return None


def durable_in_maildir(rec: Recorder, at: int, maildir: Path, key: str) -> str | None:
    """Why the message `key` was not durable at event `at` (None: it was)."""
    new = str(maildir / "new" / key)
    renamed = rec.index(lambda e: e[0] == "rename" and e[2] == new, at)
    if renamed is None:
        return "not renamed into new/"
    source = rec.events[renamed][1]
    if rec.index(lambda e: e[0] == "fsync" and e[1] == source, renamed) is None:
        return "file not fsync'ed before its rename"
    if rec.index(lambda e: e[0] == "fsync" and e[1] == str(maildir / "new"), at, renamed) is None:
        return "new/ not fsync'ed after the rename"
    return None


def durable_in_mbox(rec: Recorder, at: int, mbox: Path, stop: int) -> str | None:
    """Why the message ending at offset `stop` of the mbox was not durable at event `at`."""
    commit = str(mbox.with_name(f".{mbox.name}.committed"))
    committed = rec.index(
        lambda e: e[0] == "rename" and e[2] == commit and int(e[3].split()[1]) >= stop, at
    )
    if committed is None:
        return "no commit covering the message"
    if rec.index(lambda e: e[0] == "fsync" and e[1] == str(mbox) and e[2] >= stop, committed) is None:
        return "mbox not fsync'ed past the message before the commit"
    if rec.index(lambda e: e[0] == "fsync" and e[1] == str(mbox.parent), at, committed) is None:
        return "directory not fsync'ed after the commit"
    return None


def recording_dele(rec: Recorder, real_dele, ids: dict[int, str]):
    async def dele(number: int) -> None:
        rec.add("DELE", ids[number])
        await real_dele(number)

    return dele


@pytest.mark.parametrize("backend", ["maildir", "mbox"])
@pytest.mark.parametrize("policy", ["after_fetch", "never+delete_after_days"])
async def test_no_dele_before_the_cached_copy_is_durable(dovecot, tmp_path, monkeypatch, backend, policy):
    user, password = dovecot.new_user()
    messages = [sample(i, 200_000 if i % 7 == 3 else 3_000) for i in range(40)]
    for m in messages:
        dovecot.deliver(user, m)
    endpoint = Endpoint(dovecot.host, dovecot.tls_port, "implicit", ca_file=str(dovecot.ca_file), timeout=10)
    root = tmp_path / "cache"
    passes = 2 if policy.startswith("never") else 1  # delete_after_days=0: deleted on the pass after fetching
    rec = Recorder(monkeypatch)
    numbers_to_uid: dict[int, str] = {}
    for _ in range(passes):
        client = await connect(endpoint)
        async with client:
            await client.login(user, password)
            numbers_to_uid = await upstream_ids(client)
            client.dele = recording_dele(rec, client.dele, numbers_to_uid)
            mailbox = open_store(root, USER, backend)
            state = UserState(user_dir(root, USER) / "state.db")
            try:
                await sync_mailbox(
                    client, mailbox, state, user=USER, pipeline=build_pipeline([]),
                    policy="after_fetch" if policy == "after_fetch" else "never",
                    delete_after_days=None if policy == "after_fetch" else 0,
                )
            finally:
                mailbox.close()
                state.close()
    assert dovecot.messages(user) == []
    with UserState(user_dir(root, USER) / "state.db") as state:
        keys = {row.uid: row.key for row in state.rows()}
    deles = [(position, event[1]) for position, event in enumerate(rec.events) if event[0] == "DELE"]
    assert sorted(uid for _, uid in deles) == sorted(keys)  # every message, once
    problems = []
    if backend == "maildir":
        maildir = user_dir(root, USER) / "Maildir"
        for position, uid in deles:
            if (why := durable_in_maildir(rec, position, maildir, keys[uid])) is not None:
                problems.append(f"DELE of {uid}: {why}")
    else:
        mbox = user_dir(root, USER) / "mbox"
        stops = {entry.key: entry.stop for entry in MboxMailbox(mbox)._current_index().entries}
        for position, uid in deles:
            if (why := durable_in_mbox(rec, position, mbox, stops[keys[uid]])) is not None:
                problems.append(f"DELE of {uid}: {why}")
    print(f"{backend}/{policy}: {len(deles)} DELEs checked against {len(rec.events)} recorded events")
    assert problems == [], problems[:5]
