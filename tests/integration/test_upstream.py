"""The upstream POP3 client against the real Dovecot: connecting, logging in, reading, deleting,
refusals, APOP, endpoints, pipelined RETR. Faults, from a scripted fake server, are tested in
test_upstream_faults.py.
"""

from __future__ import annotations

import hashlib
import time

import pytest
from helpers.dovecot import free_port
from helpers.faulty_upstream import faulty_server
from helpers.upstream import DOTTED, HOST, assert_secret_hidden, at_dovecot, at_fake, headers_of, message, real

from pop3proxy.config import UpstreamSettings
from pop3proxy.net.endpoint import (
    Endpoint,
    UpstreamAuthError,
    UpstreamCommandError,
    UpstreamTLSError,
    UpstreamUnavailable,
)
from pop3proxy.net.pop3_client import connect


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
