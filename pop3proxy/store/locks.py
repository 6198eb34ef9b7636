"""One session per mailbox: an flock on the user's directory, shared across processes."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from pop3proxy.store.fsutil import FILE_MODE
from pop3proxy.store.paths import make_user_dir


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

    def confirm(self) -> bool:
        """An flock lasts as long as its descriptor: held until `release`."""
        return self.held

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
    path = make_user_dir(root, user) / ".lock"
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
