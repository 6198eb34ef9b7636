"""A small scripted POP3 server on trio, for the faults a real provider does not show on demand.

    async with faulty_server(messages={"uid1": b"..."}, stall_on="RETR") as server:
        endpoint = Endpoint("127.0.0.1", server.port, "none", timeout=0.5)

It serves an in-memory mailbox (USER/PASS, APOP, AUTH PLAIN, CAPA, STAT, LIST, UIDL, RETR, TOP,
DELE, NOOP, QUIT) and misbehaves as a `Behaviour` says. ``server.commands`` lists the keywords it
received, in order, over all connections. Only 127.0.0.1 is bound; leaving the block stops the
server and every connection.
"""

from __future__ import annotations

import base64
import binascii
import itertools
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import AsyncIterator

import trio

from pop3proxy.pop3.client import apop_digest
from pop3proxy.pop3.commands import Command, parse_command, parse_number
from pop3proxy.pop3.dotstuff import DotStuffer
from pop3proxy.pop3.errors import RemoteProtocolError
from pop3proxy.pop3.framing import NEED_DATA, Line, LineReader
from pop3proxy.pop3.replies import continuation, err, multiline, ok

HOST = "127.0.0.1"
GREETING = "GREETING"  # the stall_on / garbage_on name of the greeting


@dataclass
class Behaviour:
    messages: dict[str, bytes] = field(default_factory=dict)  # unique id → message (CRLF)
    user: str = "alice"
    password: str = "secret"
    greeting: str = "faulty POP3 server ready"
    apop: bool = False  # an APOP timestamp in the greeting, and APOP accepted
    capa: bool = True  # False: -ERR to CAPA
    uidl: bool = True  # False: -ERR to UIDL, and UIDL not in CAPA
    sasl_plain: bool = False  # offer (in CAPA) and accept AUTH PLAIN
    user_pass: bool = True  # False: -ERR to USER, and USER not in CAPA
    stls: bool = False  # list STLS in CAPA (STLS itself is always refused)
    auth_error_code: str | None = None  # code of the -ERR to refused credentials
    auth_error_text: str = "invalid credentials"  # "{password}" becomes what the client sent
    close_on_connect: bool = False  # close before the greeting
    drop_mid_retr: bool = False  # send half the message, then close
    refuse_retr: set[str] = field(default_factory=set)  # unique ids whose RETR gets -ERR
    endless_on: str | None = None  # a keyword: answer "+OK", then one endless line until closed
    trickle_retr: float | None = None  # send RETR's answer one byte per this many seconds
    stall_on: str | None = None  # GREETING or a keyword: never answer it
    drop_on: str | None = None  # a keyword: close the connection instead of answering it (once; then None)
    garbage_on: str | None = None  # GREETING or a keyword: answer it with `garbage`
    garbage: str = "* what? {args}"  # "{args}" becomes the command's arguments


class FaultyServer:
    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.messages = dict(behaviour.messages)  # what the mailbox holds after QUITs
        self.commands: list[str] = []
        self.port = 0
        self._serial = itertools.count(1)

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            await _Connection(self, stream).run()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)


class _Connection:
    def __init__(self, server: FaultyServer, stream: trio.SocketStream) -> None:
        self.server = server
        self.b = server.behaviour
        self.stream = stream
        self.reader = LineReader()
        self.timestamp = f"<{next(server._serial)}.{id(self)}@faulty.test>"
        self.user: str | None = None
        self.mailbox: list[tuple[str, bytes]] | None = None  # set once logged in
        self.deleted: set[int] = set()

    async def run(self) -> None:
        b = self.b
        if b.close_on_connect:
            return
        if await self.misbehave(GREETING, ""):
            return
        greeting = f"{b.greeting} {self.timestamp}" if b.apop else b.greeting
        await self.stream.send_all(ok(greeting))
        while True:
            line = await self.read_line()
            if line is None:
                return
            try:
                command = parse_command(line)
            except RemoteProtocolError as exc:
                await self.stream.send_all(exc.reply)
                continue
            self.server.commands.append(command.keyword)
            if await self.misbehave(command.keyword, command.arg_text):
                continue
            if not await self.dispatch(command):
                return

    async def read_line(self) -> bytes | None:
        while True:
            event = self.reader.next_event(max_length=8192)
            if isinstance(event, Line):
                return event.data
            if event is not NEED_DATA:
                continue  # an over-long line: ignored
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self.reader.receive_data(data)

    async def misbehave(self, name: str, args: str) -> bool:
        """Stall or send garbage instead of the answer when told to; True when it did."""
        if self.b.stall_on == name:
            await trio.sleep_forever()
        if self.b.drop_on == name:
            self.b.drop_on = None
            await self.stream.aclose()
            return True
        if self.b.endless_on == name:
            await self.stream.send_all(ok("here it comes"))
            chunk = b"x" * 65536
            while True:
                await self.stream.send_all(chunk)
        if self.b.garbage_on == name:
            await self.stream.send_all(self.b.garbage.format(args=args).encode() + b"\r\n")
            return True
        return False

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    # -- commands ---------------------------------------------------------------------

    async def dispatch(self, command: Command) -> bool:
        """Answer one command; False when the connection should end."""
        keyword, args = command.keyword, command.args
        if keyword == "QUIT":
            if self.mailbox is not None:
                for number in sorted(self.deleted):
                    self.server.messages.pop(self.mailbox[number - 1][0], None)
            await self.send(ok("bye"))
            return False
        if keyword == "CAPA":
            await self.send(multiline("capabilities", self.capabilities()) if self.b.capa else err("unknown command"))
        elif keyword == "NOOP":
            await self.send(ok())
        elif self.mailbox is None:
            await self.authorization(command)
        else:
            await self.transaction(keyword, args)
        return True

    def capabilities(self) -> list[str]:
        caps = ["CAPA", "TOP", "PIPELINING", "RESP-CODES", "AUTH-RESP-CODE"]
        if self.b.uidl:
            caps.append("UIDL")
        if self.b.user_pass:
            caps.append("USER")
        if self.b.sasl_plain:
            caps.append("SASL PLAIN")
        if self.b.stls:
            caps.append("STLS")
        return caps

    async def authorization(self, command: Command) -> None:
        b, keyword, args = self.b, command.keyword, command.args
        if keyword == "USER" and b.user_pass and args:
            self.user = command.arg_text
            await self.send(ok("send PASS"))
        elif keyword == "PASS" and self.user is not None:
            await self.check(self.user, command.arg_text)
        elif keyword == "APOP" and b.apop and len(args) == 2:
            good = apop_digest(self.timestamp, b.password)
            await self.check(args[0], b.password if args[1] == good else None, sent=args[1])
        elif keyword == "AUTH" and b.sasl_plain and args and args[0].upper() == "PLAIN":
            response = args[1] if len(args) > 1 else None
            if response is None:
                await self.send(continuation())
                response = (await self.read_line() or b"").decode()
            try:
                _, user, password = base64.b64decode(response, validate=True).decode().split("\0")
            except (binascii.Error, UnicodeDecodeError, ValueError):
                await self.send(err("bad SASL response"))
                return
            await self.check(user, password)
        elif keyword == "STLS":
            await self.send(err("STLS is not available here"))
        else:
            await self.send(err(f"{keyword} is not available"))

    async def check(self, user: str, password: str | None, sent: str | None = None) -> None:
        self.user = None
        b = self.b
        if user == b.user and password == b.password:
            self.mailbox = list(self.server.messages.items())
            await self.send(ok("logged in"))
            return
        text = b.auth_error_text.format(password=sent if sent is not None else password)
        await self.send(err(text, b.auth_error_code))

    def message(self, args: tuple[str, ...]) -> int | None:
        assert self.mailbox is not None
        number = parse_number(args[0]) if args else None
        if number is None or number > len(self.mailbox) or number in self.deleted:
            return None
        return number

    async def transaction(self, keyword: str, args: tuple[str, ...]) -> None:
        assert self.mailbox is not None
        live = [(n, uid, data) for n, (uid, data) in enumerate(self.mailbox, 1) if n not in self.deleted]
        if keyword == "STAT":
            await self.send(ok(f"{len(live)} {sum(len(data) for _, _, data in live)}"))
        elif keyword == "LIST" and not args:
            await self.send(multiline(f"{len(live)} messages", [f"{n} {len(data)}" for n, _, data in live]))
        elif keyword == "UIDL" and not args and self.b.uidl:
            await self.send(multiline("unique ids", [f"{n} {uid}" for n, uid, _ in live]))
        elif keyword in ("RETR", "TOP", "DELE"):
            number = self.message(args)
            if number is None:
                await self.send(err("no such message"))
            elif keyword == "RETR" and self.mailbox[number - 1][0] in self.b.refuse_retr:
                await self.send(err("message is damaged, cannot read it"))
            elif keyword == "DELE":
                self.deleted.add(number)
                await self.send(ok("marked"))
            else:
                await self.send_message(keyword, number, args)
        else:
            await self.send(err(f"{keyword} is not available"))

    async def send_message(self, keyword: str, number: int, args: tuple[str, ...]) -> None:
        assert self.mailbox is not None
        data = self.mailbox[number - 1][1]
        if keyword == "TOP":
            lines = parse_number(args[1]) if len(args) > 1 else None
            if lines is None and args[1:] != ("0",):
                await self.send(err("TOP needs a line count"))
                return
            stuffer = DotStuffer(top_lines=lines or 0)
        else:
            stuffer = DotStuffer()
        body = stuffer.feed(data)
        if self.b.drop_mid_retr and keyword == "RETR":
            await self.send(ok("message follows") + body[: len(body) // 2])
            await self.stream.aclose()
            return
        delay = self.b.trickle_retr
        if delay is not None and keyword == "RETR":
            for byte in ok("message follows") + body + stuffer.finish():
                await self.send(bytes([byte]))
                await trio.sleep(delay)  # the fault itself: a provider this slow
            return
        await self.send(ok("message follows") + body + stuffer.finish())


@asynccontextmanager
async def faulty_server(behaviour: Behaviour | None = None, **options) -> AsyncIterator[FaultyServer]:
    """Run a `FaultyServer` on 127.0.0.1 (a free port) for the duration of the block."""
    server = FaultyServer(behaviour or Behaviour(**options))
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, server.handle, 0, host=HOST))
        server.port = listeners[0].socket.getsockname()[1]
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()
