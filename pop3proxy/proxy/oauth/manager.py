"""Keeping OAuth2 access tokens fresh (trio): hand out a valid token at login, refresh it in the
background before it expires, retry transient failures with back-off, and mark an account
"needs authorisation" only when the authorization server answers ``invalid_grant``.

A renewal runs in a worker thread holding the token store's renewal of the account
(`TokenStore.renewing`), so two processes (the service and ``pop3proxy sync``) never spend the same
refresh token twice (servers that rotate refresh tokens treat a reused one as stolen and revoke the
grant).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import trio

from pop3proxy.config import OAuth2Settings
from pop3proxy.ops import metrics
from pop3proxy.proxy.oauth import flows
from pop3proxy.proxy.oauth.tokens import (
    NEEDS_AUTHORISATION,
    StoreOrRoot,
    TokenSet,
    load_tokens,
    save_tokens,
    token_store,
)

log = logging.getLogger("pop3proxy.oauth2")

EXPIRY_SKEW = 30.0  # a token with less left than this is renewed before use
IDLE_CHECK = 60.0  # how often an account without a usable grant is looked at again
MIN_RETRY = 5.0  # first wait after a transient failure; doubles up to the account's retry_max


LAST_USE = 2.0  # a token with less left than this is not used any more (the login takes time)


def _skew(tokens: TokenSet | None) -> float:
    """Renew before use when less than this is left: EXPIRY_SKEW, or a quarter of a short life."""
    if tokens is not None and tokens.updated and tokens.expires_at > tokens.updated:
        return min(EXPIRY_SKEW, (tokens.expires_at - tokens.updated) / 4)
    return EXPIRY_SKEW


class NeedsAuthorisation(Exception):
    """The account has no grant (never authorised, or the server answered invalid_grant)."""


class TokenUnavailable(Exception):
    """No valid access token right now (the authorization server failed transiently)."""


def renew_locked(store: StoreOrRoot, account: str, settings: OAuth2Settings, *, min_valid: float = EXPIRY_SKEW,
                 clock: Callable[[], float] = time.time) -> TokenSet:
    """Renew the account's token unless it is still valid for `min_valid` seconds (another task
    or process renewed it meanwhile); blocking (worker thread).

    Raises NeedsAuthorisation (state saved) or TokenUnavailable (the stored token is kept).
    """
    store = token_store(store)
    with store.renewing(account):
        tokens = load_tokens(store, account)
        if tokens is not None and tokens.state == NEEDS_AUTHORISATION:
            raise NeedsAuthorisation(tokens.error or "needs authorisation")
        if tokens is not None and tokens.valid_for(clock()) > min_valid:
            return tokens
        try:
            if settings.grant == "client_credentials":
                answer = flows.client_credentials(settings)
            elif tokens is None or not tokens.refresh_token:
                raise NeedsAuthorisation("not authorised yet: run `pop3proxy oauth login`")
            else:
                answer = flows.refresh(settings, tokens.refresh_token)
        except flows.InvalidGrant as exc:
            metrics.oauth2_refresh("invalid_grant")
            tokens = tokens or TokenSet()
            tokens.state, tokens.error, tokens.updated = NEEDS_AUTHORISATION, str(exc), clock()
            save_tokens(store, account, tokens)
            raise NeedsAuthorisation(str(exc)) from None
        except flows.OAuthFailure as exc:
            metrics.oauth2_refresh("transient")
            if tokens is not None:
                tokens.error = str(exc)
                save_tokens(store, account, tokens)
            raise TokenUnavailable(str(exc)) from None
        fresh = TokenSet.from_response(answer, tokens, clock())
        save_tokens(store, account, fresh)
        metrics.oauth2_refresh("ok")
        return fresh


class TokenManager:
    """The OAuth2 `accounts` (cache id -> settings) and their tokens in `store`: a `TokenStore`, or a
    cache root for the one machine's store under it."""

    def __init__(self, store: StoreOrRoot, accounts: dict[str, OAuth2Settings], *,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = token_store(store)
        self.accounts = dict(accounts)
        self.clock = clock
        self._locks = {name: trio.Lock() for name in self.accounts}

    def __contains__(self, account: str) -> bool:
        return account in self.accounts

    async def _load(self, account: str) -> TokenSet | None:
        try:
            return await trio.to_thread.run_sync(load_tokens, self.store, account)
        except (OSError, ValueError) as exc:  # damaged, or a store that cannot be reached (a database)
            log.error("%s", exc)
            raise TokenUnavailable(str(exc)) from None

    async def _renew(self, account: str, min_valid: float) -> TokenSet:
        async with self._locks[account]:
            try:
                return await trio.to_thread.run_sync(
                    lambda: renew_locked(self.store, account, self.accounts[account], min_valid=min_valid,
                                         clock=self.clock))
            except OSError as exc:  # the token store cannot be reached: like a transient failure
                log.error("OAuth2 token store: %s", exc)
                raise TokenUnavailable(str(exc)) from None

    def _publish(self, account: str, tokens: TokenSet | None) -> None:
        needs = tokens is None or tokens.state == NEEDS_AUTHORISATION
        if self.accounts[account].grant == "client_credentials" and tokens is None:
            needs = False
        metrics.oauth2_state(account, needs)

    async def token(self, account: str, *, force: bool = False) -> str:
        """A valid access token for `account`; renewed first when (nearly) expired or `force`."""
        tokens = await self._load(account)
        try:
            if tokens is not None and tokens.state == NEEDS_AUTHORISATION:
                raise NeedsAuthorisation(tokens.error or "needs authorisation")
            skew = _skew(tokens)
            if force or tokens is None or tokens.valid_for(self.clock()) <= skew:
                try:
                    tokens = await self._renew(account, float("inf") if force else skew)
                except TokenUnavailable:
                    # The authorization server failed: a token that has not expired keeps working.
                    if force or tokens is None or tokens.valid_for(self.clock()) <= LAST_USE:
                        raise
                    log.info("using the stored token of %r until it expires (renewal failed)", account)
        except NeedsAuthorisation:
            metrics.oauth2_state(account, True)
            raise
        self._publish(account, tokens)
        return tokens.access_token

    async def run(self) -> None:
        """Keep every account's token fresh, in the background, until cancelled."""
        async with trio.open_nursery() as nursery:
            for account in self.accounts:
                nursery.start_soon(self._keep_fresh, account)

    async def _keep_fresh(self, account: str) -> None:
        settings = self.accounts[account]
        retry = MIN_RETRY
        while True:
            try:
                tokens = await self._load(account)
            except TokenUnavailable:
                await trio.sleep(IDLE_CHECK)
                continue
            self._publish(account, tokens)
            if tokens is None and settings.grant != "client_credentials":
                await trio.sleep(IDLE_CHECK)  # waiting for `pop3proxy oauth login`
                continue
            if tokens is not None and tokens.state == NEEDS_AUTHORISATION:
                await trio.sleep(IDLE_CHECK)
                continue
            margin = settings.refresh_margin
            if tokens is not None and tokens.updated and tokens.expires_at > tokens.updated:
                # A token that lives shorter than twice the margin is renewed at half its life.
                margin = min(margin, (tokens.expires_at - tokens.updated) / 2)
            due = 0.0 if tokens is None else tokens.valid_for(self.clock()) - margin
            if due > 0:
                await trio.sleep(min(due, IDLE_CHECK))
                continue
            try:
                await self._renew(account, margin)
                retry = MIN_RETRY
                log.info("renewed the OAuth2 token of %r", account)
            except NeedsAuthorisation as exc:
                metrics.oauth2_state(account, True)
                log.warning("OAuth2 account %r needs authorisation (`pop3proxy oauth login %s`): %s",
                            account, account, exc)
            except TokenUnavailable as exc:
                log.warning("OAuth2 token renewal of %r failed, retrying in %g s: %s", account, retry, exc)
                await trio.sleep(retry)
                retry = min(retry * 2, settings.retry_max)
