"""Benchmark mail: deterministic messages of a given size, and a pop3proxy cache filled directly.

Messages are CRLF text shaped like real mail with an attachment: a header block, then base64 lines of
76 characters. No body line starts with '.', so no message needs dot-stuffing (the common case).
"""

from __future__ import annotations

import base64
import os
import random
import socket
from pathlib import Path
from typing import Iterator

from pop3proxy.store import open_store
from pop3proxy.store.paths import user_dir


def message(size: int, index: int, seed: int = 1) -> bytes:
    """A message of about ``size`` octets (CRLF form)."""
    head = (
        f"Return-Path: <sender{index}@example.org>\r\n"
        f"From: Sender {index} <sender{index}@example.org>\r\n"
        f"To: Reader <reader@example.net>\r\n"
        f"Subject: Benchmark message {index}\r\n"
        f"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
        f"Message-ID: <bench.{seed}.{index}@example.org>\r\n"
        f"MIME-Version: 1.0\r\n"
        f"Content-Type: application/octet-stream; name=\"data{index}.bin\"\r\n"
        f"Content-Transfer-Encoding: base64\r\n\r\n"
    ).encode()
    raw_size = max(0, (size - len(head)) * 57 // 78)
    raw = random.Random(seed * 1_000_003 + index).randbytes(raw_size)
    return head + base64.encodebytes(raw).replace(b"\n", b"\r\n")


def messages(count: int, size: int, seed: int = 1) -> Iterator[bytes]:
    for i in range(count):
        yield message(size, i, seed)


def big_message(size: int, seed: int = 7) -> bytes:
    """One large message, built from a repeated random block (fast to make, still incompressible)."""
    block = message(1 << 20, 0, seed)
    head_end = block.index(b"\r\n\r\n") + 4
    head, body = block[:head_end], block[head_end:]
    reps = max(1, (size - len(head)) // len(body))
    return head + body * reps


_HOST = "".join(c if c.isalnum() or c == "-" else "-" for c in socket.gethostname().split(".")[0])[:12] or "localhost"


def fill_cache(root: Path, user: str, items) -> int:
    """Write messages straight into ``user``'s Maildir cache under ``root`` (the layout and file names of
    `pop3proxy.store.MaildirMailbox.add`, without its per-message fsync). Returns the count."""
    open_store(root, user, "maildir").close()
    new = user_dir(root, user) / "Maildir" / "new"
    pid = os.getpid()
    count = 0
    base = 1_700_000_000 * 10**6
    for count, data in enumerate(items, 1):
        usec = base + count
        name = f"{usec // 10**6}.M{usec % 10**6}P{pid}Q{count}.{_HOST},S={len(data)},W={len(data)}"
        fd = os.open(new / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
    return count


def multipart_message(size: int, index: int, dangerous: bool, seed: int = 3) -> bytes:
    """A text part plus an attachment (``setup.exe`` when ``dangerous``, else a PDF name)."""
    name = "setup.exe" if dangerous else f"report{index}.pdf"
    kind = "application/x-msdownload" if dangerous else "application/pdf"
    head = (
        f"From: Sender {index} <sender{index}@example.org>\r\n"
        f"To: Reader <reader@example.net>\r\n"
        f"Subject: Report {index}\r\n"
        f"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
        f"Message-ID: <multi.{seed}.{index}@example.org>\r\n"
        f"MIME-Version: 1.0\r\n"
        f"Content-Type: multipart/mixed; boundary=\"b{index}\"\r\n\r\n"
        f"--b{index}\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        f"Hello,\r\n\r\nthe report for this week is attached.\r\n\r\nRegards\r\n\r\n"
        f"--b{index}\r\nContent-Type: {kind}; name=\"{name}\"\r\n"
        f"Content-Disposition: attachment; filename=\"{name}\"\r\n"
        f"Content-Transfer-Encoding: base64\r\n\r\n"
    ).encode()
    tail = f"--b{index}--\r\n".encode()
    raw = random.Random(seed * 1_000_003 + index).randbytes(max(0, (size - len(head) - len(tail)) * 57 // 78))
    return head + base64.encodebytes(raw).replace(b"\n", b"\r\n") + tail
