"""The offline password: a scrypt hash of the password the provider last accepted, kept in the account's
state, and a keyed digest beside it that spares scrypt while the password does not change.

One check for every door: POP3 (and the web console's sign-in, which logs in through the backend) and
the SMTP relay. Synchronous and memory-hungry (scrypt): an async caller runs these in a worker thread
under ``credentials.kdf_limiter()``.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from pop3proxy.proxy.credentials import hash_password, verify_password
from pop3proxy.store.api import AccountState, StateStore

__all__ = ["OFFLINE_HASH", "OFFLINE_MEMO", "check_offline_password", "forget_offline_password",
           "offline_memo_fresh", "remember_offline_password"]

OFFLINE_HASH = "offline_hash"  # account setting: the scrypt hash
OFFLINE_MEMO = "offline_memo"  # account setting: keyed digest of (hash, password): the hash matches


def check_offline_password(states: StateStore, cache_id: str, password: str) -> bool | None:
    """True or False when the account keeps an offline hash; None when it keeps none (no state, or no
    hash in it; nothing is created). A state that cannot be read raises (``StateError``, ``OSError``):
    the caller decides what that means."""
    state = states.open_existing(cache_id)
    if state is None:
        return None
    try:
        stored = state.get_meta(OFFLINE_HASH)
    finally:
        state.close()
    if stored is None:
        return None
    return verify_password(password, stored)


def remember_offline_password(state: AccountState, password: str, keyed: Callable[[str], bytes]) -> None:
    """Keep the hash current after the provider accepted ``password``, without paying scrypt on every
    login: the keyed digest (``keyed``: random key, memory only, shared by the worker processes of one
    service) tells whether the stored hash already matches."""
    if offline_memo_fresh(state, password, keyed):
        return
    stored = state.get_meta(OFFLINE_HASH)
    update: dict[str, str | None] = {}
    if stored is None or not verify_password(password, stored):
        stored = update[OFFLINE_HASH] = hash_password(password)
    update[OFFLINE_MEMO] = keyed(f"{stored}\0{password}").hex()
    state.set_metas(update)


def offline_memo_fresh(state: AccountState, password: str, keyed: Callable[[str], bytes]) -> bool:
    """True when the stored hash is known to be of ``password`` (the keyed digest says so): nothing to
    remember, no scrypt. One read, on every login."""
    found = state.get_metas([OFFLINE_HASH, OFFLINE_MEMO])
    stored = found[OFFLINE_HASH]
    return stored is not None and hmac.compare_digest(
        (found[OFFLINE_MEMO] or "").encode(), keyed(f"{stored}\0{password}").hex().encode())


def forget_offline_password(states: StateStore, cache_id: str, password: str) -> bool:
    """The provider refused ``password``: drop the hash only if it is that password (the user changed it
    upstream); True when dropped. A guess by anyone else leaves the real user's offline copy alone."""
    state = states.open_existing(cache_id)
    if state is None:
        return False
    try:
        stored = state.get_meta(OFFLINE_HASH)
        if stored is None or not verify_password(password, stored):
            return False
        state.set_meta(OFFLINE_HASH, None)
        return True
    finally:
        state.close()
