"""RETR and TOP on the wire, byte for byte, for messages with lines starting with "." and without: stored
with the store's dot-lines mark (Maildir names ending in ,D=0 or ,D=1), stored without it (a cache written
before the mark existed), and in mbox (no mark), over plain TCP and TLS, small (read and sent at once),
medium and large (sendfile on plain TCP when no stuffing is needed)."""

from __future__ import annotations

import re
import socket
import ssl

import pytest
from helpers.common import HOST, write_config

from pop3proxy.proxy.credentials import set_password
from pop3proxy.store import open_store
from pop3proxy.store.crlf import normalise

PASSWORD = "dots pass 1"
LINE = b"y" * 70 + b"\r\n"
SHAPES = [
    b"Subject: first body line\r\n\r\n.starts with a dot\r\nmore\r\n",
    b".Header-like first line of the message\r\n\r\nbody\r\n",
    b"Subject: after a CRLF\r\n\r\nline\r\n.dot\r\nline\r\n",
    b"Subject: lone dot\r\n\r\nbefore\r\n.\r\nafter\r\n",
    b"Subject: two dots\r\n\r\n..\r\n..two\r\n",
    b"Subject: dot at the very end\r\n\r\nbody\r\n.",
    b"Subject: dot line at the very end\r\n\r\nbody\r\n.\r\n",
    b"Subject: no dots\r\n\r\nplain . text, not at a line start\r\n",
]


def sized(shape: bytes, size: int) -> bytes:
    """``shape`` with filler lines after its header, to about ``size`` octets."""
    head, _, body = shape.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n" + LINE * (size // len(LINE)) + body


def messages() -> list[bytes]:
    """Every shape small, medium (past the inline read) and large (past the scanned sendfile's minimum)."""
    return [normalise(sized(shape, size)) for size in (0, 100_000, 300_000) for shape in SHAPES]


def stuffed(data: bytes) -> bytes:
    """RFC 1939 byte-stuffing, written independently of the server's: one more '.' before each line that
    starts with one."""
    return b"".join(b"." + line if line.startswith(b".") else line for line in re.split(rb"(?<=\n)", data))


def top(data: bytes, lines: int) -> bytes:
    head, _, body = data.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n" + b"".join(re.split(rb"(?<=\n)", body)[:lines])


def expected_replies(stored: list[bytes]) -> list[tuple[bytes, bytes]]:
    out = []
    for number, data in enumerate(stored, 1):
        out.append((f"RETR {number}\r\n".encode(), f"+OK {len(data)} octets\r\n".encode() + stuffed(data) + b".\r\n"))
        out.append((f"TOP {number} 3\r\n".encode(), b"+OK top of message follows\r\n" + stuffed(top(data, 3)) + b".\r\n"))
    return out


def store(root, backend: str, marked: bool) -> list[bytes]:
    """The messages in the cache, in order: through the store (marked), or as a cache from before the
    mark (Maildir names without the D field)."""
    stored = messages()
    with open_store(root, "dots", backend) as box:
        if marked:
            infos = [box.add(data) for data in stored]
            if backend == "maildir":
                marks = [",D=1" if b"\n." in d or d.startswith(b".") else ",D=0" for d in stored]
                assert [i.key[-4:] for i in infos] == marks
            return stored
    new = root / "dots" / "Maildir" / "new"
    for n, data in enumerate(stored, 1):
        (new / f"1700000000.M{n}P1Q{n}.oldhost,S={len(data)},W={len(data)}").write_bytes(data)
    with open_store(root, "dots", backend) as box:
        assert [i.dot_lines for i in box.list()] == [None] * len(stored)
    return stored


def receive(sock, want: int) -> bytes:
    got = b""
    while len(got) < want:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        got += chunk
    return got


@pytest.fixture(params=[("maildir", True), ("maildir", False), ("mbox", True)], ids=["marked", "unmarked", "mbox"])
def served(request, tmp_path, server_cert, server_process):
    backend, marked = request.param
    certfile, keyfile, cafile = server_cert
    set_password(tmp_path / "users", "dots", PASSWORD)
    stored = store(tmp_path / "cache", backend, marked)
    config = write_config(tmp_path / "c.toml", {
        "listen": {"host": HOST, "port": 0, "tls_port": 0, "certfile": certfile, "keyfile": keyfile},
        "local": {"users_file": tmp_path / "users"}, "cache": {"root": tmp_path / "cache", "backend": backend},
    })
    server = server_process(config).start(tls=True)
    return server, stored, cafile


def connect(server, cafile, tls: bool):
    sock = socket.create_connection((HOST, server.tls_port if tls else server.port), timeout=30)
    if tls:
        sock = ssl.create_default_context(cafile=str(cafile)).wrap_socket(sock, server_hostname="localhost")
    for command in (b"", b"USER dots\r\n", f"PASS {PASSWORD}\r\n".encode()):
        sock.sendall(command)
        line = b""
        while not line.endswith(b"\r\n"):
            line += sock.recv(4096)
        assert line.startswith(b"+OK"), line
    return sock


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_retr_and_top_are_byte_exact_one_at_a_time(served, tls):
    server, stored, cafile = served
    sock = connect(server, cafile, tls)
    for command, reply in expected_replies(stored):
        sock.sendall(command)
        assert receive(sock, len(reply)) == reply, command
    sock.sendall(b"QUIT\r\n")
    assert receive(sock, 1).startswith(b"+OK")
    sock.close()


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_retr_and_top_are_byte_exact_pipelined(served, tls):
    server, stored, cafile = served
    sock = connect(server, cafile, tls)
    replies = expected_replies(stored)
    sock.sendall(b"".join(command for command, _ in replies) + b"NOOP\r\n")
    want = b"".join(reply for _, reply in replies) + b"+OK\r\n"
    assert receive(sock, len(want)) == want
    sock.close()
