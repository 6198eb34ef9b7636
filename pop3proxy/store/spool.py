"""A message arriving from the provider, held in memory while it is small and in a file once it is not.

`Spool` takes the message chunk by chunk as the provider sends it. Up to ``limit`` octets it keeps the
chunks in memory (`finish` then gives the bytes, which go through the filters as usual). Past ``limit`` it
writes everything to a file in the mailbox's spool directory (`Mailbox.spool_path`) instead, converted to
the cache's CRLF form on the way (bare LF becomes CRLF, a non-empty message ends with CRLF), and
`finish` gives that file: `Mailbox.add_file` takes it into the cache without reading it into memory.
Memory stays bounded by ``limit`` plus one write buffer, whatever the message's size.

Two digests are kept on the way: ``source``, of the octets exactly as the provider sent them (what
recognises a message the provider lists again under a new UIDL), and, for a spooled file, ``cached``, of
the file's octets (what recovery uses to find the cached copy of a claim after a crash). A file that is
never taken by the mailbox is removed by `discard`, or by the mailbox's ``clean_tmp`` after a crash.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from pop3proxy.store.crlf import _BareLfConverter
from pop3proxy.store.fsutil import FILE_MODE, write_all

WRITE_BUFFER = 1 << 20  # octets gathered before one write to the spool file


@dataclass
class Spooled:
    """A message in a spool file, in CRLF form: ``size`` octets whose SHA-256 is ``cached``; ``dot_lines``:
    whether a line of it starts with "." (for `Mailbox.add_file`)."""

    path: Path
    size: int
    cached: str
    dot_lines: bool | None = None


class Spool:
    def __init__(self, path: Path, limit: int, prefix: bytes = b"", expected: int = 0) -> None:
        """``path``: where the file goes if the message outgrows ``limit``; ``prefix``: octets the file
        starts with in that case (a header line saying the message was not filtered); ``expected``: the
        size the provider announced (LIST): past ``limit``, the message goes to the file from its first
        octet instead of filling memory up to ``limit`` first."""
        self.path = path
        self.limit = limit
        self.prefix = prefix
        self.source = hashlib.sha256()
        self.size = 0  # octets received
        self._parts: list[bytes] = []
        self._fd: int | None = None
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._cached = hashlib.sha256()
        self._written = 0
        self._tail = b""  # the last two octets written to the file
        self._dot_lines = False  # a line of the file starts with "."
        self._convert = _BareLfConverter()
        self._to_file = expected > limit

    @property
    def spilled(self) -> bool:
        return self._fd is not None

    def add(self, chunk: bytes) -> bool:
        """Take the next chunk; True when buffered octets should be written (`flush`) now."""
        self.source.update(chunk)
        self.size += len(chunk)
        if self._fd is None and self.size <= self.limit and not self._to_file:
            self._parts.append(chunk)
            return False
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
            self._queue(self.prefix)
            for part in self._parts:
                self._queue(self._convert.feed(part))
            self._parts = []
        self._queue(self._convert.feed(chunk))
        return self._pending_size >= WRITE_BUFFER

    def _queue(self, data: bytes) -> None:
        if data:
            self._pending.append(data)
            self._pending_size += len(data)
            self._cached.update(data)
            if not self._dot_lines:
                line_start = self._tail[-1:] in (b"", b"\n")
                self._dot_lines = (line_start and data[:1] == b".") or b"\n." in data
            self._written += len(data)
            self._tail = (self._tail + data)[-2:]

    def flush(self) -> None:
        """Write what is buffered to the file (blocking: run it in a worker thread)."""
        if self._fd is None or not self._pending:
            return
        pending, self._pending, self._pending_size = self._pending, [], 0
        write_all(self._fd, pending)  # chunk by chunk: no copy of what is buffered

    def finish(self) -> bytes | Spooled:
        """The message: its bytes while it stayed small, else its spool file (complete, not fsync'ed)."""
        if self._fd is None:
            data = b"".join(self._parts)
            self._parts = []
            return data
        if self._written and self._tail != b"\r\n":  # as store.crlf.normalise: end with CRLF
            self._queue(b"\r\n")
        self.flush()
        os.close(self._fd)
        self._fd = None
        return Spooled(self.path, self._written, self._cached.hexdigest(), self._dot_lines)

    def discard(self) -> None:
        """Drop the message (the provider failed mid-way, or the sync was stopped)."""
        self._parts = []
        self._pending = []
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
