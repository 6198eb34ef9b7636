"""Held mail: the store, release into the served mailbox and the state database, the sync's hold
callback, and ``pop3proxy held``."""

from __future__ import annotations

import mailbox as pymailbox
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.common import write_config

from pop3proxy.cli import main
from pop3proxy.filtering.api import FilterResult
from pop3proxy.filtering.pipeline import build_pipeline
from pop3proxy.proxy.sync import digest, sync_mailbox
from pop3proxy.store import held as held_module
from pop3proxy.store import open_store
from pop3proxy.store.crlf import normalise
from pop3proxy.store.held import HeldError, HeldStore, held_owners, hold_callback
from pop3proxy.store.locks import MailboxBusy, lock_mailbox
from pop3proxy.store.paths import user_dir
from pop3proxy.store.state import UserState

TESTS = Path(__file__).resolve().parents[1]
MAIL = TESTS / "data" / "mail"
LUNCH = (MAIL / "plain-lunch.eml").read_bytes()
NEWSLETTER = (MAIL / "dkim-newsletter-tracking.eml").read_bytes()
SPAM = FilterResult(NEWSLETTER, action="quarantine", verdicts=["spam: score 12.5"])
BROKEN = FilterResult(LUNCH, action="hold", errors=["spam: timed out after 60 s"])


def state_of(root: Path, user: str) -> UserState:
    return UserState(user_dir(root, user) / "state.db")


def rows(root: Path, user: str) -> dict[str, tuple[str, str | None]]:
    with state_of(root, user) as state:
        return {row.uid: (row.status, row.key) for row in state.rows()}


def hold_as_sync_does(root: Path, user: str, uid: str, data: bytes, result: FilterResult) -> str:
    """What sync_mailbox does with a held message: claim the row, hold it, mark the row held."""
    cached = normalise(data)
    open_store(root, user).close()  # the cache exists before a sync opens the state database
    with state_of(root, user) as state:
        assert state.begin_fetch(uid, digest(cached))
        key = hold_callback(root, user)(cached, uid, result)
        state.finish_fetch(uid, key, len(cached), "held")
    return key


def served(root: Path, user: str, backend: str = "maildir") -> list[bytes]:
    with open_store(root, user, backend) as box:
        out = []
        for info in box.list():
            with box.open(info.key) as f:
                out.append(f.read())
        return out


# -- the store ---------------------------------------------------------------------------------------


def test_add_list_get(tmp_path):
    store = HeldStore(tmp_path, "alice")
    assert store.list() == []
    assert not (tmp_path / "alice").exists()  # listing creates nothing
    before = time.time()
    key = store.add(NEWSLETTER, "uid-1", SPAM)
    key2 = store.add(LUNCH.replace(b"\r\n", b"\n"), "uid-2", BROKEN)
    items = store.list()
    assert [item.key for item in items] == [key, key2]
    spam, broken = items
    assert (spam.uid, spam.action, spam.reasons, spam.size) == ("uid-1", "quarantine", ("spam: score 12.5",), len(NEWSLETTER))
    assert before - 1 <= spam.time <= time.time() + 1
    assert spam.sender == "Schöner Laden <news@shop.example>"
    assert spam.subject == "Frühlingsangebote: bis zu 30 % Rabatt auf ausgewählte Artikel – nur diese Woche"
    assert (broken.uid, broken.action, broken.reasons) == ("uid-2", "hold", ("spam: timed out after 60 s",))
    assert (broken.sender, broken.subject) == ("Carol <carol@example.org>", "Lunch on Friday?")
    assert store.get(key) == NEWSLETTER
    assert store.get(key2) == LUNCH  # stored in CRLF form, like the cache
    with pytest.raises(KeyError):
        store.get("no-such-key")
    assert served(tmp_path, "alice") == []  # held mail is not served
    held_dir = user_dir(tmp_path, "alice") / "held"
    assert sorted(m.get("Subject") for m in pymailbox.Maildir(held_dir, create=False)) == [
        "=?utf-8?q?Fr=C3=BChlingsangebote=3A_bis_zu_30_=25_Rabatt_auf_ausgew?=\n =?utf-8?q?=C3=A4hlte_Artikel_=E2=80=93_nur_diese_Woche?=",
        "Lunch on Friday?",
    ]
    for path in [held_dir, held_dir / "meta", user_dir(tmp_path, "alice")]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    for path in (held_dir / "meta").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_the_same_message_held_again_keeps_its_key(tmp_path):
    store = HeldStore(tmp_path, "alice")
    key = store.add(NEWSLETTER, "uid-1", SPAM)
    assert store.add(NEWSLETTER, "uid-1", SPAM) == key  # a sync repeated after a crash
    assert store.add(NEWSLETTER, "uid-9", SPAM) != key  # the same bytes under another uid: another message
    assert len(store.list()) == 2


def test_a_message_whose_metadata_was_lost_is_listed_and_adopted(tmp_path):
    store = HeldStore(tmp_path, "alice")
    key = store.add(NEWSLETTER, "uid-1", SPAM)
    for path in (user_dir(tmp_path, "alice") / "held" / "meta").iterdir():
        path.unlink()  # a crash between writing the message and its metadata
    (item,) = store.list()
    assert (item.key, item.uid, item.action, item.reasons) == (key, "", "hold", ("(why it was held is not recorded)",))
    assert item.time == float(key.split(".")[0])
    assert store.add(NEWSLETTER, "uid-1", SPAM) == key
    (item,) = store.list()
    assert (item.uid, item.action, item.reasons) == ("uid-1", "quarantine", ("spam: score 12.5",))


def test_release_serves_the_message_and_updates_the_state_row(tmp_path):
    key = hold_as_sync_does(tmp_path, "alice", "uid-1", NEWSLETTER, SPAM)
    assert rows(tmp_path, "alice") == {"uid-1": ("held", key)}
    info = HeldStore(tmp_path, "alice").release(key)
    assert served(tmp_path, "alice") == [NEWSLETTER]
    assert info.size == len(NEWSLETTER)
    assert rows(tmp_path, "alice") == {"uid-1": ("cached", info.key)}
    assert HeldStore(tmp_path, "alice").list() == []
    with pytest.raises(KeyError):
        HeldStore(tmp_path, "alice").release(key)
    assert list((user_dir(tmp_path, "alice") / "held" / "meta").iterdir()) == []


def test_release_into_an_mbox_cache(tmp_path):
    key = hold_as_sync_does(tmp_path, "alice", "uid-1", LUNCH, BROKEN)
    info = HeldStore(tmp_path, "alice", backend="mbox").release(key)
    assert served(tmp_path, "alice", "mbox") == [LUNCH]
    assert rows(tmp_path, "alice") == {"uid-1": ("cached", info.key)}
    assert (user_dir(tmp_path, "alice") / "mbox").read_bytes().startswith(b"From ")


def test_release_waits_for_the_mailbox_lock(tmp_path):
    key = hold_as_sync_does(tmp_path, "alice", "uid-1", LUNCH, BROKEN)
    with lock_mailbox(tmp_path, "alice"):  # a session or a sync has the mailbox
        with pytest.raises(MailboxBusy):
            HeldStore(tmp_path, "alice").release(key)
        assert served(tmp_path, "alice") == []
        assert rows(tmp_path, "alice") == {"uid-1": ("held", key)}
        info = HeldStore(tmp_path, "alice").release(key, lock=False)  # the lock holder may release
    assert rows(tmp_path, "alice") == {"uid-1": ("cached", info.key)}


class Crash(Exception):
    pass


@pytest.mark.parametrize("step", ["mark_released", "_remove"])
def test_a_release_interrupted_by_a_crash_is_finished_by_the_next_one(tmp_path, monkeypatch, step):
    key = hold_as_sync_does(tmp_path, "alice", "uid-1", LUNCH, BROKEN)
    hold_as_sync_does(tmp_path, "alice", "uid-2", NEWSLETTER, SPAM)

    def crash(*args, **kwargs):
        raise Crash(step)

    if step == "mark_released":  # the copy is served, the state row not yet updated
        monkeypatch.setattr(held_module, "mark_released", crash)
    else:  # the row is updated, the held copy not yet removed
        monkeypatch.setattr(HeldStore, "_remove", crash)
    with pytest.raises(Crash):
        HeldStore(tmp_path, "alice").release(key)
    monkeypatch.undo()
    assert served(tmp_path, "alice") == [LUNCH]
    info = HeldStore(tmp_path, "alice").release(key)
    assert served(tmp_path, "alice") == [LUNCH]  # one copy, not two
    assert rows(tmp_path, "alice")["uid-1"] == ("cached", info.key)
    assert [item.uid for item in HeldStore(tmp_path, "alice").list()] == ["uid-2"]


def test_release_of_a_message_without_metadata_or_row(tmp_path):
    store = HeldStore(tmp_path, "alice")
    key = store.add(LUNCH, "uid-1", BROKEN)
    for path in (user_dir(tmp_path, "alice") / "held" / "meta").iterdir():
        path.unlink()
    info = store.release(key)
    assert served(tmp_path, "alice") == [LUNCH]
    assert rows(tmp_path, "alice") == {}  # the uid is unknown: no row to write
    assert info.size == len(LUNCH)


def test_release_writes_a_row_when_the_held_row_is_missing(tmp_path):
    key = HeldStore(tmp_path, "alice").add(LUNCH, "uid-1", BROKEN)
    info = HeldStore(tmp_path, "alice").release(key)
    assert rows(tmp_path, "alice") == {"uid-1": ("cached", info.key)}  # so it is not fetched again


def test_delete_keeps_the_state_row(tmp_path):
    key = hold_as_sync_does(tmp_path, "alice", "uid-1", NEWSLETTER, SPAM)
    store = HeldStore(tmp_path, "alice")
    store.delete(key)
    assert store.list() == []
    with pytest.raises(KeyError):
        store.get(key)
    with pytest.raises(KeyError):
        store.delete(key)
    assert rows(tmp_path, "alice") == {"uid-1": ("held", key)}
    assert served(tmp_path, "alice") == []


def test_a_store_without_its_user_name_can_be_read_but_not_released(tmp_path):
    long_name = "a" * 300 + "@example.org"
    key = HeldStore(tmp_path, long_name).add(LUNCH, "uid-1", BROKEN)
    (owner,) = held_owners(tmp_path)
    assert owner.user is None
    assert owner.label.startswith("aaaa") and owner.label.endswith("...")
    store = owner.store(tmp_path)
    assert [item.key for item in store.list()] == [key]
    with pytest.raises(HeldError):
        store.release(key)


def test_held_owners(tmp_path):
    for user in ("alice", "bob@example.org", "../evil", ".hidden", "Jürgen Müller"):
        HeldStore(tmp_path, user).add(LUNCH, "uid-1", BROKEN)
    open_store(tmp_path, "carol").close()  # a user without held mail
    owners = held_owners(tmp_path)
    assert sorted(o.user for o in owners) == sorted(["alice", "bob@example.org", "../evil", ".hidden", "Jürgen Müller"])
    for owner in owners:
        assert owner.directory == user_dir(tmp_path, owner.user)
        assert owner.directory.parent == tmp_path
    assert held_owners(tmp_path / "nonexistent") == []


# -- holding during a sync ---------------------------------------------------------------------------


class FakeUpstream:
    """Stands in for a logged-in upstream session: messages by number, deletions applied at QUIT."""

    def __init__(self, messages: dict[str, bytes]) -> None:
        self.messages = dict(messages)  # uid -> bytes, in upstream order
        self.marked: set[str] = set()
        self.retrieved: list[str] = []

    def _numbers(self) -> dict[int, str]:
        return dict(enumerate(self.messages, start=1))

    async def uidl(self) -> dict[int, str]:
        return self._numbers()

    async def list(self) -> dict[int, int]:
        return {n: len(self.messages[uid]) for n, uid in self._numbers().items()}

    async def header_digest(self, number: int) -> str:
        raise AssertionError("this server has UIDL")

    async def retr_many(self, numbers, begin, end, **window) -> None:
        for index, number in enumerate(numbers):
            await self.retr(number, begin(number, index))
            await end(number, None)

    async def retr(self, number: int, sink) -> int:
        uid = self._numbers()[number]
        self.retrieved.append(uid)
        await sink(self.messages[uid])
        return len(self.messages[uid])

    async def dele(self, number: int) -> None:
        self.marked.add(self._numbers()[number])

    async def quit(self, wait: bool = True) -> None:
        for uid in self.marked:
            del self.messages[uid]
        self.marked.clear()


async def _sync(root: Path, user: str, upstream: FakeUpstream, pipeline, policy: str = "mirror"):
    mailbox = open_store(root, user)
    state = state_of(root, user)
    try:
        return await sync_mailbox(
            upstream, mailbox, state, user=user, pipeline=pipeline, policy=policy, hold=hold_callback(root, user)
        )
    finally:
        mailbox.close()
        state.close()


async def test_hold_callback_during_a_sync(tmp_path):
    spam = LUNCH.replace(b"Subject: Lunch on Friday?", b"Subject: Cheap watches, act now")
    upstream = FakeUpstream({"u1": LUNCH, "u2": spam, "u3": NEWSLETTER})
    pipeline = build_pipeline(
        [
            {"use": "headers", "remove": ["X-Tracking-*"]},
            {"use": "plugins.example_filter:SubjectWatch", "words": ["cheap watches"], "quarantine": True},
        ]
    )
    result = await _sync(tmp_path, "alice", upstream, pipeline)
    assert (result.fetched, result.held) == (3, 1)
    stripped = LUNCH.replace(b"X-Tracking-ID: 0f0f0f\r\n", b"")
    assert stripped in served(tmp_path, "alice") and len(served(tmp_path, "alice")) == 2
    (item,) = HeldStore(tmp_path, "alice").list()
    assert item.uid == "u2" and item.action == "quarantine"
    assert item.reasons == ("headers: removed X-Tracking-ID", "subject-watch: subject contains cheap watches")
    assert HeldStore(tmp_path, "alice").get(item.key) == spam.replace(b"X-Tracking-ID: 0f0f0f\r\n", b"")
    state = rows(tmp_path, "alice")
    assert state["u2"] == ("held", item.key)
    assert state["u1"][0] == state["u3"][0] == "cached"

    # Held mail is not fetched again; released mail is served and follows the deletion policy.
    upstream.retrieved.clear()
    assert (await _sync(tmp_path, "alice", upstream, pipeline)).fetched == 0
    assert upstream.retrieved == []
    info = HeldStore(tmp_path, "alice").release(item.key)
    assert len(served(tmp_path, "alice")) == 3
    with state_of(tmp_path, "alice") as st:
        st.mark_deleted([info.key])  # the client deleted the released message
    result = await _sync(tmp_path, "alice", upstream, pipeline)
    assert (result.fetched, result.deleted_upstream) == (0, 1)
    assert list(upstream.messages) == ["u1", "u3"]


async def test_a_filter_failure_with_on_error_hold_during_a_sync(tmp_path):
    upstream = FakeUpstream({"u1": LUNCH})
    pipeline = build_pipeline([{"use": "plugins.pipeline_filters:Failing", "on_error": "hold"}])
    result = await _sync(tmp_path, "alice", upstream, pipeline, policy="after_fetch")
    assert (result.fetched, result.held, result.deleted_upstream) == (1, 1, 1)
    assert upstream.messages == {}  # cached safely in held/, so deleted upstream per after_fetch
    (item,) = HeldStore(tmp_path, "alice").list()
    assert item.action == "hold"
    assert item.reasons == ("failing: ConnectionRefusedError: backend at 127.0.0.1:9 refused the connection",)
    assert HeldStore(tmp_path, "alice").get(item.key).endswith(LUNCH)
    assert served(tmp_path, "alice") == []


# -- pop3proxy held ----------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pop3proxy", *args], capture_output=True, text=True, timeout=60, env=dict(os.environ)
    )


def test_held_command(tmp_path, capsys):
    root = tmp_path / "cache"
    config = str(write_config(tmp_path / "c.toml", {"cache": {"root": str(root)}}))

    def cli(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    assert cli("held", "list", "--config", config) == (0, "no held messages\n", "")
    spam_key = hold_as_sync_does(root, "alice", "uid-1", NEWSLETTER, SPAM)
    lunch_key = hold_as_sync_does(root, "bob@example.org", "uid-7", LUNCH, BROKEN)

    result = run_cli("held", "list", "--config", config)  # as a user runs it
    assert (result.returncode, result.stderr) == (0, "")
    out = result.stdout
    assert f"alice  {spam_key}\n  quarantine, {len(NEWSLETTER)} bytes, held " in out
    assert "upstream uid uid-1\n  From: Schöner Laden <news@shop.example>\n" in out
    assert "  why: spam: score 12.5\n" in out
    assert f"bob@example.org  {lunch_key}\n  hold, {len(LUNCH)} bytes" in out
    assert "  Subject: Lunch on Friday?\n  why: spam: timed out after 60 s\n" in out
    assert "Liebe Alice" not in out and "lunch on Friday at noon" not in out  # never a body

    code, out, _ = cli("held", "list", "--config", config, "--user", "bob@example.org")
    assert code == 0 and lunch_key in out and spam_key not in out
    assert cli("held", "list", "--config", config, "--user", "carol") == (0, "no held messages for carol\n", "")
    code, out, _ = cli("held", "list", "--config", config, spam_key)
    assert code == 0 and spam_key in out and lunch_key not in out
    assert cli("held", "list", "--config", config, "1999.") == (0, "no held message matches\n", "")

    code, _, err = cli("held", "release", "--config", config)
    assert code == 2 and "name the KEY" in err
    assert cli("held", "delete", "--config", config, "1999.nope") == (
        1, "", "pop3proxy: 1999.nope: no held message has this key\n"
    )
    with lock_mailbox(root, "alice"):
        code, out, err = cli("held", "release", "--config", config, spam_key)
    assert (code, err) == (1, f"pop3proxy: {spam_key}: the mailbox of alice is in use; try again later\n")

    result = run_cli("held", "release", "--config", config, spam_key[:-3])  # a unique beginning will do
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"released {spam_key} of alice: now served as ")
    assert served(root, "alice") == [NEWSLETTER]
    assert rows(root, "alice")["uid-1"][0] == "cached"

    code, out, _ = cli("held", "delete", "--config", config, "--user", "bob@example.org", lunch_key)
    assert (code, out) == (0, f"deleted {lunch_key} of bob@example.org\n")
    assert rows(root, "bob@example.org") == {"uid-7": ("held", lunch_key)}
    assert cli("held", "list", "--config", config) == (0, "no held messages\n", "")
