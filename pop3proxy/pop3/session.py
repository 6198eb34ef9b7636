"""The server side of one POP3 session, as a sans-IO state machine.

RFC 1939 states (AUTHORIZATION → TRANSACTION → UPDATE), RFC 2449 CAPA, RFC 2595 STLS and RFC 5034
AUTH PLAIN. The machine consumes received bytes and hands back *actions* for the I/O driver
(``pop3proxy.net.pop3_server``) to carry out: send these bytes, stream this message, check these credentials,
start TLS, apply these deletions, close. Where an action needs an answer (credentials, TLS, deletions)
the driver reports it back through ``login_succeeded``/``login_failed``, ``tls_started`` or
``update_done`` before it asks for more.

Like the rest of ``pop3``, this module imports neither trio nor os; the actions are in ``actions``.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Sequence

from pop3proxy.pop3 import replies, sasl
from pop3proxy.pop3.actions import (
    Action,
    Authenticate,
    Challenge,
    Close,
    MessageInfo,
    Send,
    SendMessage,
    StartTLS,
    State,
    Update,
)
from pop3proxy.pop3.commands import (
    CREDENTIAL_COMMANDS,
    MAX_AUTH_LINE,
    MAX_COMMAND_LINE,
    Command,
    parse_command,
    parse_number,
)
from pop3proxy.pop3.errors import LocalProtocolError, RemoteProtocolError
from pop3proxy.pop3.framing import NEED_DATA, Line, LineReader, LineTooLong

__all__ = [
    "Action",
    "Authenticate",
    "Challenge",
    "Close",
    "MessageInfo",
    "SendMessage",
    "Send",
    "Session",
    "StartTLS",
    "State",
    "Update",
]

IMPLEMENTATION = "pop3proxy"
_UNREADABLE = replies.err("the message cannot be read now, try again later", "SYS/TEMP")
MAX_BAD_COMMANDS = 20
_DIGEST = re.compile(r"[0-9a-fA-F]{32}")

# Which commands each state accepts; anything else in that state is answered, not obeyed.
_ALLOWED: dict[State, frozenset[str]] = {
    State.AUTHORIZATION: frozenset({"USER", "PASS", "AUTH", "STLS", "CAPA", "QUIT", "APOP"}),
    State.TRANSACTION: frozenset(
        {"STAT", "LIST", "RETR", "DELE", "NOOP", "RSET", "TOP", "UIDL", "QUIT", "CAPA"}
    ),
}
_KNOWN = frozenset().union(*_ALLOWED.values())

# How many arguments each command takes: (least, most).
_ARITY: dict[str, tuple[int, int]] = {
    "USER": (1, 1),
    "PASS": (1, 10_000),  # the password is the rest of the line
    "AUTH": (0, 2),
    "STLS": (0, 0),
    "CAPA": (0, 0),
    "QUIT": (0, 0),
    "APOP": (2, 2),
    "STAT": (0, 0),
    "LIST": (0, 1),
    "RETR": (1, 1),
    "DELE": (1, 1),
    "NOOP": (0, 0),
    "RSET": (0, 0),
    "TOP": (2, 2),
    "UIDL": (0, 1),
}


class _Ordinary(bytes):
    """An -ERR for a well-formed command that simply cannot be done (no such message, already
    deleted): it does not count towards ``max_bad_commands``, which is for garbage."""


class _Pending(enum.Enum):
    NOTHING = 0
    LOGIN = 1
    TLS = 2
    UPDATE = 3
    SASL = 4  # waiting for an AUTH PLAIN continuation line (not a driver answer)
    CHALLENGE = 5  # waiting for the driver's CRAM-MD5 challenge


class Session:
    """One client's POP3 session.

    ``stls_available``: a certificate is configured, so STLS can be offered.
    ``tls_active``: the connection is already encrypted (implicit TLS).
    ``plaintext_auth``: whether USER/PASS and AUTH PLAIN are allowed before TLS is up (the driver
    decides from ``listen.allow_plaintext_auth`` and the client's address).
    """

    def __init__(
        self,
        *,
        stls_available: bool = False,
        tls_active: bool = False,
        plaintext_auth: bool = True,
        greeting: str = "pop3proxy ready",
        max_bad_commands: int = MAX_BAD_COMMANDS,
        bearer_auth: bool = False,
        apop_timestamp: str | None = None,
        cram_md5: bool = False,
    ) -> None:
        """``apop_timestamp``: a provider's APOP timestamp to greet with (APOP is then accepted and checked
        by that provider); ``cram_md5``: offer AUTH CRAM-MD5 (the challenge comes from the provider)."""
        self.max_bad_commands = max_bad_commands
        self.mechanisms = ("PLAIN", *sasl.MECHANISMS) if bearer_auth else ("PLAIN",)  # bearer: sasl.BearerToken
        self.challenge_mechanisms = ("CRAM-MD5",) if cram_md5 else ()
        self.apop_timestamp = apop_timestamp
        self._mechanism = "PLAIN"
        self._failure: bytes | None = None  # -ERR held back until the client answers an error challenge
        self.state = State.AUTHORIZATION
        self.stls_available = stls_available
        self.tls_active = tls_active
        self.plaintext_auth = plaintext_auth
        self._greeting = greeting
        self._reader = LineReader()
        self._pending = _Pending.NOTHING
        self._user: str | None = None
        self._messages: list[MessageInfo] = []
        self._deleted: set[int] = set()
        self.bad_commands = 0
        self.user: str | None = None  # the authenticated user
        self.messages_served = 0

    # -- input ----------------------------------------------------------------------------------

    def greeting(self) -> bytes:
        return replies.ok(f"{self._greeting} {self.apop_timestamp}" if self.apop_timestamp else self._greeting)

    def receive_data(self, data: bytes | bytearray) -> None:
        self._reader.receive_data(data)

    @property
    def buffered(self) -> int:
        return self._reader.buffered

    def next_actions(self) -> list[Action] | None:
        """Handle the next complete line. ``None`` means: receive more data first."""
        if self._pending not in (_Pending.NOTHING, _Pending.SASL):  # (CHALLENGE too is the driver's turn)
            raise LocalProtocolError(f"waiting for the driver's answer ({self._pending.name})")
        if self.state in (State.UPDATE, State.CLOSED):
            return None
        sasl = self._pending is _Pending.SASL
        credentials = sasl or self.state is State.AUTHORIZATION
        event = self._reader.next_event(MAX_AUTH_LINE if credentials else MAX_COMMAND_LINE)
        if event is NEED_DATA:
            return None
        if isinstance(event, LineTooLong):
            if sasl:
                self._pending = _Pending.NOTHING
                return self._bad(replies.err("authentication line too long", "AUTH"))
            return self._bad(replies.err("command line too long"))
        assert isinstance(event, Line)
        # Only credentials may be long; every other command keeps RFC 2449's 255 octets.
        if (
            not sasl
            and len(event.data) + 2 > MAX_COMMAND_LINE
            and event.data.split(b" ", 1)[0].upper() not in CREDENTIAL_COMMANDS
        ):
            return self._bad(replies.err("command line too long"))
        if sasl:
            self._pending = _Pending.NOTHING
            return self._sasl_response(event.data)
        try:
            command = parse_command(event.data)
        except RemoteProtocolError as exc:
            return self._bad(exc.reply or replies.err("invalid command"))
        return self._dispatch(command)

    # -- answers from the driver ----------------------------------------------------------------

    def login_succeeded(self, user: str, messages: Sequence[MessageInfo], banner: str = "") -> list[Action]:
        self._expect(_Pending.LOGIN)
        self.state = State.TRANSACTION
        self.user = user
        self._messages = list(messages)
        count, octets = self._totals()
        text = banner or f"{user} has {count} messages ({octets} octets)"
        return [Send(replies.ok(text))]

    def login_failed(self, text: str = "invalid user name or password", code: str | None = "AUTH") -> list[Action]:
        self._expect(_Pending.LOGIN)
        self._user = None
        if self._mechanism in sasl.MECHANISMS:  # RFC 7628 3.2.2: an error challenge, then -ERR
            self._failure, self._pending = replies.err(text, code), _Pending.SASL
            return [Send(replies.continuation(sasl.ERROR_CHALLENGE))]
        self.bad_commands += 1
        return self._maybe_close([Send(replies.err(text, code))])

    def challenge_given(self, challenge: str) -> list[Action]:
        """The provider's base64 challenge for the pending AUTH: relay it, wait for the client's answer."""
        self._expect(_Pending.CHALLENGE)
        self._pending = _Pending.SASL
        return [Send(replies.continuation(challenge.encode("ascii")))]

    def challenge_failed(self, text: str, code: str | None = "SYS/TEMP") -> list[Action]:
        self._expect(_Pending.CHALLENGE)
        self._mechanism = "PLAIN"
        return self._bad(replies.err(text, code))

    def tls_started(self) -> list[Action]:
        self._expect(_Pending.TLS)
        self.tls_active = True
        self._reader.discard_buffer()  # nothing sent in plaintext after STLS may be obeyed
        return []

    def update_done(self, ok: bool = True, text: str = "") -> list[Action]:
        self._expect(_Pending.UPDATE)
        self.state = State.CLOSED
        if ok:
            left = len(self._messages) - len(self._deleted)
            return [Send(replies.ok(text or f"pop3proxy signing off ({left} messages left)")), Close()]
        return [Send(replies.err(text or "some deleted messages not removed", "SYS/TEMP")), Close()]

    def _expect(self, pending: _Pending) -> None:
        if self._pending is not pending:
            raise LocalProtocolError(f"no {pending.name} answer was asked for")
        self._pending = _Pending.NOTHING

    # -- dispatch --------------------------------------------------------------------------------

    def _dispatch(self, command: Command) -> list[Action]:
        keyword = command.keyword
        if keyword not in _KNOWN:
            return self._bad(replies.err(f"unknown command {keyword[:40]}"))
        if keyword not in _ALLOWED[self.state]:
            if self.state is State.AUTHORIZATION:
                return self._bad(replies.err(f"{keyword} is not allowed before login"))
            return self._bad(replies.err(f"{keyword} is not allowed after login"))
        least, most = _ARITY[keyword]
        if not least <= len(command.args) <= most:
            if least == most == 0:
                return self._bad(replies.err(f"{keyword} takes no arguments"))
            return self._bad(replies.err(f"wrong number of arguments for {keyword}"))
        return _HANDLERS[keyword](self, command)

    def _refuse(self, reply: bytes) -> list[Action]:
        """A message-number error: an ordinary -ERR (a long session may see many), unless garbage."""
        return [Send(bytes(reply))] if isinstance(reply, _Ordinary) else self._bad(reply)

    def _bad(self, reply: bytes) -> list[Action]:
        self.bad_commands += 1
        return self._maybe_close([Send(reply)])

    def _maybe_close(self, actions: list[Action]) -> list[Action]:
        if self.bad_commands >= self.max_bad_commands:
            self.state = State.CLOSED
            actions.append(Send(replies.err("too many errors, closing connection")))
            actions.append(Close())
        return actions

    # -- AUTHORIZATION ---------------------------------------------------------------------------

    def capabilities(self) -> list[str]:
        caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self.state is State.AUTHORIZATION:
            # Challenge-response mechanisms send no password: offered with or without TLS.
            mechanisms = (self.mechanisms if self._login_allowed() else ()) + self.challenge_mechanisms
            if self._login_allowed():
                caps.append("USER")
            if mechanisms:
                caps.append("SASL " + " ".join(mechanisms))
            if self.stls_available and not self.tls_active:
                caps.append("STLS")
        caps.append(f"IMPLEMENTATION {IMPLEMENTATION}")
        return caps

    def _login_allowed(self) -> bool:
        return self.tls_active or self.plaintext_auth

    def _refuse_plaintext(self) -> list[Action]:
        hint = ", use STLS first" if self.stls_available else ""
        return self._bad(replies.err(f"plaintext authentication disallowed on an unencrypted connection{hint}", "AUTH"))

    def _cmd_capa(self, command: Command) -> list[Action]:
        return [Send(replies.multiline("capability list follows", self.capabilities()))]

    def _cmd_user(self, command: Command) -> list[Action]:
        if not self._login_allowed():
            return self._refuse_plaintext()
        self._user = command.args[0]
        return [Send(replies.ok("send your password"))]

    def _cmd_pass(self, command: Command) -> list[Action]:
        if not self._login_allowed():
            return self._refuse_plaintext()
        if self._user is None:
            return self._bad(replies.err("USER first"))
        return self._authenticate(self._user, command.arg_text, "USER")

    def _cmd_apop(self, command: Command) -> list[Action]:
        self._user = None
        if self.apop_timestamp is None:
            return self._bad(replies.err("APOP is not available here, use USER/PASS or AUTH PLAIN", "AUTH"))
        user, digest = command.args
        if not _DIGEST.fullmatch(digest):
            return self._bad(replies.err("APOP digest must be 32 hex digits", "AUTH"))
        # A digest, not a password: challenge-response needs no TLS (as at the provider).
        return self._authenticate(user, digest.lower(), "APOP")

    def _cmd_auth(self, command: Command) -> list[Action]:
        if not command.args:
            mechanisms = list(self.mechanisms) if self._login_allowed() else []
            return [Send(replies.multiline("SASL mechanisms follow", mechanisms + list(self.challenge_mechanisms)))]
        if command.args[0].upper() in self.challenge_mechanisms:
            if len(command.args) == 2:
                return self._bad(replies.err(f"{command.args[0].upper()} takes no initial response", "AUTH"))
            self._mechanism, self._failure = command.args[0].upper(), None
            self._pending = _Pending.CHALLENGE
            return [Challenge(self._mechanism)]
        if command.args[0].upper() not in self.mechanisms:
            return self._bad(replies.err(f"unsupported authentication mechanism {command.args[0][:40]}"))
        self._mechanism, self._failure = command.args[0].upper(), None
        if not self._login_allowed():
            return self._refuse_plaintext()
        if len(command.args) == 2:
            return self._sasl_response(command.args[1].encode("ascii", "replace"))
        self._pending = _Pending.SASL
        return [Send(replies.continuation())]

    def _sasl_response(self, data: bytes) -> list[Action]:
        if self._failure is not None:  # the client's answer to the error challenge
            failure, self._failure, self._mechanism = self._failure, None, "PLAIN"
            return self._bad(failure)
        data = data.strip(b" ")
        if data == b"*":
            return self._bad(replies.err("authentication cancelled", "AUTH"))
        if self._mechanism == "CRAM-MD5":
            try:
                user = sasl.parse_cram_md5(data)
            except sasl.SaslError as exc:
                return self._bad(replies.err(str(exc), "AUTH"))
            return self._authenticate(user, data.decode("ascii"), "CRAM-MD5")
        if self._mechanism != "PLAIN":
            try:
                login = sasl.parse(self._mechanism, data)
            except sasl.SaslError as exc:
                return self._bad(replies.err(f"{self._mechanism}: {exc}", "AUTH"))
            return self._authenticate(login.user, sasl.BearerToken(login.token), self._mechanism)
        try:
            user, password = sasl.parse_plain(data)
        except sasl.SaslError as exc:
            return self._bad(replies.err(str(exc), "AUTH"))
        return self._authenticate(user, password, "PLAIN")

    def _authenticate(self, user: str, password: str, mechanism: str) -> list[Action]:
        self._mechanism = mechanism
        if "\x00" in user or "\x00" in password:
            self._user = None
            return self._bad(replies.err("invalid user name or password", "AUTH"))
        self._pending = _Pending.LOGIN
        return [Authenticate(user=user, password=password, mechanism=mechanism)]

    def _cmd_stls(self, command: Command) -> list[Action]:
        if self.tls_active:
            return self._bad(replies.err("TLS is already active"))
        if not self.stls_available:
            return self._bad(replies.err("STLS is not available: no certificate configured"))
        self._pending = _Pending.TLS
        self._user = None
        return [Send(replies.ok("begin TLS negotiation")), StartTLS()]

    def _cmd_quit(self, command: Command) -> list[Action]:
        if self.state is State.AUTHORIZATION:
            self.state = State.CLOSED
            return [Send(replies.ok("pop3proxy signing off")), Close()]
        self.state = State.UPDATE
        self._pending = _Pending.UPDATE
        deleted = tuple(self._messages[i - 1].key for i in sorted(self._deleted))
        return [Update(deleted)]

    # -- TRANSACTION -----------------------------------------------------------------------------

    def _totals(self) -> tuple[int, int]:
        live = [m for i, m in enumerate(self._messages, 1) if i not in self._deleted]
        return len(live), sum(m.size for m in live)

    def _message(self, arg: str) -> tuple[int, MessageInfo] | bytes:
        """The live message numbered ``arg``, or the ``-ERR`` reply to send."""
        number = parse_number(arg) if arg != "0" else 0
        if number is None:
            return replies.err(f"invalid message number {arg[:20]!s}")
        if not 1 <= number <= len(self._messages):
            return _Ordinary(replies.err(f"no such message, only {len(self._messages)} messages in maildrop"))
        if number in self._deleted:
            return _Ordinary(replies.err(f"message {number} already deleted"))
        return number, self._messages[number - 1]

    def _cmd_stat(self, command: Command) -> list[Action]:
        count, octets = self._totals()
        return [Send(replies.ok(f"{count} {octets}"))]

    def _cmd_noop(self, command: Command) -> list[Action]:
        return [Send(replies.ok())]

    def _cmd_rset(self, command: Command) -> list[Action]:
        self._deleted.clear()
        count, octets = self._totals()
        return [Send(replies.ok(f"maildrop has {count} messages ({octets} octets)"))]

    def _cmd_list(self, command: Command) -> list[Action]:
        if command.args:
            found = self._message(command.args[0])
            if isinstance(found, bytes):
                return self._refuse(found)
            number, info = found
            return [Send(replies.ok(f"{number} {info.size}"))]
        count, octets = self._totals()
        deleted = self._deleted
        lines = [f"{i} {m.size}" for i, m in enumerate(self._messages, 1) if i not in deleted]
        return [Send(_listing(f"{count} messages ({octets} octets)", lines))]

    def _cmd_uidl(self, command: Command) -> list[Action]:
        if command.args:
            found = self._message(command.args[0])
            if isinstance(found, bytes):
                return self._refuse(found)
            number, info = found
            return [Send(replies.ok(f"{number} {wire_uid(info.uidl)}"))]
        deleted = self._deleted
        lines = [f"{i} {wire_uid(m.uidl)}" for i, m in enumerate(self._messages, 1) if i not in deleted]
        return [Send(_listing("unique-id listing follows", lines))]

    def _cmd_retr(self, command: Command) -> list[Action]:
        found = self._message(command.args[0])
        if isinstance(found, bytes):
            return self._refuse(found)
        number, info = found
        self.messages_served += 1
        return [SendMessage(info.key, size=info.size, status=replies.ok(f"{info.size} octets"), error=_UNREADABLE,
                            dot_lines=getattr(info, "dot_lines", None))]

    def _cmd_top(self, command: Command) -> list[Action]:
        found = self._message(command.args[0])
        if isinstance(found, bytes):
            return self._refuse(found)
        number, info = found
        lines = command.args[1]
        if not (lines.isascii() and lines.isdigit() and len(lines) <= 10):
            return self._bad(replies.err(f"invalid line count {lines[:20]}"))
        return [SendMessage(info.key, int(lines), size=info.size, status=replies.ok("top of message follows"),
                            error=_UNREADABLE, dot_lines=getattr(info, "dot_lines", None))]

    def _cmd_dele(self, command: Command) -> list[Action]:
        found = self._message(command.args[0])
        if isinstance(found, bytes):
            return self._refuse(found)
        number, _ = found
        self._deleted.add(number)
        return [Send(replies.ok(f"message {number} deleted"))]


def _listing(first: str, lines: list[str]) -> bytes:
    """A scan or unique-id listing: its lines start with a digit, so none needs dot-stuffing."""
    body = "\r\n".join(lines).encode("ascii")
    return replies.ok(first) + body + (b"\r\n.\r\n" if lines else b".\r\n")


_WIRE_UID = re.compile(r"[\x21-\x7e]{1,70}")


def wire_uid(uid: str) -> str:
    """The UIDL form of a store uid: RFC 1939 allows 1-70 characters from 0x21 to 0x7E.

    Uids that do not fit (long or odd file names left by other tools) become a stable digest.
    """
    if _WIRE_UID.fullmatch(uid):
        return uid
    return "h" + hashlib.sha1(uid.encode("utf-8", "surrogatepass")).hexdigest()


# The dispatch table, built once: every known keyword has exactly one handler.
_HANDLERS = {keyword: getattr(Session, "_cmd_" + keyword.lower()) for keyword in _KNOWN}
