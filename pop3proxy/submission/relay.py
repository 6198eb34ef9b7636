"""The relay's decisions (trio side): who may log in (pass-through AUTH) and what happens to a
message handed over with DATA.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio

from pop3proxy.config import queue_dir
from pop3proxy.errors import LoginError
from pop3proxy.ops import metrics
from pop3proxy.proxy.accounts import read_password_source
from pop3proxy.proxy.credentials import kdf_limiter
from pop3proxy.proxy.offline import check_offline_password
from pop3proxy.store.api import StateStore, local_stores
from pop3proxy.store.state import StateError
from pop3proxy.submission.dsn import Failure, build_dsn, store_bounce
from pop3proxy.submission.provider import (
    _ABANDON,
    SubmissionAuthError,
    SubmissionError,
    SubmissionRejected,
    SubmissionRoute,
    SubmissionUnavailable,
    check_login,
    send_message,
    submission_route,
)
from pop3proxy.submission.queue import OutQueue, RetryPolicy

log = logging.getLogger("pop3proxy.smtp")

MAX_RECIPIENTS = 100
MAX_UPSTREAM = 16  # provider connections in flight (worker threads)


class _Login:
    """An authenticated SMTP client: kept in the connection's session, never logged."""

    __slots__ = ("name", "password", "route", "offline")

    def __init__(self, name: str, password: str, route: SubmissionRoute, offline: bool) -> None:
        self.name = name
        self.password = password
        self.route = route
        self.offline = offline

    @property
    def login(self) -> str:  # what aiosmtpd shows as session.login_data
        return self.name

    def __repr__(self) -> str:
        return f"<smtp login {self.name!r}>"


@dataclass
class AuthVerdict:
    reply: str
    login: _Login | None = None


def load_passwords(settings) -> dict[str, str]:
    """The password of every ``[accounts]`` entry with a password source (raises ValueError if unsafe)."""
    found = {}
    for name, account in settings.accounts.items():
        password = read_password_source(name, account)
        if password is not None:
            found[name] = password
    return found


class Relay:
    """Checks logins, relays messages, queues them when the provider is away. Trio code."""

    def __init__(self, settings, passwords: Mapping[str, str], retry: RetryPolicy | None = None,
                 states: StateStore | None = None) -> None:
        self.settings = settings
        self.passwords = passwords
        self.states = states if states is not None else local_stores(settings.cache.root).states  # offline hashes
        self.retry = retry or RetryPolicy()
        self.queue = OutQueue(queue_dir(settings))
        self.limiter = trio.CapacityLimiter(MAX_UPSTREAM)
        self.queued = trio.Event()  # set when an entry was added; the runner looks sooner

    async def _upstream(self, fn: Callable, *args: Any) -> Any:
        return await trio.to_thread.run_sync(partial(fn, *args), limiter=self.limiter, **_ABANDON)

    # -- AUTH ------------------------------------------------------------------------------------

    async def authenticate(self, name: str, password: str, peer: str) -> AuthVerdict:
        fields = {"user": name, "peer": peer, "protocol": "smtp"}
        try:
            route = submission_route(name, self.settings)
        except (LoginError, ValueError) as exc:
            text = exc.text if isinstance(exc, LoginError) else str(exc)
            log.info("smtp login failed for %r from %s: %s", name, peer, text, extra={**fields, "result": "failed"})
            metrics.smtp_login("failed")
            return AuthVerdict("535 5.7.8 Authentication credentials invalid")
        fields["upstream"] = route.endpoint.where
        started = time.monotonic()
        unreachable: SubmissionUnavailable | None = None
        try:
            await self._upstream(check_login, route.endpoint, route.remote_user, password)
        except SubmissionUnavailable as exc:
            unreachable = exc
        except SubmissionError as exc:
            log.info(
                "smtp login failed for %r from %s: the provider said %d %s", name, peer, exc.code, exc.text,
                extra={**fields, "result": "failed"},
            )
            if 400 <= exc.code < 500:
                metrics.smtp_login("unavailable")
                return AuthVerdict("454 4.7.0 The mail provider cannot check the password right now; try again later")
            metrics.smtp_login("failed")
            return AuthVerdict("535 5.7.8 Authentication credentials invalid")
        finally:
            metrics.upstream_latency(time.monotonic() - started)
        if unreachable is not None:
            return await self._offline(name, password, route, peer, unreachable, fields)
        log.info("smtp login %r from %s via %s", name, peer, route.endpoint.where, extra={**fields, "result": "ok"})
        metrics.smtp_login("ok")
        return AuthVerdict("235 2.7.0 Authentication successful", _Login(name, password, route, offline=False))

    async def _offline(self, name, password, route, peer, reason: SubmissionUnavailable, fields) -> AuthVerdict:
        # scrypt is memory-hungry: share the POP3 side's limit
        verdict = await trio.to_thread.run_sync(
            self._check_offline, name, password, route, reason.tls_failure, limiter=kdf_limiter()
        )
        if verdict is True:
            log.warning(
                "smtp login %r from %s accepted offline: provider unreachable: %s", name, peer, reason.text,
                extra={**fields, "result": "offline"},
            )
            metrics.smtp_login("offline")
            return AuthVerdict(
                "235 2.7.0 Authentication successful (the mail provider cannot be reached right now)",
                _Login(name, password, route, offline=True),
            )
        if verdict is False:
            log.info("smtp login failed for %r from %s (offline check)", name, peer,
                     extra={**fields, "result": "failed"})
            metrics.smtp_login("failed")
            return AuthVerdict("535 5.7.8 Authentication credentials invalid")
        log.warning(
            "smtp login of %r from %s not possible: provider unreachable: %s", name, peer, reason.text,
            extra={**fields, "result": "unavailable"},
        )
        metrics.smtp_login("unavailable")
        return AuthVerdict("454 4.7.0 The mail provider cannot be reached to check the password; try again later")

    def _check_offline(
        self, name: str, password: str, route: SubmissionRoute, tls_failure: bool = False
    ) -> bool | None:
        """True/False when the password can be checked without the provider, None when it cannot.

        After a TLS failure the offline hash is not used: someone answered who could not prove to be
        the provider, and an attacker in the middle must not be able to force offline logins."""
        stored = self.passwords.get(name)
        if stored is not None:
            return hmac.compare_digest(stored.encode("utf-8"), password.encode("utf-8"))
        if not self.settings.offline.enabled:
            return None
        if tls_failure:
            log.error("smtp login of %r: the provider's TLS could not be trusted, no offline check", name)
            return None
        try:
            return check_offline_password(self.states, route.cache_id, password)
        except (StateError, OSError):
            return None

    # -- DATA ------------------------------------------------------------------------------------

    async def deliver(
        self, login: _Login, sender: str, recipients: list[str], data: bytes, mail_options: list[str], peer: str = ""
    ) -> str:
        """Relay one message; returns the reply for the client's DATA."""
        route = login.route
        fields = {
            "user": login.name, "peer": peer, "upstream": route.endpoint.where, "recipients": len(recipients),
            "bytes": len(data), "protocol": "smtp",
        }
        started = time.monotonic()
        try:
            refused = await self._upstream(
                send_message, route.endpoint, route.remote_user, login.password, sender, recipients, data, mail_options
            )
        except SubmissionUnavailable as exc:
            return await self._unreachable(login, sender, recipients, data, mail_options, exc, fields)
        except SubmissionAuthError as exc:
            log.warning("provider refused the credentials of %r at DATA: %d %s", login.name, exc.code, exc.text,
                        extra={**fields, "result": "rejected"})
            metrics.smtp_message("rejected")
            if 400 <= exc.code < 500:
                return "451 4.7.0 The mail provider cannot check your credentials right now; try again later"
            return "554 5.7.8 The mail provider no longer accepts your credentials"
        except SubmissionRejected as exc:
            log.info("provider refused mail of %r: %d %s", login.name, exc.code, exc.text,
                     extra={**fields, "result": "rejected"})
            metrics.smtp_message("rejected")
            return exc.reply()
        duration = time.monotonic() - started
        fields["duration"] = round(duration, 3)
        if refused:
            later = await self._partly_refused(login, sender, refused, data, mail_options)
            log.info("relayed mail of %r to %d of %d recipients", login.name, len(recipients) - len(refused),
                     len(recipients), extra={**fields, "result": "partial", "refused": len(refused)})
            metrics.smtp_message("relayed")
            reply = f"250 2.0.0 Sent, but the mail provider did not take {len(refused)} of {len(recipients)} recipients"
            if later:
                reply += f"; {len(later)} queued for another try"
            if len(later) < len(refused):
                reply += "; a report is in your mailbox"
            return reply
        log.info("relayed mail of %r via %s: %d recipients, %d bytes", login.name, route.endpoint.where,
                 len(recipients), len(data), extra={**fields, "result": "relayed"})
        metrics.smtp_message("relayed")
        return "250 2.0.0 OK: sent to the mail provider"

    async def _unreachable(self, login, sender, recipients, data, mail_options, exc, fields) -> str:
        if login.name not in self.passwords:
            log.warning("provider unreachable for mail of %r, not queued (no password source): %s",
                        login.name, exc.text, extra={**fields, "result": "unavailable"})
            metrics.smtp_message("unavailable")
            return "451 4.4.1 The mail provider cannot be reached; the message was NOT queued, please try again later"
        try:
            entry = await trio.to_thread.run_sync(
                partial(self.queue.add, login=login.name, cache_id=login.route.cache_id, sender=sender,
                        recipients=recipients, data=data, mail_options=mail_options)
            )
        except OSError as error:
            log.error("cannot queue mail of %r: %s", login.name, error, extra={**fields, "result": "error"})
            metrics.smtp_message("error")
            return "451 4.3.0 The mail provider cannot be reached and the message could not be queued; try again later"
        self.queued.set()
        log.info("queued mail %s of %r: provider unreachable: %s", entry.id, login.name, exc.text,
                 extra={**fields, "result": "queued", "queue_id": entry.id})
        metrics.smtp_message("queued")
        return (
            f"250 2.0.0 Queued as {entry.id}: the mail provider cannot be reached right now; "
            "pop3proxy will send the message when it can"
        )

    async def _partly_refused(
        self, login: _Login, sender: str, refused: dict[str, tuple[int, str]], data: bytes, mail_options: list[str]
    ) -> list[str]:
        """The provider took the message for some recipients only. Recipients it deferred (4xx) are
        queued when the account has a password source; the others are reported in the sender's
        mailbox. Returns the queued recipients."""
        later = [rcpt for rcpt, (code, _) in refused.items() if 400 <= code < 500]
        if later and login.name in self.passwords:
            try:
                await trio.to_thread.run_sync(
                    partial(self.queue.add, login=login.name, cache_id=login.route.cache_id, sender=sender,
                            recipients=later, data=data, mail_options=mail_options)
                )
                self.queued.set()
            except OSError as exc:
                log.error("cannot queue mail of %r for the deferred recipients: %s", login.name, exc)
                later = []
        else:
            later = []
        failures = [Failure(rcpt, code, text) for rcpt, (code, text) in refused.items() if rcpt not in later]
        if not failures:
            return later
        dsn = build_dsn(
            sender=sender, failures=failures, original=data, arrival=time.time(),
            explanation="The mail provider took your message for some recipients but not for these.",
        )
        try:
            await trio.to_thread.run_sync(store_bounce, self.settings, login.route.cache_id, dsn)
        except (OSError, ValueError) as exc:
            log.error("cannot store the delivery report for %r: %s", login.name, exc)
        return later


class RelayClosed(Exception):
    """The relay is shutting down; the message was not accepted."""
