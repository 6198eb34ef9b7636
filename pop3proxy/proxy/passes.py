"""A sync pass as the proxy runs it (`Passes`): the account's files opened with what a pass reads first,
the pass with its deadline, and its end in one worker-thread hop (the last-sync summary, the offline
hash, the listing a waiting login serves); `SyncReport` is how a login waits for the pass it started and
takes over its files.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from pop3proxy.config import Settings
from pop3proxy.filtering.pipeline import Pipeline
from pop3proxy.net.endpoint import UpstreamError, UpstreamUnavailable
from pop3proxy.net.pop3_client import UpstreamClient
from pop3proxy.ops import metrics
from pop3proxy.pop3.sasl import BearerToken
from pop3proxy.proxy.accounts import Account
from pop3proxy.proxy.credentials import kdf_limiter
from pop3proxy.proxy.deletion import plan_deletions
from pop3proxy.proxy.offline import offline_memo_fresh, remember_offline_password
from pop3proxy.proxy.prefetch import LAST_SYNC, ended_within
from pop3proxy.proxy.routing import Route
from pop3proxy.proxy.sync import StateView, SyncResult, read_view, recover, sync_mailbox, upstream_ids
from pop3proxy.store import open_store
from pop3proxy.store.api import AccountState, Row, StateError, StateStore
from pop3proxy.store.base import Mailbox, MessageInfo
from pop3proxy.store.held import hold_callback
from pop3proxy.store.paths import removed_parts_dir, user_dir

log = logging.getLogger("pop3proxy.proxy")


@dataclass
class SyncReport:
    """What the sync a login started tells the login: ``done`` is set once it ends (or breaks off)."""

    done: trio.Event = field(default_factory=trio.Event)
    result: SyncResult | None = None
    store_error: Exception | None = None  # the cache could not be written
    waiting: bool = False  # the login waits: the sync hands its files and listing over when it ends
    files: Opened | None = None  # handed over (the login closes them, or its session does)


@dataclass
class Opened:
    """An account's files as a login or a pass opened them, with what was read in the same hop."""

    mailbox: Mailbox
    state: AccountState
    view: StateView | None = None  # what a pass reads before asking the provider
    messages: list[MessageInfo] | None = None  # what a session serves
    generation: int = 0  # `Account.passes_done` before it was opened: the view is stale once it differs
    checked: bool = False  # a complete pass ended within `sync.min_check_interval` (when asked)

    def close(self) -> None:
        _close(self.mailbox, self.state)


def _close(*files: Mailbox | AccountState) -> None:
    for file in files:
        file.close()


def served_listing(mailbox: Mailbox, state: AccountState) -> list[MessageInfo]:
    """What a session serves: the cached messages but for those deleted or held."""
    hidden = state.hidden_keys()
    return [info for info in mailbox.list() if info.key not in hidden]


def pass_summary(result: SyncResult) -> str:
    """The last-sync summary of a pass that ended well (the account's `LAST_SYNC` setting)."""
    return json.dumps({"time": time.time(), "result": "ok", "fetched": result.fetched,
                       "fetched_bytes": result.fetched_bytes, "deleted_upstream": result.deleted_upstream,
                       "held": result.held, "refused": result.refused, "adopted": result.adopted,
                       "dropped": result.dropped, "remaining": result.remaining})


class Passes:
    """Runs the proxy's sync passes; ``syncing`` (cache id -> new messages stored, to fetch) is what runs
    now, for the console."""

    def __init__(self, settings: Settings, pipeline: Pipeline, states: StateStore,
                 keyed: Callable[[str], bytes]) -> None:
        self.settings = settings
        self.root = Path(settings.cache.root)
        self.pipeline = pipeline
        self.states = states
        self.keyed = keyed  # the auth cache's: keys the offline memo
        self.syncing: dict[str, tuple[int, int]] = {}

    def open_files(self, route: Route) -> tuple[Mailbox, AccountState]:
        mailbox = open_store(self.root, route.cache_id, self.settings.cache.backend)
        try:
            state = self.states.open(route.cache_id)
        except BaseException:
            mailbox.close()
            raise
        return mailbox, state

    def open(self, route: Route, *, recovering: bool, view: bool = False, listing: bool = False,
             checked_within: float = 0.0) -> Opened:
        """Open the account's files (worker thread) and, in the same hop, settle what a crash left
        (``recovering``: no sync of this process is running), read the pass's view of the state, list
        what a session serves, or tell whether a complete pass ended within ``checked_within`` seconds."""
        opened = Opened(*self.open_files(route))
        try:
            if recovering:
                recover(opened.mailbox, opened.state)
            if view:
                opened.view = read_view(opened.state)
            if listing:
                opened.messages = served_listing(opened.mailbox, opened.state)
            if checked_within > 0:
                opened.checked = ended_within(opened.state.get_meta(LAST_SYNC), checked_within, complete=True)
            return opened
        except BaseException:
            opened.close()
            raise

    async def background(self, route: Route, account: Account, client: UpstreamClient, password: str | None,
                         report: SyncReport, opened: Opened | None = None) -> None:
        try:
            async with account.sync_lock:
                report.result = await self.run(route, account, client, password, opened=opened, report=report)
        except OSError as exc:
            report.store_error = exc
            log.error("sync of %r failed writing the cache: %s", route.cache_id, exc)
        except UpstreamError as exc:
            log.warning("sync of %r stopped: %s", route.cache_id, exc)
        except StateError as exc:
            report.store_error = exc
            log.error("sync of %r failed: %s", route.cache_id, exc)
        except Exception:  # a bug must stop this sync only, never the service's other tasks
            log.exception("sync of %r failed: internal error", route.cache_id)
            metrics.background_error("sync")
        finally:
            with trio.CancelScope(shield=True):
                await client.aclose()
                report.done.set()
                await account.release(session=False)

    async def nothing_new(self, route: Route, client: UpstreamClient) -> bool:
        """The check after a login served from the auth cache, without taking the account: the provider's
        listing against the state's rows. When a pass would do nothing (no new message, nothing to delete
        or drop) the summary of a complete pass is written, the provider left, and True returned: the
        account's next login, on any worker, does not wait for this check. Else False (``client`` still
        logged in) and a pass follows, with the account held. A failure ends the check (True)."""
        try:
            return await self._nothing_new(route, client)
        except (UpstreamError, StateError, OSError) as exc:
            await client.aclose()
            log.warning("background check of %r stopped: %s", route.cache_id, exc)
            return True

    async def _nothing_new(self, route: Route, client: UpstreamClient) -> bool:
        ids = await upstream_ids(client)
        rows = await trio.to_thread.run_sync(self._rows, route.cache_id)
        upstream = self.settings.upstream
        plan = plan_deletions(ids, rows, policy=upstream.delete, now=time.time(),
                              delete_after_days=upstream.delete_after_days, vanished=upstream.vanished)
        if plan.upstream or plan.gone or plan.drop or any(uid not in rows for uid in ids.values()):
            return False
        await trio.to_thread.run_sync(self._note_summary, route.cache_id, pass_summary(SyncResult()))
        await client.quit(wait=False)
        log.info("checked %r with the provider: nothing new", route.cache_id)
        return True

    def _rows(self, cache_id: str) -> dict[str, Row]:
        state = self.states.open(cache_id)
        try:
            return {row.uid: row for row in state.rows()}
        finally:
            state.close()

    def _note_summary(self, cache_id: str, summary: str) -> None:
        state = self.states.open(cache_id)
        try:
            state.set_meta(LAST_SYNC, summary)
        finally:
            state.close()

    async def run(self, route: Route, account: Account, client: UpstreamClient, password: str | None,
                  progress=None, *, opened: Opened | None = None, report: SyncReport | None = None) -> SyncResult:
        """Recover, sync, remember the offline hash. Runs with the account lock and its ``sync_lock`` held.
        ``opened``: the files as the login opened them (recovered, with the pass's view, read again when
        another pass of this process ended since); a login still waiting (``report``) is handed them with
        the listing it serves, otherwise they are closed here."""
        if opened is None:
            opened = await trio.to_thread.run_sync(lambda: self.open(route, recovering=True, view=True))
        elif opened.view is None or opened.generation != account.passes_done:
            opened.view = await trio.to_thread.run_sync(read_view, opened.state)
        deadline = self.settings.sync.deadline
        self.syncing[route.cache_id] = (0, 0)

        def progressed(done: int, total: int) -> None:
            self.syncing[route.cache_id] = (done, total)
            if progress is not None:
                progress(done, total)

        try:
            result = await self._pass(route, client, opened, deadline, progressed)
            await self._finish(route, opened, result, password, report)
            return result
        except BaseException as exc:
            summary = json.dumps({"time": time.time(), "result": f"failed: {type(exc).__name__}"})
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(opened.state.set_meta, LAST_SYNC, summary)
            raise
        finally:
            account.passes_done += 1
            self.syncing.pop(route.cache_id, None)
            if report is None or report.files is not opened:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(opened.close)

    async def _pass(self, route: Route, client: UpstreamClient, opened: Opened, deadline: float,
                    progress: Callable[[int, int], None]) -> SyncResult:
        with trio.move_on_after(deadline) as scope:
            result = await sync_mailbox(
                client,
                opened.mailbox,
                opened.state,
                user=route.cache_id,
                pipeline=self.pipeline,
                policy=self.settings.upstream.delete,
                delete_after_days=self.settings.upstream.delete_after_days,
                vanished=self.settings.upstream.vanished,
                max_filtered_size=self.settings.sync.max_filtered_size,
                progress=progress,
                hold=hold_callback(self.root, route.cache_id),
                removed_dir=removed_parts_dir(user_dir(self.root, route.cache_id)),
                view=opened.view,
            )
        if scope.cancelled_caught:
            # What was stored is kept; claims cut short are settled by recover() on the next pass.
            reason = f"sync deadline of {deadline:g} s reached (sync.deadline)"
            raise UpstreamUnavailable(f"{route.endpoint.where}: {reason}", reason)
        log.info("synced %r: %d new (%d bytes), %d deleted upstream",
                 route.cache_id, result.fetched, result.fetched_bytes, result.deleted_upstream)
        return result

    async def _finish(self, route: Route, opened: Opened, result: SyncResult, password: str | None,
                      report: SyncReport | None) -> None:
        """The end of a pass, in one worker-thread hop: whether the offline hash is current, the last-sync
        summary, and the listing a waiting login serves (scrypt, when the password changed, in a hop of
        its own under the KDF limiter)."""
        if isinstance(password, BearerToken) or not self.settings.offline.enabled:
            password = None
        summary = pass_summary(result)
        serve = report is not None and report.waiting

        def finish() -> bool:
            stale = password is not None and not offline_memo_fresh(opened.state, password, self.keyed)
            # "user": for `pop3proxy status`; both in one write
            opened.state.set_metas({LAST_SYNC: summary, "user": route.cache_id})
            if serve:
                opened.messages = served_listing(opened.mailbox, opened.state)
            return stale

        if await trio.to_thread.run_sync(finish) and password is not None:
            await trio.to_thread.run_sync(
                remember_offline_password, opened.state, password, self.keyed, limiter=kdf_limiter())
        if serve and report is not None and report.waiting:
            report.files = opened

