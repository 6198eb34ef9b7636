"""The Maildir cache backend: one file per message, Dovecot-style names with ,S= and ,W= sizes, and
,D=0 or ,D=1 where pop3proxy stored the message: whether a line of it starts with "." (dot-stuffing)."""

from __future__ import annotations

import builtins
import contextlib
import itertools
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

from pop3proxy.store.base import Mailbox, MessageInfo
from pop3proxy.store.crlf import CHUNK, _BareLfConverter, _stream, has_dot_lines, normalise
from pop3proxy.store.fsutil import DIR_MODE, create_file, fsync_dir, make_durable

_SIZE_FIELD = re.compile(r",S=(\d+)")
_VSIZE_FIELD = re.compile(r",W=(\d+)")
_DELIVERY_TIME = re.compile(r"(\d+)\.(?:[^.]*?M(\d+))?")
# Names written by add() (and Dovecot's): <sec>.M<usec>P<pid>..., with ,S=<size>,W=<size>; add()'s end in
# ,D=0 (no line starts with ".") or ,D=1; older caches and Dovecot's names have no D field (not known).
_OWN_NAME = re.compile(r"(\d+)\.M(\d+)[^,]*,S=(\d+),W=(\d+)(?:,D=([01]))?$")
_SCANS: dict[str, tuple[tuple[int, ...], dict]] = {}  # Maildir path -> (directory mtimes, entries)
_SETTLED_NS = 2 * 10**9  # a directory unchanged this long has no change pending within its mtime's tick
# Maildir path -> (the scan it was made from, its MessageInfos)
_LISTS: dict[str, tuple[dict[str, _MaildirEntry] | None, list[MessageInfo]]] = {}
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0])[:12] or "localhost"

_clock_lock = threading.Lock()
_last_delivery = 0  # microseconds; keeps delivery times in this process strictly increasing
_counter = itertools.count(1)


def _unique_name(size: int, dot_lines: bool | None = None) -> str:
    """A Dovecot-style unique name: ``<sec>.M<usec>P<pid>Q<n>.<host>,S=<size>,W=<size>``, then ``,D=1``
    when a line of the message starts with ".", ``,D=0`` when none does (nothing: not known)."""
    global _last_delivery
    with _clock_lock:
        now = max(time.time_ns() // 1000, _last_delivery + 1)
        _last_delivery = now
        n = next(_counter)
    sec, usec = divmod(now, 1_000_000)
    dots = "" if dot_lines is None else f",D={int(dot_lines)}"
    return f"{sec}.M{usec}P{os.getpid()}Q{n}.{_HOST},S={size},W={size}{dots}"



def _is_stored_crlf(key: str, file_size: int) -> bool:
    """True when the name proves the file is already in CRLF form (physical size equals CRLF size)."""
    size, vsize = _SIZE_FIELD.search(key), _VSIZE_FIELD.search(key)
    return bool(size and vsize and int(size[1]) == int(vsize[1]) == file_size)


class _MaildirEntry(NamedTuple):
    path: str  # a plain string: building 100,000 Path objects is a measurable part of a login
    crlf: bool  # the file is already in CRLF form and is served as is
    file_size: int
    order: tuple[int, int, str]
    dot_lines: bool | None = None  # from the name's D field (see _OWN_NAME); None: not known


class MaildirMailbox(Mailbox):
    """A Maildir. A message's key is the file's base name before ':' (stable across flag changes).

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
        self._sizes: dict[str, tuple[int, int, int]] = {}  # key -> (file size, mtime_ns, CRLF size)

    def list(self) -> list[MessageInfo]:
        entries = self._scan()
        cached = _LISTS.get(str(self.path))
        if cached is not None and cached[0] is self._scanned:
            return list(cached[1])
        infos = []
        for key, entry in entries.items():
            if entry.crlf:
                size = entry.file_size
            else:
                try:
                    size = self._crlf_size(key, entry.path)
                except FileNotFoundError:  # moved or deleted by another tool meanwhile
                    continue
            infos.append(MessageInfo(key, key, size, entry.dot_lines))
        if all(entry.crlf for entry in entries.values()):  # sizes of foreign files may change in place
            _LISTS[str(self.path)] = (self._scanned, infos)
            while len(_LISTS) > 1000:
                _LISTS.pop(next(iter(_LISTS)))
        return list(infos)

    def _found(self, key: str) -> Iterator[_MaildirEntry]:
        """The message's entry as last scanned, then as scanned anew (another tool may have moved it)."""
        for rescan in (False, True):
            entry = (self._scan() if rescan else self._entries).get(key)
            if entry is not None:
                yield entry

    def open(self, key: str) -> BinaryIO:
        for entry in self._found(key):
            try:
                if entry.crlf:
                    return open(entry.path, "rb")
                return _stream(open(entry.path, "rb", buffering=0), _BareLfConverter())
            except FileNotFoundError:
                continue
        raise KeyError(key)

    def read(self, key: str, limit: int) -> bytes:
        """A message stored in CRLF form is read with one open and one read (no buffered file object: its
        extra system calls cost more than the read of a small message); others as `open` serves them."""
        for entry in self._found(key):
            if not entry.crlf:
                break
            try:
                fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                data = os.read(fd, limit)
                while len(data) < limit and (more := os.read(fd, limit - len(data))):  # a short read
                    data += more
                return data
            finally:
                os.close(fd)
        return super().read(key, limit)

    def add(self, data: bytes) -> MessageInfo:
        return self.add_many([data])[0]

    def add_many(self, messages: builtins.list[bytes]) -> builtins.list[MessageInfo]:
        """Write each to tmp/, then fsync each (the disk sees the whole batch before the first flush),
        rename each into new/, fsync new/ once. A crash leaves a message in tmp/ (never served) or whole
        in new/."""
        written: list[tuple[str, Path, int, bool]] = []
        fds: list[int] = []
        try:
            try:
                for data in messages:
                    data = normalise(data)
                    dots = has_dot_lines(data)
                    name = _unique_name(len(data), dots)
                    tmp = self._subdirs["tmp"] / name
                    fds.append(create_file(tmp, data))
                    written.append((name, tmp, len(data), dots))
                make_durable(fds)
            finally:
                for fd in fds:
                    os.close(fd)
            infos = []
            for name, tmp, size, dots in written:
                new = self._subdirs["new"] / name
                os.rename(tmp, new)
                self._entries[name] = _MaildirEntry(str(new), True, size, _order(name, 0), dots)
                infos.append(MessageInfo(name, name, size, dots))
        except BaseException:
            for _name, tmp, _, _ in written:
                tmp.unlink(missing_ok=True)
            raise
        fsync_dir(self._subdirs["new"])
        return infos

    def spool_path(self) -> Path:
        return self._subdirs["tmp"] / f"spool.{os.getpid()}.{secrets.token_hex(8)}"

    def add_file(self, path: Path, size: int, dot_lines: bool | None = None) -> MessageInfo:
        """Take a spooled message (CRLF form, written to `spool_path`): fsync it, rename it into new/."""
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        name = _unique_name(size, dot_lines)
        new = self._subdirs["new"] / name
        os.rename(path, new)
        self._entries[name] = _MaildirEntry(str(new), True, size, _order(name, 0), dot_lines)
        fsync_dir(self._subdirs["new"])
        return MessageInfo(name, name, size, dot_lines)

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
            for entry in self._found(key):
                try:
                    os.unlink(entry.path)
                    break
                except FileNotFoundError:  # maybe moved new/ -> cur/ by another tool: look again
                    continue
            self._entries.pop(key, None)
            self._sizes.pop(key, None)
        fsync_dir(self._subdirs["new"])
        fsync_dir(self._subdirs["cur"])

    def _scan(self) -> dict[str, _MaildirEntry]:
        # A directory whose mtime has not changed lists the same files: reuse the last scan of it (in
        # this process), so a login to a large, unchanged mailbox costs two stat() calls. Only a scan
        # made when both directories had been quiet for _SETTLED_NS is kept: a file that arrives within
        # the timestamp tick of the previous change leaves the mtime as it was, so a scan of a directory
        # changed that recently may already be incomplete when the mtime says it is current.
        started = time.time_ns()
        try:
            stamp = tuple(os.stat(self._subdirs[sub]).st_mtime_ns for sub in ("new", "cur"))
        except FileNotFoundError:
            stamp = None
        cached = _SCANS.get(str(self.path))
        if stamp is not None and cached is not None and cached[0] == stamp:
            self._scanned = cached[1]
            self._entries = dict(cached[1])
            return self._entries
        entries: dict[str, _MaildirEntry] = {}
        for sub in ("new", "cur"):
            with os.scandir(self._subdirs[sub]) as it:
                for item in it:
                    if item.name.startswith(".") or not item.is_file():
                        continue
                    key = item.name.split(":", 1)[0]
                    if key in entries:
                        continue
                    ours = _OWN_NAME.match(key)
                    if ours is not None and ours[3] == ours[4]:
                        # Size and order are in the name (as Dovecot trusts them): no stat() per file,
                        # which keeps listing a mailbox of 100,000 messages fast.
                        order = (int(ours[1]), int(ours[2]), key)
                        dots = None if ours[5] is None else ours[5] == "1"
                        entries[key] = _MaildirEntry(item.path, True, int(ours[3]), order, dots)
                        continue
                    try:
                        st = item.stat()
                    except FileNotFoundError:
                        continue
                    crlf = _is_stored_crlf(key, st.st_size)
                    order = _order(key, st.st_mtime_ns)
                    entries[key] = _MaildirEntry(item.path, crlf, st.st_size, order)
        self._entries = dict(sorted(entries.items(), key=lambda kv: kv[1].order))
        self._scanned = self._entries
        if stamp is not None and started - max(stamp) > _SETTLED_NS:
            _SCANS[str(self.path)] = (stamp, self._entries)
            while len(_SCANS) > 1000:
                _SCANS.pop(next(iter(_SCANS)))
            self._entries = dict(self._entries)
        return self._entries

    def _crlf_size(self, key: str, path: str | Path) -> int:
        with open(path, "rb") as file:
            st = os.fstat(file.fileno())
            cached = self._sizes.get(key)
            if cached and cached[:2] == (st.st_size, st.st_mtime_ns):
                return cached[2]
            converter, size = _BareLfConverter(), 0
            while chunk := file.read(CHUNK):
                size += len(converter.feed(chunk))
        self._sizes[key] = (st.st_size, st.st_mtime_ns, size)
        return size


def _order(key: str, mtime_ns: int) -> tuple[int, int, str]:
    """Sort key: the delivery time in the name (seconds, microseconds), else the file's mtime; then name."""
    match = _DELIVERY_TIME.match(key)
    if match:
        return int(match[1]), int(match[2] or 0), key
    sec, nsec = divmod(mtime_ns, 1_000_000_000)
    return sec, nsec // 1000, key
