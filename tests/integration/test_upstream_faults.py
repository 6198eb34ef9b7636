"""The upstream POP3 client against a scripted fake server (`faulty_upstream`): faults in TLS, in
logging in and in reading.
"""

from __future__ import annotations

import base64
import hashlib

import pytest
import trio
from helpers.faulty_upstream import GREETING, faulty_server
from helpers.upstream import assert_secret_hidden, at_fake, headers_of, message

from pop3proxy.net.endpoint import UpstreamAuthError, UpstreamError, UpstreamTLSError, UpstreamUnavailable
from pop3proxy.net.pop3_client import connect


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


async def test_password_never_shows_in_errors(autojump_clock):
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
async def test_stalled_server_times_out(stall_on, autojump_clock):
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


async def test_cancelled_command_leaves_the_session_unusable(autojump_clock):
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
