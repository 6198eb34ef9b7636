"""The state database's second record: ``state.journal``, one JSON line per claim, settled row and setting.

It exists to rebuild a state database that was found corrupt or missing, so it must hold what the
database held: claims in flight (with the digest that lets ``recover`` find their cached copy), settled
rows, deletions and settings. Several `UserState` objects of one user may be open at once (a session and
its sync); each appends through its own descriptor. Appends and compaction take an flock on the journal
file, and a writer whose file was replaced by a compaction meanwhile appends to the new one, so no note
is lost to a file that was renamed away.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from pop3proxy.store.fsutil import FILE_MODE, fsync_dir, write_all, write_new_file


def private_fd(path: Path, create: bool = True) -> int:
    """Open `path` for appending, created mode 0600 or tightened to it: it may hold a secret."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    fd = os.open(path, flags, FILE_MODE)
    try:
        if os.fstat(fd).st_mode & 0o7777 != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _same_file(fd: int, path: Path) -> bool:
    st = os.fstat(fd)
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def _line(entry: dict) -> bytes:
    return (json.dumps(entry, separators=(",", ":")) + "\n").encode("utf-8")


class Journal:
    """Appends JSON lines to one journal file (thread-safe), compacts it, reads it back."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fd: int | None = None

    def open(self) -> None:
        """Open (creating it mode 0600, or tightening an older file to 0600) the journal file."""
        with self._lock:
            if self._fd is None:
                self._fd = private_fd(self.path)

    def append(self, entries: Iterable[dict], durable: bool = False) -> None:
        """Append `entries`; with `durable`, fsync'ed before this returns. Raises OSError."""
        data = b"".join(_line(entry) for entry in entries)
        if not data and not durable:
            return
        with self._lock:
            fd = self._locked_current()
            try:
                write_all(fd, data)
                if durable:
                    os.fsync(fd)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def sync(self) -> None:
        """fsync what was appended (to the current journal file)."""
        self.append((), durable=True)

    def _locked_current(self) -> int:
        """Our descriptor of the current journal file, flock'ed (reopened if a compaction replaced it)."""
        while True:
            if self._fd is None:
                self._fd = private_fd(self.path)
            fd = self._fd
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _same_file(fd, self.path):
                return fd
            fcntl.flock(fd, fcntl.LOCK_UN)
            self._fd = None
            os.close(fd)

    def size(self) -> int:
        try:
            return os.stat(self.path).st_size
        except FileNotFoundError:
            return 0

    def compact(self, snapshot: Callable[[], Iterable[dict]], larger_than: int) -> bool:
        """Replace the journal by `snapshot()` (what the database holds now), atomically, if it is still
        larger than `larger_than` once locked. Appenders wait meanwhile and then write to the new file, so
        a note whose row the snapshot missed lands in the journal that is kept."""
        with self._lock:
            fd = self._locked_current()
            try:
                if os.fstat(fd).st_size <= larger_than:
                    return False  # compacted by another UserState meanwhile
                tmp = self.path.with_name(self.path.name + ".tmp")
                tmp.unlink(missing_ok=True)  # left by a crash during an earlier compaction
                write_new_file(tmp, b"".join(_line(entry) for entry in snapshot()))
                os.replace(tmp, self.path)
                fsync_dir(self.path.parent)
                return True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def read(self) -> Iterator[dict]:
        """The entries, oldest first; a torn or garbled line is skipped."""
        if not self.path.exists():
            return
        with open(self.path, "rb") as journal:
            for raw in journal:
                try:
                    entry = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(entry, dict):
                    yield entry

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                fd, self._fd = self._fd, None
                os.close(fd)
