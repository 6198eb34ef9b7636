"""The spam filter against a real spamd and a real rspamd (tests/helpers/daemons.py), plus its pure parts.

Failure cases a real daemon cannot produce on demand (a peer that accepts and then says nothing, a
peer that is not there) use a silent loopback listener and a port nobody listens on.
"""

from __future__ import annotations

import re
import secrets
import socket
import time
from typing import Iterator

import pytest
from helpers.daemons import GTUBE, Rspamd, Spamd, rspamd, spamd  # noqa: F401  (fixtures)
from helpers.waiting import wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pop3proxy.filtering.api import WARNING_HEADER, FilterConfigError, FilterContext
from pop3proxy.filtering.loader import load_filter
from pop3proxy.filtering.pipeline import Pipeline, build_pipeline
from pop3proxy.filters import spam as spam_module
from pop3proxy.filters._rspamd import RspamdError
from pop3proxy.filters._rspamd import parse_reply as parse_rspamd
from pop3proxy.filters._spamd import SpamdError, build_request
from pop3proxy.filters._spamd import parse_reply as parse_spamd
from pop3proxy.filters.spam import SpamFilter, prefix_subject, spam_headers

HAM = (
    b"Received: from mx.example.org (mx.example.org [192.0.2.10]) by mail.example.net; "
    b"Mon, 3 Jun 2024 09:12:00 +0000\r\n"
    b"From: Anna Berg <anna.berg@example.org>\r\n"
    b"To: Ben Costa <ben.costa@example.net>\r\n"
    b"Subject: Notes from the planning meeting\r\n"
    b"Date: Mon, 3 Jun 2024 09:11:58 +0000\r\n"
    b"Message-ID: <20240603091158.4711@example.org>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Hi Ben,\r\n\r\nthe notes from today's meeting are in the shared folder. We agreed to move the\r\n"
    b"release to Thursday and to review the migration script together tomorrow at ten.\r\n"
    b"\r\nBest,\r\nAnna\r\n"
)
SPAM = (
    b"From: Prize Office <claims@lotto-intl-claims.example>\r\n"
    b"To: ben.costa@example.net\r\n"
    b"Subject: test message\r\n"
    b"Date: Mon, 3 Jun 2024 09:11:58 +0000\r\n"
    b"Message-ID: <gtube.1@lotto-intl-claims.example>\r\n"
    b"\r\n"
    b"This is the GTUBE, the Generic Test for Unsolicited Bulk Email:\r\n\r\n" + GTUBE + b"\r\n"
)
OUR_HEADERS = ("X-Spam-Flag", "X-Spam-Score", "X-Spam-Level", "X-Spam-Status")


def context(user: str = "alice", uid: str = "uid-1") -> FilterContext:
    return FilterContext(user=user, uid=uid)


def make(**options) -> SpamFilter:
    flt, _ = load_filter({"use": "spam", **options})
    assert isinstance(flt, SpamFilter)
    return flt


def added_headers(tagged: bytes, original: bytes) -> dict[str, str]:
    """The headers the filter put on top (unfolded); every byte after them must be the original's."""
    assert tagged.endswith(original), "the original message must follow the added headers unchanged"
    head = tagged[: len(tagged) - len(original)].decode("ascii")
    assert head.endswith("\r\n") and not head.startswith((" ", "\t"))
    unfolded = re.sub(r"\r\n(?=[ \t])", "", head[:-2])
    fields = [line.split(":", 1) for line in unfolded.split("\r\n")]
    names = [name for name, _ in fields]
    assert set(names) <= set(OUR_HEADERS), names
    assert len(names) == len(set(names))
    return {name: value.strip() for name, value in fields}


def status_fields(status: str) -> dict[str, str]:
    verdict, _, rest = status.partition(", ")
    return {"verdict": verdict, **dict(item.split("=", 1) for item in rest.split())}


@pytest.fixture
def silent_listener() -> Iterator[str]:
    """A loopback TCP port that accepts connections (the kernel's backlog) and never answers."""
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


# -- spamd --------------------------------------------------------------------------------------


def test_spamd_tags_gtube_as_spam(spamd: Spamd) -> None:
    outcome = make(backend="spamd", address=spamd.address)(SPAM, context())
    headers = added_headers(outcome.data, SPAM)
    assert list(headers) == list(OUR_HEADERS)
    assert headers["X-Spam-Flag"] == "YES"
    status = status_fields(headers["X-Spam-Status"])
    assert status["verdict"] == "Yes"
    assert float(status["score"]) >= 1000 and status["required"] == "5.0"
    assert "GTUBE" in status["tests"].split(",")
    assert headers["X-Spam-Score"] == status["score"]
    assert headers["X-Spam-Level"] == "*" * 50
    assert outcome.action == "deliver"
    assert outcome.verdict.startswith("spam, score 10")


def test_spamd_passes_ham(spamd: Spamd) -> None:
    outcome = make(backend="spamd", address=spamd.address)(HAM, context())
    headers = added_headers(outcome.data, HAM)
    assert "X-Spam-Flag" not in headers
    status = status_fields(headers["X-Spam-Status"])
    assert status["verdict"] == "No"
    score = float(status["score"])
    assert score < 5.0
    assert headers["X-Spam-Level"] == "*" * max(0, int(score))
    assert "GTUBE" not in status["tests"]
    assert outcome.action == "deliver" and outcome.verdict.startswith("ham")


def test_spamd_our_thresholds_decide_per_user(spamd: Spamd) -> None:
    flt = make(backend="spamd", address=spamd.address, per_user={"lenient": 5000.0, "strict": -100.0})
    lenient = added_headers(flt(SPAM, context("lenient")).data, SPAM)
    assert "X-Spam-Flag" not in lenient
    assert status_fields(lenient["X-Spam-Status"])["verdict"] == "No"
    assert status_fields(lenient["X-Spam-Status"])["required"] == "5000.0"
    strict = added_headers(flt(HAM, context("strict")).data, HAM)
    assert strict["X-Spam-Flag"] == "YES"
    assert status_fields(strict["X-Spam-Status"])["required"] == "-100.0"
    # Everyone else gets required_score, whatever spamd's own threshold is.
    other = added_headers(flt(HAM, context("someone")).data, HAM)
    assert "X-Spam-Flag" not in other
    raised = make(backend="spamd", address=spamd.address, required_score=2000.0)
    assert "X-Spam-Flag" not in added_headers(raised(SPAM, context()).data, SPAM)


def test_spamd_is_told_the_user(spamd: Spamd) -> None:
    user = f"carol{secrets.token_hex(3)}"
    make(backend="spamd", address=spamd.address)(HAM, context(user))
    log = wait_for(spamd, f"user={user},").string
    assert re.search(rf"checking message .* for {user}:", log)


def test_spamd_over_unix_socket(spamd: Spamd) -> None:
    outcome = make(backend="spamd", address=spamd.socket_path)(SPAM, context())
    assert added_headers(outcome.data, SPAM)["X-Spam-Flag"] == "YES"
    outcome = make(backend="spamd", address=spamd.socket_path)(HAM, context())
    assert "X-Spam-Flag" not in added_headers(outcome.data, HAM)


def test_spamd_quarantine_keeps_spam_out(spamd: Spamd) -> None:
    flt = make(backend="spamd", address=spamd.address, action="quarantine")
    outcome = flt(SPAM, context())
    assert outcome.action == "quarantine"
    assert added_headers(outcome.data, SPAM)["X-Spam-Flag"] == "YES"
    assert flt(HAM, context()).action == "deliver"


def test_spamd_subject_prefix_changes_only_the_subject(spamd: Spamd) -> None:
    flt = make(backend="spamd", address=spamd.address, subject_prefix="[SPAM] ")
    outcome = flt(SPAM, context())
    assert b"\r\nSubject: [SPAM] test message\r\n" in outcome.data
    untouched = outcome.data.replace(b"Subject: [SPAM] test", b"Subject: test", 1)
    added_headers(untouched, SPAM)
    ham = flt(HAM, context())
    added_headers(ham.data, HAM)  # ham keeps its Subject


def test_spamd_large_message_is_not_sent(closed_port: str) -> None:
    big = HAM + b"x" * 2000 + b"\r\n"
    flt = make(backend="spamd", address=closed_port, max_size=len(HAM) + 100)
    outcome = flt(big, context())
    assert outcome.data == big and outcome.action == "deliver"
    assert "not checked" in outcome.verdict
    with pytest.raises(SpamdError):
        flt(HAM, context())  # within the limit it does ask, and the daemon is not there


def test_spamd_silent_daemon_times_out(silent_listener: str) -> None:
    flt = make(backend="spamd", address=silent_listener, io_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(SpamdError, match="did not answer within 0.5 s"):
        flt(HAM, context())
    assert time.monotonic() - started < 5


def test_spamd_down_raises(closed_port: str, tmp_path) -> None:
    with pytest.raises(SpamdError, match="cannot connect"):
        make(backend="spamd", address=closed_port)(HAM, context())
    with pytest.raises(SpamdError, match="cannot connect"):
        make(backend="spamd", address=str(tmp_path / "no.sock"))(HAM, context())


async def test_spamd_down_through_pipeline(closed_port: str) -> None:
    passing = build_pipeline([{"use": "spam", "backend": "spamd", "address": closed_port, "on_error": "pass"}])
    result = await passing.run(HAM, context())
    assert result.action == "deliver"
    assert result.data.endswith(HAM)
    warning = result.data[: len(result.data) - len(HAM)].decode()
    assert warning.endswith("\r\n")
    unfolded = re.sub(r"\r\n(?=[ \t])", "", warning[:-2])
    assert "\r\n" not in unfolded  # one header field
    assert unfolded.startswith(f"{WARNING_HEADER}: filter spam failed: SpamdError: cannot connect to spamd")
    assert result.errors and "X-Spam-Status" not in warning
    holding = build_pipeline([{"use": "spam", "backend": "spamd", "address": closed_port, "on_error": "hold"}])
    held = await holding.run(HAM, context())
    assert held.action == "hold" and held.data.endswith(HAM) and held.errors


async def test_spamd_quarantine_through_pipeline(spamd: Spamd) -> None:
    pipeline = build_pipeline(
        [{"use": "spam", "backend": "spamd", "address": spamd.address, "action": "quarantine"}]
    )
    result = await pipeline.run(SPAM, context())
    assert result.hold and result.action == "quarantine"
    assert result.verdicts and result.verdicts[0].startswith("spam: spam, score")


def test_spamd_reply_parser_on_recorded_replies() -> None:
    # Replies recorded from spamd 4.0.1 (SYMBOLS and CHECK), and an error reply.
    symbols = parse_spamd(
        b"SPAMD/1.1 0 EX_OK\r\nContent-length: 103\r\nSpam: True ; 1004.2 / 5.0\r\n\r\n"
        b"GTUBE,MISSING_DATE,MISSING_HEADERS,MISSING_MID,NO_HEADERS_MESSAGE,NO_RECEIVED,NO_RELAYS,TVD_SPACE_RATIO"
    )
    assert (symbols.score, symbols.threshold, symbols.spam) == (1004.2, 5.0, True)
    assert symbols.symbols[0] == "GTUBE" and len(symbols.symbols) == 8
    check = parse_spamd(b"SPAMD/1.1 0 EX_OK\r\nSpam: False ; -0.1 / 5.0\r\n\r\n")
    assert (check.score, check.spam, check.symbols) == (-0.1, False, [])
    with pytest.raises(SpamdError, match="refused the request: 76 Bad header line"):
        parse_spamd(b"SPAMD/1.0 76 Bad header line: (EOF)\r\n")
    with pytest.raises(SpamdError, match="truncated"):
        parse_spamd(b"SPAMD/1.1 0 EX_OK\r\nContent-length: 50\r\nSpam: True ; 9.0 / 5.0\r\n\r\nGTUBE")
    with pytest.raises(SpamdError, match="no Spam: header"):
        parse_spamd(b"SPAMD/1.1 0 EX_OK\r\nContent-length: 0\r\n\r\n")


def test_spamd_request_format() -> None:
    request = build_request(b"Subject: x\r\n\r\nbody\r\n", "alice")
    assert request == b"SYMBOLS SPAMC/1.5\r\nContent-length: 20\r\nUser: alice\r\n\r\nSubject: x\r\n\r\nbody\r\n"
    with pytest.raises(SpamdError):
        build_request(b"x", "evil\r\nUser: root")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_spamd_parser_never_crashes(data: bytes) -> None:
    try:
        reply = parse_spamd(data)
    except SpamdError:
        return
    assert isinstance(reply.score, float)


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from([b"True", b"False", b"Yes", b"No"]),
    st.integers(min_value=-1000, max_value=20000).map(lambda n: n / 10),
    st.lists(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ_0123456789", min_size=1, max_size=20), max_size=6),
    st.integers(min_value=1, max_value=200),
)
def test_spamd_parser_reads_any_chunking(flag, score, symbols, cut) -> None:
    body = ",".join(symbols).encode()
    head = b"SPAMD/1.1 0 EX_OK\r\nContent-length: %d\r\nSpam: %s ; %s / 5.0\r\n\r\n"
    data = head % (len(body), flag, str(score).encode()) + body
    reply = parse_spamd(data)
    assert reply.score == score and reply.symbols == symbols
    assert reply.spam == (flag in (b"True", b"Yes"))
    if cut < len(data) - len(body):
        with pytest.raises(SpamdError):
            parse_spamd(data[:cut])  # a reply cut inside its head is never taken as a verdict


# -- rspamd -------------------------------------------------------------------------------------


def test_rspamd_tags_gtube_as_spam(rspamd: Rspamd) -> None:
    outcome = make(backend="rspamd", address=rspamd.url)(SPAM, context())
    headers = added_headers(outcome.data, SPAM)
    assert headers["X-Spam-Flag"] == "YES"
    status = status_fields(headers["X-Spam-Status"])
    assert status["verdict"] == "Yes" and status["tests"] == "GTUBE"
    assert float(status["score"]) == 15.0 and status["required"] == "5.0"
    assert outcome.verdict.endswith("action reject")


def test_rspamd_passes_ham(rspamd: Rspamd) -> None:
    outcome = make(backend="rspamd", address=rspamd.url)(HAM, context())
    headers = added_headers(outcome.data, HAM)
    assert "X-Spam-Flag" not in headers
    status = status_fields(headers["X-Spam-Status"])
    assert status["verdict"] == "No" and float(status["score"]) < 5.0
    assert "GTUBE" not in status["tests"]
    assert "action no action" in outcome.verdict


def test_rspamd_actions_and_thresholds(rspamd: Rspamd) -> None:
    # By default rspamd's "reject" makes spam even above our threshold...
    flt = make(backend="rspamd", address=rspamd.url, per_user={"lenient": 100.0})
    assert added_headers(flt(SPAM, context("lenient")).data, SPAM)["X-Spam-Flag"] == "YES"
    # ...without spam_actions only our threshold counts.
    scored = make(backend="rspamd", address=rspamd.url, spam_actions=[], per_user={"lenient": 100.0, "strict": -50.0})
    assert "X-Spam-Flag" not in added_headers(scored(SPAM, context("lenient")).data, SPAM)
    assert added_headers(scored(SPAM, context("alice")).data, SPAM)["X-Spam-Flag"] == "YES"
    assert added_headers(scored(HAM, context("strict")).data, HAM)["X-Spam-Flag"] == "YES"


def test_rspamd_is_told_the_user_and_uid(rspamd: Rspamd) -> None:
    user, uid = f"dave{secrets.token_hex(3)}", f"uid{secrets.token_hex(4)}"
    make(backend="rspamd", address=rspamd.url)(HAM, context(user, uid))
    log = wait_for(rspamd, f"user: {user},").string
    line = next(line for line in log.splitlines() if f"user: {user}," in line)
    assert f"qid: <{uid}>," in line


def test_rspamd_over_unix_socket(rspamd: Rspamd) -> None:
    outcome = make(backend="rspamd", address=rspamd.socket_path, action="quarantine")(SPAM, context())
    assert outcome.action == "quarantine"
    assert added_headers(outcome.data, SPAM)["X-Spam-Flag"] == "YES"


def test_rspamd_silent_daemon_times_out(silent_listener: str) -> None:
    flt = make(backend="rspamd", address=f"http://{silent_listener}", io_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(RspamdError, match="did not answer within 0.5 s"):
        flt(HAM, context())
    assert time.monotonic() - started < 5


def test_rspamd_down_raises(closed_port: str) -> None:
    with pytest.raises(RspamdError, match="cannot connect"):
        make(backend="rspamd", address=f"http://{closed_port}")(HAM, context())


def test_rspamd_reply_parser() -> None:
    # The body is a reply recorded from rspamd 3.4 for the GTUBE message.
    reply = parse_rspamd(
        200,
        b'{"is_skipped":true,"score":15.0,"required_score":15.0,"action":"reject","symbols":{"GTUBE":'
        b'{"name":"GTUBE","score":0.0,"metric_score":0.0}},"messages":{"smtp_message":"Gtube pattern"},'
        b'"message-id":"undef","time_real":0.140630}',
    )
    assert (reply.score, reply.required_score, reply.action, reply.symbols) == (15.0, 15.0, "reject", ["GTUBE"])
    with pytest.raises(RspamdError, match="HTTP 500"):
        parse_rspamd(500, b"internal error")
    with pytest.raises(RspamdError, match="no numeric score"):
        parse_rspamd(200, b'{"action": "no action", "required_score": 15}')
    with pytest.raises(RspamdError, match="not JSON"):
        parse_rspamd(200, b"<html>")


@settings(max_examples=150, deadline=None)
@given(st.integers(min_value=100, max_value=599), st.binary(max_size=200))
def test_rspamd_parser_never_crashes(status: int, body: bytes) -> None:
    try:
        parse_rspamd(status, body)
    except RspamdError:
        pass


# -- configuration and byte-exact tagging -------------------------------------------------------


@pytest.mark.parametrize(
    "table",
    [
        {"use": "spam", "backend": "spamd", "address": "nohost"},
        {"use": "spam", "backend": "rspamd", "address": "ftp://127.0.0.1:1"},
        {"use": "spam", "backend": "builtin", "address": "127.0.0.1:783"},
        {"use": "spam", "backend": "spamd", "database": "/tmp/x.sqlite"},
        {"use": "spam", "backend": "razor"},
        {"use": "spam", "action": "delete"},
        {"use": "spam", "subject_prefix": "[SPAM]\r\nBcc: x"},
        {"use": "spam", "colour": "red"},
    ],
)
def test_bad_options_fail_at_load(table: dict) -> None:
    with pytest.raises(FilterConfigError, match=r"filters\[0\] \(spam\)"):
        load_filter(table)


def test_defaults() -> None:
    flt = make()
    assert flt.config.backend == "builtin" and flt.config.action == "tag"
    assert flt.config.subject_prefix == "" and flt.config.required_score == 5.0
    assert str(make(backend="spamd").spamd.address) == "127.0.0.1:783"  # type: ignore[union-attr]
    assert make(backend="rspamd").rspamd.port == 11333  # type: ignore[union-attr]


def test_headers_follow_spamassassin() -> None:
    assert spam_headers(True, 7.34, 5.0, ["A", "B"]) == [
        ("X-Spam-Flag", "YES"),
        ("X-Spam-Score", "7.3"),
        ("X-Spam-Level", "*******"),
        ("X-Spam-Status", "Yes, score=7.3 required=5.0 tests=A,B"),
    ]
    assert spam_headers(False, -2.0, 6.5, []) == [
        ("X-Spam-Score", "-2.0"),
        ("X-Spam-Level", ""),
        ("X-Spam-Status", "No, score=-2.0 required=6.5 tests=none"),
    ]
    assert spam_headers(True, 1004.2, 5.0, ["GTUBE"])[2] == ("X-Spam-Level", "*" * 50)


def test_provider_spam_headers_stay_below_ours(spamd: Spamd) -> None:
    forged = b"X-Spam-Status: No, score=-100 required=5.0\r\nX-Spam-Flag: NO\r\n" + SPAM
    outcome = make(backend="spamd", address=spamd.address)(forged, context())
    assert outcome.data.startswith(b"X-Spam-Flag: YES\r\n")
    assert outcome.data.endswith(forged)


def test_subject_prefix_cases() -> None:
    assert prefix_subject(b"From: a\r\nSubject: hi\r\n\r\nSubject: body\r\n", "[SPAM] ") == (
        b"From: a\r\nSubject: [SPAM] hi\r\n\r\nSubject: body\r\n"
    )
    assert prefix_subject(b"SUBJECT:hi\n\n", "[SPAM] ") == b"SUBJECT: [SPAM] hi\n\n"
    once = prefix_subject(b"Subject: [SPAM] hi\r\n\r\n", "[SPAM] ")
    assert once == b"Subject: [SPAM] hi\r\n\r\n"
    assert prefix_subject(b"From: a\r\n\r\nSubject: in the body\r\n", "[SPAM] ") == (
        b"Subject: [SPAM]\r\nFrom: a\r\n\r\nSubject: in the body\r\n"
    )
    folded = b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n  continued\r\nX: y\r\n\r\n"
    assert prefix_subject(folded, "[SPAM] ") == folded.replace(b"Subject: ", b"Subject: [SPAM] ")


_header_lines = st.lists(
    st.tuples(
        st.sampled_from(["From", "To", "Subject", "subject", "X-Thing", "Received"]),
        st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=30),
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_header_lines, st.binary(max_size=60), st.sampled_from([b"\r\n", b"\n"]))
def test_subject_prefix_inserts_only_the_prefix(headers, body, eol) -> None:
    message = b"".join(f"{name}: {value}".encode() + eol for name, value in headers) + eol + body
    tagged = prefix_subject(message, "[SPAM] ")
    has_subject = any(name.lower() == "subject" for name, _ in headers)
    if not has_subject:
        assert tagged.endswith(message) and tagged.startswith(b"Subject: [SPAM]")
        return
    if tagged == message:  # already marked
        first = next(value for name, value in headers if name.lower() == "subject")
        assert first.lstrip(" \t").startswith("[SPAM]")
        return
    # Exactly the prefix was inserted, at one place inside the first Subject line.
    first = next(i for i, (name, _) in enumerate(headers) if name.lower() == "subject")
    line_start = sum(len(f"{name}: {value}".encode()) + len(eol) for name, value in headers[:first])
    line_end = line_start + len(f"{headers[first][0]}: {headers[first][1]}".encode())
    assert any(
        tagged == message[:i] + b"[SPAM] " + message[i:] for i in range(line_start + len("subject:"), line_end + 1)
    )


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=1, max_size=200), st.floats(min_value=-50, max_value=1500), st.booleans())
def test_tagging_keeps_every_original_byte(body: bytes, score: float, spam: bool) -> None:
    message = b"Subject: x\r\n\r\n" + body
    tagged = spam_module.add_headers(message, spam_headers(spam, score, 5.0, ["A"]))
    headers = added_headers(tagged, message)
    assert ("X-Spam-Flag" in headers) == spam
    assert headers["X-Spam-Level"] == "*" * max(0, min(50, int(score)))


def test_builtin_default_is_the_pipeline_default(tmp_path) -> None:
    pipeline = build_pipeline([{"use": "spam", "database": str(tmp_path / "bayes.sqlite")}])
    assert isinstance(pipeline, Pipeline) and len(pipeline.filters) == 1
    outcome = pipeline.filters[0][0](SPAM, context())
    assert added_headers(outcome.data, SPAM)["X-Spam-Flag"] == "YES"
    assert not (tmp_path / "bayes.sqlite").exists()  # scoring never creates the store
