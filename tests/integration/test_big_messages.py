"""Messages bigger than sync.max_filtered_size: streamed from the provider to the cache, memory bounded."""

from __future__ import annotations

import hashlib
import socket
import time

import pytest
from helpers.common import HOST, memory_kib
from helpers.proxy import retr_all

pytestmark = pytest.mark.dovecot

MARK = b"X-POP3Proxy-Warning: not filtered: larger than 4096 octets\r\n"


def message_of(size: int, subject: bytes = b"sized") -> bytes:
    head = b"Subject: " + subject + b"\r\n\r\n"
    lines, rest = divmod(size - len(head), 64)
    body = b"x" * 62 + b"\r\n"
    data = head + body * lines + b"y" * max(rest - 2, 0) + (b"\r\n" if rest >= 2 else b"")
    return data if rest != 1 else data[:-2] + b"zz\r\n"


def test_messages_at_and_past_the_filtered_size(proxy, dovecot):
    at, past = message_of(4096), message_of(4097)
    assert (len(at), len(past)) == (4096, 4097)
    dovecot.deliver(dovecot.user, at)
    dovecot.deliver(dovecot.user, past)
    proxy.start(sync={"max_filtered_size": 4096},
                filters=[{"use": "headers", "add": {"X-Filtered-By": "pop3proxy"}}])
    client = proxy.client(dovecot.user, dovecot.password)
    first, second = retr_all(client)
    client.quit()
    assert b"X-Filtered-By: pop3proxy\r\n" in first and first.endswith(at[at.index(b"\r\n\r\n"):])
    assert second == MARK + past  # unfiltered, marked, otherwise byte-exact
    assert "stored unfiltered: larger than sync.max_filtered_size" in proxy.output()


def retr_digest(port: int, user: str, password: str, number: int) -> tuple[str, int]:
    """RETR through a raw socket, hashing the message as it arrives: (SHA-256, octets)."""
    with socket.create_connection((HOST, port), timeout=120) as sock:
        reader = sock.makefile("rb")

        def command(line: str) -> bytes:
            sock.sendall(line.encode() + b"\r\n")
            reply = reader.readline()
            assert reply.startswith(b"+OK"), reply
            return reply

        reader.readline()
        command(f"USER {user}")
        command(f"PASS {password}")
        command(f"RETR {number}")
        digest, size = hashlib.sha256(), 0
        while (line := reader.readline()) != b".\r\n":
            assert line, "connection closed in the middle of the message"
            line = line[1:] if line.startswith(b"..") else line
            digest.update(line)
            size += len(line)
        command("QUIT")
    return digest.hexdigest(), size


def test_a_cold_200_mb_message_keeps_the_proxy_memory_bounded(proxy, dovecot):
    line = b"0123456789" * 7 + b"\r\n"
    big = b"Subject: a very big message\r\n\r\n" + line * (200 * 1024 * 1024 // len(line))
    dovecot.deliver(dovecot.user, big)
    proxy.start(filters=[{"use": "headers", "add": {"X-Filtered-By": "pop3proxy"}}])
    pid = proxy.process.proc.pid
    before = memory_kib(pid, "VmHWM")
    started = time.monotonic()
    digest, size = retr_digest(proxy.process.port, dovecot.user, dovecot.password, 1)
    took = time.monotonic() - started
    growth_mib = (memory_kib(pid, "VmHWM") - before) / 1024
    marked = b"X-POP3Proxy-Warning: not filtered: larger than 33554432 octets\r\n"
    assert (digest, size) == (hashlib.sha256(marked + big).hexdigest(), len(marked) + len(big))
    print(f"cold login + RETR of a {len(big) / 2**20:.0f} MiB message: {took:.1f} s, "
          f"peak RSS of the proxy grew by {growth_mib:.1f} MiB")
    assert growth_mib < 64
