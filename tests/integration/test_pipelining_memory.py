"""Pipelining cannot exhaust memory: replies are sent under back-pressure.

A real server process (standalone mode). A client pipelines thousands of RETRs (or LISTs) and does not
read; the server holds at most `listen.output_buffer` of replies per session and stops reading
commands while the client does not read. The test prints the peak resident size it saw and the time a
normal login took during the attack.
"""

from __future__ import annotations

import poplib
import socket
import time

import pytest
from helpers.common import HOST, memory_kib, write_config
from helpers.waiting import eventually

from pop3proxy.proxy.credentials import set_password
from pop3proxy.store import open_store

BIG = b"Subject: big\r\n\r\n" + b"x" * 78 + b"\r\n"




def timed_login(port: int, user: str) -> float:
    started = time.monotonic()
    client = poplib.POP3(HOST, port, timeout=30)
    client.user(user)
    assert client.pass_("pw").startswith(b"+OK")
    client.stat()
    client.quit()
    return time.monotonic() - started


def _readable(sock: socket.socket) -> bool:
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return False


@pytest.mark.parametrize("attack", ["retr", "list"])
def test_pipelined_commands_keep_memory_bounded(tmp_path, server_process, attack):
    users = tmp_path / "users"
    set_password(users, "mallory", "pw")
    set_password(users, "alice", "pw")
    with open_store(tmp_path / "cache", "mallory") as box:
        if attack == "retr":
            box.add(BIG * 2000)  # one message of about 160 KB
        else:
            for i in range(2000):  # a listing of about 25 KB
                box.add(b"Subject: %d\r\n\r\nsmall\r\n" % i)
    with open_store(tmp_path / "cache", "alice") as box:
        box.add(b"Subject: hi\r\n\r\nhello\r\n")
    config = write_config(
        tmp_path / "pop3proxy.toml",
        {"listen": {"host": HOST, "port": 0}, "local": {"users_file": users}, "cache": {"root": tmp_path / "cache"}},
    )
    server = server_process(config).start()
    pid = server.proc.pid
    baseline = memory_kib(pid)
    sock = socket.create_connection((HOST, server.port), timeout=30)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    reader = sock.makefile("rb")
    assert reader.readline().startswith(b"+OK")
    sock.sendall(b"USER mallory\r\nPASS pw\r\n")
    assert reader.readline().startswith(b"+OK") and reader.readline().startswith(b"+OK")
    command = b"RETR 1\r\n" if attack == "retr" else b"LIST\r\n"
    count = 2000 if attack == "retr" else 20000
    sock.setblocking(False)
    sent = 0
    payload = command * count  # 16 KB of RETRs would ask for ~320 MB of replies; LISTs for ~500 MB
    deadline = time.monotonic() + 20
    while sent < len(payload) and time.monotonic() < deadline:
        try:
            sent += sock.send(payload[sent:])
        except BlockingIOError:
            break  # the server stopped reading: back-pressure reached the client
    # Wait for the first reply octets: the server is sending, so whatever it queued before is queued.
    eventually(lambda: _readable(sock), timeout=20)
    peak = max(memory_kib(pid) for _ in range(20))
    took = timed_login(server.port, "alice")
    peak = max(peak, memory_kib(pid))
    print(f"pipelining ({attack}): {sent} octets of commands accepted of {len(payload)}; peak RSS {peak} KiB "
          f"(baseline {baseline} KiB); a normal login took {took * 1000:.0f} ms")
    assert peak - baseline < 48 * 1024, (peak, baseline)
    sock.close()
