"""The ClamAV filter against a real clamd (tests/helpers/daemons.py) with a one-signature database: EICAR.

Failure cases a real clamd cannot produce on demand (a peer that accepts and then says nothing, a
peer that is not there) use a silent loopback listener and a port nobody listens on.
"""

from __future__ import annotations

import base64
import socket
import time
from typing import Iterator

import pytest
from helpers.daemons import EICAR, Clamd, clamd, find_binary  # noqa: F401  (fixture)
from hypothesis import given, settings
from hypothesis import strategies as st

from pop3proxy.filtering.api import FilterConfigError, FilterContext
from pop3proxy.filtering.loader import load_filter
from pop3proxy.filtering.pipeline import build_pipeline
from pop3proxy.filters.clamav import ClamAVFilter, ClamdClient, ClamdError, parse_reply

CLEAN = (
    b"From: Anna Berg <anna.berg@example.org>\r\nTo: ben@example.net\r\nSubject: the report\r\n"
    b"Date: Mon, 3 Jun 2024 09:11:58 +0000\r\nMessage-ID: <r.1@example.org>\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n--b1\r\nContent-Type: text/plain\r\n\r\n"
    b"The report is attached.\r\n--b1\r\nContent-Type: application/pdf; name=\"report.pdf\"\r\n"
    b"Content-Disposition: attachment; filename=\"report.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    + base64.encodebytes(b"%PDF-1.4\n% nothing to see\n" * 20).replace(b"\n", b"\r\n")
    + b"--b1--\r\n"
)


def infected(padding: int = 0) -> bytes:
    """A message with the EICAR test file as a base64 attachment, after ``padding`` octets of text."""
    return (
        b"From: Mallory <m@example.com>\r\nTo: ben@example.net\r\nSubject: invoice\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: multipart/mixed; boundary=\"b2\"\r\n\r\n--b2\r\nContent-Type: text/plain\r\n\r\n"
        + b"Please see the attached invoice.\r\n" * (padding // 34 + 1)
        + b"--b2\r\nContent-Type: application/octet-stream; name=\"invoice.com\"\r\n"
        b"Content-Disposition: attachment; filename=\"invoice.com\"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(EICAR).replace(b"\n", b"\r\n")
        + b"--b2--\r\n"
    )


def context() -> FilterContext:
    return FilterContext(user="alice", uid="uid-1")


def make(**options) -> ClamAVFilter:
    flt, _ = load_filter({"use": "clamav", **options})
    assert isinstance(flt, ClamAVFilter)
    return flt


@pytest.fixture
def silent_listener() -> Iterator[str]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield f"127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def closed_port() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"127.0.0.1:{port}"


def test_eicar_attachment_is_quarantined(clamd: Clamd) -> None:
    message = infected()
    outcome = make(address=clamd.address)(message, context())
    assert outcome.action == "quarantine"
    assert outcome.verdict == f"infected: {clamd.signature}"
    assert outcome.data == f"X-Virus-Status: Infected ({clamd.signature})\r\n".encode() + message


def test_tag_mode_delivers_with_the_header(clamd: Clamd) -> None:
    message = infected()
    outcome = make(address=clamd.socket_path, action="tag")(message, context())
    assert outcome.action == "deliver"
    assert outcome.data == f"X-Virus-Status: Infected ({clamd.signature})\r\n".encode() + message


@pytest.mark.parametrize("where", ["tcp", "unix"])
def test_clean_message_passes(clamd: Clamd, where: str) -> None:
    address = clamd.address if where == "tcp" else clamd.socket_path
    outcome = make(address=address)(CLEAN, context())
    assert outcome.action == "deliver" and outcome.verdict == "clean"
    assert outcome.data == b"X-Virus-Status: Clean\r\n" + CLEAN


def test_eicar_after_many_chunks(clamd: Clamd) -> None:
    # The attachment starts past several 64 KiB chunks, and the raw string straddles a chunk boundary.
    client = ClamdClient(clamd.address)
    assert client.scan(infected(padding=300_000)) == clamd.signature
    raw = b"x" * (65536 - 20) + EICAR + b"y" * 100
    assert client.scan(raw) == clamd.signature
    assert client.scan(raw.replace(EICAR, EICAR.lower())) is None


def test_ping_and_version(clamd: Clamd) -> None:
    client = ClamdClient(clamd.socket_path)
    assert client.command("PING") == "PONG"
    assert client.command("VERSION").startswith("ClamAV ")


def test_clamd_size_limit_is_an_error(clamd: Clamd) -> None:
    big = CLEAN + b"z" * (clamd.stream_max_length + 100_000)
    flt = make(address=clamd.address, max_size=4 * clamd.stream_max_length)
    with pytest.raises(ClamdError, match="StreamMaxLength"):
        flt(big, context())


def test_max_size_is_checked_before_sending(closed_port: str) -> None:
    big = CLEAN + b"z" * 5000
    with pytest.raises(ClamdError, match=r"not scanned: \d+ octets > max_size 1000"):
        make(address=closed_port, max_size=1000)(big, context())
    outcome = make(address=closed_port, max_size=1000, oversize="skip")(big, context())
    assert outcome.action == "deliver" and outcome.verdict.startswith("not scanned")
    assert outcome.data == b"X-Virus-Status: Unscanned\r\n" + big


def test_clamd_down_raises(closed_port: str, tmp_path) -> None:
    with pytest.raises(ClamdError, match="cannot connect to clamd"):
        make(address=closed_port)(CLEAN, context())
    with pytest.raises(ClamdError, match="cannot connect to clamd"):
        make(address=str(tmp_path / "clamd.ctl"))(CLEAN, context())


def test_silent_clamd_times_out(silent_listener: str) -> None:
    started = time.monotonic()
    with pytest.raises(ClamdError, match="did not answer within 0.5 s"):
        make(address=silent_listener, io_timeout=0.5)(CLEAN, context())
    assert time.monotonic() - started < 5


async def test_down_through_pipeline(closed_port: str) -> None:
    holding = build_pipeline([{"use": "clamav", "address": closed_port, "on_error": "hold"}])
    held = await holding.run(CLEAN, context())
    assert held.action == "hold" and held.errors and "ClamdError" in held.errors[0]
    passing = build_pipeline([{"use": "clamav", "address": closed_port}])
    passed = await passing.run(CLEAN, context())
    assert passed.action == "deliver" and passed.data.endswith(CLEAN)
    assert passed.data.startswith(b"X-POP3Proxy-Warning: filter clamav failed: ClamdError")
    assert b"X-Virus-Status" not in passed.data


async def test_quarantine_through_pipeline(clamd: Clamd) -> None:
    pipeline = build_pipeline([{"use": "clamav", "address": clamd.socket_path}])
    result = await pipeline.run(infected(), context())
    assert result.hold and result.action == "quarantine"
    assert result.verdicts == [f"clamav: infected: {clamd.signature}"]
    clean = await pipeline.run(CLEAN, context())
    assert clean.action == "deliver" and clean.verdicts == ["clamav: clean"]


def test_reply_parser() -> None:
    assert parse_reply(b"stream: OK\0") is None
    assert parse_reply(b"stream: Win.Test.EICAR_HDB-1 FOUND\0") == "Win.Test.EICAR_HDB-1"
    assert parse_reply(b"1: stream: Eicar-Signature FOUND\0") == "Eicar-Signature"
    with pytest.raises(ClamdError, match="StreamMaxLength"):
        parse_reply(b"INSTREAM size limit exceeded. ERROR\0")
    with pytest.raises(ClamdError, match="could not scan"):
        parse_reply(b"Can't allocate memory ERROR\0")
    with pytest.raises(ClamdError):
        parse_reply(b"stream: \0")


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=120))
def test_reply_parser_never_calls_garbage_clean(reply: bytes) -> None:
    try:
        result = parse_reply(reply)
    except ClamdError:
        return
    text = reply.rstrip(b"\0\r\n")
    if result is None:
        assert text.endswith(b"stream: OK")
    else:
        assert text.endswith(b" FOUND") and result


@pytest.mark.parametrize(
    "table",
    [
        {"use": "clamav", "address": "localhost"},
        {"use": "clamav", "action": "delete"},
        {"use": "clamav", "oversize": "ignore"},
        {"use": "clamav", "max_size": 0},
        {"use": "clamav", "scan_archives": True},
    ],
)
def test_bad_options_fail_at_load(table: dict) -> None:
    with pytest.raises(FilterConfigError, match=r"filters\[0\] \(clamav\)"):
        load_filter(table)


def test_defaults() -> None:
    flt = make()
    assert flt.config.action == "quarantine" and flt.config.oversize == "error"
    assert flt.config.address == "/run/clamav/clamd.ctl" and flt.config.max_size == 25 * 1024 * 1024


def test_missing_daemon_fails_naming_the_package() -> None:
    expected = r"^clamd-nonexistent is not installed: apt-get install clamav-daemon \(see .ci/install-filters.sh\)"
    with pytest.raises(pytest.fail.Exception, match=expected):
        find_binary("clamd-nonexistent", "clamav-daemon")
