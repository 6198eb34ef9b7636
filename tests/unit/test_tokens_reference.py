"""The spam filter's tokens and GTUBE look, read from the message's own bytes, against the reference:
the code that parsed every message with ``email.message_from_bytes(..., policy=compat32)``
(tests/helpers/bayes_reference.py). A trained store's counts mean the reference's tokens, so the two
must give the same token set for every message, and the same GTUBE verdict.
"""

from __future__ import annotations

import base64
import functools
import email
import email.feedparser
import email.policy
import random
from pathlib import Path

import pytest
from helpers import bayes_reference as reference
from helpers.attachments import EXE, TEXT_PART, attachment, mixed
from helpers.generated_mail import messages
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pop3proxy.filtering.api import FilterContext
from pop3proxy.filters import _parts
from pop3proxy.filters._bayes import Bayes, iter_messages
from pop3proxy.filters._tokens import has_gtube, parse, tokens
from pop3proxy.filters.spam import SpamFilter

DATA = Path(__file__).resolve().parents[1] / "data"
PROPERTY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def outcome(function, *args):
    """What a call gives: its result, or the type of what it raised."""
    try:
        return function(*args)
    except Exception as exc:
        return type(exc)


def assert_same_as_reference(data: bytes) -> None:
    assert outcome(tokens, data) == outcome(reference.tokens, data)
    assert outcome(has_gtube, data) == outcome(reference.has_gtube, data)
    reading = parse(data)  # read once for both, as the filter does
    assert has_gtube(data, reading) == reference.has_gtube(data)
    assert outcome(tokens, data, reading) == outcome(reference.tokens, data)


def shape(reading: _parts.Reading) -> list:
    """Everything the tokens are read from: the top-level fields, multipart or not, each part's
    fields, default type and body."""
    found: list = [reading.multipart, reading.headers.items()]
    for part in reading.parts:
        message = part.content()
        found.append((message.items(), message.get_default_type(), message.get_payload()))
    return found


def assert_same_parts_as_email(data: bytes) -> None:
    expected = _parts.reading_of(email.message_from_bytes(data, policy=email.policy.compat32))
    assert shape(_parts.parse(data)) == shape(expected)


# -- generated mail ----------------------------------------------------------------------------------


@PROPERTY
@given(data=messages())
def test_tokens_match_the_reference_on_generated_mail(data: bytes) -> None:
    assert_same_as_reference(data)
    assert_same_parts_as_email(data)


LINES = [
    b"", b"", b"--b", b"--b--", b"--b \t", b"--b--x", b"--bx", b"--c", b"--c--", b"--", b"----", b" folded", b"\tx",
    b"Content-Type: multipart/mixed; boundary=b", b"Content-Type: multipart/alternative; boundary=\"c\"",
    b"Content-Type: multipart/digest; boundary=c", b"Content-Type: multipart/mixed; boundary=\"\"",
    b"Content-Type: multipart/mixed", b"Content-Type: message/rfc822", b"Content-Type: message/delivery-status",
    b"Content-Type: text/plain; charset=utf-8", b"Content-Type: text/html", b"Content-Transfer-Encoding: base64",
    b"Content-Transfer-Encoding: quoted-printable", b"Content-Disposition: attachment; filename=a.txt",
    b"From x", b"From ", b"From: a@b.example", b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=", b":", b": x", b"abc def",
    b"SGVsbG8gd29ybGQ=", b"caf=C3=A9 =", b"\xff\xfe 8bit", b"a\x0bb\x0cc\x1cd\x85e", b"http://x.example/y",
    b"Content-Type: multipart/mixed; boundary=\"a\xffb\"", b"--a\xffb", b"Content-Type: multipart/mixed; boundary=x:y",
    b"--x:y", b"Content-Type: multipart/mixed; boundary*=utf-8''%C3%A4", b"--\xc3\xa4", b"XJS*C4JDBQADN1.NSBN3*2IDNEN*"
    b"GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X",
]


@PROPERTY
@given(
    lines=st.lists(st.tuples(st.sampled_from(LINES), st.sampled_from([b"\r\n", b"\n", b"\r"])), max_size=40),
    last_break=st.booleans(),
)
def test_tokens_match_the_reference_on_line_soup(lines, last_break) -> None:
    data = b"".join(line + eol for line, eol in lines)
    if lines and not last_break:
        data = data[: -len(lines[-1][1])]
    assert_same_as_reference(data)
    assert_same_parts_as_email(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_tokens_match_the_reference_on_any_bytes(data: bytes) -> None:
    assert_same_as_reference(data)


# -- the sample mail of the test suite and the benchmark ----------------------------------------------


def bench_like(index: int, size: int = 20_000) -> list[bytes]:
    """A single-part attachment and a text part with an attachment, the two shapes of the benchmark's
    messages (bench/bench_mail.py)."""
    raw = random.Random(index).randbytes(size * 57 // 78)
    body = base64.encodebytes(raw).replace(b"\n", b"\r\n")
    single = (
        f"Return-Path: <sender{index}@example.org>\r\nFrom: Sender {index} <sender{index}@example.org>\r\n"
        f"To: Reader <reader@example.net>\r\nSubject: Benchmark message {index}\r\nMIME-Version: 1.0\r\n"
        f"Content-Type: application/octet-stream; name=\"data{index}.bin\"\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\n"
    ).encode() + body
    name = "setup.exe" if index % 10 == 0 else f"report{index}.pdf"
    part = attachment([f'Content-Type: application/pdf; name="{name}"'.encode(),
                       f'Content-Disposition: attachment; filename="{name}"'.encode()], raw)
    return [single, mixed(TEXT_PART, part)]


@functools.cache
def sample_mail() -> list[tuple[str, bytes]]:
    found = [(str(path.relative_to(DATA)), path.read_bytes()) for path in sorted(DATA.glob("*/*.eml"))]
    found += [(origin, data) for origin, data in iter_messages([DATA / "spam"])]
    found += [(f"bench {i}", data) for i in range(3) for data in bench_like(i)]
    lf = [(f"{name} (LF)", data.replace(b"\r\n", b"\n")) for name, data in found if b"\r\n" in data]
    crlf = [(f"{name} (CRLF)", data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")) for name, data in found]
    return found + lf + crlf


def test_tokens_match_the_reference_on_the_sample_mail() -> None:
    corpus = sample_mail()
    assert len(corpus) > 600 and any(name.endswith(".eml") for name, _ in corpus)
    for name, data in corpus:
        assert tokens(data) == reference.tokens(data), name
        reading = parse(data)
        assert has_gtube(data, reading) == reference.has_gtube(data), name
        assert tokens(data, reading) == reference.tokens(data), name
        assert shape(reading) == shape(_parts.reading_of(reference.parse(data))), name


def test_the_gtube_string_is_found_in_encoded_text_only() -> None:
    gtube = base64.encodebytes(reference.GTUBE)
    for ctype, expected in (("text/plain", True), ("text/html", True), ("application/octet-stream", False)):
        data = (f"Subject: x\r\nContent-Type: {ctype}\r\nContent-Transfer-Encoding: base64\r\n\r\n").encode() + gtube
        assert has_gtube(data) is expected is reference.has_gtube(data)


# -- no parse by email, but for nesting too deep to follow -------------------------------------------


@pytest.fixture
def feeds(monkeypatch) -> list[int]:
    """Counts the messages given to email's feed parser."""
    fed: list[int] = []
    real = email.feedparser.FeedParser.close

    def close(self):
        fed.append(1)
        return real(self)

    monkeypatch.setattr(email.feedparser.FeedParser, "close", close)
    return fed


def test_checking_and_training_parse_nothing_with_email(feeds, tmp_path) -> None:
    corpus = [data for _, data in sample_mail()]
    bayes = Bayes(tmp_path / "bayes.sqlite")
    bayes.train_messages(spam=corpus[::2], ham=corpus[1::2])
    flt = SpamFilter(SpamFilter.Config(database=str(bayes.path), min_trained=1))
    for index, data in enumerate(corpus[:50] + [mixed(TEXT_PART, attachment([b"Content-Type: x/y"], EXE))]):
        flt(data, FilterContext("alice", str(index)))
    assert feeds == []


def nested(depth: int) -> bytes:
    """A text part inside ``depth`` attached messages."""
    head = b"Subject: deep\r\nContent-Type: message/rfc822\r\n\r\n"
    inner = b"Content-Type: message/rfc822\r\n\r\n" * (depth - 1)
    return head + inner + b"Content-Type: text/plain\r\n\r\nhello from the bottom " + reference.GTUBE + b"\r\n"


def test_nesting_deeper_than_the_scanner_follows_is_parsed_by_email(feeds) -> None:
    shallow, deep = nested(_parts.MAX_DEPTH), nested(_parts.MAX_DEPTH + 1)
    encoded = deep.replace(b"Content-Type: text/plain\r\n", b"Content-Type: text/plain\r\n"
                           b"Content-Transfer-Encoding: quoted-printable\r\n").replace(b"GTUBE-", b"GTUBE=2D")
    expected = [reference.tokens(shallow), reference.tokens(deep), reference.has_gtube(encoded)]
    feeds.clear()
    assert tokens(shallow) == expected[0] and feeds == []
    assert tokens(deep) == expected[1] and len(feeds) == 1
    assert {"hello", "bottom", "mime:multipart", "subject:deep"} <= expected[1]
    assert reference.GTUBE not in encoded and has_gtube(encoded) is True is expected[2]
