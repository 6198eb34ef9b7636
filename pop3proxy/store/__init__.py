"""The cache on disk: synchronous code for worker threads, standard library only.

Maildir (default) and mbox backends behind one `Mailbox` interface, per-user state, held
mail, locks and user directories. `open_store` opens a user's mailbox.
"""

from __future__ import annotations

import os

from pop3proxy.store.base import Mailbox, MessageInfo
from pop3proxy.store.crlf import normalise
from pop3proxy.store.locks import MailboxBusy, MailboxLock, lock_mailbox
from pop3proxy.store.maildir import MaildirMailbox
from pop3proxy.store.mbox import MboxMailbox
from pop3proxy.store.paths import make_user_dir, user_dir


def open_store(root: str | os.PathLike[str], user: str, backend: str = "maildir") -> Mailbox:
    """Open (creating as needed) the mailbox of `user`: root/<user>/Maildir or root/<user>/mbox."""
    if backend == "maildir":
        return MaildirMailbox(make_user_dir(root, user) / "Maildir", create=True)
    if backend == "mbox":
        return MboxMailbox(make_user_dir(root, user) / "mbox", create=True)
    raise ValueError(f"unknown mailbox backend {backend!r} (expected 'maildir' or 'mbox')")


__all__ = [
    "Mailbox",
    "MailboxBusy",
    "MailboxLock",
    "MaildirMailbox",
    "MboxMailbox",
    "MessageInfo",
    "lock_mailbox",
    "normalise",
    "open_store",
    "user_dir",
]
