"""Raw-socket POP3 clients for the benchmarks: a blocking one and a trio one.

Both set TCP_NODELAY, speak only what the workloads need (USER/PASS, STAT, UIDL, RETR, QUIT) and
check every reply: a workload that gets ``-ERR`` or a short answer fails instead of looking fast.
`ReplyReader` is the shared sans-IO part: bytes in, status lines and multi-line bodies out.
"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass, field

import trio

HOST = "127.0.0.1"
RECV_SIZE = 1 << 20
TERMINATOR = b"\r\n.\r\n"


class Pop3Error(Exception):
    """The server answered -ERR, closed early, or sent something a POP3 server must not."""


class ReplyReader:
    """Splits a server's byte stream into status lines and multi-line bodies (sans-IO)."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.pos = 0
        self._scan = -1  # where the terminator search resumes for the body being read

    def feed(self, data: bytes) -> None:
        if self.pos > (1 << 20) and self._scan < 0:
            del self.buf[: self.pos]
            self.pos = 0
        self.buf += data

    def line(self) -> bytes | None:
        """The next status line without CRLF, or None when it is not complete yet."""
        end = self.buf.find(b"\r\n", self.pos)
        if end < 0:
            return None
        line = bytes(self.buf[self.pos : end])
        self.pos = end + 2
        return line

    def body(self) -> int | None:
        """Octets of the multi-line body after the status line just read (dot-stuffed, with its final
        CRLF, without the terminating ``.``), or None when the terminator has not arrived yet."""
        start = self.pos - 2  # the CRLF that ended the status line: an empty body is ".\r\n" right after it
        if self._scan < 0:
            self._scan = start
        end = self.buf.find(TERMINATOR, self._scan)
        if end < 0:
            self._scan = max(start, len(self.buf) - len(TERMINATOR) + 1)
            return None
        self._scan = -1
        self.pos = end + len(TERMINATOR)
        return max(0, end + 2 - (start + 2))


def _check(line: bytes, what: str) -> bytes:
    if not line.startswith(b"+OK"):
        raise Pop3Error(f"{what}: {line[:200]!r}")
    return line


@dataclass
class Download:
    """What one session fetched and how long its parts took (seconds)."""

    messages: int = 0
    octets: int = 0
    login: float = 0.0
    total: float = 0.0
    retr_times: list[float] = field(default_factory=list)


class Pop3Client:
    """A blocking POP3 client on one socket (plain or implicit TLS)."""

    def __init__(
        self, port: int, *, host: str = HOST, context: ssl.SSLContext | None = None, timeout: float = 300.0
    ) -> None:
        raw = socket.create_connection((host, port), timeout=timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock: socket.socket = context.wrap_socket(raw, server_hostname="localhost") if context else raw
        self.reader = ReplyReader()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> Pop3Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fill(self) -> None:
        data = self.sock.recv(RECV_SIZE)
        if not data:
            raise Pop3Error("connection closed by the server")
        self.reader.feed(data)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while (line := self.reader.line()) is None:
            self._fill()
        return line

    def body(self) -> int:
        while (n := self.reader.body()) is None:
            self._fill()
        return n

    def command(self, text: str) -> bytes:
        self.send(text.encode() + b"\r\n")
        return _check(self.line(), text.split()[0])

    def greeting(self) -> bytes:
        return _check(self.line(), "greeting")

    def login(self, user: str, password: str) -> bytes:
        self.command(f"USER {user}")
        return self.command(f"PASS {password}")

    def multiline(self, text: str) -> int:
        self.command(text)
        return self.body()

    def quit(self, wait_close: bool = True) -> None:
        """QUIT, then (by default) wait until the server closes: only then is the mailbox free again."""
        self.command("QUIT")
        if wait_close:
            try:
                while self.sock.recv(4096):
                    pass
            except OSError:
                pass

    def stat(self) -> tuple[int, int]:
        parts = self.command("STAT").split()
        return int(parts[1]), int(parts[2])


def download(
    port: int,
    user: str,
    password: str,
    *,
    pipelined: bool,
    context: ssl.SSLContext | None = None,
    window: int = 64,
    expect: int | None = None,
    limit: int | None = None,
) -> Download:
    """Log in, UIDL, RETR every message (the first ``limit`` only, if given), QUIT. ``pipelined`` keeps
    up to ``window`` RETRs in flight."""
    result = Download()
    t0 = time.perf_counter()
    with Pop3Client(port, context=context) as c:
        c.greeting()
        c.login(user, password)
        result.login = time.perf_counter() - t0
        count, _ = c.stat()
        if expect is not None and count != expect:
            raise Pop3Error(f"{user}: {count} messages, expected {expect}")
        if limit is not None:
            count = min(count, limit)
        if pipelined:
            commands = [b"UIDL\r\n"] + [f"RETR {n}\r\n".encode() for n in range(1, count + 1)]
            sent = min(window, len(commands))
            c.send(b"".join(commands[:sent]))
            for done in range(len(commands)):
                _check(c.line(), "UIDL" if done == 0 else "RETR")
                n = c.body()
                if done:
                    result.messages += 1
                    result.octets += n
                if sent < len(commands) and sent - done - 1 <= window // 2:
                    more = min(len(commands), sent + window // 2)
                    c.send(b"".join(commands[sent:more]))
                    sent = more
        else:
            c.multiline("UIDL")
            for n in range(1, count + 1):
                r0 = time.perf_counter()
                result.octets += c.multiline(f"RETR {n}")
                result.retr_times.append(time.perf_counter() - r0)
                result.messages += 1
        c.quit()
    result.total = time.perf_counter() - t0
    return result


def login_latency(port: int, user: str, password: str, context: ssl.SSLContext | None = None) -> float:
    """Seconds from connect() to the +OK after PASS; then QUIT and wait for the close."""
    t0 = time.perf_counter()
    with Pop3Client(port, context=context) as c:
        c.greeting()
        c.login(user, password)
        elapsed = time.perf_counter() - t0
        c.quit()
    return elapsed


def login_stat_uidl(port: int, user: str, password: str, wait_close: bool = False) -> tuple[float, int]:
    """Seconds for connect, login, STAT and the whole UIDL listing; and the message count. ``wait_close``:
    after QUIT, wait until the server closes (the session is over)."""
    t0 = time.perf_counter()
    with Pop3Client(port) as c:
        c.greeting()
        c.login(user, password)
        count, _ = c.stat()
        c.multiline("UIDL")
        elapsed = time.perf_counter() - t0
        c.quit(wait_close=wait_close)
    return elapsed, count


# --- many sessions at once ---------------------------------------------------------------------------


@dataclass
class SwarmResult:
    sessions: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    messages: int = 0
    octets: int = 0
    seconds: float = 0.0
    session_times: list[float] = field(default_factory=list)

    def error(self, text: str) -> None:
        self.errors[text] = self.errors.get(text, 0) + 1


async def _session(port: int, user: str, password: str, result: SwarmResult, timeout: float,
                   retr: bool = True) -> None:
    reader = ReplyReader()
    t0 = time.perf_counter()

    try:
        with trio.fail_after(timeout):
            stream = await trio.open_tcp_stream(HOST, port)
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            async with stream:

                async def line() -> bytes:
                    while (got := reader.line()) is None:
                        data = await stream.receive_some(RECV_SIZE)
                        if not data:
                            raise Pop3Error("closed")
                        reader.feed(data)
                    return got

                async def body() -> int:
                    while (got := reader.body()) is None:
                        data = await stream.receive_some(RECV_SIZE)
                        if not data:
                            raise Pop3Error("closed")
                        reader.feed(data)
                    return got

                async def command(text: str) -> bytes:
                    await stream.send_all(text.encode() + b"\r\n")
                    return _check(await line(), text.split()[0])

                _check(await line(), "greeting")
                await command(f"USER {user}")
                await command(f"PASS {password}")
                count = int((await command("STAT")).split()[1])
                await command("UIDL")
                await body()
                for n in range(1, count + 1 if retr else 1):
                    await command(f"RETR {n}")
                    result.octets += await body()
                    result.messages += 1
                await command("QUIT")
                while await stream.receive_some(4096):
                    pass
        result.ok += 1
        result.session_times.append(time.perf_counter() - t0)
    except Pop3Error as exc:
        text = str(exc)
        result.error(text[:60])
    except trio.TooSlowError:
        result.error("timeout")
    except OSError as exc:
        result.error(f"{type(exc).__name__}: {exc.strerror or exc}"[:60])
    except trio.BrokenResourceError:
        result.error("connection reset")


async def _swarm(port: int, users: list[tuple[str, str]], timeout: float, retr: bool) -> SwarmResult:
    result = SwarmResult(sessions=len(users))
    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for user, password in users:
            nursery.start_soon(_session, port, user, password, result, timeout, retr)
    result.seconds = time.perf_counter() - t0
    return result


def swarm(port: int, users: list[tuple[str, str]], timeout: float = 300.0, retr: bool = True) -> SwarmResult:
    """One concurrent session per entry of ``users`` (all started at once); each downloads everything
    (with ``retr`` False: login, STAT, UIDL, QUIT only)."""
    return trio.run(_swarm, port, users, timeout, retr)


# --- idle connections ----------------------------------------------------------------------------------


def open_idle(port: int, count: int, timeout: float = 30.0) -> tuple[list[socket.socket], int]:
    """Open ``count`` connections and read each greeting; returns the sockets and how many failed."""
    socks: list[socket.socket] = []
    failed = 0
    for _ in range(count):
        try:
            s = socket.create_connection((HOST, port), timeout=timeout)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            data = s.recv(512)
            if not data.startswith(b"+OK"):
                failed += 1
                s.close()
                continue
            socks.append(s)
        except OSError:
            failed += 1
    return socks, failed
