"""Load, bounded and on loopback: many concurrent clients through pop3proxy in front of Dovecot.

Each client logs in, lists, retrieves every message, checks it against a checksum and quits, in rounds.
The test prints sessions completed and errors, and checks that nothing was lost or corrupted and that
the proxy's file descriptors and memory do not grow from round to round.

``POP3PROXY_LOAD_CLIENTS`` (default 500) and ``POP3PROXY_LOAD_ROUNDS`` (default 3) scale it.
"""

from __future__ import annotations

import hashlib
import os
import resource
import time
from pathlib import Path

import pytest
import trio
from helpers.common import HOST, children_of, write_config
from helpers.waiting import eventually

pytestmark = pytest.mark.dovecot

CLIENTS = int(os.environ.get("POP3PROXY_LOAD_CLIENTS", "500"))
ROUNDS = int(os.environ.get("POP3PROXY_LOAD_ROUNDS", "3"))
MESSAGES = 3


def message(user: str, i: int) -> bytes:
    return (
        f"From: load@example.org\r\nTo: {user}@example.org\r\nSubject: load {i}\r\n\r\n".encode()
        + b"".join(b"%s line %d of %d\r\n" % (user.encode(), n, i) for n in range(40 + 30 * i))
        + b".leading dot\r\n"
    )


def family(pid: int) -> list[int]:
    """The server process and its worker processes (``listen.workers``)."""
    return [pid, *children_of(pid)]


# The state databases a process keeps open between sessions (store.state_pool): not a session's.
POOLED = ("state.db", "state.db-wal", "state.db-shm", "state.journal")


def cache_files_open(pid: int, cache: Path) -> list[str]:
    """Files below the cache root that the server's processes hold open for a session (a session still
    closing holds some): every file but the state databases kept open between sessions."""
    out = []
    for member in family(pid):
        for fd in os.listdir(f"/proc/{member}/fd"):
            try:
                target = os.readlink(f"/proc/{member}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(str(cache)) and not target.endswith(POOLED):
                out.append(target)
    return out


def proc_status(pid: int) -> tuple[int, int]:
    """(open file descriptors, resident memory in KiB) of the server's processes together."""
    fds = rss = 0
    for member in family(pid):
        fds += len(os.listdir(f"/proc/{member}/fd"))
        rss += next(int(line.split()[1]) for line in Path(f"/proc/{member}/status").read_text().splitlines()
                    if line.startswith("VmRSS:"))
    return fds, rss


class Stats:
    def __init__(self) -> None:
        self.sessions = 0
        self.messages = 0
        self.errors: list[str] = []


async def read_line(stream, buf: bytearray) -> bytes:
    while (end := buf.find(b"\r\n")) < 0:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise EOFError("connection closed")
        buf += chunk
    line = bytes(buf[:end])
    del buf[: end + 2]
    return line


async def read_body(stream, buf: bytearray) -> bytes:
    while (end := buf.find(b"\r\n.\r\n")) < 0 and not buf.startswith(b".\r\n"):
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise EOFError("connection closed in a multi-line reply")
        buf += chunk
    if buf.startswith(b".\r\n"):
        del buf[:3]
        return b""
    body = bytes(buf[: end + 2])
    del buf[: end + 5]
    return body.replace(b"\r\n..", b"\r\n.")


async def session(port: int, user: str, password: str, expected: dict[str, str], stats: Stats) -> None:
    try:
        with trio.fail_after(120):
            stream = await trio.open_tcp_stream(HOST, port)
            async with stream:
                buf = bytearray()
                assert (await read_line(stream, buf)).startswith(b"+OK")
                # Pipelined login, as a client that supports PIPELINING does.
                await stream.send_all(f"USER {user}\r\nPASS {password}\r\nLIST\r\n".encode())
                assert (await read_line(stream, buf)).startswith(b"+OK")
                reply = await read_line(stream, buf)
                assert reply.startswith(b"+OK"), reply
                assert (await read_line(stream, buf)).startswith(b"+OK")
                listing = (await read_body(stream, buf)).split(b"\r\n")[:-1]
                assert len(listing) == MESSAGES, listing
                await stream.send_all(b"".join(b"RETR %d\r\n" % (i + 1) for i in range(MESSAGES)))
                for i in range(MESSAGES):
                    assert (await read_line(stream, buf)).startswith(b"+OK")
                    body = await read_body(stream, buf)
                    digest = hashlib.sha256(body).hexdigest()
                    assert digest == expected[f"{user}/{i}"], f"message {i} of {user} corrupted"
                    assert int(listing[i].split()[1]) == len(body)
                    stats.messages += 1
                await stream.send_all(b"QUIT\r\n")
                assert (await read_line(stream, buf)).startswith(b"+OK")
        stats.sessions += 1
    except Exception as exc:  # counted, reported, asserted on below
        stats.errors.append(f"{user}: {type(exc).__name__}: {exc}")


@pytest.mark.parametrize("workers", [1, 2])
def test_concurrent_clients_through_the_proxy(dovecot, server_process, tmp_path, workers):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    began = time.monotonic()
    users = [dovecot.new_user() for _ in range(CLIENTS)]
    expected = {}
    for name, _ in users:
        for i in range(MESSAGES):
            data = message(name, i)
            dovecot.deliver(name, data)
            expected[f"{name}/{i}"] = hashlib.sha256(data).hexdigest()
    config = write_config(
        tmp_path / "proxy.toml",
        {
            "listen": {"host": HOST, "port": 0, "max_sessions": CLIENTS * 2, "max_sessions_per_address": CLIENTS * 2,
                       "workers": workers},
            "upstream": {"host": HOST, "port": dovecot.port, "tls": "none", "timeout": 60},
            "cache": {"root": tmp_path / "cache"},
            "log": {"level": "info"},
        },
    )
    prepared = time.monotonic()
    proxy = server_process(config).start()
    pid = proxy.proc.pid
    assert len(family(pid)) == (1 if workers == 1 else 1 + workers), family(pid)
    samples = []
    totals = Stats()
    for round_number in range(ROUNDS):
        stats = Stats()

        async def run_round() -> None:
            async with trio.open_nursery() as nursery:
                for name, password in users:
                    nursery.start_soon(session, proxy.port, name, password, expected, stats)

        started = time.monotonic()
        trio.run(run_round)
        # Every client has its QUIT reply; wait until the proxy has closed those sessions too (their
        # mailbox locks and state files), so that the sample compares quiet states.
        eventually(lambda: not cache_files_open(pid, tmp_path / "cache"), timeout=30)
        samples.append(proc_status(pid))
        took = time.monotonic() - started
        totals.sessions += stats.sessions
        totals.messages += stats.messages
        totals.errors += stats.errors
        print(f"load round {round_number + 1} ({workers} worker processes): {stats.sessions} sessions, {stats.messages} messages, "
              f"{len(stats.errors)} errors in {took:.1f} s; proxy fds={samples[-1][0]} rss={samples[-1][1]} KiB")
    print(f"load setup took {prepared - began:.1f} s")
    summary = (f"load: {totals.sessions} sessions completed, {totals.messages} messages checked, "
               f"{len(totals.errors)} errors over {ROUNDS} rounds of {CLIENTS} concurrent clients")
    print(summary)
    assert not totals.errors, summary + "\n" + "\n".join(totals.errors[:10])
    assert totals.sessions == CLIENTS * ROUNDS, summary
    # Nothing lost upstream (mirror policy, no DELE) and nothing duplicated in the cache.
    assert all(len(dovecot.messages(name)) == MESSAGES for name, _ in users[:20])
    # No growth between warm rounds: descriptors back to the same level, memory within 20 %.
    (fds_first, rss_first), (fds_last, rss_last) = samples[1 if ROUNDS > 2 else 0], samples[-1]
    assert fds_last <= fds_first + 5, samples
    assert rss_last <= rss_first * 1.2 + 2048, samples
