"""The filter pipeline: loading plugins, failure policies, worker threads, byte-exact header editing,
the ``headers`` filter, the ``pop3proxy filter`` command and the plugin guide's example."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import os
import re
import subprocess
import sys
import threading
import time
from email.header import decode_header, make_header
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from helpers.common import write_config
from hypothesis import given, settings
from hypothesis import strategies as st
from plugins import pipeline_filters
from plugins.example_filter import SubjectWatch

from pop3proxy.filtering import loader as filtering_loader
from pop3proxy.filtering.api import (
    WARNING_HEADER,
    FilterConfigError,
    FilterContext,
    FilterResult,
)
from pop3proxy.filtering.headers import (
    add_header,
    line_ending,
    remove_headers,
    split_header,
)
from pop3proxy.filtering.loader import load_filter
from pop3proxy.filtering.pipeline import Pipeline, build_pipeline
from pop3proxy.filtering.summary import change_summary
from pop3proxy.filters.headers import HeadersFilter

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
MAIL = TESTS / "data" / "mail"
NEWSLETTER = MAIL / "dkim-newsletter-tracking.eml"
MIXED = MAIL / "dkim-mixed-endings-8bit.eml"
LUNCH = MAIL / "plain-lunch.eml"
DKIM_KEY = (MAIL / "dkim-test-key.pub.pem").read_bytes()
CTX = FilterContext(user="alice", uid="0001")
P = "plugins.pipeline_filters"


@pytest.fixture(autouse=True)
def _reset_plugins():
    pipeline_filters.Tag.calls.clear()
    pipeline_filters.Sleepy.threads.clear()
    pipeline_filters.release_sleepers.clear()
    yield
    pipeline_filters.release_sleepers.set()  # lets abandoned slow filters finish


def pipeline(*tables: dict, concurrency: int = 2) -> Pipeline:
    return build_pipeline(list(tables), concurrency=concurrency)


# -- a DKIM verifier (rsa-sha256, relaxed/relaxed), enough to show signatures survive filtering ----


def _crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _dkim_split(data: bytes) -> tuple[list[bytes], bytes]:
    end = data.find(b"\r\n\r\n")
    head, body = (data, b"") if end < 0 else (data[: end + 2], data[end + 4 :])
    fields: list[bytes] = []
    for line in head.split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\r\n" + line
        else:
            fields.append(line)
    return fields, body


def _relaxed_header(field: bytes) -> bytes:
    name, _, value = field.partition(b":")
    value = re.sub(rb"\r\n(?=[ \t])", b"", value)
    value = re.sub(rb"[ \t]+", b" ", value).strip(b" ")
    return name.strip(b" \t").lower() + b":" + value


def _relaxed_body(body: bytes) -> bytes:
    lines = [re.sub(rb"[ \t]+", b" ", line).rstrip(b" ") for line in body.split(b"\r\n")]
    while lines and lines[-1] == b"":
        lines.pop()
    return b"".join(line + b"\r\n" for line in lines)


def dkim_verifies(message: bytes) -> bool:
    fields, body = _dkim_split(_crlf(message))
    sigs = [f for f in fields if f.partition(b":")[0].strip().lower() == b"dkim-signature"]
    assert len(sigs) == 1, "the samples carry one signature"
    tags = {}
    for part in sigs[0].partition(b":")[2].split(b";"):
        key, _, value = part.partition(b"=")
        tags[key.strip().decode()] = re.sub(rb"\s+", b"", value)
    if base64.b64encode(hashlib.sha256(_relaxed_body(body)).digest()) != tags["bh"]:
        return False
    used: set[int] = set()
    signed = b""
    for name in tags["h"].split(b":"):
        for i in range(len(fields) - 1, -1, -1):
            if i not in used and fields[i].partition(b":")[0].strip(b" \t").lower() == name.lower():
                used.add(i)
                signed += _relaxed_header(fields[i]) + b"\r\n"
                break
    signed += _relaxed_header(re.sub(rb"(\bb=)[^;]*", rb"\1", sigs[0]))
    key = serialization.load_pem_public_key(DKIM_KEY)
    try:
        key.verify(base64.b64decode(tags["b"]), signed, padding.PKCS1v15(), hashes.SHA256())
    except Exception:
        return False
    return True


def test_the_dkim_samples_verify_and_the_verifier_notices_tampering():
    for path in (NEWSLETTER, MIXED):
        data = path.read_bytes()
        assert dkim_verifies(data), path.name
        assert not dkim_verifies(data.replace(b"alice@example.com\r\nSubject", b"alice@example.org\r\nSubject", 1)
                                 if path == NEWSLETTER else data.replace(b"To: bob@", b"To: rob@"))
        assert not dkim_verifies(data.replace(b"Kuchen am Freitag", b"Kuchen am Samstag")
                                 if path == MIXED else data.replace(b"Liebe Alice", b"Liebe Alma"))


# -- loading --------------------------------------------------------------------------------------


def test_builtin_filter_by_name():
    flt, options = load_filter({"use": "headers", "remove": ["X-A"], "timeout": 5})
    assert isinstance(flt, HeadersFilter)
    assert flt.remove == ["X-A"]
    assert (options.use, options.on_error, options.timeout) == ("headers", "pass", 5)


def test_module_class_filter():
    flt, options = load_filter({"use": "plugins.example_filter:SubjectWatch", "words": ["x"], "on_error": "hold"})
    assert isinstance(flt, SubjectWatch)
    assert options.on_error == "hold"


def _entry_points(*eps: importlib.metadata.EntryPoint):
    def fake(group: str):
        assert group == "pop3proxy.filters"
        return list(eps)

    return fake


def test_entry_point_filter(monkeypatch):
    ep = importlib.metadata.EntryPoint(
        name="subject-watch", value="plugins.example_filter:SubjectWatch", group="pop3proxy.filters"
    )
    monkeypatch.setattr(filtering_loader, "entry_points", _entry_points(ep))
    flt, _ = load_filter({"use": "subject-watch", "words": ["lunch"]})
    assert isinstance(flt, SubjectWatch)
    assert flt.words == ["lunch"]


def test_entry_point_that_fails_to_load(monkeypatch):
    ep = importlib.metadata.EntryPoint(name="broken", value="plugins.broken_import:Broken", group="pop3proxy.filters")
    monkeypatch.setattr(filtering_loader, "entry_points", _entry_points(ep))
    with pytest.raises(FilterConfigError) as info:
        load_filter({"use": "broken"})
    assert "'broken'" in str(info.value)
    assert "plugins.broken_import:Broken" in str(info.value)
    assert "pop3proxy_no_such_dependency" in str(info.value)


def test_builtin_wins_over_an_entry_point_of_the_same_name(monkeypatch):
    ep = importlib.metadata.EntryPoint(
        name="headers", value="plugins.example_filter:SubjectWatch", group="pop3proxy.filters"
    )
    monkeypatch.setattr(filtering_loader, "entry_points", _entry_points(ep))
    flt, _ = load_filter({"use": "headers"})
    assert isinstance(flt, HeadersFilter)


@pytest.mark.parametrize(
    "table, expected",
    [
        ({"use": "nosuchfilter"}, "unknown filter 'nosuchfilter'"),
        ({"use": "No Such Filter"}, "unknown filter 'No Such Filter'"),
        ({"use": "plugins.no_such_module:X"}, "cannot import plugins.no_such_module"),
        ({"use": f"{P}:Missing"}, f"{P} has no Missing"),
        ({"use": "plugins.broken_import:Broken"}, "No module named 'pop3proxy_no_such_dependency'"),
        ({"use": f"{P}:BadInit"}, "cannot start: RuntimeError: no spamd at 127.0.0.1:9"),
        ({"use": f"{P}:BadInit", "address": "192.0.2.1:783"}, "no spamd at 192.0.2.1:783"),
        ({"use": f"{P}:Tag", "lable": "x"}, "unknown option(s) lable"),
        ({"use": f"{P}:Failing", "level": 3}, "unknown option(s) level"),
        ({"use": "headers", "remvoe": ["X-A"]}, "remvoe"),
        ({"use": "headers", "remove": "X-A"}, "remove: Input should be a valid list"),
        ({"use": "headers", "add": {"Bad Name": "x"}}, "invalid header name 'Bad Name'"),
        ({"use": "headers", "remove": ["X-A: b"]}, "is not a header name pattern"),
        ({"use": f"{P}:Tag", "on_error": "retry"}, "on_error"),
        ({"use": f"{P}:Tag", "timeout": -1}, "timeout"),
        ({"use": f"{P}:NoName"}, "not a filter class"),
        ({"use": f"{P}:not_a_class"}, "not a filter class"),
        ({"use": f"{P}:WrongCall"}, "its call must take (message, context)"),
        ({"use": "plugins.example_filter:SubjectWatch", "words": []}, "words"),
        ({"use": "plugins.example_filter:SubjectWatch", "words": [" "]}, "words must not be blank"),
    ],
)
def test_a_filter_that_cannot_be_loaded_is_named(table, expected):
    tables = [{"use": "headers"}, table]
    with pytest.raises(FilterConfigError) as info:
        build_pipeline(tables)
    message = str(info.value)
    assert message.startswith("filters[1]"), message
    assert expected in message, message
    assert "\n" not in message


def _proxy_config(tmp_path: Path, filters: list[dict]) -> Path:
    return write_config(
        tmp_path / "c.toml",
        {
            "listen": {"host": "127.0.0.1", "port": 0},
            "upstream": {"host": "127.0.0.1", "port": 9, "tls": "none"},
            "cache": {"root": str(tmp_path / "cache")},
            "filters": filters,
        },
    )


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "pop3proxy", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.mark.parametrize(
    "filters, expected",
    [
        ([{"use": "nosuchfilter"}], "unknown filter 'nosuchfilter'"),
        ([{"use": "headers"}, {"use": f"{P}:BadInit"}], "filters[1] (plugins.pipeline_filters:BadInit): cannot start"),
    ],
)
def test_serve_with_a_bad_filter_says_so_in_one_line(tmp_path, filters, expected):
    result = run_cli("serve", "--config", str(_proxy_config(tmp_path, filters)))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert lines[0].startswith("pop3proxy: ")


# -- the pipeline -----------------------------------------------------------------------------------


async def test_no_filters_is_the_identity():
    data = NEWSLETTER.read_bytes()
    result = await Pipeline().run(data, CTX)
    assert result == FilterResult(data)
    assert not Pipeline()


async def test_filters_run_in_order_and_their_verdicts_are_kept():
    p = pipeline(
        {"use": f"{P}:Tag", "label": "first", "verdict": "one"},
        {"use": f"{P}:Tag", "label": "second"},
        {"use": f"{P}:Tag", "label": "third", "verdict": "three"},
    )
    data = LUNCH.read_bytes()
    result = await p.run(data, CTX)
    assert result.data == b"X-Tag: third\r\nX-Tag: second\r\nX-Tag: first\r\n" + data
    assert result.verdicts == ["tag: one", "tag: three"]
    assert (result.action, result.errors) == ("deliver", [])
    assert [label for label, _ in pipeline_filters.Tag.calls] == ["first", "second", "third"]


async def test_on_error_pass_marks_the_message_and_keeps_every_other_byte():
    p = pipeline({"use": f"{P}:Failing"}, {"use": f"{P}:Tag", "label": "after"})
    data = NEWSLETTER.read_bytes()
    result = await p.run(data, CTX)
    assert result.action == "deliver"
    assert result.errors == ["failing: ConnectionRefusedError: backend at 127.0.0.1:9 refused the connection"]
    warning = (
        b"X-POP3Proxy-Warning: filter failing failed: ConnectionRefusedError: backend at\r\n"
        b" 127.0.0.1:9 refused the connection\r\n"
    )
    assert result.data == b"X-Tag: after\r\n" + warning + data
    assert dkim_verifies(result.data)
    fields, _ = split_header(result.data)
    assert fields[1].name == WARNING_HEADER


async def test_on_error_hold_holds_the_message_and_stops_the_pipeline():
    p = pipeline({"use": f"{P}:Tag", "label": "before"}, {"use": f"{P}:Failing", "on_error": "hold"},
                 {"use": f"{P}:Tag", "label": "never"})
    data = LUNCH.read_bytes()
    result = await p.run(data, CTX)
    assert result.action == "hold" and result.hold
    assert result.errors == ["failing: ConnectionRefusedError: backend at 127.0.0.1:9 refused the connection"]
    assert [label for label, _ in pipeline_filters.Tag.calls] == ["before"]
    assert result.data.endswith(b"X-Tag: before\r\n" + data)
    assert result.data.startswith(b"X-POP3Proxy-Warning: filter failing failed:")


async def test_a_filter_calling_sys_exit_is_a_failure_not_an_exit():
    result = await pipeline({"use": f"{P}:Exiting"}).run(b"Subject: x\r\n\r\nbody\r\n", CTX)
    assert result.errors == ["exiting: SystemExit: 3"]
    assert result.action == "deliver"


async def test_a_filter_that_overruns_its_timeout_is_a_failure_within_the_timeout():
    p = pipeline({"use": f"{P}:Sleepy", "seconds": 30, "timeout": 0.3}, {"use": f"{P}:Tag"})
    data = LUNCH.read_bytes()
    start = time.monotonic()
    result = await p.run(data, CTX)
    elapsed = time.monotonic() - start
    assert 0.25 < elapsed < 3
    assert result.errors == ["sleepy: timed out after 0.3 s"]
    assert result.data == b"X-Tag: tagged\r\nX-POP3Proxy-Warning: filter sleepy failed: timed out after 0.3 s\r\n" + data


async def test_an_abandoned_filter_thread_does_not_block_the_next_message():
    p = pipeline({"use": f"{P}:Sleepy", "seconds": 30, "timeout": 0.2}, concurrency=1)
    start = time.monotonic()
    for uid in ("1", "2", "3"):
        result = await p.run(b"Subject: x\r\n\r\n", FilterContext("alice", uid))
        assert result.errors == ["sleepy: timed out after 0.2 s"]
    assert time.monotonic() - start < 3


async def test_a_hold_on_timeout():
    p = pipeline({"use": f"{P}:Sleepy", "seconds": 30, "timeout": 0.2, "on_error": "hold"})
    result = await p.run(b"Subject: x\r\n\r\n", CTX)
    assert result.action == "hold"


@pytest.mark.parametrize(
    "kind, error",
    [
        ("string", "returned str, not a FilterOutcome"),
        ("none", "returned NoneType, not a FilterOutcome"),
        ("text-data", "returned data of type str, not bytes"),
        ("empty", "returned an empty message"),
        ("action", "returned the unknown action 'discard'"),
    ],
)
async def test_a_filter_returning_garbage_is_a_failure(kind, error):
    data = LUNCH.read_bytes()
    result = await pipeline({"use": f"{P}:Garbage", "kind": kind}).run(data, CTX)
    assert result.errors == [f"garbage: {error}"]
    assert result.action == "deliver"
    assert result.data.endswith(data)
    assert result.data.startswith(b"X-POP3Proxy-Warning: filter garbage failed: ")


async def test_quarantine_stops_the_pipeline():
    p = pipeline({"use": f"{P}:Quarantine"}, {"use": f"{P}:Tag"})
    data = LUNCH.read_bytes()
    result = await p.run(data, CTX)
    assert (result.action, result.verdicts, result.data) == ("quarantine", ["quarantine: spam (score 12.5)"], data)
    assert pipeline_filters.Tag.calls == []


async def test_filters_run_in_worker_threads_in_parallel():
    p = pipeline({"use": f"{P}:Sleepy", "seconds": 0.5}, concurrency=2)
    start = time.monotonic()
    async with trio.open_nursery() as nursery:
        for uid in ("1", "2"):
            nursery.start_soon(p.run, b"Subject: x\r\n\r\n", FilterContext("alice", uid))
    elapsed = time.monotonic() - start
    assert elapsed < 0.9, f"two 0.5 s filters took {elapsed:.2f} s: not in parallel"
    threads = pipeline_filters.Sleepy.threads
    assert len(threads) == 2 and len(set(threads)) == 2
    assert threading.get_ident() not in threads


async def test_concurrency_is_bounded():
    p = pipeline({"use": f"{P}:Sleepy", "seconds": 0.3}, concurrency=1)
    start = time.monotonic()
    async with trio.open_nursery() as nursery:
        for uid in ("1", "2"):
            nursery.start_soon(p.run, b"Subject: x\r\n\r\n", FilterContext("alice", uid))
    assert time.monotonic() - start >= 0.55


# -- byte-exact header editing ------------------------------------------------------------------------

header_names = st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,30}", fullmatch=True)


@settings(max_examples=150, deadline=None)
@given(message=st.binary(max_size=400), name=header_names, value=st.text(max_size=300))
def test_add_header_prepends_one_field_and_keeps_the_message(message, name, value):
    result = add_header(message, name, value)
    assert result.endswith(message)
    added = result[: len(result) - len(message)]
    eol = line_ending(message)
    assert added.endswith(eol)
    assert added.isascii()
    lines = added[: -len(eol)].split(eol)
    assert all(len(line) <= 998 for line in lines)
    assert all(line[:1] == b" " for line in lines[1:])
    unfolded = b"".join(lines).decode("ascii")
    assert unfolded.startswith(f"{name}:")
    text = str(make_header(decode_header(unfolded[len(name) + 1 :])))
    assert " ".join(text.split()) == " ".join(re.sub(r"[\x00-\x1f\x7f]", " ", value).split())
    if not message.startswith((b" ", b"\t")):  # else the message's first line continues the new field
        fields, rest = split_header(result)
        assert fields[0].raw == added and fields[0].name == name


@pytest.mark.parametrize("name", ["", "X Bad", "X:Y", "Grüße", "X\r\nBcc"])
def test_add_header_refuses_bad_names(name):
    with pytest.raises(ValueError):
        add_header(b"Subject: x\r\n\r\n", name, "v")


def test_add_header_uses_the_message_line_ending():
    assert add_header(b"Subject: x\n\nbody\n", "X-A", "b") == b"X-A: b\nSubject: x\n\nbody\n"
    assert add_header(b"\nbody", "X-A", "b") == b"X-A: b\n\nbody"
    assert add_header(b"", "X-A", "line\r\nbreak") == b"X-A: line break\r\n"


def test_split_header_keeps_every_byte():
    data = MIXED.read_bytes()
    fields, rest = split_header(data)
    assert b"".join(f.raw for f in fields) + rest == data
    assert rest.startswith(b"\nHallo Bob")
    names = [f.name for f in fields]
    assert "X-Tracking-Campaign" in names and "X-tracking-LAST" in names
    note = next(f for f in fields if f.name == "X-Note")
    assert b"\tX-Tracking-ID: but it is part of X-Note" in note.raw


# -- the headers filter ------------------------------------------------------------------------------

HEADERS_OPTIONS = {"use": "headers", "remove": ["X-Tracking-*", "X-Mailgun-*"], "add": {"X-Filtered-By": "pop3proxy"}}


def _without(data: bytes, *pieces: bytes) -> bytes:
    for piece in pieces:
        assert data.count(piece) == 1, piece
        data = data.replace(piece, b"")
    return data


async def test_headers_filter_on_a_dkim_signed_newsletter():
    data = NEWSLETTER.read_bytes()
    result = await pipeline(HEADERS_OPTIONS).run(data, CTX)
    expected = b"X-Filtered-By: pop3proxy\r\n" + _without(
        data,
        b"X-Mailgun-Sid: WyI1ZTJhNiIsICJhbGljZUBleGFtcGxlLmNvbSIsICI4YjQ1MiJd\r\n",
        b'X-Mailgun-Variables: {"campaign": "spring-sale-2024", "customer_id":\r\n'
        b' "883451", "segment": "loyal-customers", "ab_variant":\r\n\t"subject-b"}\r\n',
        b"X-Tracking-ID: 5f2c9a0e-0d3b-4b8e-9a51-2e7c1d4f9b20\r\n",
        b"x-tracking-pixel: https://t.shop.example/o/5f2c9a0e.gif?u=883451&c=spring-sale-2024&v=b&r=\r\n"
        b" newsletter\r\n",
        b"X-MAILGUN-TAG: newsletter\r\n",
    )
    assert result.data == expected
    assert result.verdicts == [
        "headers: removed X-Mailgun-Sid, X-Mailgun-Variables, X-Tracking-ID, x-tracking-pixel, X-MAILGUN-TAG; "
        "added X-Filtered-By"
    ]
    assert b"X-Tracker-Note: not a tracking header" in result.data
    assert b"X-Mailgunner: also not ours" in result.data
    assert b"X-Tracking-ID: this line is body text and stays\r\n" in result.data
    assert dkim_verifies(result.data)


async def test_headers_filter_on_mixed_line_endings_and_invalid_utf8():
    data = MIXED.read_bytes()
    result = await pipeline(HEADERS_OPTIONS).run(data, CTX)
    # The first line ends with a bare LF, so the added field does too.
    expected = b"X-Filtered-By: pop3proxy\n" + _without(
        data,
        b"X-Tracking-Campaign : q1-letters\n",
        b"X-Tracking-ID:no-space-after-colon-7d1e\r\n",
        b"X-tracking-LAST: the last field before the body,\n folded with a bare LF\r\n",
    )
    assert result.data == expected
    assert b"\tX-Tracking-ID: but it is part of X-Note and stays\r\n" in result.data
    assert b"X-Tracking-ID: body text again\r\n" in result.data
    assert dkim_verifies(result.data)


async def test_headers_filter_adds_in_the_order_given_and_can_replace():
    p = pipeline({"use": "headers", "remove": ["X-Filtered-By"], "add": {"X-Filtered-By": "pop3proxy", "X-B": "2"}})
    data = b"X-Filtered-By: forged\r\nSubject: x\r\n\r\nbody\r\n"
    result = await p.run(data, CTX)
    assert result.data == b"X-Filtered-By: pop3proxy\r\nX-B: 2\r\nSubject: x\r\n\r\nbody\r\n"


async def test_headers_filter_with_nothing_to_do_changes_nothing():
    data = LUNCH.read_bytes()
    result = await pipeline({"use": "headers", "remove": ["X-Nothing-*"]}).run(data, CTX)
    assert result.data == data and result.verdicts == []


_line_end = st.sampled_from([b"\r\n", b"\n"])
_value = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
_field_name = st.sampled_from(["X-Tracking-ID", "x-tracking-pixel", "X-Mailgun-Sid", "Subject", "X-Track", "From",
                               "DKIM-Signature", "X-Mailgunner", "Received"])


@st.composite
def _field(draw):
    name = draw(_field_name)
    blank = draw(st.sampled_from([b"", b" ", b"\t"]))
    raw = name.encode() + blank + b":" + draw(_value) + draw(_line_end)
    for _ in range(draw(st.integers(0, 3))):
        raw += draw(st.sampled_from([b" ", b"\t", b"  "])) + draw(_value) + draw(_line_end)
    return name, raw


@settings(max_examples=100, deadline=None)
@given(fields=st.lists(_field(), max_size=12), separator=_line_end, body=st.binary(max_size=200))
def test_headers_filter_removes_exactly_the_matching_fields(fields, separator, body):
    message = b"".join(raw for _, raw in fields) + separator + body
    flt = HeadersFilter(HeadersFilter.Config(remove=["X-Tracking-*", "x-mailgun-*"]))
    outcome = flt(message, CTX)
    removed = {"X-Tracking-ID", "x-tracking-pixel", "X-Mailgun-Sid"}
    kept = b"".join(raw for name, raw in fields if name not in removed)
    assert outcome.data == kept + separator + body
    names = [name for name, _ in fields if name in removed]
    assert outcome.verdict == ("removed " + ", ".join(names) if names else "")


def test_remove_headers_reports_names_in_message_order():
    data, removed = remove_headers(b"B: 1\r\nA: 2\r\nb: 3\r\n\r\n", ["b"])
    assert (data, removed) == (b"A: 2\r\n\r\n", ["B", "b"])


# -- describing changes, and the `pop3proxy filter` command -------------------------------------------


def test_change_summary():
    before = b"Subject: x\r\nX-Tracking-ID: 1\r\n\r\nbody\r\n"
    after = b"X-Filtered-By: pop3proxy\r\nSubject: x\r\n\r\nbody\r\n"
    assert change_summary(before, after) == [
        f"size: {len(before)} -> {len(after)} bytes",
        "headers changed:",
        "  + X-Filtered-By: pop3proxy",
        "  - X-Tracking-ID: 1",
        "body unchanged",
    ]
    changed = change_summary(before, before.replace(b"body", b"new\r\nbody"))
    assert changed[-1] == "body changed (6 -> 11 bytes, 0 lines removed, 1 added)"
    assert changed[1] == "headers unchanged"
    assert change_summary(b"X-Evil: \x1b[2J\r\n\r\n", b"\r\n")[2] == "  - X-Evil: \\x1b[2J"


def test_filter_command_on_sample_files(tmp_path):
    config = write_config(
        tmp_path / "c.toml",
        {"filters": [HEADERS_OPTIONS, {"use": "plugins.example_filter:SubjectWatch", "words": ["lunch"]}]},
    )
    result = run_cli("filter", "--config", str(config), str(LUNCH), str(NEWSLETTER))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lunch = LUNCH.read_bytes()
    out = result.stdout
    expected_lunch = "\n".join(
        [
            f"== {LUNCH}",
            "verdict: headers: removed X-Tracking-ID; added X-Filtered-By",
            "verdict: subject-watch: subject contains lunch",
            "action: deliver",
            f"size: {len(lunch)} -> {len(lunch) - len(b'X-Tracking-ID: 0f0f0f') + len(b'X-Subject-Watch: lunch') + len(b'X-Filtered-By: pop3proxy') + 2} bytes",
            "headers changed:",
            "  + X-Subject-Watch: lunch",
            "  + X-Filtered-By: pop3proxy",
            "  - X-Tracking-ID: 0f0f0f",
            "body unchanged",
        ]
    )
    assert expected_lunch in out
    assert f"== {NEWSLETTER}" in out
    assert "  - X-Mailgun-Variables: {\"campaign\": \"spring-sale-2024\", \"customer_id\":" in out
    assert "Liebe Alice" not in out  # bodies are never shown


def test_filter_command_reports_failures_and_holds(tmp_path):
    config = write_config(tmp_path / "c.toml", {"filters": [{"use": f"{P}:Failing", "on_error": "hold"}]})
    result = run_cli("filter", "--config", str(config), str(LUNCH))
    assert result.returncode == 0
    assert "error: failing: ConnectionRefusedError: backend at 127.0.0.1:9 refused the connection" in result.stdout
    assert "action: hold" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_filter_command_missing_file_and_bad_config(tmp_path):
    config = write_config(tmp_path / "c.toml", {"filters": [{"use": "headers"}]})
    missing = tmp_path / "nope.eml"
    result = run_cli("filter", "--config", str(config), str(LUNCH), str(missing))
    assert result.returncode == 2
    assert result.stderr.strip() == f"pop3proxy: cannot read {missing}: No such file or directory"
    assert result.stdout == ""
    bad = write_config(tmp_path / "bad.toml", {"filters": [{"use": "nosuchfilter"}]})
    result = run_cli("filter", "--config", str(bad), str(LUNCH))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "unknown filter 'nosuchfilter'" in result.stderr
    assert "Traceback" not in result.stderr


# -- the plugin guide -------------------------------------------------------------------------------


def test_the_guide_contains_the_tested_example_verbatim():
    guide = (REPO / "docs" / "writing-a-filter.md").read_text()
    example = (TESTS / "plugins" / "example_filter.py").read_text()
    assert example.strip() in guide
    assert example.strip() in (REPO / "README.md").read_text()  # the README's "Writing a filter" too
    assert '[project.entry-points."pop3proxy.filters"]' in guide
    assert 'subject-watch = "' in guide


async def test_the_example_filter():
    data = LUNCH.read_bytes()
    flag = pipeline({"use": "plugins.example_filter:SubjectWatch", "words": ["LUNCH", "invoice"]})
    result = await flag.run(data, CTX)
    assert result.data == b"X-Subject-Watch: lunch\r\n" + data
    assert result.verdicts == ["subject-watch: subject contains lunch"]
    quarantine = pipeline({"use": "plugins.example_filter:SubjectWatch", "words": ["lunch"], "quarantine": True})
    result = await quarantine.run(data, CTX)
    assert (result.action, result.data) == ("quarantine", data)
    result = await flag.run(NEWSLETTER.read_bytes(), CTX)
    assert (result.data, result.verdicts) == (NEWSLETTER.read_bytes(), [])
