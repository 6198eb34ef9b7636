"""The proxy backend: logs a client in upstream (pass-through), syncs the cache, serves it
offline when the provider is unreachable, and prefetches accounts with a password source.

It holds one object per way in (`EarlyLogins`: the early connection, APOP and CRAM-MD5; `OAuthLogins`;
`AuthCache`), the `AccountRegistry` of the accounts it serves now, and the stores it was given
(`store.api.Stores`): which engine keeps the state and the locks is the composition root's choice.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable

import trio

from pop3proxy.config import Settings
from pop3proxy.errors import LoginError
from pop3proxy.filtering.pipeline import Pipeline, build_pipeline
from pop3proxy.net.backend_api import Backend, Maildrop
from pop3proxy.net.early import EarlyUpstream
from pop3proxy.net.endpoint import (
    AUTH_TEXT,
    UpstreamAuthError,
    UpstreamUnavailable,
)
from pop3proxy.net.pop3_client import UpstreamClient, connect
from pop3proxy.ops import metrics
from pop3proxy.pop3.sasl import BearerToken
from pop3proxy.proxy.accounts import Account, AccountRegistry, read_password_source
from pop3proxy.proxy.auth_cache import AuthCache
from pop3proxy.proxy.cache_ids import migrate_cache_ids
from pop3proxy.proxy.credentials import kdf_limiter
from pop3proxy.proxy.early_logins import CHALLENGE_MECHANISMS, EarlyLogins
from pop3proxy.proxy.oauth import TokenManager
from pop3proxy.proxy.oauth.logins import OAuthLogins
from pop3proxy.proxy.offline import (
    check_offline_password,
    forget_offline_password,
)
from pop3proxy.proxy.passes import Opened, Passes, SyncReport
from pop3proxy.proxy.prefetch import fresh_prefetch, mark_prefetched, prefetch_forever
from pop3proxy.proxy.proxied_maildrop import Mirror, ProxyMaildrop
from pop3proxy.proxy.routing import Route, resolve
from pop3proxy.proxy.sync import SyncResult
from pop3proxy.proxy.trust import refuse_untrusted
from pop3proxy.store.api import MailboxBusy, StateError, Stores, local_stores

log = logging.getLogger("pop3proxy.proxy")

OFFLINE_NOTE = "(offline: the provider is unreachable, serving cached mail)"


class _CannotOpen(Exception):
    """The account's files could not be opened (an `OSError` or `StateError` inside)."""


def _banner(count: int, report: SyncReport) -> str:
    banner = f"{count} messages"
    result = report.result
    if not report.done.is_set():
        banner += " (more mail is still downloading; it will show at your next login)"
    elif result is None or result.remaining:  # no result: the sync broke off
        banner += " (some new mail could not be fetched yet)"
    if result is not None and result.refused:
        banner += (f" ({result.refused} message{'s' if result.refused != 1 else ''} refused by the provider,"
                   " skipped; retried later)")
    return banner


def _close(*files: Opened) -> None:
    for opened in files:
        opened.close()


class ProxyBackend(Backend):
    accepts_bearer = True  # AUTH XOAUTH2 / OAUTHBEARER tokens are passed upstream
    stores: Stores  # always set: its own embedded engines unless it is given others

    def __init__(self, settings: Settings, pipeline: Pipeline | None = None, stores: Stores | None = None) -> None:
        self.settings = settings
        self.root = settings.cache.root
        self.store_backend = settings.cache.backend
        migrate_cache_ids(settings, self.root)
        self.pipeline = pipeline if pipeline is not None else build_pipeline(
            settings.filters, processes=settings.sync.filter_processes)
        self.stores = stores if stores is not None else local_stores(self.root)
        self.accounts = AccountRegistry(self.stores.locks)
        self._nursery: trio.Nursery | None = None
        # Its key keys the digests kept to skip scrypt too (memory only; the worker processes of one
        # service share it, so a digest one of them wrote to a state database serves them all).
        self.auth_cache = AuthCache(self.root, self.stores.shared_key or secrets.token_bytes(32),
                                    settings.sync.auth_cache_ttl)
        self.early = EarlyLogins(settings)
        self.passes = Passes(settings, self.pipeline, self.stores.states, self.auth_cache.keyed)
        self.passwords: dict[str, str] = {}
        self.oauth = TokenManager(self.stores.tokens or self.root, {
            name: account.oauth2 for name, account in settings.accounts.items() if account.oauth2 is not None})
        self.oauth_logins = OAuthLogins(self.oauth, settings.offline.enabled)
        for name, account in settings.accounts.items():
            password = read_password_source(name, account)
            if password is not None:
                self.passwords[name] = password

    @property
    def syncing(self) -> dict[str, tuple[int, int]]:
        """Syncs running now: cache id -> (new messages stored, new messages to fetch), for the console."""
        return self.passes.syncing

    @property
    def memo_key(self) -> bytes:
        return self.auth_cache.key

    @memo_key.setter
    def memo_key(self, key: bytes) -> None:  # a worker process takes its service's key
        self.auth_cache.key = key

    def attach(self, nursery: trio.Nursery, *, background: bool = True) -> None:
        """Give the backend a nursery for background syncs, and unless ``background`` is False start the
        prefetch loop and the OAuth2 renewals (once per service; a worker's logins renew on demand, under
        the token file's lock)."""
        self._nursery = nursery
        if not background:
            return
        if self.oauth.accounts:
            nursery.start_soon(self.oauth.run)
        if self.passwords or self.oauth.accounts:
            nursery.start_soon(prefetch_forever, self)

    # -- login -----------------------------------------------------------------------------------

    def account_key(self, user: str) -> str:
        """The provider account a login name reaches (provider and remote user, case folded)."""
        try:
            route = resolve(user, self.settings)
        except LoginError:
            return user.lower()
        return f"{route.endpoint.host.lower()}:{route.endpoint.port}/{route.remote_user.lower()}"

    def early_upstream(self, peer: tuple[str, int]) -> EarlyUpstream | None:
        return self.early.early_upstream(peer)

    async def greeting_ready(self, early: EarlyUpstream) -> tuple[str | None, bool]:
        return await self.early.greeting_ready(early)

    async def challenge(self, early: EarlyUpstream | None, mechanism: str) -> str:
        return await self.early.challenge(early, mechanism)

    async def upstream_secret(self, route: Route, password: str | None) -> str:
        return await self.oauth_logins.upstream_secret(route, password)

    async def login(self, user: str, password: str, peer: str, *, mechanism: str = "USER",
                    early: EarlyUpstream | None = None) -> Maildrop:
        route = resolve(user, self.settings)
        if mechanism in CHALLENGE_MECHANISMS:
            client = await self.early.challenge_login(route, user, password, mechanism, early,
                                                      token_account=route.cache_id in self.oauth)
            return await self._online_session(route, client, None)
        if isinstance(password, BearerToken):
            return await self._online_session(route, await self.oauth_logins.bearer_login(route, password), password)
        if route.cache_id in self.oauth:
            oauth_client = await self.oauth_logins.login(route, password)
            if oauth_client is None:
                return (await self._cached_session(route, None, OFFLINE_NOTE))[0]
            return await self._online_session(route, oauth_client, None)
        if fresh_prefetch(self.root, route.cache_id, self.passwords.get(route.cache_id), password,
                          self.settings.sync.interval):
            return (await self._cached_session(route, password, ""))[0]
        if self.auth_cache.matches(route.cache_id, password):
            within = self.settings.sync.min_check_interval
            maildrop, checked = await self._cached_session(route, password, "", checked_within=within)
            if checked:  # sync.min_check_interval: the provider was asked moments ago, not again now
                return maildrop
            assert self._nursery is not None, "ProxyBackend.attach() was not called"
            waiting = await early.take(route.endpoint) if early is not None and early.ready.is_set() else None
            self._nursery.start_soon(self._check_in_background, route, password, waiting)
            return maildrop
        return await self._password_login(route, password, peer, early)

    async def _password_login(self, route: Route, password: str, peer: str, early: EarlyUpstream | None) -> Maildrop:
        """Pass-through: the client's password goes to the provider (once); offline when it is unreachable."""
        started = time.monotonic()
        try:
            client, was_early = await self.early.connect_for_login(route, early, peer)
        except UpstreamUnavailable as exc:
            return await self._offline_login(route, password, exc)
        try:
            try:
                await client.login(route.remote_user, password)
            except UpstreamUnavailable as exc:
                # A new connection only when the provider had dropped the waiting one: before the
                # password went out, or by closing it unread. One that left the password unanswered may
                # have counted it: it is never sent again for this attempt (a lock-out at the provider).
                if not was_early or (client.secret_sent and not exc.closed):
                    raise
                await client.aclose()
                client, was_early = await self.early.connect_for_login(route, None, peer)
                await client.login(route.remote_user, password)
        except UpstreamAuthError as exc:
            await client.aclose()
            if exc.code == "AUTH":
                await self._forget_offline_password(route, password)
            log.info("provider refused the login of %r: %s", route.cache_id, exc)
            raise LoginError(AUTH_TEXT.get(exc.code, "login refused by the mail provider"), exc.code) from None
        except UpstreamUnavailable as exc:
            await client.aclose()
            try:
                return await self._offline_login(route, password, exc)
            except LoginError as error:
                error.guess = True  # the provider had the password and did not answer: a guess all the same
                raise
        except BaseException:
            await client.aclose()
            raise
        metrics.upstream_latency(time.monotonic() - started)
        self.auth_cache.remember(route.cache_id, password)
        return await self._online_session(route, client, password)

    async def _hold(self, route: Route, then: Callable[[], Opened]) -> tuple[Account, Opened]:
        """The account held for a session, and ``then()`` (opening its files) in the same worker-thread
        hop: ``-ERR [IN-USE]`` while another session (on any node) has it, ``-ERR [SYS/TEMP]`` when the
        session locks cannot be reached (a cluster's database) or the files cannot be opened."""
        account = self.accounts.get(route.cache_id)

        def opening() -> Opened:
            try:
                return then()
            except (OSError, StateError) as exc:
                raise _CannotOpen(exc) from exc

        try:
            opened = await account.acquire(session=True, then=opening)
        except MailboxBusy:
            raise LoginError("mailbox is in use by another session", "IN-USE") from None
        except _CannotOpen as exc:
            log.error("cannot open the cache of %r: %s", route.cache_id, exc.__cause__)
            raise LoginError("cannot open the mailbox, try again later", "SYS/TEMP") from None
        except StateError as exc:
            log.warning("cannot lock the mailbox of %r: %s", route.cache_id, exc)
            raise LoginError("the mailbox cannot be opened now, try again later", "SYS/TEMP") from None
        assert opened is not None
        return account, opened

    def _maildrop(self, account: Account, route: Route, password: str | None, opened: Opened,
                  banner: str) -> ProxyMaildrop:
        upstream = self.settings.upstream
        mirror = Mirror(upstream.delete == "mirror", upstream.timeout * 2, self.upstream_secret,
                        token_account=route.cache_id in self.oauth)
        assert opened.messages is not None
        return ProxyMaildrop(account, route, password, opened.mailbox, opened.state, opened.messages, banner, mirror)

    async def _online_session(self, route: Route, client: UpstreamClient, password: str | None) -> Maildrop:
        """Hold the account and open its files for the sync (one worker-thread hop), sync while the login
        waits (``sync.login_budget``), and serve the files the sync hands over with its listing; a sync
        that has not ended in time keeps its files, and the session opens its own."""
        held = self.accounts.get(route.cache_id)
        # A pass of this process running now recovered the files itself; one that ends before ours starts
        # makes the view read here stale (`Passes.run` reads it again).
        recovering, generation = not held.sync_lock.locked(), held.passes_done
        try:
            account, opened = await self._hold(route, lambda: self.passes.open(route, recovering=recovering, view=True))
        except BaseException:
            await client.aclose()
            raise
        opened.generation = generation
        report = SyncReport(waiting=True)
        handed_over = False  # the client and the files belong to the background sync once it is started
        served: Opened | None = None  # the files the session is to serve
        try:
            assert self._nursery is not None, "ProxyBackend.attach() was not called"
            await account.acquire(session=False)  # the sync's own hold on the lock
            self._nursery.start_soon(self.passes.background, route, account, client, password, report, opened)
            handed_over = True
            with trio.move_on_after(self.settings.sync.login_budget):
                await report.done.wait()
            report.waiting = False
            if report.store_error is not None:
                raise LoginError("cannot store new mail, try again later", "SYS/TEMP")
            served, report.files = report.files, None
            if served is None:
                served = await self._open_served(route)
            return self._maildrop(account, route, password, served, _banner(len(served.messages or ()), report))
        except BaseException as exc:
            report.waiting = False
            # Whatever went wrong between taking the lock and handing out the session, the lock is
            # released: the user must not stay "in use" until a restart.
            with trio.CancelScope(shield=True):
                if not handed_over:
                    await client.aclose()
                unused = [files for files in (None if handed_over else opened, report.files, served)
                          if files is not None]
                report.files = None
                await account.release(session=True, closing=lambda: _close(*unused))
            if isinstance(exc, Exception) and not isinstance(exc, LoginError):
                log.exception("login of %r failed: internal error", route.cache_id)
                metrics.background_error("login")
                raise LoginError("internal error, try again later", "SYS/TEMP") from None
            raise

    async def _open_served(self, route: Route) -> Opened:
        """The session's own files, while its sync (still running) keeps the ones it opened."""
        try:
            return await trio.to_thread.run_sync(lambda: self.passes.open(route, recovering=False, listing=True))
        except (OSError, StateError) as exc:
            log.error("cannot open the cache of %r: %s", route.cache_id, exc)
            raise LoginError("cannot open the mailbox, try again later", "SYS/TEMP") from None

    # -- offline ---------------------------------------------------------------------------------

    async def _forget_offline_password(self, route: Route, password: str) -> None:
        """The provider refused ``password``: drop the offline hash if it is that password."""
        try:
            if await trio.to_thread.run_sync(forget_offline_password, self.stores.states, route.cache_id, password,
                                             limiter=kdf_limiter()):
                log.info("dropped the offline password of %r: the provider no longer accepts it", route.cache_id)
        except (OSError, StateError) as exc:
            log.error("cannot drop the offline password of %r: %s", route.cache_id, exc)

    async def _offline_login(self, route: Route, password: str, reason: UpstreamUnavailable) -> Maildrop:
        refuse_untrusted(route, reason)
        log.warning("provider %s:%d unreachable for %r: %s", route.endpoint.host, route.endpoint.port,
                    route.cache_id, reason)
        if not self.settings.offline.enabled:
            raise LoginError("the mail provider cannot be reached, try again later", "SYS/TEMP")
        try:
            verdict = await trio.to_thread.run_sync(
                check_offline_password, self.stores.states, route.cache_id, password, limiter=kdf_limiter())
        except StateError:
            verdict = None
        if verdict is None:
            raise LoginError("the mail provider cannot be reached and this account has no offline copy yet", "SYS/TEMP")
        if not verdict:
            raise LoginError("invalid user name or password", "AUTH")
        return (await self._cached_session(route, None, OFFLINE_NOTE))[0]

    async def _cached_session(self, route: Route, password: str | None, note: str, *,
                              checked_within: float = 0.0) -> tuple[Maildrop, bool]:
        """Serve the cache as it is, without asking the provider (offline, or a fresh prefetch): the
        account held, its files opened and listed in one worker-thread hop. And whether a complete pass
        ended within ``checked_within`` seconds."""
        syncing = self.accounts.get(route.cache_id).sync_lock.locked()
        account, opened = await self._hold(route, lambda: self.passes.open(
            route, recovering=not syncing, listing=True, checked_within=checked_within))
        banner = f"{len(opened.messages or ())} messages" + (f" {note}" if note else "")
        return self._maildrop(account, route, password, opened, banner), opened.checked

    # -- background prefetch ---------------------------------------------------------------------

    async def sync_account(self, name: str, password: str | None, progress=None) -> SyncResult:
        """One sync pass for a configured account (prefetch loop and ``pop3proxy sync``); an OAuth2
        account (`password` None) logs in with its token."""
        route = resolve(name, self.settings)
        account = self.accounts.get(route.cache_id)
        if account.session_active or account.sync_lock.locked():
            raise MailboxBusy(route.cache_id)
        await account.acquire(session=False)
        try:
            async with account.sync_lock:
                secret = await self.upstream_secret(route, password)
                async with await connect(route.endpoint) as client:
                    await client.login(route.remote_user, secret)
                    result = await self.passes.run(route, account, client, secret, progress)
            if not result.remaining and password is not None:
                await trio.to_thread.run_sync(mark_prefetched, self.root, route.cache_id)
                log.info("prefetch of %r complete: logins with its configured password are served from "
                         "the cache until the next interval", route.cache_id)
            return result
        finally:
            await account.release(session=False)

    async def _check_in_background(self, route: Route, password: str, client: UpstreamClient | None) -> None:
        """After a login served from the auth cache: log in at the provider (a refusal drops the entry)
        and fetch new mail, which shows at the next login. ``client``: the early connection, if any."""
        account = self.accounts.get(route.cache_id)
        client = await self.auth_cache.check_upstream(route, password, client)
        if client is None:
            return
        if await self.passes.nothing_new(route, client):  # the usual case: the lock was never needed
            return
        if account.sync_lock.locked():
            await client.aclose()
            return
        try:
            await account.acquire(session=False)
        except MailboxBusy:  # another process (a worker, `pop3proxy sync`) has the mailbox: it is its turn
            await client.aclose()
            log.info("background check of %r: password accepted; fetch skipped: the mailbox is in use "
                     "elsewhere (the next login fetches)", route.cache_id)
            return
        await self.passes.background(route, account, client, password, SyncReport())
