"""Background prefetch: every ``sync.interval`` the supervising process syncs the accounts that have a
password source or an OAuth2 token (`prefetch_forever`). In a cluster each node's supervisor runs it, and
an account that another node synced within half an interval is left alone (its ``last_sync`` is in the
shared state), so each account is prefetched by about one node per interval; the session lock keeps two
syncs of one account apart whatever happens.

The mark a complete prefetch leaves (``.prefetched`` in the account's cache directory, its time the
mtime) is seen by every process of the service: a login with the account's configured password is then
served from the cache until the next interval, without asking the provider."""

from __future__ import annotations

import hmac
import json
import logging
import os
import time
from typing import Any, Protocol

import trio

from pop3proxy.config import Settings
from pop3proxy.errors import LoginError
from pop3proxy.net.endpoint import UpstreamError
from pop3proxy.ops import metrics
from pop3proxy.proxy.oauth import NeedsAuthorisation, TokenUnavailable
from pop3proxy.proxy.routing import resolve
from pop3proxy.store.api import MailboxBusy, StateError, StateStore, Stores
from pop3proxy.store.paths import user_dir

log = logging.getLogger("pop3proxy.proxy")

LAST_SYNC = "last_sync"  # JSON: time, result, counts (written by every sync; read by `pop3proxy status`)


class Prefetching(Protocol):
    settings: Settings
    stores: Stores
    passwords: dict[str, str]
    oauth: Any  # a TokenManager: its ``accounts``

    async def sync_account(self, name: str, password: str | None, progress=None) -> Any: ...


def synced_lately(states: StateStore, cache_id: str, within: float) -> bool:
    """Whether a sync of the account (by any node) ended well within the last ``within`` seconds."""
    state = states.open_existing(cache_id)
    if state is None:
        return False
    try:
        raw = state.get_meta(LAST_SYNC)
    finally:
        state.close()
    return ended_within(raw, within)


def ended_within(summary: str | None, within: float, *, complete: bool = False) -> bool:
    """Whether the last-sync ``summary`` (the account's `LAST_SYNC` setting) tells of a pass that ended
    well within the last ``within`` seconds (``complete``: and left no new message unfetched)."""
    try:
        found = json.loads(summary or "{}")
    except ValueError:
        return False
    if not isinstance(found, dict) or found.get("result") != "ok":
        return False
    when = found.get("time")
    if complete and found.get("remaining") != 0:
        return False
    return isinstance(when, (int, float)) and 0 <= time.time() - when <= within


async def prefetch_forever(backend: Prefetching) -> None:
    while True:
        await prefetch_pass(backend)
        await trio.sleep(backend.settings.sync.interval)


async def prefetch_pass(backend: Prefetching) -> None:
    """One sync of each account to prefetch; one account's failure never stops the others."""
    accounts = {**{name: None for name in backend.oauth.accounts}, **backend.passwords}
    half = backend.settings.sync.interval / 2
    for name, password in accounts.items():
        try:
            if backend.stores.node is not None and await trio.to_thread.run_sync(
                    synced_lately, backend.stores.states, resolve(name, backend.settings).cache_id, half):
                log.debug("prefetch of %r left to the node that synced it lately", name)
                continue
            await backend.sync_account(name, password)
        except MailboxBusy:
            pass
        except (NeedsAuthorisation, TokenUnavailable) as exc:
            log.warning("prefetch of %r skipped: no OAuth2 token: %s", name, exc)
        except (UpstreamError, LoginError) as exc:
            log.warning("prefetch of %r failed: %s", name, exc)
        except (OSError, StateError) as exc:
            log.error("prefetch of %r failed writing the cache: %s", name, exc)
        except Exception:  # one account's bug must not stop the loop, nor the service
            log.exception("prefetch of %r failed: internal error", name)
            metrics.background_error("prefetch")

PREFETCHED = ".prefetched"


def mark_prefetched(root: str | os.PathLike[str], cache_id: str) -> None:
    (user_dir(root, cache_id) / PREFETCHED).touch()


def fresh_prefetch(root: str | os.PathLike[str], cache_id: str, configured: str | None, password: str,
                   interval: float) -> bool:
    """True when the account has a configured password, the client gave exactly it, and a prefetch
    completed within 1.5 ``interval``."""
    if configured is None:
        return False
    try:
        age = time.time() - (user_dir(root, cache_id) / PREFETCHED).stat().st_mtime
    except OSError:
        return False
    if age > interval * 1.5:
        return False
    return hmac.compare_digest(configured.encode("utf-8"), password.encode("utf-8"))
