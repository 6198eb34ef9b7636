"""``sync.auth_cache_ttl``: a login whose password the provider accepted within the TTL is served from
the cache at once; the provider is asked in the background, and an entry it refuses is dropped.

Only a keyed digest of each password is kept (the key is random and lives in memory only, shared by the
worker processes of one service); a different password never uses an entry. An entry is a small file in
the account's cache directory, so that every worker process serves from it and a drop holds for all.
The trade-off (a password changed at the provider keeps opening the cache until the entry expires or
the background check sees it refused) is in SECURITY.md.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from pathlib import Path

from pop3proxy.net.endpoint import UpstreamAuthError, UpstreamError
from pop3proxy.net.pop3_client import UpstreamClient, connect
from pop3proxy.pop3.sasl import BearerToken
from pop3proxy.proxy.routing import Route
from pop3proxy.store.fsutil import write_new_file
from pop3proxy.store.paths import make_user_dir, user_dir

log = logging.getLogger("pop3proxy.proxy")


AUTH_CACHE_FILE = ".auth-cache"  # in the account's cache directory: "<keyed digest> <time accepted>"


class AuthCache:
    """The auth cache of one service: keyed digests of passwords the provider accepted lately."""

    def __init__(self, root: Path, key: bytes, ttl: float) -> None:
        self.root = root
        self.key = key  # random, memory only; the worker processes of one service share it
        self.ttl = ttl

    def keyed(self, password: str) -> bytes:
        return hmac.new(self.key, password.encode("utf-8"), "sha256").digest()

    def path(self, cache_id: str) -> Path:
        return user_dir(self.root, cache_id) / AUTH_CACHE_FILE

    def remember(self, cache_id: str, password: str) -> None:
        """The provider accepted ``password`` just now (written atomically; an error only costs the entry)."""
        if self.ttl <= 0:
            return
        try:
            directory = make_user_dir(self.root, cache_id)
            temporary = directory / f"{AUTH_CACHE_FILE}.{os.getpid()}"
            temporary.unlink(missing_ok=True)  # left by a crash
            # Mode 0600 whatever the umask, like every file that holds something derived from a password.
            write_new_file(temporary, f"{self.keyed(password).hex()} {time.time():.6f}\n".encode(), durable=False)
            temporary.replace(directory / AUTH_CACHE_FILE)
        except OSError as exc:
            log.warning("auth cache entry of %r not kept: %s", cache_id, exc)

    def forget(self, cache_id: str) -> None:
        self.path(cache_id).unlink(missing_ok=True)

    def matches(self, cache_id: str, password: str) -> bool:
        """``sync.auth_cache_ttl``: this password was accepted by the provider for this account within
        the TTL (a keyed digest, never the password)."""
        if isinstance(password, BearerToken) or self.ttl <= 0:
            return False
        try:
            digest, accepted = self.path(cache_id).read_text().split()
            age = time.time() - float(accepted)
        except (OSError, ValueError):
            return False
        if not 0 <= age <= self.ttl:
            self.forget(cache_id)
            return False
        return hmac.compare_digest(digest.encode(), self.keyed(password).hex().encode())

    async def check_upstream(self, route: Route, password: str, client: UpstreamClient | None) -> UpstreamClient | None:
        """After a login served from the cache: log in at the provider (``client``: the early
        connection, if any); a refusal drops the entry. The logged-in client, or None."""
        try:
            client = client or await connect(route.endpoint)
        except UpstreamError as exc:
            log.info("background check of %r: provider unreachable: %s", route.cache_id, exc)
            return None
        try:
            await client.login(route.remote_user, password)
        except UpstreamError as exc:
            await client.aclose()
            if isinstance(exc, UpstreamAuthError) and exc.code == "AUTH":
                self.forget(route.cache_id)
                log.warning("the provider no longer accepts the cached password of %r: auth cache entry "
                            "dropped (the login it served stays)", route.cache_id)
            return None
        return client
