"""The mbox cache backend (mboxrd quoting), readable by mutt, Dovecot and Python's mailbox."""

from __future__ import annotations

import builtins
import contextlib
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
from pop3proxy.store.fsutil import FILE_MODE, fsync_dir, write_all, write_new_file


@dataclass(frozen=True)
class _MboxEntry:
    key: str
    record: int  # offset of the 'From ' line
    start: int  # offset of the message's first octet
    stop: int  # offset just past the message (before the separating blank line)
    size: int  # CRLF size


Identity = tuple[int, int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns, committed length


@dataclass
class _MboxIndex:
    identity: Identity
    entries: list[_MboxEntry]
    counts: dict[str, int]  # digest -> number of messages with that content
    by_key: dict[str, _MboxEntry] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_key.update((e.key, e) for e in self.entries)

    def append(self, entry: _MboxEntry) -> None:
        self.entries.append(entry)
        self.by_key[entry.key] = entry

    def info(self) -> list[MessageInfo]:
        return [MessageInfo(key=e.key, uidl=e.key, size=e.size) for e in self.entries]


def _identity(st: os.stat_result, committed: int) -> Identity:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, committed


def _key(digest: str, counts: dict[str, int]) -> str:
    counts[digest] = n = counts.get(digest, 0) + 1
    return digest if n == 1 else f"{digest}-{n}"


class MboxMailbox(Mailbox):
    """A single mboxrd file, LF line endings on disk, locked with flock and fcntl locks while written.

    A message's key is the SHA-1 hex digest of its CRLF form; the n-th copy of identical content gets the
    suffix ``-n``. Uids survive restarts and the deletion of other content; deleting one of several
    identical copies renumbers the later copies.

    Crash safety: beside the mbox, ``.<name>.committed`` holds the inode and the length of the mbox as
    last committed, replaced atomically (written, fsync'ed, renamed, directory fsync'ed). An append
    writes and fsyncs its messages past the committed length and then commits the new length; a rewrite
    (deletion) copies the kept messages to ``.<name>.<pid>.<random>.tmp``, fsyncs it, commits its inode
    and length, and renames it over the mbox. Readers never look past the committed length, so a
    message a crash left half written is never served; the next write (or ``clean_tmp``, run by
    recovery) cuts it off, and ``clean_tmp`` removes rewrite copies a crash left behind. When the
    commit file names another inode (an mbox replaced by another program, or a crash between the two
    renames of a rewrite), the mbox is taken as it is.
    """

    def __init__(self, path: str | os.PathLike[str], create: bool = True) -> None:
        self.path = Path(path)
        self._commit_path = self.path.with_name(f".{self.path.name}.committed")
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
            entry = index.by_key.get(key)
            if entry is None:
                raise KeyError(key)
            file = open(self.path, "rb", buffering=0)  # noqa: SIM115 - handed to the returned stream or closed below
            st = os.fstat(file.fileno())
            if (st.st_dev, st.st_ino) == index.identity[:2] and st.st_size >= entry.stop:
                file.seek(entry.start)
                return _stream(file, _MboxrdConverter(), entry.stop - entry.start)
            file.close()  # replaced between indexing and opening: index again
            self._index = None
        raise OSError(f"{self.path} keeps changing while being opened")

    def add(self, data: bytes) -> MessageInfo:
        return self.add_many([data])[0]

    def add_many(self, messages: builtins.list[bytes]) -> builtins.list[MessageInfo]:
        """Append the messages with one fsync and one commit: a crash leaves none of them served or all."""
        if not messages:
            return []
        datas = [normalise(data) for data in messages]
        bodies = [_QUOTABLE_FROM.sub(rb">\1", data.replace(b"\r\n", b"\n")) for data in datas]

        def write(fd: int, from_line: bytes) -> list[tuple[str, int, int]]:
            for body in bodies:  # each record ends in a blank line (the body ends with LF, then one more)
                write_all(fd, from_line + body + b"\n")
            return [(hashlib.sha1(data).hexdigest(), len(body), len(data))
                    for data, body in zip(datas, bodies, strict=True)]

        return self._append(write)

    def spool_path(self) -> Path:
        return self._tmp_name("spool")

    def add_file(self, path: Path, size: int, dot_lines: bool | None = None) -> MessageInfo:
        """Append a spooled message (CRLF form, from `spool_path`) chunk by chunk, then remove the file.
        (An mbox keeps no ``dot_lines``: its messages are looked at when served.)"""

        def write(fd: int, from_line: bytes) -> list[tuple[str, int, int]]:
            digest, body_size, carry = hashlib.sha1(), 0, b""
            write_all(fd, from_line)
            with open(path, "rb") as source:
                for chunk in iter(lambda: source.read(CHUNK * 16), b""):
                    digest.update(chunk)
                    chunk = carry + chunk
                    cut = chunk.rfind(b"\n") + 1  # whole lines only: a From line is quoted at a line start
                    chunk, carry = chunk[:cut], chunk[cut:]
                    body = _QUOTABLE_FROM.sub(rb">\1", chunk.replace(b"\r\n", b"\n"))
                    write_all(fd, body)
                    body_size += len(body)
            body = _QUOTABLE_FROM.sub(rb">\1", carry.replace(b"\r\n", b"\n"))
            write_all(fd, body + b"\n")
            return [(digest.hexdigest(), body_size + len(body), size)]

        info = self._append(write)[0]
        path.unlink(missing_ok=True)
        return info

    def _append(self, write) -> builtins.list[MessageInfo]:
        """Append records under the lock with one fsync and one commit; ``write(fd, from_line)`` writes
        them at the end of the file and returns (SHA-1 of the CRLF form, body octets on disk, CRLF size)
        for each. A failure cuts the file back: nothing past the committed length is ever served."""
        from_line = f"From MAILER-DAEMON {time.asctime(time.gmtime())}\n".encode()
        with self._locked() as fd:
            end = self._settle_locked(fd)
            index = self._index_locked(fd)
            tail = os.pread(fd, 2, end - 2) if end >= 2 else os.pread(fd, end, 0)
            separator = b"" if end == 0 or tail == b"\n\n" else b"\n" if tail.endswith(b"\n") else b"\n\n"
            try:
                os.lseek(fd, end, os.SEEK_SET)
                write_all(fd, separator)
                written = write(fd, from_line)
                os.fsync(fd)
                st = os.fstat(fd)
                self._commit(st.st_ino, st.st_size)
            except BaseException:  # leave no partial message behind (for example on a full disk)
                self._index = None
                with contextlib.suppress(OSError):  # the commit file still says `end`: nothing past it is served
                    os.ftruncate(fd, end)
                raise
            infos = []
            position = end + len(separator)
            for digest, body_size, size in written:
                key = _key(digest, index.counts)
                start = position + len(from_line)
                index.append(_MboxEntry(key, position, start, start + body_size, size))
                position = start + body_size + 1
                infos.append(MessageInfo(key=key, uidl=key, size=size))
            if separator:  # the previous message's end has changed: index again when needed
                self._index = None
            else:
                index.identity = _identity(st, st.st_size)
        return infos

    def delete(self, keys: Iterable[str]) -> None:
        doomed = set(keys)
        with self._locked() as fd:
            end = self._settle_locked(fd)
            index = self._index_locked(fd)
            kept = [e for e in index.entries if e.key not in doomed]
            if len(kept) == len(index.entries):
                return
            st = os.fstat(fd)
            ends = [e.record for e in index.entries[1:]] + [end]
            ranges = [(0, index.entries[0].record)]  # anything before the first message is kept
            ranges += [(e.record, stop) for e, stop in zip(index.entries, ends, strict=True) if e.key not in doomed]
            tmp = self._tmp_name("")
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
            try:
                os.fchmod(out, st.st_mode & 0o7777)
                for start, stop in ranges:
                    _copy_range(fd, out, start, stop)
                os.fsync(out)
                self._commit(os.fstat(out).st_ino, sum(stop - start for start, stop in ranges))
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

    def clean_tmp(self) -> int:
        """Recovery after a crash (with the mailbox lock held, no sync running): cut off a message left
        half written past the committed length, remove the rewrite copies a crash left behind."""
        removed = 0
        prefix = f".{self.path.name}."
        with self._locked() as fd:
            self._settle_locked(fd)
            with os.scandir(self.path.parent) as it:
                for item in it:
                    if item.name.startswith(prefix) and item.name.endswith(".tmp") and item.is_file():
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(item.path)
                            removed += 1
        return removed

    def _tmp_name(self, kind: str) -> Path:
        return self.path.with_name(f".{self.path.name}.{kind}{os.getpid()}.{secrets.token_hex(4)}.tmp")

    def _read_commit(self) -> tuple[int, int] | None:
        """(inode, length) of the last commit, or None when there is none (or it cannot be read)."""
        try:
            parts = self._commit_path.read_bytes().split()
        except FileNotFoundError:
            return None
        if len(parts) == 2 and all(part.isdigit() for part in parts):
            return int(parts[0]), int(parts[1])
        return None

    def _committed(self, st: os.stat_result) -> int:
        """How much of the mbox file described by `st` is committed (readers look no further)."""
        mark = self._read_commit()
        if mark is not None and mark[0] == st.st_ino and mark[1] <= st.st_size:
            return mark[1]
        return st.st_size

    def _commit(self, inode: int, length: int) -> None:
        """Durably record `length` as the committed length of the mbox file `inode`."""
        tmp = self._tmp_name("committed.")
        try:
            write_new_file(tmp, f"{inode} {length}\n".encode())
            os.replace(tmp, self._commit_path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(self.path.parent)

    def _settle_locked(self, fd: int) -> int:
        """Before writing: cut off what a crashed append left past the committed length (or adopt the file
        as it is when no commit describes it). Returns the committed length."""
        st = os.fstat(fd)
        mark = self._read_commit()
        if mark is None or mark[0] != st.st_ino or mark[1] > st.st_size:
            self._commit(st.st_ino, st.st_size)
            return st.st_size
        if mark[1] < st.st_size:
            os.ftruncate(fd, mark[1])
            os.fsync(fd)
            self._index = None
        return mark[1]

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
        if self._index is not None:
            st = os.stat(self.path)
            if self._index.identity == _identity(st, self._committed(st)):
                return self._index
        with self._locked() as fd:
            return self._index_locked(fd)

    def _index_locked(self, fd: int) -> _MboxIndex:
        st = os.fstat(fd)
        identity = _identity(st, self._committed(st))
        if self._index is None or self._index.identity != identity:
            with open(os.dup(fd), "rb") as file:
                self._index = _parse_mbox(file, identity)
        return self._index


def _parse_mbox(file: BinaryIO, identity: Identity) -> _MboxIndex:
    """Index an mbox (up to its committed length) the way Python's `mailbox.mbox` splits it, hashing each
    message's CRLF form."""
    limit = identity[4]
    entries: list[_MboxEntry] = []
    counts: dict[str, int] = {}
    current: tuple[int, int] | None = None  # (record offset, start offset)
    digest = hashlib.sha1()
    size = 0
    pending_blank = False  # a blank line that separates messages unless more lines follow
    pos = 0  # offset of the current line
    file.seek(0)
    while True:
        line = file.readline(max(0, limit - pos))
        length = len(line)
        if not line or line.startswith(b"From "):
            if current is not None:
                stop = pos - 1 if pending_blank else pos
                key = _key(digest.hexdigest(), counts)
                entries.append(_MboxEntry(key, current[0], current[1], stop, size))
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
