"""The upstream POP3 client, against the real Dovecot and, for faults, a scripted fake server."""

from __future__ import annotations

import base64
import hashlib
import time
import traceback

import pytest
import trio
from helpers.dovecot import free_port
from helpers.faulty_upstream import GREETING, faulty_server

from pop3proxy.config import UpstreamSettings
from pop3proxy.net.endpoint import (
    Endpoint,
    UpstreamAuthError,
    UpstreamCommandError,
    UpstreamError,
    UpstreamTLSError,
    UpstreamUnavailable,
)
from pop3proxy.net.pop3_client import connect

real = pytest.mark.dovecot
HOST = "127.0.0.1"


def message(subject: str, *body_lines: str) -> bytes:
    lines = [
        "From: Sender <sender@example.org>",
        "To: Receiver <receiver@example.org>",
        f"Subject: {subject}",
        f"Message-ID: <{subject.replace(' ', '.')}@example.org>",
        "",
        *body_lines,
    ]
    return "".join(line + "\r\n" for line in lines).encode()


DOTTED = message(
    "dots",
    ".a line that starts with a dot",
    "..two dots",
    ".",
    "a lone dot above, and a line ending in a dot.",
    "",
    "  trailing spaces  ",
    "\tand a tab",
)


def headers_of(data: bytes) -> bytes:
    return data[: data.index(b"\r\n\r\n") + 2]


def at_dovecot(server, tls: str, **options) -> Endpoint:
    port = server.tls_port if tls == "implicit" else server.port
    options.setdefault("ca_file", str(server.ca_file))
    options.setdefault("timeout", 10.0)
    return Endpoint(server.host, port, tls, **options)


def at_fake(server, tls: str = "none", **options) -> Endpoint:
    options.setdefault("timeout", 0.5)
    return Endpoint(HOST, server.port, tls, **options)


def assert_secret_hidden(error: BaseException, *secrets: str) -> None:
    shown = [str(error), repr(error), "".join(traceback.format_exception(error)), repr(error.args)]
    for secret in secrets:
        for text in shown:
            assert secret not in text, text


# --- Dovecot: connecting, logging in, reading --------------------------------------


@real
@pytest.mark.parametrize("method", ["plain", "user"])
@pytest.mark.parametrize("tls", ["implicit", "starttls", "none"])
async def test_login_and_read_byte_exact(dovecot, tls, method):
    first = message("first", "hello")
    dovecot.deliver(dovecot.user, first)
    dovecot.deliver(dovecot.user, DOTTED)

    async with await connect(at_dovecot(dovecot, tls, auth=(method,))) as client:
        assert client.greeting.startswith("Dovecot")
        assert client.capabilities is not None and "UIDL" in client.capabilities
        assert "STLS" in client.capabilities or tls != "none"
        assert await client.login(dovecot.user, dovecot.password) == method
        assert client.auth_method == method
        assert await client.stat() == (2, len(first) + len(DOTTED))
        assert await client.list() == {1: len(first), 2: len(DOTTED)}
        uids = await client.uidl()
        assert uids is not None and sorted(uids) == [1, 2] and uids[1] != uids[2]
        assert await client.retr_bytes(2) == DOTTED
        assert await client.retr_bytes(1) == first
        await client.noop()
        await client.quit()
    assert dovecot.messages(dovecot.user) == [first, DOTTED]


@real
async def test_default_methods_use_sasl_plain_when_offered(dovecot):
    async with await connect(at_dovecot(dovecot, "implicit")) as client:
        assert "PLAIN" in client.capabilities["SASL"]
        assert await client.login(dovecot.user, dovecot.password) == "plain"


@real
async def test_starttls_capabilities_are_read_again_over_tls(dovecot):
    async with await connect(at_dovecot(dovecot, "starttls")) as client:
        assert client.tls_version in ("TLSv1.2", "TLSv1.3")
        # Dovecot lists STLS only before TLS is on.
        assert "STLS" not in client.capabilities
        assert "USER" in client.capabilities


@real
async def test_tls_1_3_minimum(dovecot):
    async with await connect(at_dovecot(dovecot, "implicit", tls_min_version="1.3")) as client:
        assert client.tls_version == "TLSv1.3"
        await client.login(dovecot.user, dovecot.password)
    async with await connect(at_dovecot(dovecot, "none")) as client:
        assert client.tls_version is None


@real
async def test_five_megabyte_message_streams_in_large_chunks(dovecot):
    line = b"0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz012\r\n"
    body = (line * 100 + b"." + line + b"..\r\n") * 660
    big = message("big") + body
    assert len(big) > 5_000_000
    dovecot.deliver(dovecot.user, big)

    chunks: list[bytes] = []

    async def sink(chunk: bytes) -> None:  # an async sink is awaited
        chunks.append(chunk)

    async with await connect(at_dovecot(dovecot, "implicit")) as client:
        await client.login(dovecot.user, dovecot.password)
        started = time.perf_counter()
        size = await client.retr(1, sink)
        elapsed = time.perf_counter() - started
    assert size == len(big)
    assert b"".join(chunks) == big
    assert all(len(chunk) >= 64 * 1024 for chunk in chunks[:-1])
    assert elapsed < 5, f"5 MB took {elapsed:.2f} s"


@real
async def test_top_and_header_digest(dovecot):
    dovecot.deliver(dovecot.user, DOTTED)
    digests = []
    for _ in range(2):
        async with await connect(at_dovecot(dovecot, "none")) as client:
            await client.login(dovecot.user, dovecot.password)
            assert await client.top(1, 0) == headers_of(DOTTED) + b"\r\n"
            assert await client.top(1, 2) == headers_of(DOTTED) + b"\r\n.a line that starts with a dot\r\n..two dots\r\n"
            digests.append(await client.header_digest(1))
    assert digests[0] == digests[1] == "hd-" + hashlib.sha256(headers_of(DOTTED)).hexdigest()


@real
async def test_retr_of_a_missing_message_is_a_command_error(dovecot):
    dovecot.deliver(dovecot.user, message("only"))
    async with await connect(at_dovecot(dovecot, "none")) as client:
        await client.login(dovecot.user, dovecot.password)
        with pytest.raises(UpstreamCommandError) as caught:
            await client.retr_bytes(7)
        assert caught.value.command == "RETR"
        with pytest.raises(UpstreamCommandError):
            await client.dele(7)
        # The session goes on.
        assert await client.stat() == (1, len(message("only")))


# --- Dovecot: deleting ---------------------------------------------------------------


@real
async def test_dele_then_quit_removes_the_message(dovecot):
    drop, keep = message("drop", "d"), message("keep", "k")
    dovecot.deliver(dovecot.user, drop)
    dovecot.deliver(dovecot.user, keep)
    async with await connect(at_dovecot(dovecot, "implicit")) as client:
        await client.login(dovecot.user, dovecot.password)
        await client.dele(1)
        await client.quit()
    assert dovecot.messages(dovecot.user) == [keep]


@real
@pytest.mark.parametrize("how", ["aclose", "leave the block"])
async def test_dele_without_quit_removes_nothing(dovecot, how):
    first, second = message("one"), message("two")
    dovecot.deliver(dovecot.user, first)
    dovecot.deliver(dovecot.user, second)
    async with await connect(at_dovecot(dovecot, "implicit")) as client:
        await client.login(dovecot.user, dovecot.password)
        await client.dele(1)
        await client.dele(2)
        if how == "aclose":
            await client.aclose()
            with pytest.raises(UpstreamUnavailable):
                await client.noop()
    # A new session sees both (Dovecot lets it in once the old one is gone).
    async with await connect(at_dovecot(dovecot, "implicit")) as client:
        await client.login(dovecot.user, dovecot.password)
        assert await client.stat() == (2, len(first) + len(second))
        await client.quit()
    assert dovecot.messages(dovecot.user) == [first, second]


# --- Dovecot: refusals ---------------------------------------------------------------


@real
@pytest.mark.parametrize("method", ["plain", "user"])
async def test_wrong_password_is_an_auth_error(dovecot, method):
    wrong = dovecot.password + "-wrong"
    async with await connect(at_dovecot(dovecot, "implicit", auth=(method,))) as client:
        with pytest.raises(UpstreamAuthError) as caught:
            await client.login(dovecot.user, wrong)
    assert caught.value.code == "AUTH"
    assert_secret_hidden(caught.value, wrong)


async def test_apop_without_a_greeting_timestamp_is_not_tried():
    # A server whose greeting has no timestamp (the scripted server: Dovecot here offers APOP).
    async with faulty_server(messages={"u1": b"Subject: x\r\n\r\nhi\r\n"}) as server:
        async with await connect(at_fake(server, timeout=5, auth=("apop",))) as client:
            assert client.apop_timestamp is None
            with pytest.raises(UpstreamAuthError) as caught:
                await client.login("alice", "secret")
    assert caught.value.code == "SYS/PERM"
    assert "none of the login methods" in str(caught.value)


@real
@pytest.mark.parametrize("tls", ["implicit", "starttls"])
async def test_untrusted_certificate_is_a_verification_failure(dovecot, tls):
    # No ca_file: the system trust store, which knows nothing of the test CA.
    with pytest.raises(UpstreamTLSError) as caught:
        await connect(at_dovecot(dovecot, tls, ca_file=""))
    assert caught.value.tls_verify_failed
    assert "certificate verification failed" in str(caught.value)


@real
async def test_wrong_server_name_is_a_verification_failure(dovecot):
    with pytest.raises(UpstreamTLSError) as caught:
        await connect(at_dovecot(dovecot, "implicit", server_hostname="wrong.example"))
    assert caught.value.tls_verify_failed
    assert "wrong.example" in caught.value.reason


@real
async def test_server_hostname_is_what_gets_verified(dovecot):
    # The certificate names localhost and 127.0.0.1; connecting by address, verifying the name.
    async with await connect(at_dovecot(dovecot, "implicit", server_hostname="localhost")) as client:
        await client.login(dovecot.user, dovecot.password)


@real
async def test_implicit_tls_to_a_plain_port_fails_without_fallback(dovecot):
    # The plain port greets in clear text where a TLS handshake is expected.
    endpoint = Endpoint(dovecot.host, dovecot.port, "implicit", ca_file=str(dovecot.ca_file), timeout=5)
    with pytest.raises(UpstreamUnavailable) as caught:
        await connect(endpoint)
    assert not caught.value.tls_verify_failed
    assert "TLS" in caught.value.reason


async def test_connection_refused():
    with pytest.raises(UpstreamUnavailable) as caught:
        await connect(Endpoint(HOST, free_port(), "none", timeout=2))
    assert not isinstance(caught.value, UpstreamTLSError)
    assert "refused" in caught.value.reason.lower()
    assert caught.value.code == "SYS/TEMP"


async def test_unknown_host():
    with pytest.raises(UpstreamUnavailable):
        await connect(Endpoint("no-such-host.invalid", 110, "none", timeout=5))


# --- APOP (the test Dovecot offers it) -----------------------------------------------


@real
async def test_apop_login_at_dovecot(dovecot):
    user, password = dovecot.user, dovecot.password
    data = message("apop", "hi")
    dovecot.deliver(user, data)
    async with await connect(at_dovecot(dovecot, "none", auth=("apop",))) as client:
        assert client.apop_timestamp is not None
        assert await client.login(user, password) == "apop"
        assert await client.retr_bytes(1) == data
        await client.quit()

    async with await connect(at_dovecot(dovecot, "none", auth=("apop",))) as client:
        with pytest.raises(UpstreamAuthError) as caught:
            await client.login(user, password + "x")
    assert caught.value.code == "AUTH"


# --- faults: TLS ---------------------------------------------------------------------


async def test_starttls_is_refused_when_not_offered():
    async with faulty_server() as server:
        with pytest.raises(UpstreamTLSError) as caught:
            await connect(at_fake(server, "starttls"))
    assert not caught.value.tls_verify_failed
    assert "does not offer STLS" in str(caught.value)
    assert caught.value.code == "SYS/PERM"
    assert server.commands == ["CAPA"]  # nothing else, least of all a password


async def test_starttls_is_refused_when_capa_is_unknown():
    async with faulty_server(capa=False) as server:
        with pytest.raises(UpstreamTLSError):
            await connect(at_fake(server, "starttls"))
    assert server.commands == ["CAPA"]


async def test_starttls_refused_by_the_server():
    async with faulty_server(stls=True) as server:
        with pytest.raises(UpstreamTLSError) as caught:
            await connect(at_fake(server, "starttls"))
    assert "refused STLS" in str(caught.value)
    assert server.commands == ["CAPA", "STLS"]


@pytest.mark.parametrize("close_on_connect", [True, False])
async def test_implicit_tls_to_a_server_without_tls(close_on_connect):
    async with faulty_server(close_on_connect=close_on_connect) as server:
        with pytest.raises(UpstreamUnavailable) as caught:
            await connect(at_fake(server, "implicit"))
    assert not caught.value.tls_verify_failed


async def test_missing_ca_file():
    async with faulty_server() as server:
        with pytest.raises(UpstreamTLSError) as caught:
            await connect(at_fake(server, "implicit", ca_file="/nonexistent/ca.pem"))
    assert "CA file" in str(caught.value)
    assert not caught.value.tls_verify_failed


# --- faults: logging in --------------------------------------------------------------


async def test_without_capa_login_uses_user_pass():
    async with faulty_server(capa=False, messages={"a": message("a")}) as server:
        async with await connect(at_fake(server)) as client:
            assert client.capabilities is None
            assert await client.login("alice", "secret") == "user"
            assert await client.stat() == (1, len(message("a")))
    assert server.commands == ["CAPA", "USER", "PASS", "STAT"]


async def test_user_refused_before_the_password_falls_through_to_apop():
    async with faulty_server(capa=False, user_pass=False, apop=True) as server:
        async with await connect(at_fake(server)) as client:
            assert await client.login("alice", "secret") == "apop"
    assert server.commands == ["CAPA", "USER", "APOP"]


async def test_apop_login_at_the_fake():
    async with faulty_server(apop=True, user_pass=False) as server:
        async with await connect(at_fake(server)) as client:
            assert await client.login("alice", "secret") == "apop"


async def test_long_credentials_use_plain_without_initial_response():
    password = "p" * 300
    async with faulty_server(sasl_plain=True, password=password) as server:
        async with await connect(at_fake(server, auth=("plain",))) as client:
            assert await client.login("alice", password) == "plain"
    assert server.commands == ["CAPA", "AUTH"]


async def test_no_other_method_after_the_credentials_were_refused():
    async with faulty_server(sasl_plain=True, apop=True) as server:
        async with await connect(at_fake(server)) as client:
            with pytest.raises(UpstreamAuthError) as caught:
                await client.login("alice", "wrong")
    assert caught.value.code == "AUTH"
    assert server.commands == ["CAPA", "AUTH"]


async def test_no_offered_method():
    async with faulty_server(user_pass=False) as server:
        async with await connect(at_fake(server, auth=("user", "plain", "apop"))) as client:
            with pytest.raises(UpstreamAuthError) as caught:
                await client.login("alice", "secret")
    assert caught.value.code == "SYS/PERM"
    assert server.commands == ["CAPA"]


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("IN-USE", "IN-USE"),
        ("LOGIN-DELAY", "LOGIN-DELAY"),
        ("SYS/TEMP", "SYS/TEMP"),
        ("SYS/PERM", "SYS/PERM"),
        ("AUTH", "AUTH"),
        (None, "AUTH"),
        ("X-VENDOR", "AUTH"),
    ],
)
async def test_auth_response_codes_are_passed_on(given, expected):
    async with faulty_server(auth_error_code=given) as server:
        async with await connect(at_fake(server)) as client:
            with pytest.raises(UpstreamAuthError) as caught:
                await client.login("alice", "wrong")
    assert caught.value.code == expected


async def test_password_never_shows_in_errors():
    password = "Sup3r-S3cret pass"
    errors: list[BaseException] = []

    async def attempt(endpoint_options: dict, **behaviour) -> None:
        async with faulty_server(**behaviour) as server:
            async with await connect(at_fake(server, **endpoint_options)) as client:
                try:
                    await client.login("alice", password)
                except UpstreamError as exc:
                    errors.append(exc)
                else:
                    raise AssertionError("login should have failed")

    echo = "no such password: {password}"
    await attempt({"auth": ("user",)}, auth_error_text=echo)
    await attempt({"auth": ("plain",)}, sasl_plain=True, auth_error_text=echo)
    await attempt({"auth": ("plain",)}, sasl_plain=True, garbage_on="AUTH", garbage="-ERR you said {args}")
    await attempt({"auth": ("user",)}, garbage_on="PASS", garbage="* you said {args}")
    await attempt({"auth": ("plain",)}, sasl_plain=True, garbage_on="AUTH", garbage="* you said {args}")
    await attempt({"auth": ("user",)}, stall_on="PASS")
    async with faulty_server() as server:
        async with await connect(at_fake(server)) as client:
            try:
                await client.login("alice", password + "\r\nDELE 1")
            except UpstreamError as exc:
                errors.append(exc)
    assert [type(e) for e in errors] == [UpstreamAuthError] * 3 + [UpstreamUnavailable] * 3 + [UpstreamAuthError]
    plain = base64.b64encode(f"\0alice\0{password}".encode()).decode()
    for error in errors:
        assert_secret_hidden(error, password, plain)


# --- faults: reading -----------------------------------------------------------------


async def test_no_uidl_and_the_header_digest():
    messages = {"a": message("first", "x"), "b": message("second", "y")}
    digests = []
    async with faulty_server(uidl=False, messages=messages) as server:
        for _ in range(2):
            async with await connect(at_fake(server)) as client:
                await client.login("alice", "secret")
                assert await client.uidl() is None
                digests.append([await client.header_digest(1), await client.header_digest(2)])
                await client.noop()  # the -ERR to UIDL left the session usable
    assert digests[0] == digests[1]
    assert digests[0][0] != digests[0][1]
    assert digests[0][0] == "hd-" + hashlib.sha256(headers_of(messages["a"])).hexdigest()


async def test_dropped_mid_retr_is_unavailable_and_unusable():
    big = message("big") + b"x" * 75 + b"\r\n" * 1 + (b"y" * 76 + b"\r\n") * 4000
    received: list[bytes] = []
    async with faulty_server(drop_mid_retr=True, messages={"a": big}) as server:
        async with await connect(at_fake(server)) as client:
            await client.login("alice", "secret")
            with pytest.raises(UpstreamUnavailable) as caught:
                await client.retr(1, received.append)
            assert "closed" in caught.value.reason
            with pytest.raises(UpstreamUnavailable):
                await client.noop()
    assert len(b"".join(received)) < len(big)


@pytest.mark.parametrize("stall_on", [GREETING, "CAPA", "PASS", "RETR", "QUIT"])
async def test_stalled_server_times_out(stall_on):
    async with faulty_server(stall_on=stall_on, messages={"a": message("a")}) as server:
        started = trio.current_time()
        with pytest.raises(UpstreamUnavailable) as caught:
            async with await connect(at_fake(server, timeout=0.5)) as client:
                await client.login("alice", "secret")
                await client.retr_bytes(1)
                await client.quit()
        elapsed = trio.current_time() - started
    assert "timed out" in caught.value.reason
    assert elapsed < 2.0


async def test_cancelled_command_leaves_the_session_unusable():
    async with faulty_server(stall_on="RETR", messages={"a": message("a")}) as server:
        async with await connect(at_fake(server, timeout=5)) as client:
            await client.login("alice", "secret")
            with trio.move_on_after(0.1):
                await client.retr_bytes(1)
            with pytest.raises(UpstreamUnavailable):
                await client.noop()


async def test_sink_error_propagates_and_leaves_the_session_unusable():
    class DiskFull(Exception):
        pass

    def sink(chunk: bytes) -> None:
        raise DiskFull

    async with faulty_server(messages={"a": message("a")}) as server:
        async with await connect(at_fake(server)) as client:
            await client.login("alice", "secret")
            with pytest.raises(DiskFull):
                await client.retr(1, sink)
            with pytest.raises(UpstreamUnavailable):
                await client.noop()


@pytest.mark.parametrize("garbage_on", [GREETING, "CAPA", "STAT", "LIST", "RETR"])
async def test_garbage_is_unavailable(garbage_on):
    async with faulty_server(garbage_on=garbage_on, messages={"a": message("a")}) as server:
        with pytest.raises(UpstreamUnavailable) as caught:
            async with await connect(at_fake(server)) as client:
                await client.login("alice", "secret")
                await client.stat()
                await client.list()
                await client.retr_bytes(1)
    assert "invalid" in caught.value.reason


async def test_fake_mailbox_dele_and_quit():
    messages = {"a": message("a"), "b": message("b")}
    async with faulty_server(messages=messages) as server:
        async with await connect(at_fake(server)) as client:
            await client.login("alice", "secret")
            assert await client.uidl() == {1: "a", 2: "b"}
            await client.dele(1)
        assert list(server.messages) == ["a", "b"]
        async with await connect(at_fake(server)) as client:
            await client.login("alice", "secret")
            await client.dele(1)
            await client.quit()
        assert list(server.messages) == ["b"]


# --- endpoints -----------------------------------------------------------------------


def test_endpoint_from_settings():
    endpoint = Endpoint.from_settings(UpstreamSettings(host="pop.example.com", auth=["user"]))
    assert endpoint == Endpoint("pop.example.com", 995, "implicit", auth=("user",))
    endpoint = Endpoint.from_settings(UpstreamSettings(host="pop.example.com", tls="starttls", timeout=5))
    assert (endpoint.port, endpoint.tls, endpoint.timeout) == (110, "starttls", 5)
    assert endpoint.tls_name == "pop.example.com"
    with pytest.raises(ValueError):
        Endpoint.from_settings(UpstreamSettings())


@pytest.mark.parametrize(
    "options",
    [{"port": 0}, {"tls": "ssl"}, {"tls_min_version": "1.1"}, {"timeout": 0}, {"auth": ("cram-md5",)}, {"auth": ()}],
)
def test_endpoint_rejects_bad_values(options):
    values = {"host": "pop.example.com", "port": 995, "tls": "implicit", **options}
    with pytest.raises(ValueError):
        Endpoint(**values)


# --- pipelined RETR ---------------------------------------------------------------------


@real
@pytest.mark.parametrize("window", [1, 4, 16])
async def test_pipelined_retr_keeps_order_and_the_window(dovecot, window):
    data = [message(f"p{i}", "x" * (i * 500)) for i in range(20)]
    for m in data:
        dovecot.deliver(dovecot.user, m)
    async with await connect(at_dovecot(dovecot, "none")) as client:
        await client.login(dovecot.user, dovecot.password)
        assert client.pipelining  # Dovecot offers PIPELINING
        sent = 0
        send = client._conn.send

        def counting(*args, **kwargs):
            nonlocal sent
            sent += 1
            return send(*args, **kwargs)

        client._conn.send = counting
        got: dict[int, list[bytes]] = {}
        in_flight: list[int] = []

        def begin(number, index):
            in_flight.append(sent - index)
            got[number] = []
            return got[number].append

        async def end(number, error):
            assert error is None

        await client.retr_many(list(range(1, 21)), begin, end, window=window)
        await client.quit()
    assert [b"".join(got[n]) for n in range(1, 21)] == data
    assert max(in_flight) == window  # up to the window, never beyond


async def test_pipelined_retr_passes_a_refused_message_on_and_goes_on():
    messages = {f"u{i}": message(f"f{i}", "hi") for i in range(1, 4)}
    async with faulty_server(messages=messages, refuse_retr={"u2"}) as server:
        async with await connect(at_fake(server, timeout=5)) as client:
            await client.login("alice", "secret")
            got, errors = {}, {}

            def begin(number, index):
                got[number] = []
                return got[number].append

            async def end(number, error):
                if error is not None:
                    errors[number] = error

            await client.retr_many([1, 2, 3], begin, end)
    assert {n: b"".join(v) for n, v in got.items()} == {1: messages["u1"], 3: messages["u3"]}
    assert list(errors) == [2] and isinstance(errors[2], UpstreamCommandError)
