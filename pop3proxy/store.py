"""Mailboxes on disk: the per-user cache that POP3 sessions are served from.

Everything here is synchronous and uses only the standard library; callers run it in worker threads.
One `Mailbox` object is meant to be used by one thread at a time.

Two backends share one contract (`Mailbox`):

- `MaildirMailbox`: a Maildir (``tmp/ new/ cur/``) that Python's `mailbox.Maildir`, mutt and Dovecot can
  read. Messages are stored in CRLF form, with Dovecot's ``,S=<size>,W=<size>`` in the file name.
- `MboxMailbox`: a single mbox file in mboxrd format with LF line endings, as mbox tools expect.

Every message is served in CRLF form: `MessageInfo.size` is exactly the number of octets `open()` yields,
which is what POP3 RETR sends before dot-stuffing. `add()` normalises a message to CRLF and ends it with a
line break, so both backends store and serve the same bytes.

Per-user directories (`user_dir`, `open_store`) and the per-user session lock (`lock_mailbox`) live here too.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import fcntl
import hashlib
import io
import itertools
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, NamedTuple

__all__ = [
    "MailboxBusy",
    "MailboxLock",
    "Mailbox",
    "MaildirMailbox",
    "MboxMailbox",
    "MessageInfo",
    "lock_mailbox",
    "normalise",
    "open_store",
    "user_dir",
]

CHUNK = 64 * 1024
DIR_MODE = 0o700
FILE_MODE = 0o600


class MessageInfo(NamedTuple):
    """One stored message. `size` is the exact octet count of the message in CRLF form.

    A named tuple rather than a dataclass: a login to a large mailbox builds one per message."""

    key: str
    uid: str
    size: int


class Mailbox(abc.ABC):
    """A store of messages, each served in CRLF form. Keys are the messages' uids."""

    @abc.abstractmethod
    def list(self) -> list[MessageInfo]:
        """All messages, oldest first, in a stable order."""

    @abc.abstractmethod
    def open(self, key: str) -> BinaryIO:
        """A binary file yielding exactly the message's octets in CRLF form. Raises KeyError if absent."""

    @abc.abstractmethod
    def add(self, data: bytes) -> MessageInfo:
        """Store a message atomically and durably (fsync'ed) and describe it."""

    def add_many(self, messages: list[bytes]) -> list[MessageInfo]:
        """Store several messages; when it returns, all are durable (one flush for the batch where the
        backend can do that). A crash meanwhile leaves each message either stored whole or not at all."""
        return [self.add(data) for data in messages]

    @abc.abstractmethod
    def delete(self, keys: Iterable[str]) -> None:
        """Remove messages durably; keys that are not (or no longer) present are ignored."""

    def close(self) -> None:
        """Release what the object holds; files returned by `open()` stay usable."""

    def __enter__(self) -> Mailbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def normalise(data: bytes) -> bytes:
    """The message in CRLF form: bare LF becomes CRLF, and a non-empty message ends with CRLF."""
    data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


# --- streaming conversion to CRLF --------------------------------------------------------------------


class _BareLfConverter:
    """Turns bare LF into CRLF across chunk boundaries (a CRLF split between chunks is kept as is)."""

    def __init__(self) -> None:
        self._after_cr = False

    def feed(self, data: bytes) -> bytes:
        head = b""
        if self._after_cr and data[:1] == b"\n":
            head, data = b"\n", data[1:]
        if head or data:
            self._after_cr = data[-1:] == b"\r"
        return head + data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")

    def finish(self) -> bytes:
        return b""


_QUOTED_FROM = re.compile(rb"^>(>*From )", re.MULTILINE)  # mboxrd unquoting: drop one '>'
_QUOTABLE_FROM = re.compile(rb"^(>*From )", re.MULTILINE)  # mboxrd quoting: add one '>'
_UNDECIDED = re.compile(rb">+(?:F(?:r(?:o(?:m)?)?)?)?")  # a line start that may still become >+From


class _MboxrdConverter:
    """Turns mboxrd body lines (LF on disk) into the message in CRLF form, chunk by chunk.

    Every LF becomes CRLF (on disk an LF always ends a line; a CR before it is message data), and one '>' is
    removed from lines matching ``^>+From ``.
    """

    def __init__(self) -> None:
        self._at_line_start = True
        self._held = b""  # a line start that cannot be decided yet (such as b">>Fro")

    def feed(self, data: bytes) -> bytes:
        text, self._held = self._held + data, b""
        out = b""
        if not self._at_line_start:
            end = text.find(b"\n")
            if end < 0:
                return text
            out, text = text[:end] + b"\r\n", text[end + 1 :]
        last = text.rfind(b"\n") + 1
        if _UNDECIDED.fullmatch(text, last):
            text, self._held = text[:last], text[last:]
        self._at_line_start = not text or text.endswith(b"\n")
        return out + _QUOTED_FROM.sub(rb"\1", text).replace(b"\n", b"\r\n")

    def finish(self) -> bytes:
        held, self._held = self._held, b""
        return held


class _CrlfStream(io.RawIOBase):
    """A read-only stream of the CRLF form of `length` octets (or all) of `source` from its position."""

    def __init__(
        self,
        source: BinaryIO,
        converter: _BareLfConverter | _MboxrdConverter,
        length: int | None = None,
    ) -> None:
        self._source = source
        self._converter = converter
        self._remaining = length
        self._out = b""
        self._pos = 0
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        while self._pos >= len(self._out):
            if self._eof:
                return 0
            self._fill()
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = self._out[self._pos : self._pos + n]
        self._pos += n
        return n

    def _fill(self) -> None:
        want = CHUNK if self._remaining is None else min(CHUNK, self._remaining)
        data = self._source.read(want) if want else b""
        if data:
            if self._remaining is not None:
                self._remaining -= len(data)
            self._out = self._converter.feed(data)
        else:
            self._eof = True
            self._out = self._converter.finish()
        self._pos = 0

    def close(self) -> None:
        if not self.closed:
            self._source.close()
        super().close()


def _stream(
    source: BinaryIO, converter: _BareLfConverter | _MboxrdConverter, length: int | None = None
) -> BinaryIO:
    return io.BufferedReader(_CrlfStream(source, converter, length), CHUNK)  # type: ignore[return-value]


# --- durability helpers ------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_new_file(path: Path, data: bytes, durable: bool = True) -> None:
    """Create `path` (which must not exist) with `data`, mode 0600; fsync'ed unless `durable` is False."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if durable:
            os.fsync(fd)
    except BaseException:
        # A partial file (a full disk) must not keep the space it took.
        try:
            os.unlink(path)
        except OSError:
            pass
        raise
    finally:
        os.close(fd)


# --- Maildir -----------------------------------------------------------------------------------------

_SIZE_FIELD = re.compile(r",S=(\d+)")
_VSIZE_FIELD = re.compile(r",W=(\d+)")
_DELIVERY_TIME = re.compile(r"(\d+)\.(?:[^.]*?M(\d+))?")
# Names written by add() (and Dovecot's): <sec>.M<usec>P<pid>..., with ,S=<size>,W=<size>.
_OWN_NAME = re.compile(r"(\d+)\.M(\d+)[^,]*,S=(\d+),W=(\d+)$")
_SCANS: dict[str, tuple[tuple[int, ...], dict]] = {}  # Maildir path -> (directory mtimes, entries)
_LISTS: dict[str, tuple[dict, list]] = {}  # Maildir path -> (the scan it was made from, its MessageInfos)
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0])[:12] or "localhost"

_clock_lock = threading.Lock()
_last_delivery = 0  # microseconds; keeps delivery times in this process strictly increasing
_counter = itertools.count(1)


def _unique_name(size: int) -> str:
    """A Dovecot-style unique name: ``<sec>.M<usec>P<pid>Q<n>.<host>,S=<size>,W=<size>``."""
    global _last_delivery
    with _clock_lock:
        now = max(time.time_ns() // 1000, _last_delivery + 1)
        _last_delivery = now
        n = next(_counter)
    sec, usec = divmod(now, 1_000_000)
    return f"{sec}.M{usec}P{os.getpid()}Q{n}.{_HOST},S={size},W={size}"


def _named_crlf_size(uid: str) -> int | None:
    """The size the name states, when it proves CRLF form (``,S=n,W=n`` with equal values)."""
    size, vsize = _SIZE_FIELD.search(uid), _VSIZE_FIELD.search(uid)
    if size and vsize and size[1] == vsize[1]:
        return int(size[1])
    return None


def _is_stored_crlf(uid: str, file_size: int) -> bool:
    """True when the name proves the file is already in CRLF form (physical size equals CRLF size)."""
    size, vsize = _SIZE_FIELD.search(uid), _VSIZE_FIELD.search(uid)
    return bool(size and vsize and int(size[1]) == int(vsize[1]) == file_size)


class _MaildirEntry(NamedTuple):
    path: str  # a plain string: building 100,000 Path objects is a measurable part of a login
    crlf: bool  # the file is already in CRLF form and is served as is
    file_size: int
    order: tuple[int, int, str]


class MaildirMailbox(Mailbox):
    """A Maildir. Messages are keyed by uid: the file's base name before ':' (stable across flag changes).

    Messages that other tools drop into new/ or cur/ are served too; their CRLF size is computed by reading
    them once and remembered for the life of the object.
    """

    def __init__(self, path: str | os.PathLike[str], create: bool = True) -> None:
        self.path = Path(path)
        self._subdirs = {name: self.path / name for name in ("tmp", "new", "cur")}
        if create:
            self.path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            for subdir in self._subdirs.values():
                subdir.mkdir(mode=DIR_MODE, exist_ok=True)
        missing = [str(d) for d in self._subdirs.values() if not d.is_dir()]
        if missing:
            raise FileNotFoundError(f"not a Maildir, missing: {', '.join(missing)}")
        self._entries: dict[str, _MaildirEntry] = {}
        self._scanned: dict[str, _MaildirEntry] | None = None
        self._sizes: dict[str, tuple[int, int, int]] = {}  # uid -> (file size, mtime_ns, CRLF size)

    def list(self) -> list[MessageInfo]:
        entries = self._scan()
        cached = _LISTS.get(str(self.path))
        if cached is not None and cached[0] is self._scanned:
            return list(cached[1])
        infos = []
        for uid, entry in entries.items():
            if entry.crlf:
                size = entry.file_size
            else:
                try:
                    size = self._crlf_size(uid, entry.path)
                except FileNotFoundError:  # moved or deleted by another tool meanwhile
                    continue
            infos.append(MessageInfo(key=uid, uid=uid, size=size))
        if all(entry.crlf for entry in entries.values()):  # sizes of foreign files may change in place
            _LISTS[str(self.path)] = (self._scanned, infos)
            while len(_LISTS) > 1000:
                _LISTS.pop(next(iter(_LISTS)))
        return list(infos)

    def open(self, key: str) -> BinaryIO:
        for rescan in (False, True):
            entry = (self._scan() if rescan else self._entries).get(key)
            if entry is None:
                continue
            try:
                if entry.crlf:
                    return open(entry.path, "rb")
                return _stream(open(entry.path, "rb", buffering=0), _BareLfConverter())
            except FileNotFoundError:
                continue
        raise KeyError(key)

    def add(self, data: bytes) -> MessageInfo:
        return self.add_many([data])[0]

    def add_many(self, messages: list[bytes]) -> list[MessageInfo]:
        """Write each to tmp/, then fsync each (the disk sees the whole batch before the first flush),
        rename each into new/, fsync new/ once. A crash leaves a message in tmp/ (never served) or whole
        in new/."""
        written: list[tuple[str, Path, int]] = []
        try:
            batch = len(messages) > 1
            for data in messages:
                data = normalise(data)
                name = _unique_name(len(data))
                tmp = self._subdirs["tmp"] / name
                _write_new_file(tmp, data, durable=not batch)
                written.append((name, tmp, len(data)))
            if batch:
                for _, tmp, _ in written:
                    fd = os.open(tmp, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
            infos = []
            for name, tmp, size in written:
                new = self._subdirs["new"] / name
                os.rename(tmp, new)
                self._entries[name] = _MaildirEntry(str(new), True, size, _order(name, 0))
                infos.append(MessageInfo(key=name, uid=name, size=size))
        except BaseException:
            for name, tmp, _ in written:
                tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self._subdirs["new"])
        return infos

    def clean_tmp(self) -> int:
        """Remove what a crash left in tmp/ (never served); call only while nothing writes here."""
        removed = 0
        with os.scandir(self._subdirs["tmp"]) as it:
            for item in it:
                if item.is_file() and not item.name.startswith("."):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(item.path)
                        removed += 1
        return removed

    def delete(self, keys: Iterable[str]) -> None:
        for key in keys:
            for rescan in (False, True):
                entry = (self._scan() if rescan else self._entries).get(key)
                if entry is None:
                    if rescan:
                        break
                    continue
                try:
                    os.unlink(entry.path)
                    break
                except FileNotFoundError:  # maybe moved new/ -> cur/ by another tool: look again
                    continue
            self._entries.pop(key, None)
            self._sizes.pop(key, None)
        _fsync_dir(self._subdirs["new"])
        _fsync_dir(self._subdirs["cur"])

    def _scan(self) -> dict[str, _MaildirEntry]:
        # A directory whose mtime has not changed lists the same files: reuse the last scan of it (in
        # this process), so a login to a large, unchanged mailbox costs two stat() calls.
        try:
            stamp = tuple(os.stat(self._subdirs[sub]).st_mtime_ns for sub in ("new", "cur"))
        except FileNotFoundError:
            stamp = None
        cached = _SCANS.get(str(self.path))
        if stamp is not None and cached is not None and cached[0] == stamp and time.time_ns() - max(stamp) > 2e9:
            self._scanned = cached[1]
            self._entries = dict(cached[1])
            return self._entries
        entries: dict[str, _MaildirEntry] = {}
        for sub in ("new", "cur"):
            with os.scandir(self._subdirs[sub]) as it:
                for item in it:
                    if item.name.startswith(".") or not item.is_file():
                        continue
                    uid = item.name.split(":", 1)[0]
                    if uid in entries:
                        continue
                    ours = _OWN_NAME.match(uid)
                    if ours is not None and ours[3] == ours[4]:
                        # Size and order are in the name (as Dovecot trusts them): no stat() per file,
                        # which keeps listing a mailbox of 100,000 messages fast.
                        order = (int(ours[1]), int(ours[2]), uid)
                        entries[uid] = _MaildirEntry(item.path, True, int(ours[3]), order)
                        continue
                    try:
                        st = item.stat()
                    except FileNotFoundError:
                        continue
                    crlf = _is_stored_crlf(uid, st.st_size)
                    order = _order(uid, st.st_mtime_ns)
                    entries[uid] = _MaildirEntry(item.path, crlf, st.st_size, order)
        self._entries = dict(sorted(entries.items(), key=lambda kv: kv[1].order))
        self._scanned = self._entries
        if stamp is not None:
            _SCANS[str(self.path)] = (stamp, self._entries)
            while len(_SCANS) > 1000:
                _SCANS.pop(next(iter(_SCANS)))
            self._entries = dict(self._entries)
        return self._entries

    def _crlf_size(self, uid: str, path: Path) -> int:
        with open(path, "rb") as file:
            st = os.fstat(file.fileno())
            cached = self._sizes.get(uid)
            if cached and cached[:2] == (st.st_size, st.st_mtime_ns):
                return cached[2]
            converter, size = _BareLfConverter(), 0
            while chunk := file.read(CHUNK):
                size += len(converter.feed(chunk))
        self._sizes[uid] = (st.st_size, st.st_mtime_ns, size)
        return size


def _order(uid: str, mtime_ns: int) -> tuple[int, int, str]:
    """Sort key: the delivery time in the name (seconds, microseconds), else the file's mtime; then name."""
    match = _DELIVERY_TIME.match(uid)
    if match:
        return int(match[1]), int(match[2] or 0), uid
    sec, nsec = divmod(mtime_ns, 1_000_000_000)
    return sec, nsec // 1000, uid


# --- mbox --------------------------------------------------------------------------------------------


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
            _fsync_dir(self.path.parent)
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


# --- per-user directories and locking ----------------------------------------------------------------

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.@+-")
_MAX_NAME = 150
_PREFIX = _MAX_NAME - 1 - 64  # room for '~' and a SHA-256 hex digest


def _encode_user(user: str) -> str:
    """A file name for `user`: injective, case-preserving, never special, at most 150 octets.

    Octets outside ``[A-Za-z0-9_.@+-]`` of the UTF-8 form, and a leading '.', become ``%XX``. A longer
    encoding becomes a prefix of it + '~' + the SHA-256 of the name ('~' never appears otherwise).
    """
    if not user:
        raise ValueError("empty user name")
    raw = user.encode("utf-8", "surrogatepass")
    name = "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in raw)
    if name.startswith("."):
        name = "%2E" + name[1:]
    if len(name) > _MAX_NAME:
        prefix = name[:_PREFIX]
        cut = prefix.rfind("%", len(prefix) - 2)
        if cut >= 0:  # do not split a %XX escape
            prefix = prefix[:cut]
        name = f"{prefix}~{hashlib.sha256(raw).hexdigest()}"
    return name


def user_dir(root: str | os.PathLike[str], user: str) -> Path:
    """The directory of `user` under `root`: always a direct child of root. Raises ValueError for ''."""
    return Path(root) / _encode_user(user)


def _make_user_dir(root: str | os.PathLike[str], user: str) -> Path:
    path = user_dir(root, user)
    Path(root).mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    path.mkdir(mode=DIR_MODE, exist_ok=True)
    return path


def open_store(root: str | os.PathLike[str], user: str, backend: str = "maildir") -> Mailbox:
    """Open (creating as needed) the mailbox of `user`: root/<user>/Maildir or root/<user>/mbox."""
    if backend == "maildir":
        return MaildirMailbox(_make_user_dir(root, user) / "Maildir", create=True)
    if backend == "mbox":
        return MboxMailbox(_make_user_dir(root, user) / "mbox", create=True)
    raise ValueError(f"unknown mailbox backend {backend!r} (expected 'maildir' or 'mbox')")


class MailboxBusy(Exception):
    """The mailbox is locked by another session (in this process or another one)."""


class MailboxLock:
    """An exclusive lock on one user's mailbox; released by `release()`, on exit, or when the process dies."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd: int | None = fd
        self.path = path

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the only descriptor drops the flock

    def __enter__(self) -> MailboxLock:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


def lock_mailbox(root: str | os.PathLike[str], user: str) -> MailboxLock:
    """Lock `user`'s mailbox without waiting (flock on root/<user>/.lock); raise MailboxBusy if held."""
    path = _make_user_dir(root, user) / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise MailboxBusy(f"the mailbox of {user!r} is in use") from None
    except BaseException:
        os.close(fd)
        raise
    return MailboxLock(fd, path)
