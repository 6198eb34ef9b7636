"""The POP3 client towards a provider (trio): connect (implicit TLS, STLS or none, verified),
log in (USER/PASS, AUTH PLAIN, APOP; an OAuth2 bearer token with XOAUTH2 or OAUTHBEARER), list, fetch
and delete. Every read is under a deadline and trio's errors are mapped to `UpstreamError`s.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import operator
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TypeVar

import trio

from pop3proxy.net import bearer_login, password_login
from pop3proxy.net.endpoint import (
    _IO_ERRORS,
    Endpoint,
    UpstreamCommandError,
    UpstreamError,
    UpstreamTLSError,
    UpstreamTooLarge,
    UpstreamUnavailable,
    _describe,
    _is_tls_failure,
)
from pop3proxy.ops.logs import MIN_MASKED
from pop3proxy.pop3.client import (
    ClientConnection,
    parse_capa,
    parse_greeting_timestamp,
    parse_scan_listing,
    parse_uidl_listing,
)
from pop3proxy.pop3.client import header_digest as digest_of_headers
from pop3proxy.pop3.errors import RemoteProtocolError
from pop3proxy.pop3.framing import NEED_DATA, Data, EndOfData, Status
from pop3proxy.pop3.sasl import BearerToken

log = logging.getLogger("pop3proxy.upstream")
_T = TypeVar("_T")

RECEIVE_SIZE = 256 * 1024  # octets asked for per read
SINK_CHUNK = 64 * 1024  # message data is handed to a sink in pieces of at least this size
LISTING_OCTETS = 64 * 1024  # the most a CAPA (or any other small multi-line answer) may send
RETR_WINDOW = 16  # RETR commands in flight at once (when the provider offers PIPELINING)
RETR_WINDOW_OCTETS = 1 << 20  # ... and no more than this many announced octets beyond the first
LISTING_LINE = 84  # octets per LIST/UIDL entry at most: number, space, a 70-octet id, CRLF
Sink = Callable[[bytes], object | Awaitable[object]]


async def _call(sink: Sink, chunk: bytes) -> None:
    if inspect.isawaitable(result := sink(chunk)):
        await result


def _message_number(number: int) -> int:
    number = operator.index(number)
    if number < 1:
        raise ValueError("message numbers start at 1")
    return number


async def connect(endpoint: Endpoint) -> UpstreamClient:
    """Open a session with the provider: connected, secured as configured, greeted, CAPA read."""
    try:
        with trio.fail_after(endpoint.timeout):
            stream: trio.abc.Stream = await trio.open_tcp_stream(endpoint.host, endpoint.port)
    except trio.TooSlowError:
        reason = f"timed out connecting (after {endpoint.timeout:g} s)"
        raise UpstreamUnavailable(f"{endpoint.where}: {reason}", reason) from None
    except OSError as exc:
        reason = f"cannot connect: {_describe(exc)[0]}"
        raise UpstreamUnavailable(f"{endpoint.where}: {reason}", reason) from None
    client = UpstreamClient(stream, endpoint)
    try:
        await client._start()
    except BaseException:
        client._broken = client._broken or "the session could not be set up"
        await client.aclose()
        raise
    return client


class UpstreamClient:
    """One POP3 session with the provider. Use `connect` to make one.

    One command at a time. After an `UpstreamUnavailable`, a cancellation or an exception
    from a sink, the session is unusable: every further command raises `UpstreamUnavailable`.
    `UpstreamCommandError` leaves the session usable.
    """

    def __init__(self, stream: trio.abc.Stream, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.greeting = ""
        self.capabilities: dict[str, list[str]] | None = None
        self.auth_method: str | None = None
        self._stream = stream
        self._conn = ClientConnection()
        self._broken: str | None = None
        self._closed = False
        self._secrets: tuple[str, ...] = ()  # kept out of error messages while logging in
        # True once a command carrying a credential (PASS, AUTH PLAIN's response, APOP, a SASL answer)
        # was sent: from then on the provider may have counted the attempt, so it is never sent again.
        self.secret_sent = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else (f"broken: {self._broken}" if self._broken else "open")
        return f"<UpstreamClient {self.endpoint.where} tls={self.endpoint.tls} {state}>"

    async def __aenter__(self) -> UpstreamClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def apop_timestamp(self) -> str | None:
        return parse_greeting_timestamp(self.greeting)

    @property
    def tls_version(self) -> str | None:
        """The negotiated TLS version ("TLSv1.3"…), None on a clear-text connection."""
        return self._stream.version() if isinstance(self._stream, trio.SSLStream) else None

    # -- logging in: the ways to log in are functions of password_login and bearer_login, over this
    # client as their `LoginChannel` (endpoint, capabilities, auth_method, apop_timestamp, request,
    # unavailable, scrub, keeping_secret)

    async def login(self, user: str, password: str) -> str:
        """Log in with a password (or with an OAuth2 token: a `BearerToken`); the method used."""
        if isinstance(password, BearerToken):
            return await bearer_login.login_bearer(self, user, password)
        return await password_login.login(self, user, password)

    @contextlib.contextmanager
    def keeping_secret(self, *secrets: str) -> Iterator[None]:
        self._secrets = secrets
        try:
            yield
        finally:
            self._secrets = ()

    # -- connection set-up ------------------------------------------------------------

    async def _start(self) -> None:
        if self.endpoint.tls == "implicit":
            await self._start_tls()
        if self.endpoint.tls != "starttls":
            await self._greeting()
            return
        try:
            await self._greeting()
            if self.capabilities is None or "STLS" not in self.capabilities:
                raise self._tls_error("the provider does not offer STLS (refusing to go on without TLS)")
            reply = await self.request("STLS")
        except UpstreamTLSError:
            raise
        except UpstreamUnavailable as exc:
            if exc.transport:  # refused, timed out, reset or closed: the network, not what was said
                raise
            # Anything said in plain text before STLS may come from someone in the middle.
            raise self._tls_error(f"{exc.reason} before STLS (refusing to go on without TLS)") from None
        if not reply.ok:
            raise self._tls_error(f"the provider refused STLS: {reply.text}")
        if self._conn.buffered:
            # Plain text sent after the STLS reply would be read as if it came over TLS: tampering.
            raise self._tls_error("the provider sent data after its STLS reply")
        await self._start_tls()
        await self._read_capabilities()

    async def _greeting(self) -> None:
        greeting = await self._reply()
        if not greeting.ok:
            code = greeting.code if greeting.code in ("IN-USE", "SYS/TEMP", "SYS/PERM") else "SYS/TEMP"
            raise self.unavailable(f"the provider refused the session: {greeting.text}", code)
        self.greeting = greeting.text
        await self._read_capabilities()

    async def _start_tls(self) -> None:
        try:
            context = self.endpoint.ssl_context()
        except (OSError, ValueError) as exc:
            reason = f"cannot load the CA file {self.endpoint.ca_file!r}: {_describe(exc)[0]}"
            raise self._tls_error(reason) from None
        self._stream = trio.SSLStream(self._stream, context, server_hostname=self.endpoint.tls_name)
        with self._io_errors("during the TLS handshake"):
            with trio.fail_after(self.endpoint.timeout):
                await self._stream.do_handshake()

    async def _read_capabilities(self) -> None:
        body = bytearray()
        reply = await self.request("CAPA", sink=body.extend)
        self.capabilities = parse_capa(bytes(body)) if reply.ok else None

    # -- I/O and error mapping --------------------------------------------------------

    def scrub_reply(self, text: str) -> str:
        """The text of the provider's status line, fit for an error message (and so for the log)."""
        if any(secret and len(secret) < MIN_MASKED for secret in self._secrets):
            # Masked in place, a short password would show itself ("Authentication ***ed"); decided
            # by its length, never by where it occurs, so that nothing tells whether the text had it.
            return "(the provider's text is not shown: the password is too short to be masked in it)"
        return self.scrub(text)

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            if secret:
                text = text.replace(secret, "***")
        return text

    def unavailable(self, reason: str, code: str | None = "SYS/TEMP", *, transport: bool = False,
                     closed: bool = False) -> UpstreamUnavailable:
        reason = self.scrub(reason)
        self._broken = self._broken or reason
        return UpstreamUnavailable(f"{self.endpoint.where}: {reason}", reason, code, transport=transport, closed=closed)

    def _tls_error(self, reason: str, verify_failed: bool = False) -> UpstreamTLSError:
        reason = self.scrub(reason)
        self._broken = self._broken or reason
        return UpstreamTLSError(f"{self.endpoint.where}: {reason}", reason, tls_verify_failed=verify_failed)

    @contextlib.contextmanager
    def _io_errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except trio.TooSlowError:
            raise self.unavailable(f"timed out {doing} (after {self.endpoint.timeout:g} s)", transport=True) from None
        except _IO_ERRORS as exc:
            reason, verify_failed = _describe(exc)
            if verify_failed or _is_tls_failure(exc):
                # Not "unreachable": someone in the middle can cause it, so no offline fallback.
                raise self._tls_error(f"{reason} {doing}", verify_failed=verify_failed) from None
            raise self.unavailable(f"{reason} {doing}", transport=True, closed=True) from None

    async def _send(self, line: bytes) -> None:
        with self._io_errors("while sending a command"):
            with trio.fail_after(self.endpoint.timeout):
                await self._stream.send_all(line)

    async def _receive(self) -> bytes | bytearray:
        with self._io_errors("while waiting for the provider"):
            with trio.fail_after(self.endpoint.timeout):
                data = await self._stream.receive_some(RECEIVE_SIZE)
        if not data:
            raise self.unavailable("the provider closed the connection", transport=True, closed=True)
        return data

    async def _event(self) -> Status | Data | EndOfData:
        while True:
            try:
                event = self._conn.next_event()
            except RemoteProtocolError as exc:
                # While logging in, the server's words are left out: it may echo the password.
                detail = "" if self._secrets else f": {exc}"
                raise self.unavailable(f"invalid reply from the provider{detail}") from None
            if event is not NEED_DATA:
                return event
            self._conn.receive_data(await self._receive())

    async def _reply(self) -> Status:
        event = await self._event()
        if not isinstance(event, Status):
            raise self.unavailable("reply out of step with its command")
        return event

    async def request(
        self, command: str, *args: str | int, sink: Sink | None = None, sasl: bool = False, limit: int = 0,
        secret: bool = False,
    ) -> Status:
        """Send one command and read its reply; a multi-line body is handed to `sink`.

        Any failure in between (including cancellation and a sink's exception) leaves the
        session out of step, so it is marked unusable.
        """
        if self._broken is not None:
            raise UpstreamUnavailable(f"{self.endpoint.where}: {self._broken}", self._broken)
        if self._conn.buffered:
            raise self.unavailable("the provider sent data nobody asked for")
        finished = False
        try:
            line = self._conn.send(command, *args, sasl=sasl)
            self.secret_sent = self.secret_sent or secret
            await self._send(line)
            reply = await self._reply()
            if self._conn.pending:  # the positive status line of a multi-line reply
                if sink is None:
                    raise self.unavailable(f"unexpected multi-line reply to {command}")
                await self._drain(sink, command, limit or LISTING_OCTETS)
            finished = True
            return reply
        finally:
            if not finished and self._broken is None:
                self._broken = f"{command} did not complete"

    async def _drain(self, sink: Sink, command: str, limit: int) -> int:
        """Hand a multi-line body to `sink` in pieces of SINK_CHUNK octets or more; at most `limit`
        octets, so an endless line or reply from the provider ends the session, not the memory."""
        total = 0
        parts: list[bytes] = []
        size = 0
        while True:
            event = await self._event()
            if isinstance(event, EndOfData):
                break
            if not isinstance(event, Data):
                raise self.unavailable("reply out of step with its command")
            parts.append(event.data)
            size += len(event.data)
            if total + size > limit:
                reason = self.unavailable(f"the provider's answer to {command} exceeds {limit} octets")
                raise UpstreamTooLarge(str(reason), reason.reason)
            if size >= SINK_CHUNK:
                total += size
                await _call(sink, b"".join(parts))
                parts.clear()
                size = 0
        if parts:
            total += size
            await _call(sink, b"".join(parts))
        return total

    async def _simple(self, command: str, *args: str | int) -> Status:
        """A single-line command whose ``-ERR`` is an `UpstreamCommandError`."""
        reply = await self.request(command, *args)
        if not reply.ok:
            raise self._command_error(command, reply)
        return reply

    def _command_error(self, command: str, reply: Status) -> UpstreamCommandError:
        text = self.scrub_reply(reply.text)
        return UpstreamCommandError(
            f"{self.endpoint.where}: the provider refused {command}: {text}", command, reply.code
        )

    # -- logging in -------------------------------------------------------------------

    async def stat(self) -> tuple[int, int]:
        """(number of messages, total octets)."""
        reply = await self._simple("STAT")
        parts = reply.text.split()
        if len(parts) < 2 or not all(part.isascii() and part.isdigit() for part in parts[:2]):  # not '²'
            raise self.unavailable(f"invalid STAT reply from the provider: {reply.text[:80]!r}")
        return int(parts[0]), int(parts[1])

    async def list(self) -> dict[int, int]:
        """{message number: size in octets} for every message."""
        return self._parse(parse_scan_listing, await self._listing("LIST"))

    async def uidl(self) -> dict[int, str] | None:
        """{message number: unique id}, or None when the provider does not support UIDL."""
        body = bytearray()
        reply = await self.request("UIDL", sink=body.extend, limit=self.endpoint.max_listing * LISTING_LINE)
        if not reply.ok:
            return None
        self._check_entries("UIDL", bytes(body))
        return self._parse(parse_uidl_listing, bytes(body))

    def _parse(self, parser: Callable[[bytes], _T], body: bytes) -> _T:
        try:
            return parser(body)
        except RemoteProtocolError as exc:
            raise self.unavailable(str(exc)) from None

    def _check_entries(self, command: str, body: bytes) -> None:
        if (entries := body.count(b"\n")) > (most := self.endpoint.max_listing):
            raise self.unavailable(f"{command} lists {entries} entries, over upstream.max_listing ({most})")

    async def _listing(self, command: str) -> bytes:
        body = bytearray()
        reply = await self.request(command, sink=body.extend, limit=self.endpoint.max_listing * LISTING_LINE)
        self._check_entries(command, bytes(body))
        if not reply.ok:
            raise self._command_error(command, reply)
        return bytes(body)

    async def retr(self, number: int, sink: Sink) -> int:
        """Stream message `number` to `sink`; return its size in octets.

        `sink` gets the message unstuffed, CRLF line endings kept, in pieces of 64 KiB or
        more; it may be a plain or an async function. A message is complete only when this
        returns: if it raises (the connection dropped, a timeout…), what the sink got is a
        fragment and must be thrown away — there is no other end-of-message signal.
        """
        number = _message_number(number)
        size = 0

        async def counted(chunk: bytes) -> None:
            nonlocal size
            size += len(chunk)
            await _call(sink, chunk)

        reply = await self.request("RETR", number, sink=counted, limit=self.endpoint.max_message_size)
        if not reply.ok:
            raise self._command_error("RETR", reply)
        return size

    @property
    def pipelining(self) -> bool:
        return self.capabilities is not None and "PIPELINING" in self.capabilities

    async def retr_many(self, numbers: Sequence[int], begin: Callable[[int, int], Sink],
                        end: Callable[[int, UpstreamCommandError | None], Awaitable[None]],
                        window: int = RETR_WINDOW, sizes: dict[int, int] | None = None,
                        window_octets: int = RETR_WINDOW_OCTETS) -> None:
        """RETR each of `numbers`, in order, with up to `window` commands in flight (and no more than
        `window_octets` of announced sizes, beyond the first) when the provider offers PIPELINING.

        For each message: ``begin(number, index)`` gives the sink its body goes to, then
        ``await end(number, None)`` once it is complete; a message the provider refuses gets
        ``await end(number, error)`` and no ``begin``. A failure of the connection raises, and the
        message being received then is a fragment (its sink's owner throws it away).
        """
        numbers = [_message_number(n) for n in numbers]
        if not self.pipelining:
            window = 1
        sizes = sizes or {}
        if self._broken is not None:
            raise UpstreamUnavailable(f"{self.endpoint.where}: {self._broken}", self._broken)
        sent = done = 0
        finished = False
        try:
            while done < len(numbers):
                lines, flight = [], sum(sizes.get(n, 0) for n in numbers[done:sent])
                while sent < len(numbers) and sent - done < window and (sent == done or flight < window_octets):
                    lines.append(self._conn.send("RETR", numbers[sent], pipelined=True))
                    flight += sizes.get(numbers[sent], 0)
                    sent += 1
                if lines:
                    await self._send(b"".join(lines))
                number = numbers[done]
                reply = await self._reply()
                if self._conn.in_data:
                    await self._drain(begin(number, done), "RETR", self.endpoint.max_message_size)
                    await end(number, None)
                else:
                    await end(number, self._command_error("RETR", reply))
                done += 1
            finished = True
        finally:
            if not finished and self._broken is None:
                self._broken = "RETR did not complete"

    async def retr_bytes(self, number: int) -> bytes:
        """Message `number`, whole, unstuffed, CRLF line endings kept."""
        parts: list[bytes] = []
        await self.retr(number, parts.append)
        return b"".join(parts)

    async def top(self, number: int, lines: int) -> bytes:
        """The headers, the blank line and the first `lines` body lines of message `number`."""
        number = _message_number(number)
        lines = operator.index(lines)
        if lines < 0:
            raise ValueError("TOP needs a line count of 0 or more")
        parts: list[bytes] = []
        reply = await self.request("TOP", number, lines, sink=parts.append, limit=self.endpoint.max_message_size)
        if not reply.ok:
            raise self._command_error("TOP", reply)
        return b"".join(parts)

    async def header_digest(self, number: int) -> str:
        """An identifier for providers without UIDL (`pop3.client.header_digest` of ``TOP n 0``)."""
        return digest_of_headers(await self.top(number, 0))

    async def dele(self, number: int) -> None:
        """Mark message `number` for deletion; the provider removes it only at `quit`."""
        await self._simple("DELE", _message_number(number))

    async def noop(self) -> None:
        await self._simple("NOOP")

    async def quit(self, wait: bool = True) -> None:
        """End the session with QUIT, which makes the provider apply the deletions; then close. Without
        ``wait`` (nothing was deleted) QUIT goes out and the connection is closed without its reply."""
        if not wait and not self._closed and self._broken is None and not self._conn.buffered:
            with contextlib.suppress(UpstreamError):
                await self._send(self._conn.send("QUIT"))
        try:
            reply = await self.request("QUIT") if wait else None
        finally:
            await self.aclose()
        if reply is not None and not reply.ok:
            raise self._command_error("QUIT", reply)

    async def aclose(self) -> None:
        """Close the connection without QUIT: the provider deletes nothing. Idempotent."""
        if self._closed:
            return
        self._closed = True
        broken, self._broken = self._broken, self._broken or "the connection is closed"
        if broken is not None:
            await trio.aclose_forcefully(self._stream)
            return
        with trio.move_on_after(self.endpoint.timeout):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await self._stream.aclose()
