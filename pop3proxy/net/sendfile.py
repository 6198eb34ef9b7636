"""Messages that can go to a plain socket as they are, with os.sendfile() (a large RETR copied in the kernel)."""

from __future__ import annotations

import io
import os
from typing import BinaryIO

from pop3proxy.net.backend_api import Maildrop


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
