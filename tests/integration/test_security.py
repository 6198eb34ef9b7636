"""Limits and abuse resistance, against a server running in the test's trio loop."""

from __future__ import annotations

import os
import signal
import ssl

import pytest
import trio
import trustme
from helpers.common import HOST, write_config
from helpers.waiting import eventually_async, wait_for

from pop3proxy.app import run_service
from pop3proxy.config import Settings
from pop3proxy.proxy.credentials import set_password
from pop3proxy.store import open_store

PASSWORD = "right password"


class Client:
    """A raw POP3 client over a trio stream: send lines, read lines."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = b""

    @classmethod
    async def connect(cls, port: int, local: str | None = None) -> "Client":
        stream = await trio.open_tcp_stream(HOST, port, local_address=local)
        client = cls(stream)
        greeting = await client.line()
        assert greeting.startswith(b"+OK"), greeting
        return client

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def line(self, timeout: float = 10) -> bytes:
        with trio.fail_after(timeout):
            while b"\r\n" not in self.buffer:
                chunk = await self.stream.receive_some(65536)
                if not chunk:
                    raise EOFError(self.buffer)
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    async def multiline(self) -> list[bytes]:
        lines = []
        while (line := await self.line()) != b".":
            lines.append(line)
        return lines

    async def command(self, text: bytes) -> bytes:
        await self.send(text + b"\r\n")
        return await self.line()

    async def login(self, user: bytes = b"alice", password: bytes = PASSWORD.encode()) -> bytes:
        assert (await self.command(b"USER " + user)).startswith(b"+OK")
        return await self.command(b"PASS " + password)

    async def closed(self, timeout: float = 10) -> bytes:
        """Read until the server closes; returns what came."""
        data = self.buffer
        with trio.fail_after(timeout):
            while chunk := await self.stream.receive_some(65536):
                data += chunk
        return data

    async def aclose(self) -> None:
        await self.stream.aclose()


async def connect_when_admitted(port: int, timeout: float = 10) -> Client:
    """A session once the server admits one: a refusal ("too many sessions") is retried until *timeout*."""

    async def admitted() -> Client | None:
        client = Client(await trio.open_tcp_stream(HOST, port))
        greeting = await client.line()
        if greeting.startswith(b"+OK"):
            return client
        assert b"too many sessions" in greeting, greeting
        await client.aclose()
        return None

    return await eventually_async(admitted, timeout=timeout, interval=0.02, message="a session admitted")


@pytest.fixture
def mail_root(tmp_path):
    users = tmp_path / "users"
    set_password(users, "alice", PASSWORD)
    set_password(users, "bob", PASSWORD)
    root = tmp_path / "cache"
    with open_store(root, "alice") as box:
        box.add(b"Subject: small\r\n\r\nhello\r\n")
        box.add(b"Subject: big\r\n\r\n" + b"x" * 1000 + b"\r\n" * 20_000)
    with open_store(root, "bob") as box:
        box.add(b"Subject: for bob\r\n\r\nhi bob\r\n")
    return tmp_path


async def start(nursery, mail_root, server_cert=None, **listen):
    tls = {}
    if server_cert is not None:
        tls = {"certfile": server_cert[0], "keyfile": server_cert[1]}
    throttle = listen.pop("throttle", {})
    settings = Settings(
        listen={"host": HOST, "port": 0, **tls, **listen},
        local={"users_file": mail_root / "users"},
        cache={"root": mail_root / "cache"},
        throttle={"base_delay": 0.01, "max_delay": 0.05, **throttle},
    )
    return await nursery.start(run_service, settings)


def client_context(server_cert, **versions) -> ssl.SSLContext:
    import warnings

    ctx = ssl.create_default_context(cafile=str(server_cert[2]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # legacy versions are the point here
        for name, value in versions.items():
            setattr(ctx, name, value)
    return ctx


async def test_plaintext_pipelined_after_stls_is_discarded(nursery, mail_root, server_cert):
    ports = await start(nursery, mail_root, server_cert)
    client = await Client.connect(ports.plain)
    # The classic STARTTLS injection: commands sent in plaintext right behind STLS.
    await client.send(b"STLS\r\nUSER alice\r\nPASS " + PASSWORD.encode() + b"\r\n")
    assert await client.line() == b"+OK begin TLS negotiation"
    assert client.buffer == b""
    tls = trio.SSLStream(client.stream, client_context(server_cert), server_hostname="localhost")
    await tls.do_handshake()
    secure = Client(tls)
    # Had the injected lines been obeyed, the first answer would be to USER/PASS.
    assert (await secure.command(b"CAPA")).startswith(b"+OK capability list")
    caps = await secure.multiline()
    assert b"STLS" not in caps and b"USER" in caps
    assert (await secure.command(b"STAT")).startswith(b"-ERR STAT is not allowed before login")
    await secure.aclose()


async def test_plaintext_auth_refused_until_tls_when_configured(nursery, mail_root, server_cert):
    ports = await start(nursery, mail_root, server_cert, allow_plaintext_auth="never")
    client = await Client.connect(ports.plain)
    assert (await client.command(b"CAPA")).startswith(b"+OK")
    caps = await client.multiline()
    assert b"STLS" in caps and b"USER" not in caps and not any(c.startswith(b"SASL") for c in caps)
    assert (await client.command(b"USER alice")).startswith(b"-ERR [AUTH] plaintext authentication disallowed")
    assert (await client.command(b"AUTH PLAIN AGFsaWNlAHg=")).startswith(b"-ERR [AUTH] plaintext")
    assert await client.command(b"STLS") == b"+OK begin TLS negotiation"
    tls = trio.SSLStream(client.stream, client_context(server_cert), server_hostname="localhost")
    secure = Client(tls)
    assert (await secure.login()).startswith(b"+OK")
    await secure.aclose()


async def test_failed_logins_are_throttled_per_pair_without_collateral_damage(nursery, mail_root):
    ports = await start(nursery, mail_root, throttle={"max_failures": 3, "address_failures": 5})
    client = await Client.connect(ports.plain)
    for _ in range(3):
        assert (await client.login(password=b"wrong")).startswith(b"-ERR [AUTH]")
    # Now even the right password is refused for this pair, without checking it.
    assert (await client.login()).startswith(b"-ERR [LOGIN-DELAY]")
    # Another user behind the same address (a household, an office behind NAT) is not locked out ...
    assert (await client.login(b"bob")).startswith(b"+OK")
    await client.aclose()
    # ... nor is the same user from another address: strangers cannot lock the real user out.
    other = await Client.connect(ports.plain, local="127.0.0.2")
    assert (await other.login()).startswith(b"+OK")
    await other.aclose()
    # An address that fails across users reaches the higher address threshold: every login refused.
    client = await Client.connect(ports.plain)
    for _ in range(2):
        assert (await client.login(b"bob", b"wrong")).startswith(b"-ERR [AUTH]")
    assert (await client.login(b"bob")).startswith(b"-ERR [LOGIN-DELAY]")
    await client.aclose()


async def test_concurrent_guesses_count_while_in_flight_and_name_variants_are_one_account(nursery, mail_root):
    ports = await start(nursery, mail_root, throttle={"max_failures": 5, "address_failures": 100})

    async def guess(name: bytes, results: list[bytes]) -> None:
        client = await Client.connect(ports.plain)
        results.append(await client.login(name, b"wrong"))
        await client.aclose()

    results: list[bytes] = []
    async with trio.open_nursery() as guesses:
        for i in range(20):  # name variants of one account, all at once
            guesses.start_soon(guess, b"alice" if i % 2 else b"ALICE", results)
    refused_by_password = [r for r in results if r.startswith(b"-ERR [AUTH]")]
    assert len(results) == 20 and len(refused_by_password) <= 5, results
    assert all(r.startswith((b"-ERR [AUTH]", b"-ERR [LOGIN-DELAY]")) for r in results)


async def test_failed_login_answers_are_delayed(nursery, mail_root):
    ports = await start(nursery, mail_root, throttle={"max_failures": 10, "base_delay": 0.2, "max_delay": 1})
    client = await Client.connect(ports.plain)
    started = trio.current_time()
    await client.login(password=b"wrong")
    await client.login(password=b"wrong")
    assert trio.current_time() - started >= 0.2 + 0.4
    await client.aclose()


async def test_sessions_per_address_are_capped(nursery, mail_root):
    ports = await start(nursery, mail_root, max_sessions_per_address=2)
    first, second = await Client.connect(ports.plain), await Client.connect(ports.plain)
    third = await trio.open_tcp_stream(HOST, ports.plain)
    assert (await Client(third).line()).startswith(b"-ERR [SYS/TEMP] too many sessions from your address")
    await third.aclose()
    other = await Client.connect(ports.plain, local="127.0.0.3")
    await other.aclose()
    await first.aclose()
    # The server frees the first slot when it sees the close; until then a new session is refused.
    fourth = await connect_when_admitted(ports.plain)
    await fourth.aclose()
    await second.aclose()


async def test_total_sessions_are_capped(nursery, mail_root):
    ports = await start(nursery, mail_root, max_sessions=1)
    first = await Client.connect(ports.plain)
    extra = await trio.open_tcp_stream(HOST, ports.plain, local_address="127.0.0.4")
    assert (await Client(extra).line()).startswith(b"-ERR [SYS/TEMP] too many sessions")
    await extra.aclose()
    await first.aclose()


async def test_bad_commands_close_the_session(nursery, mail_root):
    ports = await start(nursery, mail_root, max_bad_commands=3)
    client = await Client.connect(ports.plain)
    await client.send(b"JUNK\r\n" * 10)
    rest = await client.closed()
    assert rest.count(b"-ERR unknown command") == 3
    assert rest.endswith(b"-ERR too many errors, closing connection\r\n")


async def test_idle_client_is_disconnected(nursery, mail_root):
    ports = await start(nursery, mail_root, idle_timeout=0.3)
    client = await Client.connect(ports.plain)
    assert (await client.closed(timeout=5)).startswith(b"-ERR idle timeout")


async def test_tls_handshake_timeout(nursery, mail_root, server_cert):
    ports = await start(nursery, mail_root, server_cert, tls_port=0, tls_handshake_timeout=0.3)
    stream = await trio.open_tcp_stream(HOST, ports.tls)
    with trio.fail_after(5):
        assert await stream.receive_some(100) == b""
    await stream.aclose()


async def test_slow_reader_does_not_block_others(nursery, mail_root):
    ports = await start(nursery, mail_root, idle_timeout=1)
    slow = await Client.connect(ports.plain)
    assert (await slow.login()).startswith(b"+OK")
    await slow.send(b"RETR 2\r\n" * 20)  # and never read: the socket buffers fill up
    assert (await slow.line()).startswith(b"+OK")  # the server is sending: it will block on this session
    quick = await Client.connect(ports.plain)
    with trio.fail_after(3):
        assert (await quick.login(b"bob")).startswith(b"+OK")
        assert await quick.command(b"RETR 1") == b"+OK 28 octets"
        assert (await quick.multiline())[-1] == b"hi bob"
    await quick.aclose()
    # The stuck session is dropped after the idle timeout (1 s), releasing alice's mailbox: a login,
    # refused while the mailbox is in use, succeeds within a bound of 10 s.
    async def logged_in() -> Client | None:
        again = await Client.connect(ports.plain)
        reply = await again.login()
        if reply.startswith(b"+OK"):
            return again
        assert b"IN-USE" in reply, reply
        await again.aclose()
        return None

    again = await eventually_async(logged_in, timeout=10, message="alice's login once the stuck session is dropped")
    await again.aclose()
    await slow.aclose()


async def test_legacy_tls_versions_only_when_allowed(nursery, mail_root, server_cert):
    old = {"minimum_version": ssl.TLSVersion.TLSv1, "maximum_version": ssl.TLSVersion.TLSv1_1}

    async def handshake(port: int) -> str:
        ctx = client_context(server_cert, **old)
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        stream = trio.SSLStream(await trio.open_tcp_stream(HOST, port), ctx, server_hostname="localhost")
        try:
            await stream.do_handshake()
            return "ok"
        except (trio.BrokenResourceError, ssl.SSLError):
            return "refused"
        finally:
            await trio.aclose_forcefully(stream)

    default = await start(nursery, mail_root, server_cert, tls_port=0)
    assert await handshake(default.tls) == "refused"
    legacy = await start(nursery, mail_root, server_cert, tls_port=0, tls_min_version="1.0")
    try:
        assert await handshake(legacy.tls) == "ok"
    except AssertionError:
        # The client side of this machine's OpenSSL may refuse TLS 1.0/1.1 itself: then show it.
        ctx = client_context(server_cert, **old)
        pytest.fail(f"legacy handshake refused; client OpenSSL: {ssl.OPENSSL_VERSION}, ctx {ctx.minimum_version}")


@pytest.mark.parametrize(
    "payload",
    [
        b"\x00\x00\x00\r\n",
        b"USER \x00alice\r\n",
        bytes(range(128, 256)) + b"\r\n",
        b"NOOP\rNOOP\r\n",
        b"CAPA\n",
        b"X" * 1_000_000 + b"\r\n",
        b"AUTH PLAIN ####\r\n",
        b"AUTH PLAIN\r\n" + b"A" * 20_000 + b"\r\n",
        b"USER ../../etc/passwd\r\nPASS x\r\n",
        b"USER %00\r\nPASS x\r\n",
        b"USER " + b"n" * 10_000 + b"\r\nPASS x\r\n",
        b"PASS\r\n",
        b"\r\n\r\n\r\n",
        b"STLS\r\n",
        b"APOP alice 0123456789abcdef0123456789abcdef\r\n",
    ],
)
async def test_hostile_input_before_login(nursery, mail_root, payload):
    ports = await start(nursery, mail_root)
    client = await Client.connect(ports.plain)
    await client.send(payload)
    await client.send(b"XMARK\r\n")
    lines = []
    while (line := await client.line()) != b"-ERR unknown command XMARK":
        lines.append(line)
        if line.endswith(b"follows"):
            await client.multiline()
    assert all(line.startswith((b"+OK", b"-ERR", b"+ ")) for line in lines), lines
    assert (await client.command(b"CAPA")).startswith(b"+OK")
    assert b"UIDL" in await client.multiline()
    assert (await client.login()).startswith(b"+OK")
    await client.aclose()
    # No user name ever became a path outside the cache root.
    assert sorted(os.listdir(mail_root)) == ["cache", "users"]


@pytest.mark.parametrize(
    "command, reply",
    [
        (b"RETR 0", b"-ERR no such message"),
        (b"RETR -1", b"-ERR invalid message number"),
        (b"RETR 99999999999999999999999", b"-ERR invalid message number"),
        (b"TOP 1 -1", b"-ERR invalid line count"),
        (b"TOP 1 99999999999999999999", b"-ERR invalid line count"),
        (b"LIST 3", b"-ERR no such message"),
        (b"DELE 1 2", b"-ERR wrong number of arguments"),
        (b"UIDL \xff", b"-ERR"),
        (b"NOOP extra", b"-ERR NOOP takes no arguments"),
    ],
)
async def test_hostile_input_after_login(nursery, mail_root, command, reply):
    ports = await start(nursery, mail_root)
    client = await Client.connect(ports.plain)
    assert (await client.login()).startswith(b"+OK")
    assert (await client.command(command)).startswith(reply)
    assert await client.command(b"NOOP") == b"+OK"
    await client.aclose()


async def test_command_split_byte_by_byte(nursery, mail_root):
    ports = await start(nursery, mail_root)
    client = await Client.connect(ports.plain)
    for byte in b"USER alice\r\nPASS " + PASSWORD.encode() + b"\r\nSTAT\r\n":
        await client.send(bytes([byte]))
    assert (await client.line()).startswith(b"+OK")
    assert (await client.line()).startswith(b"+OK alice has 2 messages")
    assert (await client.line()).startswith(b"+OK 2 ")
    await client.aclose()


def test_sighup_reloads_certificate_without_dropping_sessions(tmp_path, mail_root, server_process):
    """A real serve process: new TLS connections get the new certificate, old sessions go on."""
    ca = trustme.CA()
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"

    def issue(name: str) -> None:
        cert = ca.issue_cert("localhost", "127.0.0.1", organization_unit_name=name)
        cert.private_key_and_cert_chain_pem.write_to_path(str(certfile))
        cert.private_key_pem.write_to_path(str(keyfile))

    issue("first")
    config = write_config(
        tmp_path / "c.toml",
        {
            "listen": {"host": HOST, "port": 0, "tls_port": 0, "certfile": certfile, "keyfile": keyfile},
            "local": {"users_file": mail_root / "users"},
            "cache": {"root": mail_root / "cache"},
        },
    )
    server = server_process(config).start(tls=True)
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)

    import poplib

    def unit_of_peer_cert(client: poplib.POP3_SSL) -> str:
        der = client.sock.getpeercert(binary_form=False)
        return dict(x[0] for x in der["subject"])["organizationalUnitName"]

    old = poplib.POP3_SSL(HOST, server.tls_port, context=ctx, timeout=10)
    assert unit_of_peer_cert(old) == "first"
    old.user("alice")
    old.pass_(PASSWORD)
    issue("second")
    server.proc.send_signal(signal.SIGHUP)
    wait_for(server, "certificate reloaded", timeout=10)
    new = poplib.POP3_SSL(HOST, server.tls_port, context=ctx, timeout=10)
    assert unit_of_peer_cert(new) == "second"
    new.quit()
    # The session opened before the reload still works.
    assert old.stat()[0] == 2
    old.quit()
