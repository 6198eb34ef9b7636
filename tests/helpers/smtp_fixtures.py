"""A real SMTP submission server standing in for the provider, and helpers for the relay tests:
`relay_config` (a configuration pointing pop3proxy at a `Provider`), `running_relay` (the relay
in-process, under trio), and `Client`/`submit` (smtplib, step by step).

`Provider` is aiosmtpd on its own asyncio loop in a thread, on a free loopback port: AUTH PLAIN and
LOGIN for one fixed user, STARTTLS (the default) or implicit TLS with a trustme certificate, and it
records every message it accepts (envelope and the exact bytes). It can be stopped and started again on
the same port, to play a provider that goes away and comes back.
"""

from __future__ import annotations

import asyncio
import re
import smtplib
import socket
import ssl
import threading
import warnings
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import trio
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from helpers.common import write_config
from pop3proxy.submission.bridge import run_smtp
from pop3proxy.submission.queue import RetryPolicy

HOST = "127.0.0.1"
PROVIDER_USER = "alice@example.com"
PROVIDER_PASSWORD = "s3cret provider pass"
SENDER = "alice@example.com"
BOB = "bob@example.net"
FAST = RetryPolicy(first=0.2, factor=1.5, longest=0.5)  # retries in tests: fractions of a second


@dataclass(frozen=True)
class Received:
    sender: str
    recipients: tuple[str, ...]
    data: bytes
    login: str


class _ProviderHandler:
    def __init__(self, provider: "Provider") -> None:
        self.provider = provider

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802
        if address in self.provider.reject:
            return "550 5.1.1 <%s>: no such user here" % address
        if address in self.provider.defer:
            return "450 4.2.1 <%s>: mailbox busy, try later" % address
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        auth = session.auth_data
        login = auth.login.decode() if isinstance(auth, LoginPassword) else ""
        with self.provider.lock:
            self.provider.messages.append(
                Received(envelope.mail_from, tuple(envelope.rcpt_tos), bytes(envelope.original_content), login)
            )
        return "250 2.0.0 Ok: queued at the provider"


class Provider:
    """The provider's submission server (aiosmtpd), with AUTH and TLS."""

    def __init__(self, cert: tuple[Path, Path, Path], tls: str = "starttls",
                 user: str = PROVIDER_USER, password: str = PROVIDER_PASSWORD) -> None:
        certfile, keyfile, ca_file = cert
        self.ca_file = ca_file
        self.tls = tls
        self.user = user
        self.password = password
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(str(certfile), str(keyfile))
        self.messages: list[Received] = []
        self.auth_attempts: list[tuple[str, bool]] = []
        self.reject: set[str] = set()
        self.defer: set[str] = set()
        self.lock = threading.Lock()
        self.port = self._free_port()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.server = None

    @staticmethod
    def _free_port() -> int:
        with socket.socket() as s:
            s.bind((HOST, 0))
            return s.getsockname()[1]

    def _authenticate(self, server, session, envelope, mechanism, auth_data) -> AuthResult:
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login == self.user.encode()
            and auth_data.password == self.password.encode()
        )
        with self.lock:
            self.auth_attempts.append((mechanism, ok))
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

    def _factory(self) -> SMTP:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return SMTP(
                _ProviderHandler(self),
                hostname="provider.test",
                authenticator=self._authenticate,
                auth_required=True,
                # implicit TLS: the connection is encrypted already, aiosmtpd just does not know it
                auth_require_tls=self.tls == "starttls",
                tls_context=self.context if self.tls == "starttls" else None,
                loop=self.loop,
            )

    def start(self) -> "Provider":
        assert self.thread is None, "already running"
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(lambda loop, context: None)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, self.port))
        sock.listen(32)
        sock.setblocking(False)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="provider-smtp")
        self.thread.start()
        ssl_context = self.context if self.tls == "implicit" else None
        future = asyncio.run_coroutine_threadsafe(
            self.loop.create_server(self._factory, sock=sock, ssl=ssl_context), self.loop
        )
        self.server = future.result(10)
        return self

    def stop(self) -> None:
        if self.thread is None:
            return
        loop, server = self.loop, self.server

        async def shutdown() -> None:
            server.close()
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # every task has seen its cancellation

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        self.thread.join(10)
        loop.close()
        self.thread = None
        self.server = None

    def received(self) -> list[Received]:
        with self.lock:
            return list(self.messages)

    def upstream_section(self, **overrides) -> dict:
        """The ``[smtp.upstream]`` table that points pop3proxy at this provider."""
        section = {"host": HOST, "port": self.port, "tls": self.tls, "ca_file": str(self.ca_file), "timeout": 5}
        section.update(overrides)
        return section


@pytest.fixture
def provider(server_cert):
    made = Provider(server_cert).start()
    yield made
    made.stop()


@pytest.fixture
def provider_tls(server_cert):
    made = Provider(server_cert, tls="implicit").start()
    yield made
    made.stop()


def message(subject: str = "hello", body: bytes = b"") -> bytes:
    """A CRLF message with features a careless relay would change: folded header, dot lines, 8-bit."""
    return (
        b"From: Alice <alice@example.com>\r\n"
        b"To: Bob <bob@example.net>\r\n"
        b"Subject: " + subject.encode() + b"\r\n"
        b"X-Folded: first part\r\n"
        b"\tsecond part, keep   spacing\r\n"
        b"Message-ID: <" + subject.replace(" ", ".").encode() + b"@example.com>\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n"
        b".a line that starts with a dot\r\n"
        b"..two dots\r\n"
        b"caf\xc3\xa9 8-bit text\r\n"
        b"trailing spaces   \r\n"
        + body
        + b"bye\r\n"
    )


# --- pop3proxy's relay, and clients -------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def relay_config(
    tmp_path: Path,
    provider: Provider,
    server_cert,
    *,
    password_source: bool = False,
    listen: dict | None = None,
    smtp: dict | None = None,
    upstream: dict | None = None,
    pop3: dict | None = None,
    log: dict | None = None,
) -> Path:
    """``upstream`` overrides ``[smtp.upstream]``, ``pop3`` the POP3 ``[upstream]``."""
    certfile, keyfile, ca_file = server_cert
    sections: dict[str, dict] = {
        "listen": {"host": HOST, "port": 0, "certfile": str(certfile), "keyfile": str(keyfile), **(listen or {})},
        # the POP3 provider: needed for routing, never contacted by these tests
        "upstream": {"host": HOST, "port": closed_port(), "tls": "implicit", "ca_file": str(ca_file), "timeout": 2,
                     **(pop3 or {})},
        "cache": {"root": str(tmp_path / "cache")},
        "sync": {"interval": 3600},
        "smtp": {"host": HOST, "port": 0, **(smtp or {})},
        "smtp.upstream": provider.upstream_section(**(upstream or {})),
        "log": {"level": "debug", **(log or {})},
    }
    if password_source:
        secret = tmp_path / "alice.pass"
        secret.write_text(PROVIDER_PASSWORD + "\n")
        secret.chmod(0o600)
        sections[f'accounts."{PROVIDER_USER}"'] = {"password_file": str(secret)}
    return write_config(tmp_path / "pop3proxy.toml", sections)


@asynccontextmanager
async def running_relay(settings, retry: RetryPolicy = FAST):
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(run_smtp, settings, None, retry=retry))
        try:
            yield port
        finally:
            nursery.cancel_scope.cancel()


class Client:
    """An smtplib session, step by step, returning every reply as (code, text)."""

    def __init__(self, port: int, ca_file: Path | None = None, starttls: bool = True) -> None:
        self.smtp = smtplib.SMTP(HOST, port, local_hostname="client.test", timeout=30)
        self.smtp.ehlo()
        if starttls:
            self.smtp.starttls(context=ssl.create_default_context(cafile=str(ca_file)))
            self.smtp.ehlo()

    def auth(self, user: str = PROVIDER_USER, password: str = PROVIDER_PASSWORD, mechanism: str = "PLAIN"):
        self.smtp.user, self.smtp.password = user, password
        method = {"PLAIN": self.smtp.auth_plain, "LOGIN": self.smtp.auth_login}[mechanism]
        try:
            return self.smtp.auth(mechanism, method, initial_response_ok=mechanism == "PLAIN")
        except smtplib.SMTPAuthenticationError as exc:
            return exc.smtp_code, exc.smtp_error

    def send(self, data: bytes, sender: str = SENDER, recipients=(BOB,)):
        code, text = self.smtp.mail(sender)
        if code != 250:
            return code, text
        for rcpt in recipients:
            code, text = self.smtp.rcpt(rcpt)
            if code not in (250, 251):
                return code, text
        self.smtp.putcmd("data")
        code, text = self.smtp.getreply()
        if code != 354:
            return code, text
        payload = re.sub(rb"(?m)^\.", b"..", data)
        if not payload.endswith(b"\r\n"):
            payload += b"\r\n"
        self.smtp.send(payload + b".\r\n")
        return self.smtp.getreply()

    def close(self) -> None:
        try:
            self.smtp.quit()
        except smtplib.SMTPException:
            self.smtp.close()


def submit(port: int, ca_file: Path, data: bytes, *, mechanism="PLAIN", password=PROVIDER_PASSWORD,
           recipients=(BOB,), starttls=True):
    """Log in and send one message; returns (auth reply, data reply)."""
    client = Client(port, ca_file, starttls=starttls)
    try:
        auth = client.auth(mechanism=mechanism, password=password)
        if auth[0] != 235:
            return auth, None
        return auth, client.send(data, recipients=recipients)
    finally:
        client.close()
