"""The proxy's promises under faults.

* Crashes: the proxy process is killed (SIGKILL) at random points of a sync of many messages from
  the real Dovecot, restarted, and synced to the end; every message exists exactly once across the
  provider and the cache — never lost, never duplicated, never a fragment — for both cache backends
  under every deletion policy (one proxy per backend and policy, side by side). Run with -s for the
  count of kills and messages checked.
* A misbehaving provider (`faulty_upstream`): a connection dropped in the middle of RETR, a stall
  past ``upstream.timeout``, garbage, no CAPA, no UIDL, TLS refused, ``[IN-USE]`` and
  ``[LOGIN-DELAY]``.
* ``upstream.delete_after_days`` with the real Dovecot.
* A full disk under the cache (a small tmpfs).

The proxy is always a real ``pop3proxy serve`` process and the clients are poplib.
"""

from __future__ import annotations

import json
import os
import poplib
import random
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest
import trio
from helpers.common import HOST, ServerProcess, write_config
from helpers.faulty_upstream import GREETING, faulty_server
from helpers.proxy import Proxy, cached, retr_all, sample

from pop3proxy.store.paths import user_dir
from pop3proxy.store.state import UserState

# --- helpers --------------------------------------------------------------------------------------


def cache_rows(root: Path, user: str) -> list:
    with UserState(user_dir(root, user) / "state.db") as state:
        return state.rows()


def open_claims(root: Path, user: str) -> int:
    """Rows a crash left 'fetching' (read-only: the proxy's own restart must do the recovery)."""
    path = user_dir(root, user) / "state.db"
    if not path.exists():
        return 0
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute("SELECT count(*) FROM messages WHERE status = 'fetching'").fetchone()[0]
    except sqlite3.OperationalError:  # killed before the table was created
        return 0
    finally:
        db.close()


def check_copies(originals: list[bytes], upstream: list[bytes], cache: list[bytes]) -> list[str]:
    """What breaks "every message exists exactly once across provider and cache" (empty: nothing)."""
    problems = []
    up, local = Counter(upstream), Counter(cache)
    for index, message in enumerate(originals):
        if up[message] + local[message] == 0:
            problems.append(f"message {index} lost")
        if up[message] > 1 or local[message] > 1:
            problems.append(f"message {index} duplicated (provider {up[message]}, cache {local[message]})")
    known = set(originals)
    strangers = [m for m in list(up) + list(local) if m not in known]
    if strangers:
        problems.append(f"{len(strangers)} unknown (partial?) messages, e.g. {strangers[0][:80]!r}")
    return problems


def check_final(policy: str, originals: list[bytes], upstream: list[bytes], cache: list[bytes]) -> list[str]:
    """After a clean, complete sync: the cache holds each message once; the provider per policy."""
    problems = check_copies(originals, upstream, cache)
    if Counter(cache) != Counter(originals):
        problems.append(f"cache holds {len(cache)} messages, not the {len(originals)} delivered")
    expected_upstream = [] if policy == "after_fetch" else originals
    if Counter(upstream) != Counter(expected_upstream):
        problems.append(f"provider holds {len(upstream)} messages, expected {len(expected_upstream)}")
    return problems


def provider_messages(dovecot, user: str) -> list[bytes]:
    """`dovecot.messages`, robust against Dovecot moving a file from new/ to cur/ meanwhile."""
    for _ in range(50):
        try:
            return dovecot.messages(user)
        except FileNotFoundError:
            time.sleep(0.02)
    return dovecot.messages(user)


def login_in_background(port: int, user: str, password: str) -> threading.Thread:
    """A poplib login that triggers a sync; the proxy may die under it (errors are expected)."""

    def run() -> None:
        try:
            client = poplib.POP3(HOST, port, timeout=30)
            client.user(user)
            client.pass_(password)
            client.quit()
        except (OSError, poplib.error_proto, EOFError):
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


# --- crash consistency ----------------------------------------------------------------------------

CRASH_MESSAGES = 40  # a sync long enough that most kills in the random window land in the middle of it
CRASH_SIZE = 10_000
CRASH_BIG = 2_000_000  # one message this big, so that kills also land in the middle of writing one
CRASH_ROUNDS = int(os.environ.get("POP3PROXY_CRASH_ROUNDS", "20"))  # per backend and deletion policy
CRASH_WINDOW = 0.8  # seconds after the login starts in which the kill falls
POLICIES = ("mirror", "after_fetch", "never")
BACKENDS = ("maildir", "mbox")


@dataclass
class CrashReport:
    backend: str
    policy: str
    kills: int = 0
    mid_sync: int = 0  # kills that left the cache partly filled
    claims: int = 0  # kills that left a message claimed ('fetching') but not finished
    checked: int = 0  # messages checked, over all the checks
    delays: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.backend}/{self.policy}: {self.kills} kills ({self.mid_sync} in the middle of the sync, {self.claims} with a "
            f"message claimed but not finished), {self.checked} messages checked"
        )


def crash_rounds(proxy: Proxy, dovecot, user: str, password: str, backend: str, policy: str,
                 rng: random.Random) -> CrashReport:
    """CRASH_ROUNDS times: fill the provider, log in, SIGKILL the proxy mid-sync, restart, sync to the end."""
    report = CrashReport(backend, policy)
    originals = [sample(i, CRASH_BIG if i == CRASH_MESSAGES // 4 else CRASH_SIZE) for i in range(CRASH_MESSAGES)]
    config = {"upstream": {"delete": policy}, "sync": {"login_budget": 60}}
    proxy.start(**config)
    try:
        for round_ in range(CRASH_ROUNDS):
            # Every round starts from an empty cache and the provider holding all the messages.
            shutil.rmtree(user_dir(proxy.root, user), ignore_errors=True)
            if not provider_messages(dovecot, user):
                for m in originals:
                    dovecot.deliver(user, m)
            assert provider_messages(dovecot, user) == originals
            delay = rng.uniform(0, CRASH_WINDOW)
            report.delays.append(round(delay, 3))
            thread = login_in_background(proxy.process.port, user, password)
            time.sleep(delay)
            process = proxy.process
            proxy.kill()
            report.logs.append(process.output())
            report.kills += 1
            thread.join(10)
            # Right after the crash: nothing lost, nothing twice, no fragment in the cache.
            cache = cached(proxy, user, backend)
            for problem in check_copies(originals, provider_messages(dovecot, user), cache):
                report.problems.append(f"round {round_}, killed after {delay:.3f} s: {problem}")
            report.mid_sync += 0 < len(cache) < CRASH_MESSAGES
            report.claims += open_claims(proxy.root, user) > 0
            report.checked += len(originals)
            # Restart; a login with a generous budget finishes the sync (and QUITs upstream).
            proxy.start(**config)
            client = proxy.client(user, password)
            count, _ = client.stat()
            uids = {line.split()[1] for line in client.uidl()[1]}
            client.quit()
            if count != CRASH_MESSAGES or len(uids) != CRASH_MESSAGES:
                report.problems.append(f"round {round_}: the client saw {count} messages, {len(uids)} uids")
            for problem in check_final(policy, originals, provider_messages(dovecot, user),
                                       cached(proxy, user, backend)):
                report.problems.append(f"round {round_}, killed after {delay:.3f} s, synced again: {problem}")
            home = user_dir(proxy.root, user)
            leftovers = [str(p.relative_to(home)) for p in home.rglob("*")
                         if p.is_file() and (p.name.endswith(".tmp") or p.parent.name == "tmp")]
            if leftovers:
                report.problems.append(f"round {round_}: left over after recovery: {leftovers[:5]}")
            statuses = Counter(row.status for row in cache_rows(proxy.root, user))
            if statuses != Counter({"cached": CRASH_MESSAGES}):
                report.problems.append(f"round {round_}: state rows {dict(statuses)}")
            report.checked += len(originals)
    finally:
        if proxy.process is not None:
            report.logs.append(proxy.output())
        proxy.stop()
    return report


@pytest.mark.dovecot
def test_kill_during_sync_loses_and_duplicates_nothing(server_process, tmp_path, dovecot):
    # One proxy per backend and deletion policy, side by side (each with its own provider user and cache).
    seed = random.randrange(1 << 32)
    combos = [(backend, policy) for backend in BACKENDS for policy in POLICIES]
    users = [(dovecot.user, dovecot.password)] + [dovecot.new_user() for _ in combos[1:]]
    started = time.monotonic()
    with ThreadPoolExecutor(len(combos)) as pool:
        futures = []
        for (backend, policy), (user, password) in zip(combos, users):
            (tmp_path / backend / policy).mkdir(parents=True)
            proxy = Proxy(server_process, tmp_path / backend / policy, dovecot, cache={"backend": backend})
            rng = random.Random(f"{seed}-{backend}-{policy}")
            futures.append(pool.submit(crash_rounds, proxy, dovecot, user, password, backend, policy, rng))
        reports = [future.result() for future in futures]
    summary = (
        f"crash test (seed {seed}, {time.monotonic() - started:.0f} s): {sum(r.kills for r in reports)} kills, "
        f"{sum(r.checked for r in reports)} messages checked; " + "; ".join(r.summary() for r in reports)
    )
    print(summary)
    for report in reports:
        details = (f"{summary}\n{report.backend}/{report.policy} kill delays {report.delays}:\n"
                   + "\n".join(report.problems[:20]))
        assert report.kills >= CRASH_ROUNDS and not report.problems, details
    for backend in BACKENDS:
        assert sum(r.mid_sync for r in reports if r.backend == backend) >= 1, f"no kill interrupted a sync: {summary}"
    for report, (_, password) in zip(reports, users):
        assert not any(password in log for log in report.logs), "a password reached the log"


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
    assert "TLS" in proxy.output()


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


# --- delete_after_days ----------------------------------------------------------------------------


@pytest.fixture
def dovecot_proxy(server_process, tmp_path, dovecot):
    made = Proxy(server_process, tmp_path, dovecot)
    yield made
    output = made.output()
    made.stop()
    assert dovecot.password not in output, "a password reached the log"


@pytest.mark.dovecot
def test_delete_after_days_zero_deletes_fetched_mail_at_the_next_sync(dovecot_proxy, dovecot):
    proxy = dovecot_proxy
    first = [sample(i) for i in range(2)]
    for m in first:
        dovecot.deliver(dovecot.user, m)
    proxy.start(upstream={"delete": "never", "delete_after_days": 0})
    client = proxy.client(dovecot.user, dovecot.password)
    assert retr_all(client) == first
    client.quit()
    assert provider_messages(dovecot, dovecot.user) == first  # fetched now, old only from now on
    later = sample(2)
    dovecot.deliver(dovecot.user, later)
    client = proxy.client(dovecot.user, dovecot.password)
    assert retr_all(client) == first + [later]
    client.quit()
    assert provider_messages(dovecot, dovecot.user) == [later]
    assert cached(proxy, dovecot.user) == first + [later]
    client = proxy.client(dovecot.user, dovecot.password)
    assert retr_all(client) == first + [later]
    client.quit()
    assert provider_messages(dovecot, dovecot.user) == []
    assert cached(proxy, dovecot.user) == first + [later]


# --- a full disk ----------------------------------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path):
    """A 2 MiB tmpfs; grow() makes it 64 MiB."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (this test needs root): {done.stderr.strip()}")

    class Disk:
        path = mount_point

        @staticmethod
        def grow() -> None:
            subprocess.run(["mount", "-o", "remount,size=64m", str(mount_point)], check=True)

    try:
        yield Disk
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


@pytest.mark.dovecot
def test_full_disk_loses_nothing_and_recovers(tiny_disk, dovecot_proxy, dovecot):  # proxy stops, then umount
    proxy = dovecot_proxy
    proxy.root = tiny_disk.path / "cache"
    originals = [sample(i, 100_000) for i in range(30)]  # 3 MB for 2 MiB of disk
    for m in originals:
        dovecot.deliver(dovecot.user, m)
    proxy.start(upstream={"delete": "after_fetch"}, sync={"login_budget": 30})
    client = poplib.POP3(HOST, proxy.process.port, timeout=30)
    client.user(dovecot.user)
    try:
        reply = client.pass_(dovecot.password)
    except poplib.error_proto as exc:
        refusal = exc.args[0]
        assert isinstance(refusal, bytes) and refusal.startswith(b"-ERR [SYS/TEMP]"), proxy.output()[-3000:]
    else:  # served what fits
        served = retr_all(client)
        assert served and len(served) < len(originals) and Counter(served) <= Counter(originals), reply
    client.quit()
    assert proxy.process.proc.poll() is None, "the proxy died:\n" + proxy.output()[-3000:]
    upstream, cache = provider_messages(dovecot, dovecot.user), cached(proxy, dovecot.user)
    assert len(cache) < len(originals)
    assert check_copies(originals, upstream, cache) == []
    # Nothing that is not cached was deleted upstream.
    assert all(m in upstream for m in originals if m not in cache)
    tiny_disk.grow()
    client = proxy.client(dovecot.user, dovecot.password)
    assert Counter(retr_all(client)) == Counter(originals)
    client.quit()
    upstream, cache = provider_messages(dovecot, dovecot.user), cached(proxy, dovecot.user)
    assert check_final("after_fetch", originals, upstream, cache) == []


async def test_trickling_provider_is_stopped_by_the_sync_deadline(faulty):
    # One byte every 50 ms never trips upstream.timeout, yet the message would take about 10 s: the
    # whole-sync deadline (1 s here) ends the sync, frees the account and says why in the log.
    server, proxy = faulty
    server.messages["u3"] = message(3) + b"x" * 150 + b"\r\n"
    server.behaviour.trickle_retr = 0.05
    await proxy.start(sync={"deadline": 1})
    session = await proxy.session("alice", PASSWORD)
    assert "still downloading" in session.reply or "could not" in session.reply
    started = time.monotonic()
    while "sync deadline" not in proxy.output():
        assert time.monotonic() - started < 5, "the sync was not stopped by its deadline"
        await trio.sleep(0.05)  # polling for the log line, not synchronising on time
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
    assert "upstream.max_listing (3)" in proxy.output()
    await proxy.start(max_listing=5, max_message_size=len(big) - 1)
    server.messages["u5"] = message(5, size=4000)  # as big as `big`: one octet over the limit
    server.messages.pop("u4")
    session = await proxy.session("alice", PASSWORD)
    assert "could not" in session.reply and session.messages == [message(1), message(2), big]
    assert f"exceeds {len(big) - 1} octets" in proxy.output()
    # The oversized message is skipped (backing off) and no longer blocks the mail after it.
    server.messages["u6"] = message(6)
    session = await proxy.session("alice", PASSWORD)
    assert session.messages == [message(1), message(2), big, message(6)]
    assert "1 message refused by the provider" in session.reply
    assert proxy.alive()
