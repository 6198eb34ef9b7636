"""The seam of the OAuth2 tokens: where an account's token record and local password hash are kept, and
the lock that makes one renewal at a time (one refresh per expiry, whoever asks for it).

The layers above name only `TokenStore` and `local_token_store`; which engine keeps the tokens is the
composition root's choice. The embedded default is `store.token_files.FileTokenStore` (files beside the
account's cache, mode 0600, an ``flock`` for a renewal); a cluster's store would keep rows and take a
row or advisory lock, so that one node of many refreshes.

Accounts are named by their cache id (any non-empty string: the empty name raises ValueError); a name
never reaches storage as it was typed (a file store encodes it with `store.paths.encode_user`, so it
never becomes a path outside its root). A record is plain JSON data (a dict of str, numbers, bools,
None): its meaning belongs to the layer that owns it (``proxy.oauth.tokens.TokenSet``). Every method is
synchronous (call it from a worker thread); a store that cannot be reached raises OSError.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

from pop3proxy.store.token_files import FileTokenStore

__all__ = ["TokenStore", "local_token_store"]


class TokenStore(Protocol):
    """OAuth2 accounts' tokens and local password hashes: secrets, readable by the service only."""

    def load(self, account: str) -> dict[str, Any] | None:
        """The record last saved for `account`, or None when none was. A record that cannot be read
        (damaged) raises ValueError and is left as it is: nothing here deletes a record."""
        ...

    def save(self, account: str, record: Mapping[str, Any]) -> None:
        """Replace the account's record, atomically and durably: a reader sees the old or the new one,
        never a part, and a record saved survives the process dying."""
        ...

    def renewing(self, account: str) -> AbstractContextManager[None]:
        """Hold the account's renewal for the ``with`` block: waits while another holder (a thread, a
        process, another node) has it, and is released on leaving the block or when the holder dies.
        Inside, `load` sees every record saved by earlier holders, and `save` may be called. Not
        re-entrant: a holder must not ask for it again."""
        ...

    def local_password_hash(self, account: str) -> str | None:
        """The hash of the password a legacy client logs in with, None when none was set; ValueError
        when it is stored but cannot be read."""
        ...

    def set_local_password_hash(self, account: str, password_hash: str) -> None:
        """Replace the local password hash (one line of ASCII, else ValueError), atomically."""
        ...


def local_token_store(root: str | os.PathLike[str]) -> TokenStore:
    """One machine's token store: files beside each account's cache below `root`."""
    return FileTokenStore(Path(root))
