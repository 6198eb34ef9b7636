"""A provider's address and TLS settings (`Endpoint`), and the errors of talking to it:
whose fault a failure was (unreachable, TLS, authentication, a refused command).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, TypeVar

import trio

from pop3proxy.config import UpstreamSettings
from pop3proxy.net.tls import CLIENT_VERSIONS, client_context

log = logging.getLogger("pop3proxy.upstream")

_T = TypeVar("_T")


_TLS_VERSIONS = CLIENT_VERSIONS
_AUTH_METHODS = frozenset({"plain", "user", "apop"})
# Response codes of a refused login that are passed on as they are (RFC 2449, 3206).
_AUTH_CODES = ("IN-USE", "LOGIN-DELAY", "SYS/TEMP", "SYS/PERM", "AUTH")


# What a client is told when the provider refuses a login with one of these RFC 3206 codes.
AUTH_TEXT: dict[str | None, str] = {  # by response code (None: the provider gave none)
    "AUTH": "invalid user name or password",
    "IN-USE": "the mailbox is in use at the mail provider",
    "LOGIN-DELAY": "the mail provider asks to wait before logging in again",
    "SYS/TEMP": "the mail provider has a temporary problem, try again later",
    "SYS/PERM": "the mail provider refuses this login permanently",
}


class UpstreamError(Exception):
    """Something went wrong with the provider; ``code`` is the response code for the client."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r}, code={self.code!r})"


class UpstreamUnavailable(UpstreamError):
    """The provider cannot be reached or misbehaves; ``reason`` says how, briefly.

    ``transport`` is True when the connection itself failed (refused, timed out, reset, closed), as
    opposed to something the provider said; ``closed`` when the provider closed or reset it (rather
    than leaving a command unanswered).
    """

    tls_verify_failed: bool = False

    def __init__(self, message: str, reason: str, code: str | None = "SYS/TEMP", *,
                 transport: bool = False, closed: bool = False) -> None:
        super().__init__(message, code)
        self.reason = reason
        self.transport = transport
        self.closed = closed


class UpstreamTooLarge(UpstreamUnavailable):
    """An answer from the provider went over a limit; the session is given up."""


class UpstreamTLSError(UpstreamUnavailable):
    """TLS with the provider could not be trusted; the session was given up, never downgraded.

    ``tls_verify_failed`` is True when the provider's certificate failed verification (wrong
    CA, wrong name, expired…): worth a loud log line, it may be an attack. Otherwise the
    provider did not offer or refused STLS, or the CA file could not be loaded.
    """

    def __init__(
        self, message: str, reason: str, code: str | None = "SYS/PERM", *, tls_verify_failed: bool = False
    ) -> None:
        super().__init__(message, reason, code)
        self.tls_verify_failed = tls_verify_failed


def may_go_offline(exc: BaseException) -> bool:
    """Whether a failure towards the provider may lead to offline mode: the one place that says so.

    ==========================================================  =====================================
    failure                                                     a login gets
    ==========================================================  =====================================
    connection refused, timed out, reset or closed; garbage     the cache, offline (password checked
    over an established session; an answer over a limit        against the offline hash)
    (``UpstreamUnavailable``)
    a certificate that fails verification, a broken TLS         ``-ERR [SYS/TEMP]`` and an ERROR log
    handshake, STLS not offered, refused or tampered with       line; never offline: someone in the
    (plain text injected after its ``+OK``, a garbled plain     middle can cause any of these at will
    text exchange before it), an unloadable CA file
    (``UpstreamTLSError``)
    the provider refused the credentials (``UpstreamAuthError``)  ``-ERR [AUTH]`` (or its code)
    ==========================================================  =====================================
    """
    return isinstance(exc, UpstreamUnavailable) and not isinstance(exc, UpstreamTLSError)


class UpstreamAuthError(UpstreamError):
    """The provider refused the login (``code`` is AUTH unless the provider said better)."""

    def __init__(self, message: str, code: str | None = "AUTH") -> None:
        super().__init__(message, code)


class UpstreamCommandError(UpstreamError):
    """The provider answered ``-ERR`` to ``command``; ``code`` is its response code, if any."""

    def __init__(self, message: str, command: str, code: str | None = None) -> None:
        super().__init__(message, code)
        self.command = command


def _auth_code(code: str | None) -> str:
    if code:
        upper = code.upper()
        for known in _AUTH_CODES:
            if upper == known or upper.startswith(known + "/"):
                return known
    return "AUTH"


@dataclass(frozen=True)
class Endpoint:
    """A provider's POP3 service and how to talk to it.

    ``server_hostname`` is the name sent as SNI and checked against the certificate; it
    defaults to ``host``. ``ca_file`` empty means the system's trust store. ``timeout`` bounds
    the connect, the TLS handshake and every single read and write.
    """

    host: str
    port: int
    tls: Literal["implicit", "starttls", "none"]
    ca_file: str = ""
    tls_min_version: str = "1.2"
    timeout: float = 30.0
    auth: tuple[str, ...] = ("plain", "user", "apop")
    server_hostname: str | None = None
    max_message_size: int = 256 * 1024 * 1024  # octets of one RETR answer
    max_listing: int = 1_000_000  # entries of a LIST or UIDL answer

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("upstream host must not be empty")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"upstream port {self.port} is out of range")
        if self.tls not in ("implicit", "starttls", "none"):
            raise ValueError(f"upstream tls must be implicit, starttls or none, not {self.tls!r}")
        if self.tls_min_version not in _TLS_VERSIONS:
            raise ValueError(f"tls_min_version must be one of {sorted(_TLS_VERSIONS)}")
        if not self.timeout > 0:
            raise ValueError("upstream timeout must be positive")
        unknown = set(self.auth) - _AUTH_METHODS
        if unknown or not self.auth:
            raise ValueError(f"upstream auth methods must be some of {sorted(_AUTH_METHODS)}")
        object.__setattr__(self, "auth", tuple(self.auth))

    @classmethod
    def from_settings(cls, settings: UpstreamSettings) -> Endpoint:
        if settings.host is None:
            raise ValueError("upstream.host is not set")
        return cls(
            host=settings.host,
            port=settings.effective_port(),
            tls=settings.tls,
            ca_file=settings.ca_file,
            tls_min_version=settings.tls_min_version,
            timeout=settings.timeout,
            auth=tuple(settings.auth),
        )

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def tls_name(self) -> str:
        return self.server_hostname or self.host

    def ssl_context(self) -> ssl.SSLContext:
        return client_context(self.ca_file, self.tls_min_version)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, what caused it, and the members of exception groups on the way."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo.extend(getattr(current, "exceptions", ()))
        cause = current.__cause__ or current.__context__
        if cause is not None:
            todo.append(cause)


def _is_tls_failure(exc: BaseException) -> bool:
    """True when TLS itself failed (not the connection under it): something an attacker can cause."""
    return any(isinstance(cause, ssl.SSLError) for cause in _causes(exc))


def _describe(exc: BaseException) -> tuple[str, bool]:
    """A short reason for an I/O failure, and whether it is a certificate verification failure."""
    for cause in _causes(exc):
        if isinstance(cause, ssl.SSLCertVerificationError):
            detail = cause.verify_message or cause.reason or "certificate rejected"
            return f"TLS certificate verification failed: {detail}", True
    for cause in _causes(exc):
        if isinstance(cause, ssl.SSLError):
            return f"TLS failure: {cause.reason or cause.strerror or type(cause).__name__}", False
    for cause in _causes(exc):
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror, False
    if isinstance(exc, trio.BrokenResourceError):
        return "the connection broke", False
    if isinstance(exc, trio.ClosedResourceError):
        return "the connection is closed", False
    return str(exc) or type(exc).__name__, False


_IO_ERRORS = (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, OSError)
