"""Shared by the tests of the sans-IO POP3 core (tests/unit/test_protocol*.py): feeding readers,
reference implementations of dot-stuffing and TOP, and the hypothesis strategies.
"""

from __future__ import annotations

import re

from hypothesis import settings
from hypothesis import strategies as st

from pop3proxy import pop3 as p


PROPERTY = settings(max_examples=250, deadline=None)


# --- helpers ------------------------------------------------------------------------


def read_lines(chunks: list[bytes], max_length: int = p.MAX_COMMAND_LINE) -> list[object]:
    """Every event a LineReader produces when fed `chunks` one after another."""
    reader = p.LineReader()
    events: list[object] = []
    for chunk in chunks:
        reader.receive_data(chunk)
        while (event := reader.next_event(max_length)) is not p.NEED_DATA:
            events.append(event)
        assert reader.buffered <= max(max_length, len(chunk))
    return events


def read_replies(chunks: list[bytes], expected: list[bool]) -> list[object]:
    """ReplyReader events for `chunks`, adjacent Data merged; a failure ends in "ERROR"."""
    reader = p.ReplyReader()
    for multiline in expected:
        reader.expect(multiline)
    events: list[object] = []
    try:
        for chunk in chunks:
            reader.receive_data(chunk)
            while (event := reader.next_event()) is not p.NEED_DATA:
                if isinstance(event, p.Data):
                    assert event.data, "a Data event is never empty"
                    if events and isinstance(events[-1], p.Data):
                        event = p.Data(events.pop().data + event.data)
                events.append(event)
    except p.RemoteProtocolError:
        events.append("ERROR")
    return events


def stuff(message: bytes, chunks: list[bytes] | None = None, top: int | None = None) -> bytes:
    stuffer = p.DotStuffer(top)
    out = [stuffer.feed(chunk) for chunk in (chunks if chunks is not None else [message])]
    return b"".join(out) + stuffer.finish()


def unstuff_reference(wire: bytes) -> bytes:
    """A plain line-by-line reading of a stuffed body that ends with `.` CRLF."""
    assert wire.endswith(b".\r\n")
    lines = wire.split(b"\r\n")
    assert lines[-2:] == [b".", b""]
    body = lines[:-2]
    for line in body:
        assert line != b"."
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in body)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(set(cut % (len(data) + 1) for cut in cuts)), len(data)]
    return [data[a:b] for a, b in zip(points, points[1:])]


def body_of(message: bytes) -> bytes:
    """What a body read back should be: CRLF form, ending in CRLF unless empty."""
    data = p.to_crlf(message)
    return data if data == b"" or data.endswith(b"\r\n") else data + b"\r\n"


def top_reference(message: bytes, n: int) -> bytes:
    lines = re.findall(rb"[^\n]*\n|[^\n]+$", p.to_crlf(message))
    if b"\r\n" not in lines:
        return body_of(message)
    blank = lines.index(b"\r\n")
    return body_of(b"".join(lines[: blank + 1 + n]))


mail_bytes = st.one_of(
    st.binary(max_size=200),
    st.lists(
        st.sampled_from([b"\r", b"\n", b".", b"\r\n", b"..", b"\r\n.\r\n", b"\n.\n", b"a", b"From: x"]),
        max_size=40,
    ).map(b"".join),
)
cuts = st.lists(st.integers(min_value=0, max_value=10_000), max_size=12)
