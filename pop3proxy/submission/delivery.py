"""Delivering queued mail: one attempt per entry with back-off, and the runner that walks the
queue in the background.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Literal

import trio

from pop3proxy.ops import metrics
from pop3proxy.submission.dsn import Failure, _duration, build_dsn, store_bounce
from pop3proxy.submission.provider import (
    _ABANDON,
    SubmissionAuthError,
    SubmissionRejected,
    SubmissionUnavailable,
    send_message,
    submission_route,
)
from pop3proxy.submission.queue import EntryBusy, OutQueue, RetryPolicy
from pop3proxy.submission.relay import Relay

log = logging.getLogger("pop3proxy.smtp")

IDLE_WAKE = 300.0  # the queue runner looks at the queue at least this often


@dataclass
class Attempt:
    entry_id: str
    outcome: Literal["delivered", "retry", "bounced", "busy", "gone"]
    detail: str = ""
    next_try: float | None = None


def attempt_delivery(
    queue: OutQueue,
    entry_id: str,
    settings,
    passwords: Mapping[str, str],
    retry: RetryPolicy,
    *,
    now: Callable[[], float] = time.time,
) -> Attempt:
    """Try to send one queued message now, then settle its entry: removed when the provider took it
    (with a report for recipients it refused), bounced (permanent refusal, or ``give_up_after``
    passed), or rescheduled with back-off. Holds the entry's claim throughout."""
    with contextlib.ExitStack() as stack:
        try:
            entry = stack.enter_context(queue.claim(entry_id))
        except KeyError:
            return Attempt(entry_id, "gone", "not in the queue")
        except EntryBusy:
            return Attempt(entry_id, "busy", "being sent or removed by another process")
        return _attempt(queue, entry, settings, passwords, retry, now)


def _attempt(queue: OutQueue, entry, settings, passwords, retry: RetryPolicy, now: Callable[[], float]) -> Attempt:
    """`attempt_delivery` with the entry's claim held."""
    from pop3proxy.errors import LoginError

    entry_id = entry.id
    data = queue.read_message(entry_id)
    temporary = ""
    failures: list[Failure] = []
    password = passwords.get(entry.login)
    try:
        if password is None:
            raise SubmissionUnavailable(f"no password source is configured for {entry.login!r} any more")
        route = submission_route(entry.login, settings)
        refused = send_message(
            route.endpoint, route.remote_user, password, entry.sender, entry.recipients, data, entry.mail_options
        )
    except LoginError as exc:
        temporary = f"cannot route {entry.login!r}: {exc.text}"
    except SubmissionAuthError as exc:
        temporary = f"the provider refused the stored password: {exc.code} {exc.text}"
    except SubmissionRejected as exc:
        if exc.permanent:
            failures = [Failure(rcpt, exc.code, exc.text) for rcpt in entry.recipients]
        else:
            temporary = f"{exc.code} {exc.text}"
    except SubmissionUnavailable as exc:
        temporary = exc.text
    else:
        if not refused:
            queue.remove(entry_id)
            metrics.smtp_message("delivered_from_queue")
            return Attempt(entry_id, "delivered", f"sent to {route.endpoint.where}")
        # Accepted for some: never send it to those again.
        entry.recipients = [rcpt for rcpt in entry.recipients if rcpt in refused]
        queue.update(entry)
        failures = [Failure(r, c, t) for r, (c, t) in refused.items() if c >= 500]
        later = [f"{r}: {c} {t}" for r, (c, t) in refused.items() if c < 500]
        if later:
            temporary = "; ".join(later)
    moment = now()
    deadline = entry.created + settings.smtp.give_up_after
    if temporary and moment >= deadline:
        kept = _duration(settings.smtp.give_up_after)
        failures += [Failure(rcpt, 451, f"4.4.7 delivery time expired; last error: {temporary}")
                     for rcpt in entry.recipients if all(f.recipient != rcpt for f in failures)]
        temporary = ""
        explanation = (
            f"pop3proxy kept your message and tried to send it for {kept}, "
            "but the mail provider could not take it. It has given up."
        )
    else:
        explanation = "The mail provider refused your message permanently."
    if failures:
        dsn = build_dsn(
            sender=entry.sender, failures=failures, original=data, arrival=entry.created,
            explanation=explanation, queue_id=entry.id, now=moment,
        )
        store_bounce(settings, entry.cache_id, dsn)
        metrics.smtp_message("bounced")
        bounced = {f.recipient for f in failures}
        entry.recipients = [rcpt for rcpt in entry.recipients if rcpt not in bounced]
        if not entry.recipients:
            queue.remove(entry_id)
            return Attempt(entry_id, "bounced", failures[0].text)
    entry.attempts += 1
    entry.last_error = temporary
    entry.next_try = min(moment + retry.delay(entry.attempts), deadline)
    queue.update(entry)
    return Attempt(entry_id, "retry", temporary, entry.next_try)


class QueueRunner:
    """Retries queued mail in the background: every entry once at start, then as each falls due."""

    def __init__(self, relay: Relay, clock: Callable[[], float] = time.time) -> None:
        self.relay = relay
        self.clock = clock

    async def run(self) -> None:
        queue = self.relay.queue
        try:
            await trio.to_thread.run_sync(queue.sweep)
        except OSError as exc:
            log.error("cannot clean the queue's tmp directory: %s", exc)
        force = True
        while True:
            if self.relay.queued.is_set():
                self.relay.queued = trio.Event()
            try:
                next_due = await self.run_pass(force=force)
            except OSError as exc:
                log.error("cannot read the outgoing queue %s: %s", queue.directory, exc)
                next_due = self.clock() + 60
            force = False
            delay = min(IDLE_WAKE, max(0.05, next_due - self.clock())) if next_due is not None else IDLE_WAKE
            with trio.move_on_after(delay):
                await self.relay.queued.wait()

    async def run_pass(self, *, force: bool = False) -> float | None:
        """Attempt every due entry (every entry with ``force``); returns the time the next is due."""
        relay = self.relay
        entries = await trio.to_thread.run_sync(relay.queue.entries)
        next_due: float | None = None
        for entry in entries:
            if not force and entry.next_try > self.clock():
                next_due = entry.next_try if next_due is None else min(next_due, entry.next_try)
                continue
            try:
                result = await trio.to_thread.run_sync(
                    partial(attempt_delivery, relay.queue, entry.id, relay.settings, relay.passwords, relay.retry,
                            now=self.clock),
                    limiter=relay.limiter,
                    **_ABANDON,
                )
            except (OSError, ValueError) as exc:
                log.error("queued mail %s: %s", entry.id, exc)
                retry_at = self.clock() + relay.retry.first
                next_due = retry_at if next_due is None else min(next_due, retry_at)
                continue
            fields = {"queue_id": entry.id, "user": entry.login, "result": result.outcome}
            if result.outcome == "busy":  # `pop3proxy queue flush` is sending it: look again soon
                retry_at = self.clock() + relay.retry.first
                next_due = retry_at if next_due is None else min(next_due, retry_at)
            if result.outcome == "delivered":
                log.info("queued mail %s of %r delivered: %s", entry.id, entry.login, result.detail, extra=fields)
            elif result.outcome == "bounced":
                log.warning("queued mail %s of %r bounced to the sender: %s", entry.id, entry.login, result.detail,
                            extra=fields)
            elif result.outcome == "retry":
                log.info("queued mail %s of %r: will retry (attempt %d failed: %s)", entry.id, entry.login,
                         entry.attempts + 1, result.detail, extra=fields)
                if result.next_try is not None:
                    next_due = result.next_try if next_due is None else min(next_due, result.next_try)
        return next_due
