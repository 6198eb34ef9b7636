"""The outgoing mail queue: mail accepted while the provider could not be reached, kept on disk
until it is sent or bounced.

One directory per entry, below the queue directory (mode 0700)::

    <queue>/tmp/                  entries being written, and entries being removed
    <queue>/<id>/message          the message, exactly as the client sent it; never changes
    <queue>/<id>/meta.json        envelope and delivery state (attempts, next try, last error)

An entry is written completely in ``tmp/`` (message and meta.json fsync'ed, the directory fsync'ed) and
then renamed into the queue: the rename is the commit point, so an entry is either all there or not
there at all, and a crash half-way leaves only a ``tmp/`` directory that is never sent (it is swept
away later). The queue directory is fsync'ed before ``add`` returns, so a mail acknowledged with 250
survives a power cut or kill -9. ``meta.json`` is replaced atomically (write, fsync, rename). An entry
is removed by renaming it back into ``tmp/`` (atomic), then deleting it.

Whoever sends or removes an entry holds an exclusive ``flock`` on its ``message`` file (`claim`), so a
running service and ``pop3proxy queue flush|delete`` never work on the same entry at once.

Synchronous code, standard library only; trio callers run it in worker threads.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pop3proxy.store.fsutil import fsync_dir as fsync_dir
from pop3proxy.store.fsutil import replace_file, write_new_file

__all__ = ["Entry", "EntryBusy", "OutQueue", "RetryPolicy", "valid_id"]

DIR_MODE = 0o700
MESSAGE = "message"
META = "meta.json"
_ID = re.compile(r"[0-9]{14}-[0-9a-f]{8}")
STALE_TMP_AGE = 24 * 3600.0  # seconds after which a left-over tmp/ directory is swept away


def valid_id(text: str) -> bool:
    """Whether ``text`` has the form of a queue id (so it can never name a path outside the queue)."""
    return bool(_ID.fullmatch(text))


class EntryBusy(Exception):
    """Another task or process is sending or removing this entry right now."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential back-off between delivery attempts of a queued message."""

    first: float = 60.0  # seconds before the second attempt
    factor: float = 2.0
    longest: float = 3600.0

    def delay(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt (1-based)."""
        return min(self.longest, self.first * self.factor ** max(0, attempts - 1))


@dataclass
class Entry:
    """One queued message's envelope and delivery state (what meta.json holds)."""

    id: str
    login: str  # the name the client authenticated with: it picks the provider and password
    cache_id: str  # the local mailbox that gets the bounce if the message cannot be delivered
    sender: str
    recipients: list[str]
    size: int
    created: float
    attempts: int = 0
    next_try: float = 0.0
    last_error: str = ""
    mail_options: list[str] = field(default_factory=list)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), ensure_ascii=False, indent=1).encode("utf-8") + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> Entry:
        raw = json.loads(data.decode("utf-8"))
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in raw.items() if k in names})


class OutQueue:
    """The queue directory. Cheap to construct; every method reads the disk afresh."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.tmp = self.directory / "tmp"
        self.directory.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        self.directory.mkdir(mode=DIR_MODE, exist_ok=True)
        self.tmp.mkdir(mode=DIR_MODE, exist_ok=True)

    def __repr__(self) -> str:
        return f"OutQueue({str(self.directory)!r})"

    # -- writing ---------------------------------------------------------------------------------

    def add(
        self,
        *,
        login: str,
        cache_id: str,
        sender: str,
        recipients: Iterable[str],
        data: bytes,
        mail_options: Iterable[str] = (),
        now: float | None = None,
    ) -> Entry:
        """Queue a message durably; when this returns, the entry survives a crash."""
        now = time.time() if now is None else now
        recipients = list(recipients)
        if not recipients:
            raise ValueError("a queued message needs at least one recipient")
        while True:
            entry_id = time.strftime("%Y%m%d%H%M%S", time.gmtime(now)) + "-" + secrets.token_hex(4)
            staging = self.tmp / entry_id
            try:
                staging.mkdir(mode=DIR_MODE)
            except FileExistsError:
                continue
            if not (self.directory / entry_id).exists():
                break
            staging.rmdir()
        entry = Entry(
            id=entry_id,
            login=login,
            cache_id=cache_id,
            sender=sender,
            recipients=recipients,
            size=len(data),
            created=now,
            next_try=now,
            mail_options=list(mail_options),
        )
        try:
            write_new_file(staging / MESSAGE, data)
            write_new_file(staging / META, entry.to_json())
            fsync_dir(staging)
            os.rename(staging, self.directory / entry_id)
            fsync_dir(self.directory)
            fsync_dir(self.tmp)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return entry

    def update(self, entry: Entry) -> None:
        """Replace an entry's state atomically (call it while holding the entry's claim)."""
        path = self.directory / entry.id
        if not (path / META).exists():
            raise KeyError(entry.id)
        replace_file(path / META, entry.to_json())

    def remove(self, entry_id: str) -> None:
        """Remove an entry (call it while holding its claim). Missing entries are ignored."""
        self._check(entry_id)
        doomed = self.tmp / f"{entry_id}.removed-{secrets.token_hex(4)}"
        try:
            os.rename(self.directory / entry_id, doomed)
        except FileNotFoundError:
            return
        fsync_dir(self.directory)
        shutil.rmtree(doomed, ignore_errors=True)

    # -- reading ---------------------------------------------------------------------------------

    def ids(self) -> list[str]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(name for name in names if valid_id(name))

    def get(self, entry_id: str) -> Entry | None:
        """The entry, or None when there is no such (complete) entry."""
        self._check(entry_id)
        try:
            return Entry.from_json((self.directory / entry_id / META).read_bytes())
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            raise OSError(errno.EINVAL, f"queue entry {entry_id} has unreadable state: {exc}") from None

    def entries(self) -> list[Entry]:
        """Every complete entry, oldest first. Entries that vanish meanwhile are left out."""
        found = []
        for entry_id in self.ids():
            try:
                entry = self.get(entry_id)
            except OSError:
                continue  # unreadable state: left in place for a person to look at, never sent
            if entry is not None:
                found.append(entry)
        found.sort(key=lambda e: (e.created, e.id))
        return found

    def read_message(self, entry_id: str) -> bytes:
        self._check(entry_id)
        try:
            return (self.directory / entry_id / MESSAGE).read_bytes()
        except FileNotFoundError:
            raise KeyError(entry_id) from None

    def totals(self) -> tuple[int, int]:
        """(entries, octets) in the queue."""
        entries = self.entries()
        return len(entries), sum(entry.size for entry in entries)

    # -- claiming --------------------------------------------------------------------------------

    @contextmanager
    def claim(self, entry_id: str) -> Iterator[Entry]:
        """Hold an entry exclusively. Raises KeyError if it is gone, EntryBusy if someone holds it."""
        self._check(entry_id)
        try:
            fd = os.open(self.directory / entry_id / MESSAGE, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KeyError(entry_id) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise EntryBusy(entry_id) from None
            entry = self.get(entry_id)  # re-read under the lock: it may have been sent meanwhile
            if entry is None:
                raise KeyError(entry_id)
            yield entry
        finally:
            os.close(fd)

    def sweep(self, max_age: float = STALE_TMP_AGE, now: float | None = None) -> int:
        """Delete what crashed writers and removers left in tmp/ (older than ``max_age``)."""
        now = time.time() if now is None else now
        swept = 0
        for name in os.listdir(self.tmp):
            path = self.tmp / name
            try:
                removed = ".removed-" in name
                if removed or now - path.stat().st_mtime > max_age:
                    shutil.rmtree(path, ignore_errors=True)
                    swept += 1
            except FileNotFoundError:
                continue
        return swept

    @staticmethod
    def _check(entry_id: str) -> None:
        if not valid_id(entry_id):
            raise KeyError(entry_id)
