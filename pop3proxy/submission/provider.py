"""Talking to the provider's submission server (smtplib, synchronous; runs in worker threads),
and the errors that say whose fault a failure was.
"""

from __future__ import annotations

import inspect
import logging
import re
import smtplib
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import trio

from pop3proxy.net.tls import client_context

log = logging.getLogger("pop3proxy.smtp")


EHLO_NAME = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname()) or "localhost"

_ABANDON: dict[str, Any] = (  # the keyword of this trio version
    {"abandon_on_cancel": True}
    if "abandon_on_cancel" in inspect.signature(trio.to_thread.run_sync).parameters
    else {"cancellable": True}
)
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")


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
        return client_context(self.ca_file, "1.3" if self.tls_min_version == "1.3" else "1.2")


@dataclass(frozen=True)
class SubmissionRoute:
    login: str  # what the client authenticated as
    remote_user: str  # who we authenticate as at the provider
    cache_id: str  # the local mailbox of this login (bounces go there)
    endpoint: SubmissionEndpoint


def submission_route(login: str, settings) -> SubmissionRoute:
    """Where mail of ``login`` goes. Raises `pop3proxy.server.LoginError` when nothing is configured."""
    from pop3proxy.errors import LoginError
    from pop3proxy.proxy.routing import resolve

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

    def __init__(self, reason: str, *, tls_failure: bool = False) -> None:
        super().__init__(451, reason)
        self.tls_failure = tls_failure  # the peer could not prove to be the provider: not "unreachable"


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
    return SubmissionUnavailable(f"{endpoint.where}: {_reason(exc)}", tls_failure=isinstance(exc, ssl.SSLError))


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
            raise SubmissionUnavailable(
                f"{endpoint.where}: STARTTLS failed: {exc.smtp_code} {_text(exc.smtp_error)}") from None
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
