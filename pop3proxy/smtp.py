"""SMTP submission relay: local mail clients send through pop3proxy to their own provider.

::

    client ──SMTP (+STARTTLS), AUTH PLAIN/LOGIN──▶ pop3proxy ──587 STARTTLS / 465 TLS, same AUTH──▶ provider
                                                     │
                                      provider unreachable and a password source configured:
                                                     ▼
                                      on-disk queue (outqueue.py) ──retries──▶ provider, or a bounce
                                                                              into the sender's cache

The listener is aiosmtpd, running its asyncio loop in a thread of its own. Its hooks hand every AUTH
and every message into trio (`trio.from_thread.run` with the main loop's token, from a small thread
pool so the asyncio loop never blocks); everything that decides and relays is trio code, or synchronous
code in trio worker threads (smtplib for the provider, the queue on disk).

The rules, in the order a message meets them:

1. AUTH is required and checked at AUTH time by logging in to the provider's submission server with
   the client's own credentials (pass-through). Routing is POP3's (`pop3proxy.proxy.resolve`): the same
   login name picks the same provider, remote user and cache; the submission server is the account's or
   route's ``smtp_host``, else ``[smtp.upstream]``. Only configured hosts are ever contacted. Nothing is
   remembered on failure (535). Plaintext AUTH from a non-loopback client is refused unless
   ``listen.allow_plaintext_auth`` allows it, as for POP3.
2. When the provider cannot be reached at AUTH time, the password is checked locally instead: against
   the account's password source, or the scrypt hash kept by POP3 offline mode. Otherwise 454.
3. A message is relayed at the end of DATA: 250 only after the provider said 250. Its 4xx/5xx comes
   back to the client as it was. When the provider takes the message for some recipients only, the
   deferred ones (4xx) are queued if the account has a password source, and the others get a report
   (a DSN) in the sender's cached mailbox, where their POP3 client shows it.
4. Unreachable provider (connection refused, timeout, TLS failure: not "the provider said no"): with a
   password source for the account, the message is written to the queue (fsync'ed) *before* the 250,
   whose text says it was queued; without one, 451 4.4.1 and nothing is kept.
5. Queued mail is retried with exponential back-off by a background task, and once at every start.
   After ``smtp.give_up_after`` seconds (or at once on a permanent 5xx) a DSN goes into the sender's
   cached mailbox and the entry is removed. An entry leaves the queue only once the provider accepted it
   or its bounce is stored: nothing accepted is lost. (As with any SMTP relay, a crash in the instant
   between the provider's 250 and the entry's removal means the message is sent once more.)

Credentials live only in memory for the connection (and, for queued mail, in the configured password
source); they are never logged and never written to the queue. Message bodies are never logged.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import email.utils
import hmac
import inspect
import ipaddress
import logging
import re
import secrets
import smtplib
import socket
import ssl
import sys
import time
import weakref
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import trio
from aiosmtpd.smtp import SMTP, AuthResult, Session

from pop3proxy import metrics
from pop3proxy.outqueue import EntryBusy, OutQueue, RetryPolicy, valid_id

log = logging.getLogger("pop3proxy.smtp")

MAX_RECIPIENTS = 100
MAX_UPSTREAM = 16  # provider connections in flight (worker threads)
BRIDGE_THREADS = 32  # AUTH and DATA hand-overs from the asyncio loop in flight
IDLE_WAKE = 300.0  # the queue runner looks at the queue at least this often
EHLO_NAME = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname()) or "localhost"

_ABANDON = (
    {"abandon_on_cancel": True}
    if "abandon_on_cancel" in inspect.signature(trio.to_thread.run_sync).parameters
    else {"cancellable": True}
)
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")


# --- where to send ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubmissionEndpoint:
    """A provider's submission service and how to secure it."""

    host: str
    port: int
    tls: Literal["implicit", "starttls", "none"]
    ca_file: str = ""
    timeout: float = 60.0
    tls_min_version: str = "1.2"

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca_file or None)
        context.minimum_version = ssl.TLSVersion.TLSv1_3 if self.tls_min_version == "1.3" else ssl.TLSVersion.TLSv1_2
        context.check_hostname = True
        context.verify_mode = ssl.CERT_REQUIRED
        return context


@dataclass(frozen=True)
class SubmissionRoute:
    login: str  # what the client authenticated as
    remote_user: str  # who we authenticate as at the provider
    cache_id: str  # the local mailbox of this login (bounces go there)
    endpoint: SubmissionEndpoint


def submission_route(login: str, settings) -> SubmissionRoute:
    """Where mail of ``login`` goes. Raises `pop3proxy.server.LoginError` when nothing is configured."""
    from pop3proxy.proxy import resolve
    from pop3proxy.server import LoginError

    route = resolve(login, settings)
    up = settings.smtp.upstream
    host, port, tls = up.host, up.port, up.tls
    override = settings.accounts.get(login)
    if override is None and "@" in login and "#" not in login:
        domain = login.rpartition("@")[2].lower()
        override = {name.lower(): r for name, r in settings.routes.items()}.get(domain)
    if override is not None and override.smtp_host:
        host, port, tls = override.smtp_host, override.smtp_port, override.smtp_tls or up.tls
    if not host:
        raise LoginError("no submission server is configured for this login", "SYS/PERM")
    if port is None:
        port = 465 if tls == "implicit" else 587
    endpoint = SubmissionEndpoint(
        host=host,
        port=port,
        tls=tls,
        ca_file=up.ca_file or route.endpoint.ca_file,
        timeout=up.timeout,
        tls_min_version=settings.upstream.tls_min_version,
    )
    return SubmissionRoute(login, route.remote_user, route.cache_id, endpoint)


def queue_dir(settings) -> Path:
    """The outgoing queue: ``smtp.queue_dir``, else ``.queue`` below the cache root (a name no user's
    cache directory can have)."""
    return Path(settings.smtp.queue_dir) if settings.smtp.queue_dir else Path(settings.cache.root) / ".queue"


# --- talking to the provider (synchronous; runs in worker threads) -------------------------------


class SubmissionError(Exception):
    """Something went wrong with the provider's submission server; ``code`` is an SMTP reply code."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    def reply(self) -> str:
        """The reply to hand to our client (always a 4xx or 5xx)."""
        code = self.code if 400 <= self.code < 600 else 451
        return f"{code} {self.text}"


class SubmissionUnavailable(SubmissionError):
    """The provider could not be reached or the connection failed (not: it said no)."""

    def __init__(self, reason: str) -> None:
        super().__init__(451, reason)


class SubmissionAuthError(SubmissionError):
    """The provider refused the credentials (or offers no way to use them)."""


class SubmissionRejected(SubmissionError):
    """The provider refused the message (MAIL, RCPT or DATA), with its code and text."""


def _text(reply: bytes | str | None) -> str:
    if isinstance(reply, bytes):
        reply = reply.decode("utf-8", "replace")
    text = " ".join((reply or "").split())
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text[:300] or "(no text)"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed: {exc.verify_message or exc.reason or 'rejected'}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failure: {exc.reason or type(exc).__name__}"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return "the connection was closed by the provider"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _unavailable(endpoint: SubmissionEndpoint, exc: BaseException) -> SubmissionUnavailable:
    return SubmissionUnavailable(f"{endpoint.where}: {_reason(exc)}")


def _open(endpoint: SubmissionEndpoint) -> smtplib.SMTP:
    """A connected, secured (as configured) and greeted submission session."""
    client: smtplib.SMTP | None = None
    try:
        if endpoint.tls == "implicit":
            client = smtplib.SMTP_SSL(
                endpoint.host, endpoint.port, local_hostname=EHLO_NAME, timeout=endpoint.timeout,
                context=endpoint.ssl_context(),
            )
        else:
            client = smtplib.SMTP(endpoint.host, endpoint.port, local_hostname=EHLO_NAME, timeout=endpoint.timeout)
        client.ehlo_or_helo_if_needed()
        if endpoint.tls == "starttls":
            if not client.has_extn("starttls"):
                raise SubmissionUnavailable(f"{endpoint.where}: the server does not offer STARTTLS")
            client.starttls(context=endpoint.ssl_context())
            client.ehlo()
        return client
    except SubmissionError:
        _close(client)
        raise
    except smtplib.SMTPConnectError as exc:  # the greeting was not 220
        _close(client)
        if 400 <= exc.smtp_code < 500 or exc.smtp_code < 400:
            raise SubmissionUnavailable(f"{endpoint.where}: busy: {exc.smtp_code} {_text(exc.smtp_error)}") from None
        raise SubmissionRejected(exc.smtp_code, _text(exc.smtp_error)) from None
    except smtplib.SMTPServerDisconnected as exc:
        _close(client)
        raise _unavailable(endpoint, exc) from None
    except smtplib.SMTPResponseException as exc:  # EHLO/STARTTLS refused
        _close(client)
        if endpoint.tls == "starttls":
            raise SubmissionUnavailable(f"{endpoint.where}: STARTTLS failed: {exc.smtp_code} {_text(exc.smtp_error)}") from None
        raise SubmissionRejected(exc.smtp_code, _text(exc.smtp_error)) from None
    except (OSError, smtplib.SMTPException) as exc:
        _close(client)
        raise _unavailable(endpoint, exc) from None


def _close(client: smtplib.SMTP | None) -> None:
    if client is None:
        return
    try:
        client.quit()
    except (OSError, smtplib.SMTPException):
        pass
    finally:
        client.close()


def _login(client: smtplib.SMTP, endpoint: SubmissionEndpoint, user: str, password: str) -> None:
    """One AUTH attempt (PLAIN, else LOGIN): a wrong password costs the user one failure at the
    provider, not one per mechanism."""
    offered = client.esmtp_features.get("auth", "").upper().split()
    if not client.has_extn("auth"):
        raise SubmissionAuthError(530, "the submission server offers no AUTH")
    client.user, client.password = user, password
    try:
        if "PLAIN" in offered:
            client.auth("PLAIN", client.auth_plain)
        elif "LOGIN" in offered:
            client.auth("LOGIN", client.auth_login, initial_response_ok=False)
        else:
            raise SubmissionAuthError(535, "the submission server offers neither AUTH PLAIN nor LOGIN")
    except smtplib.SMTPAuthenticationError as exc:
        raise SubmissionAuthError(exc.smtp_code, _text(exc.smtp_error)) from None
    except smtplib.SMTPNotSupportedError:
        raise SubmissionAuthError(530, "the submission server offers no AUTH") from None
    except smtplib.SMTPServerDisconnected as exc:
        raise _unavailable(endpoint, exc) from None
    except smtplib.SMTPResponseException as exc:
        raise SubmissionAuthError(exc.smtp_code, _text(exc.smtp_error)) from None
    except smtplib.SMTPException as exc:  # no common mechanism
        raise SubmissionAuthError(535, f"cannot log in: {_text(str(exc))}") from None
    except OSError as exc:
        raise _unavailable(endpoint, exc) from None


def check_login(endpoint: SubmissionEndpoint, user: str, password: str) -> None:
    """Log in to the submission server and leave. Raises a `SubmissionError` when that fails."""
    client = _open(endpoint)
    try:
        _login(client, endpoint, user, password)
    finally:
        _close(client)


def send_message(
    endpoint: SubmissionEndpoint,
    user: str,
    password: str,
    sender: str,
    recipients: Sequence[str],
    data: bytes,
    mail_options: Sequence[str] = (),
) -> dict[str, tuple[int, str]]:
    """Log in and submit one message byte for byte; returns the recipients the provider refused while
    accepting the others. Raises `SubmissionRejected` when it took none, or another `SubmissionError`."""
    client = _open(endpoint)
    try:
        _login(client, endpoint, user, password)
        options = [o for o in mail_options if o.upper().startswith("BODY=") and client.has_extn("8bitmime")]
        try:
            refused = client.sendmail(sender, list(recipients), data, mail_options=options)
        except smtplib.SMTPRecipientsRefused as exc:
            codes = {rcpt: (code, _text(text)) for rcpt, (code, text) in exc.recipients.items()}
            temporary = [c for c in codes.values() if 400 <= c[0] < 500]
            code, text = temporary[0] if temporary else next(iter(codes.values()))
            raise SubmissionRejected(code, text) from None
        except smtplib.SMTPServerDisconnected as exc:
            raise _unavailable(endpoint, exc) from None
        except smtplib.SMTPResponseException as exc:  # sender refused, data refused
            raise SubmissionRejected(exc.smtp_code, _text(exc.smtp_error)) from None
        except (OSError, smtplib.SMTPException) as exc:
            raise _unavailable(endpoint, exc) from None
        return {rcpt: (code, _text(text)) for rcpt, (code, text) in refused.items()}
    finally:
        _close(client)


# --- bounces ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    recipient: str
    code: int
    text: str

    @property
    def status(self) -> str:
        match = _ENHANCED.match(self.text)
        if match:
            return match.group(0)
        return "5.0.0" if self.code >= 500 else "4.0.0"


def _header_block(message: bytes, limit: int = 64 * 1024) -> bytes:
    end = re.search(rb"\r?\n\r?\n", message)
    head = message[: end.start()] if end else message
    head = head[:limit].replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return head + b"\r\n"


def _ascii(text: str) -> str:
    return "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text)


def build_dsn(
    *,
    sender: str,
    failures: Sequence[Failure],
    original: bytes,
    arrival: float,
    explanation: str,
    queue_id: str | None = None,
    now: float | None = None,
) -> bytes:
    """A delivery status notification (RFC 3464 multipart/report) for the sender's mailbox."""
    now = time.time() if now is None else now
    boundary = f"=_pop3proxy_{secrets.token_hex(12)}"
    to = f"<{_ascii(sender)}>" if sender else "undisclosed-recipients:;"
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{EHLO_NAME}>",
        f"To: {to}",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {email.utils.formatdate(now)}",
        f"Message-ID: {email.utils.make_msgid('pop3proxy-dsn', domain=EHLO_NAME)}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated delivery report.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "Content-Description: Notification",
        "",
        f"This is pop3proxy on {EHLO_NAME}.",
        "",
        _ascii(explanation),
        "",
        "Your message could not be delivered to:",
        "",
    ]
    for failure in failures:
        lines.append(f"  <{_ascii(failure.recipient)}>: {_ascii(f'{failure.code} {failure.text}')}")
    lines += [
        "",
        "The headers of your message are attached below.",
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "Content-Description: Delivery report",
        "",
        f"Reporting-MTA: dns; {EHLO_NAME}",
    ]
    if queue_id:
        lines.append(f"X-POP3Proxy-Queue-ID: {queue_id}")
    lines.append(f"Arrival-Date: {email.utils.formatdate(arrival)}")
    for failure in failures:
        lines += [
            "",
            f"Final-Recipient: rfc822; {_ascii(failure.recipient)}",
            "Action: failed",
            f"Status: {failure.status}",
            f"Diagnostic-Code: smtp; {_ascii(f'{failure.code} {failure.text}')}",
            f"Last-Attempt-Date: {email.utils.formatdate(now)}",
        ]
    lines += [
        "",
        f"--{boundary}",
        "Content-Type: text/rfc822-headers",
        "Content-Description: Undelivered message headers",
        "",
    ]
    head = "\r\n".join(lines).encode("ascii") + b"\r\n"
    return head + _header_block(original) + f"\r\n--{boundary}--\r\n".encode("ascii")


def store_bounce(settings, cache_id: str, dsn: bytes) -> str:
    """Put a report into the cached mailbox of ``cache_id`` (fsync'ed); returns its key."""
    from pop3proxy.store import open_store

    with open_store(settings.cache.root, cache_id, settings.cache.backend) as mailbox:
        return mailbox.add(dsn).key


# --- the queue: one delivery attempt (synchronous; a worker thread or the CLI) -------------------


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds:.3g} seconds"


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
    from pop3proxy.server import LoginError

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


# --- the relay (trio) ---------------------------------------------------------------------------


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
    from pop3proxy.proxy import read_password_source

    found = {}
    for name, account in settings.accounts.items():
        password = read_password_source(name, account)
        if password is not None:
            found[name] = password
    return found


class Relay:
    """Checks logins, relays messages, queues them when the provider is away. Trio code."""

    def __init__(self, settings, passwords: Mapping[str, str], retry: RetryPolicy | None = None) -> None:
        self.settings = settings
        self.passwords = passwords
        self.retry = retry or RetryPolicy()
        self.queue = OutQueue(queue_dir(settings))
        self.limiter = trio.CapacityLimiter(MAX_UPSTREAM)
        self.queued = trio.Event()  # set when an entry was added; the runner looks sooner

    async def _upstream(self, fn: Callable, *args: Any) -> Any:
        return await trio.to_thread.run_sync(partial(fn, *args), limiter=self.limiter, **_ABANDON)

    # -- AUTH ------------------------------------------------------------------------------------

    async def authenticate(self, name: str, password: str, peer: str) -> AuthVerdict:
        from pop3proxy.server import LoginError

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
        from pop3proxy import server

        kdf = getattr(server, "kdf_limiter", None)  # scrypt is memory-hungry: share the POP3 side's limit
        verdict = await trio.to_thread.run_sync(
            self._check_offline, name, password, route, **({"limiter": kdf()} if kdf else {})
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
            log.info("smtp login failed for %r from %s (offline check)", name, peer, extra={**fields, "result": "failed"})
            metrics.smtp_login("failed")
            return AuthVerdict("535 5.7.8 Authentication credentials invalid")
        log.warning(
            "smtp login of %r from %s not possible: provider unreachable: %s", name, peer, reason.text,
            extra={**fields, "result": "unavailable"},
        )
        metrics.smtp_login("unavailable")
        return AuthVerdict("454 4.7.0 The mail provider cannot be reached to check the password; try again later")

    def _check_offline(self, name: str, password: str, route: SubmissionRoute) -> bool | None:
        """True/False when the password can be checked without the provider, None when it cannot."""
        stored = self.passwords.get(name)
        if stored is not None:
            return hmac.compare_digest(stored.encode("utf-8"), password.encode("utf-8"))
        if not self.settings.offline.enabled:
            return None
        from pop3proxy.passwords import verify_password
        from pop3proxy.proxy import OFFLINE_HASH
        from pop3proxy.state import StateError, UserState
        from pop3proxy.store import user_dir

        path = user_dir(self.settings.cache.root, route.cache_id) / "state.db"
        if not path.exists():
            return None
        try:
            with UserState(path) as state:
                hashed = state.get_meta(OFFLINE_HASH)
        except (StateError, OSError):
            return None
        if hashed is None:
            return None
        return verify_password(password, hashed)

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


# --- the aiosmtpd side (asyncio, in its own thread) ----------------------------------------------


class RelayClosed(Exception):
    """The relay is shutting down; the message was not accepted."""


class _Bridge:
    """Hands calls from the asyncio thread into trio and waits for the answer without blocking asyncio."""

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self.token = token
        self.executor = concurrent.futures.ThreadPoolExecutor(BRIDGE_THREADS, thread_name_prefix="pop3proxy-smtp")
        self.scopes: set[trio.CancelScope] = set()
        self.closed = False

    async def call(self, afn: Callable, *args: Any) -> Any:  # in the asyncio loop
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self._enter, afn, args)

    def _enter(self, afn: Callable, args: tuple) -> Any:  # in a bridge thread
        try:
            return trio.from_thread.run(self._guarded, afn, *args, trio_token=self.token)
        except (trio.Cancelled, trio.RunFinishedError):
            raise RelayClosed() from None

    async def _guarded(self, afn: Callable, *args: Any) -> Any:  # in trio
        if self.closed:
            raise RelayClosed()
        with trio.CancelScope() as scope:
            self.scopes.add(scope)
            try:
                return await afn(*args)
            finally:
                self.scopes.discard(scope)
        raise RelayClosed()

    def close(self) -> None:  # in trio
        self.closed = True
        for scope in list(self.scopes):
            scope.cancel()

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def _is_loopback(peer: Any) -> bool:
    host = peer[0] if isinstance(peer, tuple) and peer else ""
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


def _peer_host(session) -> str:
    peer = getattr(session, "peer", None)
    return str(peer[0]) if isinstance(peer, tuple) and peer else ""


class _Handler:
    """aiosmtpd hooks. Everything that decides goes through the bridge into trio."""

    def __init__(self, bridge: _Bridge, relay: Relay) -> None:
        self.bridge = bridge
        self.relay = relay

    async def handle_RCPT(self, server, session, envelope, address: str, rcpt_options: list[str]) -> str:  # noqa: N802
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return f"452 4.5.3 Too many recipients (at most {MAX_RECIPIENTS} per message)"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802
        login = session.auth_data
        if not isinstance(login, _Login):
            return "530 5.7.0 Authentication required"
        options = [o for o in envelope.mail_options if o.upper().startswith("BODY=")]
        try:
            return await self.bridge.call(
                self.relay.deliver, login, envelope.mail_from or "", list(envelope.rcpt_tos),
                bytes(envelope.original_content or b""), options, _peer_host(session),
            )
        except RelayClosed:
            return "451 4.3.2 pop3proxy is shutting down; the message was not accepted, try again later"
        except Exception as exc:
            log.error("relaying mail of %r failed: %s: %s", login.name, type(exc).__name__, exc)
            return "451 4.3.0 Internal error; the message was not accepted, try again later"

    async def handle_exception(self, error: Exception) -> str:
        log.error("smtp session error: %s: %s", type(error).__name__, error)
        return "500 5.3.0 Internal error"


class _Session(Session):
    """aiosmtpd's session without its deprecation warning on every successful AUTH."""

    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


class _RelaySMTP(SMTP):
    """aiosmtpd's SMTP with the AUTH policy of pop3proxy and AUTH checked in trio."""

    def __init__(self, handler: _Handler, *, plaintext_auth: str, **kwargs: Any) -> None:
        super().__init__(handler, auth_required=True, auth_require_tls=True, **kwargs)
        self._plaintext_auth = plaintext_auth
        self._bridge = handler.bridge
        self._relay = handler.relay

    def _create_session(self) -> Session:
        return _Session(self.loop)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._tls_protocol is None and self.session is not None:
            allowed = {"always": True, "never": False}.get(self._plaintext_auth, _is_loopback(self.session.peer))
            self._auth_require_tls = not allowed

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:  # noqa: N802
        if len(args) == 1:
            blob = await self.challenge_auth("")
            if not isinstance(blob, bytes):
                return AuthResult(success=False, handled=True)
        else:
            blob = _b64(args[1])
            if blob is None:
                return AuthResult(success=False, handled=False, message="501 5.5.2 Cannot decode base64")
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            return AuthResult(success=False, handled=False, message="501 5.5.2 Cannot split the AUTH PLAIN value")
        return await self._check(parts[1], parts[2])

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:  # noqa: N802
        if len(args) == 1:
            user = await self.challenge_auth("Username:")
            if not isinstance(user, bytes):
                return AuthResult(success=False, handled=True)
        else:
            user = _b64(args[1])
            if user is None:
                return AuthResult(success=False, handled=False, message="501 5.5.2 Cannot decode base64")
        password = await self.challenge_auth("Password:")
        if not isinstance(password, bytes):
            return AuthResult(success=False, handled=True)
        return await self._check(user, password)

    async def _check(self, user: bytes, password: bytes) -> AuthResult:
        try:
            name, secret = user.decode("utf-8"), password.decode("utf-8")
        except UnicodeDecodeError:
            return AuthResult(success=False, handled=False, message="501 5.5.2 Credentials are not UTF-8")
        if not name or not secret:
            return AuthResult(success=False, handled=False, message="535 5.7.8 Authentication credentials invalid")
        try:
            verdict: AuthVerdict = await self._bridge.call(self._relay.authenticate, name, secret, _peer_host(self.session))
        except RelayClosed:
            return AuthResult(success=False, handled=False, message="454 4.3.2 pop3proxy is shutting down")
        except Exception as exc:
            log.error("smtp AUTH check failed: %s: %s", type(exc).__name__, exc)
            return AuthResult(success=False, handled=False, message="454 4.3.0 Internal error, try again later")
        if verdict.login is None:
            return AuthResult(success=False, handled=False, message=verdict.reply)
        return AuthResult(success=True, handled=False, message=verdict.reply, auth_data=verdict.login)


def _b64(text: str) -> bytes | None:
    import base64
    import binascii

    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        return None


def _asyncio_error(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    exc = context.get("exception")
    detail = f"{type(exc).__name__}: {exc}" if exc is not None else context.get("message", "error")
    log.debug("smtp listener: %s", detail)


class _Listener:
    """aiosmtpd on an asyncio loop in a thread of its own, serving one bound socket."""

    def __init__(self, sock: socket.socket, factory: Callable[[asyncio.AbstractEventLoop], SMTP]) -> None:
        self.sock = sock
        self.factory = factory
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(_asyncio_error)
        self.thread: Any = None
        self.server: asyncio.AbstractServer | None = None
        self.protocols: "weakref.WeakSet[SMTP]" = weakref.WeakSet()

    def _make(self) -> SMTP:
        protocol = self.factory(self.loop)
        self.protocols.add(protocol)
        return protocol

    def start(self) -> None:  # blocking; run it in a worker thread
        import threading

        self.thread = threading.Thread(target=self._run, name="pop3proxy-smtp-listener", daemon=True)
        self.thread.start()
        future = asyncio.run_coroutine_threadsafe(self.loop.create_server(self._make, sock=self.sock), self.loop)
        self.server = future.result(30)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def stop(self) -> None:  # blocking; run it in a worker thread
        if self.thread is None:
            self.sock.close()
            return

        async def shutdown() -> None:
            if self.server is not None:
                self.server.close()
            for protocol in list(self.protocols):
                transport = getattr(protocol, "transport", None)
                if transport is not None:
                    transport.close()
            current = asyncio.current_task()
            for task in asyncio.all_tasks():
                if task is not current:
                    task.cancel()
            await asyncio.sleep(0.05)

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        except (concurrent.futures.TimeoutError, RuntimeError):
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()
        self.sock.close()


def _bind(host: str, port: int) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def run_smtp(
    settings,
    backend=None,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    retry: RetryPolicy | None = None,
    tls_context: ssl.SSLContext | Callable[[], ssl.SSLContext | None] | None = None,
) -> None:
    """Run the submission listener and the queue runner until cancelled; ``started(port)``.

    ``backend`` is the running POP3 backend: a `ProxyBackend`'s ``passwords`` are used as the password
    sources; without one they are read from ``[accounts]``. ``tls_context`` is the STARTTLS context, or
    a function returning the current one (asked at every new connection, so certificates reloaded by the
    POP3 side apply here too); by default one is made from ``[listen] certfile/keyfile``.
    """
    from pop3proxy.app import StartupError
    from pop3proxy.server import make_server_ssl_context

    smtp = settings.smtp
    if smtp.port is None:
        raise StartupError("smtp.port is not set: the SMTP relay is disabled")
    passwords = getattr(backend, "passwords", None)
    if passwords is None:
        try:
            passwords = load_passwords(settings)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
    try:
        relay = Relay(settings, passwords, retry)
    except OSError as exc:
        raise StartupError(f"cannot use the outgoing queue {queue_dir(settings)}: {exc.strerror or exc}") from None
    listen = settings.listen
    if tls_context is None and listen.certfile is not None:
        try:
            tls_context = make_server_ssl_context(listen.certfile, listen.keyfile, listen.tls_min_version)
        except (OSError, ValueError) as exc:
            raise StartupError(f"cannot load listen.certfile/keyfile: {exc}") from None
    current_tls: Callable[[], ssl.SSLContext | None] = (
        tls_context if callable(tls_context) else (lambda: tls_context)  # type: ignore[assignment,return-value]
    )
    try:
        sock = _bind(smtp.host, smtp.port)
    except OSError as exc:
        raise StartupError(f"cannot listen for SMTP on {smtp.host} port {smtp.port}: {exc.strerror or exc}") from None
    port = sock.getsockname()[1]
    bridge = _Bridge(trio.lowlevel.current_trio_token())
    handler = _Handler(bridge, relay)

    def factory(loop: asyncio.AbstractEventLoop) -> SMTP:
        return _RelaySMTP(
            handler,
            plaintext_auth=listen.allow_plaintext_auth,
            data_size_limit=smtp.max_message_size,
            hostname=EHLO_NAME,
            ident="pop3proxy ESMTP",
            tls_context=current_tls(),
            timeout=listen.idle_timeout,
            loop=loop,
        )

    listener = _Listener(sock, factory)
    logging.getLogger("mail.log").setLevel(max(logging.WARNING, logging.getLogger("mail.log").level))
    try:
        await trio.to_thread.run_sync(listener.start)
    except BaseException:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(listener.stop)
        bridge.shutdown()
        raise
    starttls = " (STARTTLS available)" if current_tls() is not None else ""
    log.info("listening for SMTP on %s port %d%s", smtp.host, port, starttls)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(QueueRunner(relay).run)
            task_status.started(port)
            await trio.sleep_forever()
    finally:
        bridge.close()
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(listener.stop)
        bridge.shutdown()


# --- `pop3proxy queue list|flush|delete` ---------------------------------------------------------


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def queue_command(settings, action: str, ids: list[str], out=None) -> int:
    """``pop3proxy queue list|flush|delete [ID...]``: 0 on success, 1 when something was not done,
    2 for a usage error."""
    out = out or sys.stdout
    err = sys.stderr if out is sys.stdout else out
    directory = queue_dir(settings)
    bad = [i for i in ids if not valid_id(i)]
    if bad:
        print(f"pop3proxy: not a queue id: {bad[0]!r}", file=err)
        return 2
    if action not in ("list", "flush", "delete"):
        print(f"pop3proxy: queue {action}: expected list, flush or delete", file=err)
        return 2
    if not directory.is_dir():
        if action == "delete" and ids:
            print(f"pop3proxy: no such queue entry: {ids[0]}", file=err)
            return 1
        print("the outgoing queue is empty", file=out)
        return 0
    try:
        return _queue_action(settings, OutQueue(directory), action, ids, out, err)
    except OSError as exc:
        print(f"pop3proxy: cannot use the queue {directory}: {exc.strerror or exc}", file=err)
        return 1


def _queue_action(settings, queue: OutQueue, action: str, ids: list[str], out, err) -> int:
    now = time.time()
    if action == "list":
        entries = [e for e in queue.entries() if not ids or e.id in ids]
        if not entries:
            print("the outgoing queue is empty", file=out)
            return 0
        print(f"{'ID':24} {'SENDER':28} {'RCPTS':>5} {'SIZE':>9} {'AGE':>5} {'TRIES':>5} {'NEXT TRY':>8}  LAST ERROR", file=out)
        for e in entries:
            next_try = "now" if e.next_try <= now else "in " + _age(e.next_try - now)
            sender = e.sender or "<>"
            print(
                f"{e.id:24} {sender[:28]:28} {len(e.recipients):>5} {e.size:>9} {_age(now - e.created):>5} "
                f"{e.attempts:>5} {next_try:>8}  {e.last_error[:120]}",
                file=out,
            )
            print(f"{'':24} to: {', '.join(e.recipients)[:200]}", file=out)
        return 0
    if action == "delete":
        if not ids:
            print("pop3proxy: queue delete needs the IDs to delete (see `pop3proxy queue list`)", file=err)
            return 2
        failed = 0
        for entry_id in ids:
            try:
                with queue.claim(entry_id):
                    queue.remove(entry_id)
                print(f"{entry_id}: deleted", file=out)
            except KeyError:
                failed += 1
                print(f"{entry_id}: no such queue entry", file=out)
            except EntryBusy:
                failed += 1
                print(f"{entry_id}: being sent right now; try again in a moment", file=out)
        return 1 if failed else 0
    # flush
    try:
        passwords = load_passwords(settings)
    except ValueError as exc:
        print(f"pop3proxy: {exc}", file=err)
        return 1
    targets = ids or queue.ids()
    if not targets:
        print("the outgoing queue is empty", file=out)
        return 0
    left = 0
    retry = RetryPolicy()
    for entry_id in targets:
        try:
            result = attempt_delivery(queue, entry_id, settings, passwords, retry)
        except (OSError, ValueError) as exc:
            left += 1
            print(f"{entry_id}: failed: {exc}", file=out)
            continue
        if result.outcome == "delivered":
            print(f"{entry_id}: delivered ({result.detail})", file=out)
        elif result.outcome == "bounced":
            print(f"{entry_id}: bounced to the sender's mailbox ({result.detail})", file=out)
        elif result.outcome == "retry":
            left += 1
            when = time.strftime("%H:%M:%S UTC", time.gmtime(result.next_try or now))
            print(f"{entry_id}: still queued, next try {when} ({result.detail})", file=out)
        else:
            left += 1
            print(f"{entry_id}: {result.outcome}: {result.detail}", file=out)
    return 1 if left else 0
