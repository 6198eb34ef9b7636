"""Byte-exact header editing and the ``headers`` filter: DKIM signatures survive it, line endings and
invalid UTF-8 are kept, exactly the matching fields go.
"""

from __future__ import annotations

import re
from email.header import decode_header, make_header

import pytest
from helpers.filtering import CTX, HEADERS_OPTIONS, LUNCH, MIXED, NEWSLETTER, dkim_verifies, pipeline
from helpers.filtering import _reset_plugins  # noqa: F401  (fixtures)
from hypothesis import given, settings
from hypothesis import strategies as st

from pop3proxy.filtering.headers import (
    add_header,
    line_ending,
    remove_headers,
    split_header,
)
from pop3proxy.filters.headers import HeadersFilter


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
