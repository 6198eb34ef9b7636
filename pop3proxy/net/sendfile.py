"""Messages that can go to a plain socket as they are, with os.sendfile() (a large RETR copied in the kernel)."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from typing import BinaryIO

import trio

from pop3proxy.net.backend_api import Maildrop


async def send_file(sock: trio.socket.SocketType, f: BinaryIO, size: int, timeout: float,
                    sent: Callable[[int], None]) -> None:
    """Copy a whole file to a (plain) socket in the kernel: a large RETR without Python copies. Each wait
    for the socket is bounded by ``timeout``; ``sent`` is told every part that went out."""
    offset = 0
    while offset < size:
        try:
            count = os.sendfile(sock.fileno(), f.fileno(), offset, size - offset)
        except BlockingIOError:
            with trio.fail_after(timeout):
                await trio.lowlevel.wait_writable(sock)
            continue
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise trio.BrokenResourceError(str(exc)) from exc
        if count == 0:
            raise trio.BrokenResourceError("the file ended early")
        offset += count
        sent(count)
        await trio.lowlevel.checkpoint()


def open_as_is(maildrop: Maildrop, key: str, size: int) -> BinaryIO | None:
    """The message's own file, not read, for a message the store says has no line starting with '.':
    a plain file of exactly ``size`` octets whose last two are CRLF (one pread), else None."""
    f = maildrop.open(key)
    try:
        if (isinstance(f, io.BufferedReader) and f.tell() == 0 and os.fstat(f.fileno()).st_size == size
                and os.pread(f.fileno(), 2, size - 2) == b"\r\n"):
            return f
    except BaseException:
        f.close()
        raise
    f.close()
    return None


def open_for_sendfile(maildrop: Maildrop, key: str, size: int) -> BinaryIO | None:
    """The message's own file when it can go to the socket as it is: a plain file of exactly ``size``
    octets (CRLF form, as the store serves it) that ends with CRLF and has no line starting with '.'."""
    f = maildrop.open(key)
    try:
        if not isinstance(f, io.BufferedReader) or f.tell() != 0 or os.fstat(f.fileno()).st_size != size:
            f.close()
            return None
        # Scanned in pieces through one buffer: mapping the file would count it in our resident size.
        buffer = bytearray(1 << 20)
        view = memoryview(buffer)
        last = b"\n"  # as if a line ended just before the file: a leading '.' counts
        tail = b""
        while n := f.readinto(buffer):
            piece = bytes(view[:n])
            if (last + piece).find(b"\n.") >= 0:
                f.close()
                return None
            last = piece[-1:]
            tail = (tail + piece)[-2:]
        if tail != b"\r\n":
            f.close()
            return None
        f.seek(0)
        return f
    except BaseException:
        f.close()
        raise
