"""The proxy's promises with a misbehaving provider (`faulty_upstream`): a connection dropped in the
middle of RETR, a stall past ``upstream.timeout``, garbage, no CAPA, no UIDL, TLS refused, ``[IN-USE]``
and ``[LOGIN-DELAY]``, a provider that trickles, refuses a message or answers without bound.

The proxy is always a real ``pop3proxy serve`` process and the clients are poplib.
"""

from __future__ import annotations

import json
import poplib
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import trio
from helpers.common import HOST, ServerProcess, write_config
from helpers.faults import cache_rows
from helpers.faulty_upstream import GREETING, faulty_server
from helpers.proxy import cached, retr_all, sample
from helpers.waiting import wait_for_async

from pop3proxy.store.paths import user_dir
from pop3proxy.store.state import UserState


# --- a misbehaving provider (the scripted faulty server) ------------------------------------------

FAULTY_TIMEOUT = 1.0
FAULTY_BUDGET = 3.0
PASSWORD = "pw-faulty-7Qx"


def message(i: int, size: int = 600) -> bytes:
    return sample(1000 + i, size)


async def concurrently(*calls):
    """Run async calls side by side; their results in order."""
    results: list = [None] * len(calls)

    async def run(index: int) -> None:
        results[index] = await calls[index]()

    async with trio.open_nursery() as nursery:
        for index in range(len(calls)):
            nursery.start_soon(run, index)
    return results


@dataclass
class Session:
    reply: str  # the +OK to PASS
    elapsed: float  # seconds from PASS to that reply
    messages: list[bytes]
    uids: list[str]


class FaultyProxy:
    """A proxy process whose provider is a `faulty_upstream.FaultyServer` (plain POP3)."""

    def __init__(self, factory, tmp_path: Path, port: int) -> None:
        self.factory = factory
        self.tmp_path = tmp_path
        self.root = tmp_path / "cache"
        self.port = port
        self.process: ServerProcess | None = None
        self.logs: list[str] = []

    async def start(self, sync: dict | None = None, **upstream) -> "FaultyProxy":
        """(Re)start the proxy; `upstream` overrides [upstream] settings, `sync` [sync] ones."""
        await self.stop()
        settings = {"host": HOST, "port": self.port, "tls": "none", "timeout": FAULTY_TIMEOUT, **upstream}
        config = write_config(self.tmp_path / "proxy.toml", {
            "listen": {"host": HOST, "port": 0},
            "upstream": settings,
            "cache": {"root": self.root},
            "sync": {"login_budget": FAULTY_BUDGET, **(sync or {})},
            "log": {"level": "debug"},
        })
        self.process = await trio.to_thread.run_sync(self.factory(config).start)
        return self

    async def stop(self) -> None:
        if self.process is not None:
            process, self.process = self.process, None
            await trio.to_thread.run_sync(process.stop)
            self.logs.append(process.output())

    def alive(self) -> bool:
        return self.process is not None and self.process.proc is not None and self.process.proc.poll() is None

    def output(self) -> str:
        return "\n".join(self.logs + ([self.process.output()] if self.process else []))

    async def session(self, user: str, password: str, dele: tuple[int, ...] = ()) -> "Session":
        """Log in, read everything, delete `dele`, QUIT. Raises poplib.error_proto if refused."""
        assert self.process is not None
        port = self.process.port

        def run() -> Session:
            client = poplib.POP3(HOST, port, timeout=30)
            try:
                client.user(user)
                started = time.monotonic()
                reply = client.pass_(password)
                elapsed = time.monotonic() - started
                messages = retr_all(client)
                uids = [line.split()[1].decode() for line in client.uidl()[1]]
                for number in dele:
                    client.dele(number)
                client.quit()
            except BaseException:
                client.close()
                raise
            return Session(reply.decode(), elapsed, messages, uids)

        return await trio.to_thread.run_sync(run)

    async def refused(self, user: str, password: str) -> tuple[str, float]:
        """Log in expecting -ERR; the reply and how long it took."""
        assert self.process is not None
        port = self.process.port

        def run() -> tuple[str, float]:
            client = poplib.POP3(HOST, port, timeout=30)
            try:
                client.user(user)
                started = time.monotonic()
                try:
                    client.pass_(password)
                except poplib.error_proto as exc:
                    reply = exc.args[0]
                    reply = reply.decode() if isinstance(reply, bytes) else str(reply)
                    return reply, time.monotonic() - started
                raise AssertionError(f"login of {user!r} was accepted")
            finally:
                client.close()

        return await trio.to_thread.run_sync(run)


@pytest.fixture
async def faulty(server_process, tmp_path):
    """(server, proxy): a faulty server holding two messages for alice, a proxy in front."""
    async with faulty_server(messages={"u1": message(1), "u2": message(2)}, password=PASSWORD) as server:
        proxy = FaultyProxy(server_process, tmp_path, server.port)
        await proxy.start()
        try:
            yield server, proxy
        finally:
            await proxy.stop()
            assert PASSWORD not in proxy.output(), "a password reached the log"


async def test_drop_mid_retr_serves_cache_never_a_fragment(faulty):
    server, proxy = faulty
    await proxy.start(delete="after_fetch")
    first = await proxy.session("alice", PASSWORD)
    assert first.messages == [message(1), message(2)]
    assert server.messages == {}  # moved home: after_fetch
    big = message(3, 300_000)
    server.messages["u3"] = big
    server.behaviour.drop_mid_retr = True
    broken = await proxy.session("alice", PASSWORD)
    assert broken.messages == [message(1), message(2)]  # no fragment of the third
    assert broken.uids == first.uids
    assert "could not" in broken.reply
    assert cached(proxy, "alice") == [message(1), message(2)]
    assert [row.uid for row in cache_rows(proxy.root, "alice")] == ["u1", "u2"]
    assert server.messages == {"u3": big}  # nothing deleted upstream
    server.behaviour.drop_mid_retr = False
    healed = await proxy.session("alice", PASSWORD)
    assert healed.messages == [message(1), message(2), big]
    assert healed.uids[:2] == first.uids
    assert server.messages == {}
    assert proxy.alive()


@pytest.mark.parametrize("fault", ["stall", "garbage"])
async def test_stalled_or_garbled_provider_serves_the_cache(faulty, fault):
    # Stalls last past upstream.timeout; garbage is a line that is no POP3 reply (on PASS it echoes
    # the password, which must not reach the log). alice has a cache and an offline hash; bob neither.
    server, proxy = faulty
    behaviour = server.behaviour
    served = await proxy.session("alice", PASSWORD)
    assert served.messages == [message(1), message(2)]
    limit = FAULTY_BUDGET + FAULTY_TIMEOUT
    for number, point in enumerate([GREETING, "PASS", "UIDL", "RETR"], start=3):
        where = f"{fault} on {point}"
        server.messages[f"u{number}"] = message(number)
        setattr(behaviour, f"{fault}_on", point)
        if point in (GREETING, "PASS"):  # the provider cannot be used: offline, from the cache
            session, (refusal, refusal_time) = await concurrently(
                partial(proxy.session, "alice", PASSWORD), partial(proxy.refused, "bob", PASSWORD)
            )
            assert "offline" in session.reply, where
            assert refusal.startswith("-ERR [SYS/TEMP]") and refusal_time < limit, (where, refusal)
        else:  # logged in, but the sync broke off: the cache, with a note
            session = await proxy.session("alice", PASSWORD)
            assert "offline" not in session.reply and "could not" in session.reply, where
        assert session.messages == served.messages and session.elapsed < limit, where
        setattr(behaviour, f"{fault}_on", None)
        served = await proxy.session("alice", PASSWORD)
        assert served.messages == [message(i) for i in range(1, number + 1)], where
    # Accepted by the provider but nothing could be fetched: an empty mailbox, with the note.
    behaviour.user = "bob"
    setattr(behaviour, f"{fault}_on", "RETR")
    empty = await proxy.session("bob", PASSWORD)
    assert empty.messages == [] and "could not" in empty.reply and empty.elapsed < limit
    assert proxy.alive()


async def test_provider_without_capa_logs_in_with_user_pass(faulty):
    server, proxy = faulty
    server.behaviour.capa = False
    server.behaviour.sasl_plain = True  # offered, but nobody can tell without CAPA
    session = await proxy.session("alice", PASSWORD)
    assert session.messages == [message(1), message(2)]
    assert "USER" in server.commands and "PASS" in server.commands
    assert "AUTH" not in server.commands


async def test_provider_without_uidl_is_synced_by_header_digests(faulty):
    server, proxy = faulty
    server.behaviour.uidl = False
    first = await proxy.session("alice", PASSWORD)
    assert first.messages == [message(1), message(2)]
    assert "TOP" in server.commands and server.commands.count("RETR") == 2
    assert all(row.uid.startswith("hd-") for row in cache_rows(proxy.root, "alice"))
    server.messages["u3"] = message(3)
    second = await proxy.session("alice", PASSWORD, dele=(1,))
    assert second.messages == [message(1), message(2), message(3)]
    assert second.uids[:2] == first.uids
    assert server.commands.count("RETR") == 3  # only the new one was fetched
    # The client's deletion is mirrored upstream by the same header digests.
    assert server.messages == {"u2": message(2), "u3": message(3)}
    third = await proxy.session("alice", PASSWORD)
    assert third.messages == [message(2), message(3)]
    assert server.commands.count("RETR") == 3


async def test_failed_tls_handshake_is_an_error_not_offline(faulty):
    server, proxy = faulty
    assert (await proxy.session("alice", PASSWORD)).messages == [message(1), message(2)]
    server.messages["u3"] = message(3)
    await proxy.start(tls="implicit")  # the provider only speaks plain POP3
    # Someone in the middle can break a handshake at will: no offline fallback, even with a cache.
    reply, _ = await proxy.refused("alice", PASSWORD)
    assert reply.startswith("-ERR [SYS/TEMP]") and "offline" not in reply
    reply, _ = await proxy.refused("bob", PASSWORD)
    assert reply.startswith("-ERR [SYS/TEMP]")
    await wait_for_async(proxy, "TLS")  # logged before the reply; its reader may see it a moment later


async def test_provider_response_codes_reach_the_client(faulty):
    server, proxy = faulty
    await proxy.session("alice", PASSWORD)
    for code in ("IN-USE", "LOGIN-DELAY"):
        server.behaviour.auth_error_code = code
        server.behaviour.password = "changed-meanwhile"  # refused, with the code
        for _ in range(2):
            reply, _ = await proxy.refused("alice", PASSWORD)
            assert reply.startswith(f"-ERR [{code}]"), reply
        # Not a wrong password: the offline copy stays usable.
        with UserState(user_dir(proxy.root, "alice") / "state.db") as state:
            assert state.get_meta("offline_hash")
        server.behaviour.password = PASSWORD
        assert (await proxy.session("alice", PASSWORD)).messages == [message(1), message(2)]


async def test_login_right_after_quit_is_not_in_use(faulty):
    # The previous session's mailbox lock is released before (or while) the next login takes it.
    server, proxy = faulty
    for _ in range(20):
        assert (await proxy.session("alice", PASSWORD)).messages == [message(1), message(2)]


async def test_trickling_provider_is_stopped_by_the_sync_deadline(faulty):
    # One byte every 50 ms never trips upstream.timeout, yet the message would take about 10 s: the
    # whole-sync deadline (1 s here) ends the sync, frees the account and says why in the log.
    server, proxy = faulty
    server.messages["u3"] = message(3) + b"x" * 150 + b"\r\n"
    server.behaviour.trickle_retr = 0.05
    await proxy.start(sync={"deadline": 1})
    session = await proxy.session("alice", PASSWORD)
    assert "still downloading" in session.reply or "could not" in session.reply
    # the sync was stopped by its deadline: bound 5 s, well below the 10 s the message would take
    await wait_for_async(proxy, "sync deadline", timeout=5)
    server.behaviour.trickle_retr = None
    session = await proxy.session("alice", PASSWORD)
    assert session.messages == [message(1), message(2), message(3) + b"x" * 150 + b"\r\n"]


async def test_a_refused_message_is_skipped_and_retried_later(faulty):
    server, proxy = faulty
    server.messages["u3"] = message(3)
    server.messages["u4"] = message(4)
    server.behaviour.refuse_retr = {"u3"}
    session = await proxy.session("alice", PASSWORD)
    assert session.messages == [message(1), message(2), message(4)]  # u4 after it still arrives
    assert "1 message refused by the provider" in session.reply, session.reply
    retrs = server.commands.count("RETR")
    # Backing off: the next pass does not ask again at once.
    session = await proxy.session("alice", PASSWORD)
    assert server.commands.count("RETR") == retrs
    assert "refused by the provider" in session.reply
    status = subprocess.run(
        [sys.executable, "-m", "pop3proxy", "status", "--config", str(proxy.tmp_path / "proxy.toml")],
        capture_output=True, text=True, timeout=60,
    )
    assert "refused" in status.stdout and "u3" not in status.stderr, status.stdout + status.stderr
    # Once the back-off is over the message is asked for again, and fetched when the provider gives it.
    server.behaviour.refuse_retr = set()
    with UserState(user_dir(proxy.root, "alice") / "state.db") as state:
        refused = json.loads(state.get_meta("refused_messages"))
        refused["u3"]["next"] = 0
        state.set_meta("refused_messages", json.dumps(refused))
    session = await proxy.session("alice", PASSWORD)
    assert sorted(session.messages) == sorted([message(1), message(2), message(3), message(4)])
    assert "refused" not in session.reply
    with UserState(user_dir(proxy.root, "alice") / "state.db") as state:
        assert json.loads(state.get_meta("refused_messages")) == {}  # the entry went with the message fetched


async def test_passes_that_refuse_nothing_write_no_refused_setting(faulty):
    server, proxy = faulty
    for _ in range(2):
        session = await proxy.session("alice", PASSWORD)
        assert session.messages == [message(1), message(2)]
    with UserState(user_dir(proxy.root, "alice") / "state.db") as state:
        assert state.get_meta("refused_messages") is None


async def test_provider_answers_are_bounded(faulty):
    # At the limits everything is fetched; one entry or one octet more fails that sync cleanly.
    server, proxy = faulty
    big = message(3, size=4000)
    server.messages["u3"] = big
    await proxy.start(max_listing=3, max_message_size=len(big))
    session = await proxy.session("alice", PASSWORD)
    assert session.messages == [message(1), message(2), big]
    server.messages["u4"] = message(4)  # 4 entries in LIST/UIDL, max_listing is 3
    session = await proxy.session("alice", PASSWORD)
    assert "could not" in session.reply and session.messages == [message(1), message(2), big]
    await wait_for_async(proxy, "upstream.max_listing (3)")
    await proxy.start(max_listing=5, max_message_size=len(big) - 1)
    server.messages["u5"] = message(5, size=4000)  # as big as `big`: one octet over the limit
    server.messages.pop("u4")
    session = await proxy.session("alice", PASSWORD)
    assert "could not" in session.reply and session.messages == [message(1), message(2), big]
    await wait_for_async(proxy, f"exceeds {len(big) - 1} octets")
    # The oversized message is skipped (backing off) and no longer blocks the mail after it.
    server.messages["u6"] = message(6)
    session = await proxy.session("alice", PASSWORD)
    assert session.messages == [message(1), message(2), big, message(6)]
    assert "1 message refused by the provider" in session.reply
    assert proxy.alive()
