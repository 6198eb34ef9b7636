"""The mbox cache backend (mboxrd quoting), readable by mutt, Dovecot and Python's mailbox."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import secrets
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from pop3proxy.store.base import Mailbox, MessageInfo
from pop3proxy.store.crlf import (
    _QUOTABLE_FROM,
    _QUOTED_FROM,
    CHUNK,
    _MboxrdConverter,
    _stream,
    normalise,
)
from pop3proxy.store.fsutil import FILE_MODE, fsync_dir


@dataclass(frozen=True)
class _MboxEntry:
    uid: str
    record: int  # offset of the 'From ' line
    start: int  # offset of the message's first octet
    stop: int  # offset just past the message (before the separating blank line)
    size: int  # CRLF size


@dataclass
class _MboxIndex:
    identity: tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns
    entries: list[_MboxEntry]
    counts: dict[str, int]  # digest -> number of messages with that content
    by_uid: dict[str, _MboxEntry] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_uid.update((e.uid, e) for e in self.entries)

    def append(self, entry: _MboxEntry) -> None:
        self.entries.append(entry)
        self.by_uid[entry.uid] = entry

    def info(self) -> list[MessageInfo]:
        return [MessageInfo(key=e.uid, uid=e.uid, size=e.size) for e in self.entries]


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _uid(digest: str, counts: dict[str, int]) -> str:
    counts[digest] = n = counts.get(digest, 0) + 1
    return digest if n == 1 else f"{digest}-{n}"


class MboxMailbox(Mailbox):
    """A single mboxrd file, LF line endings on disk, locked with flock and fcntl locks while written.

    A message's uid is the SHA-1 hex digest of its CRLF form; the n-th copy of identical content gets the
    suffix ``-n``. Uids survive restarts and the deletion of other content; deleting one of several
    identical copies renumbers the later copies.
    """

    def __init__(self, path: str | os.PathLike[str], create: bool = True) -> None:
        self.path = Path(path)
        if create:
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, FILE_MODE))
        elif not self.path.is_file():
            raise FileNotFoundError(f"no mbox file at {self.path}")
        self._index: _MboxIndex | None = None

    def list(self) -> list[MessageInfo]:
        return self._current_index().info()

    def open(self, key: str) -> BinaryIO:
        for _ in range(3):
            index = self._current_index()
            entry = index.by_uid.get(key)
            if entry is None:
                raise KeyError(key)
            file = open(self.path, "rb", buffering=0)
            st = os.fstat(file.fileno())
            if (st.st_dev, st.st_ino) == index.identity[:2] and st.st_size >= index.identity[2]:
                file.seek(entry.start)
                return _stream(file, _MboxrdConverter(), entry.stop - entry.start)
            file.close()  # replaced between indexing and opening: index again
            self._index = None
        raise OSError(f"{self.path} keeps changing while being opened")

    def add(self, data: bytes) -> MessageInfo:
        data = normalise(data)
        body = _QUOTABLE_FROM.sub(rb">\1", data.replace(b"\r\n", b"\n"))
        from_line = f"From MAILER-DAEMON {time.asctime(time.gmtime())}\n".encode()
        with self._locked() as fd:
            index = self._index_locked(fd)
            end = os.fstat(fd).st_size
            tail = os.pread(fd, 2, end - 2) if end >= 2 else os.pread(fd, 1, 0)
            separator = b"" if end == 0 or tail == b"\n\n" else b"\n" if tail.endswith(b"\n") else b"\n\n"
            record = separator + from_line + body + b"\n"
            try:
                os.lseek(fd, end, os.SEEK_SET)
                view = memoryview(record)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except BaseException:  # leave no partial message behind (for example on a full disk)
                os.ftruncate(fd, end)
                self._index = None
                raise
            uid = _uid(hashlib.sha1(data).hexdigest(), index.counts)
            if separator:  # the previous message's end may have changed: index again when needed
                self._index = None
            else:
                start = end + len(from_line)
                index.append(_MboxEntry(uid, end, start, start + len(body), len(data)))
                index.identity = _identity(os.fstat(fd))
        return MessageInfo(key=uid, uid=uid, size=len(data))

    def delete(self, keys: Iterable[str]) -> None:
        doomed = set(keys)
        with self._locked() as fd:
            index = self._index_locked(fd)
            kept = [e for e in index.entries if e.uid not in doomed]
            if len(kept) == len(index.entries):
                return
            st = os.fstat(fd)
            ends = [e.record for e in index.entries[1:]] + [st.st_size]
            ranges = [(0, index.entries[0].record)]  # anything before the first message is kept
            ranges += [(e.record, end) for e, end in zip(index.entries, ends) if e.uid not in doomed]
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
            try:
                os.fchmod(out, st.st_mode & 0o7777)
                for start, end in ranges:
                    _copy_range(fd, out, start, end)
                os.fsync(out)
                os.close(out)
                out = -1
                os.replace(tmp, self.path)
            except BaseException:
                if out >= 0:
                    os.close(out)
                tmp.unlink(missing_ok=True)
                raise
            fsync_dir(self.path.parent)
            self._index = None

    @contextmanager
    def _locked(self) -> Iterator[int]:
        """Hold flock and fcntl locks on the mbox file itself (not on a file renamed away meanwhile)."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                fcntl.lockf(fd, fcntl.LOCK_EX)
                st = os.fstat(fd)
                try:
                    now = os.stat(self.path)
                except FileNotFoundError:
                    now = None
                if now is not None and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        try:
            yield fd
        finally:
            os.close(fd)  # releases both locks

    def _current_index(self) -> _MboxIndex:
        if self._index is not None and self._index.identity == _identity(os.stat(self.path)):
            return self._index
        with self._locked() as fd:
            return self._index_locked(fd)

    def _index_locked(self, fd: int) -> _MboxIndex:
        st = os.fstat(fd)
        if self._index is None or self._index.identity != _identity(st):
            with open(os.dup(fd), "rb") as file:
                self._index = _parse_mbox(file, _identity(st))
        return self._index


def _parse_mbox(file: BinaryIO, identity: tuple[int, int, int, int]) -> _MboxIndex:
    """Index an mbox the way Python's `mailbox.mbox` splits it, hashing each message's CRLF form."""
    entries: list[_MboxEntry] = []
    counts: dict[str, int] = {}
    current: tuple[int, int] | None = None  # (record offset, start offset)
    digest = hashlib.sha1()
    size = 0
    pending_blank = False  # a blank line that separates messages unless more lines follow
    pos = 0  # offset of the current line
    file.seek(0)
    while True:
        line = file.readline()
        length = len(line)
        if not line or line.startswith(b"From "):
            if current is not None:
                stop = pos - 1 if pending_blank else pos
                uid = _uid(digest.hexdigest(), counts)
                entries.append(_MboxEntry(uid, current[0], current[1], stop, size))
            if not line:
                break
            current, digest, size, pending_blank = (pos, pos + length), hashlib.sha1(), 0, False
        elif current is not None:
            if pending_blank:
                digest.update(b"\r\n")
                size += 2
            pending_blank = line == b"\n"
            if not pending_blank:
                if line.startswith(b">") and _QUOTED_FROM.match(line):
                    line = line[1:]
                if line.endswith(b"\n"):
                    line = line[:-1] + b"\r\n"
                digest.update(line)
                size += len(line)
        pos += length
    return _MboxIndex(identity, entries, counts)


def _copy_range(src: int, dst: int, start: int, end: int) -> None:
    while start < end:
        data = os.pread(src, min(CHUNK * 16, end - start), start)
        if not data:
            raise OSError(errno.EIO, "mbox file shrank while being rewritten")
        view = memoryview(data)
        while view:
            view = view[os.write(dst, view) :]
        start += len(data)
