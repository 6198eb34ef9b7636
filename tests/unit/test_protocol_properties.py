"""The sans-IO POP3 core, properties: chunking never changes what is read, stuffing round-trips,
and the readers and parsers raise only remote errors.
"""

from __future__ import annotations

from helpers.protocol import (
    PROPERTY,
    body_of,
    cuts,
    mail_bytes,
    read_lines,
    read_replies,
    split_at,
    stuff,
    top_reference,
    unstuff_reference,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from pop3proxy import pop3 as p


# --- properties ---------------------------------------------------------------------


@PROPERTY
@given(message=mail_bytes, stuff_cuts=cuts, read_cuts=cuts)
def test_stuff_then_unstuff_round_trips(message, stuff_cuts, read_cuts):
    wire = stuff(message, split_at(message, stuff_cuts))
    assert unstuff_reference(wire) == body_of(message)
    events = read_replies(split_at(b"+OK\r\n" + wire, read_cuts), [True])
    expected_body = [p.Data(body_of(message))] if body_of(message) else []
    assert events == [p.Status(True, None, ""), *expected_body, p.EndOfData()]


@PROPERTY
@given(message=mail_bytes, top=st.integers(min_value=0, max_value=5), stuff_cuts=cuts)
def test_top_matches_a_line_by_line_reading(message, top, stuff_cuts):
    stuffer = p.DotStuffer(top)
    out = b"".join(stuffer.feed(chunk) for chunk in split_at(message, stuff_cuts))
    done_early = stuffer.done
    wire = out + stuffer.finish()
    assert unstuff_reference(wire) == top_reference(message, top)
    if done_early:
        assert out.endswith(b"\r\n")


line_input = st.lists(
    st.sampled_from([b"\r", b"\n", b"\r\n", b" ", b"USER a", b"x" * 7, b"\0", b"\xff", b"."]), max_size=40
).map(b"".join)


@PROPERTY
@given(data=line_input, max_length=st.integers(min_value=1, max_value=30), chunk_cuts=cuts)
def test_line_reader_ignores_chunking(data, max_length, chunk_cuts):
    whole = read_lines([data], max_length)
    assert read_lines([bytes([b]) for b in data], max_length) == whole
    assert read_lines(split_at(data, chunk_cuts), max_length) == whole


reply_input = st.lists(
    st.sampled_from(
        [b"+OK", b"-ERR", b"+ ", b" [AUTH]", b" text", b"\r\n", b"\n", b"\r", b".", b"..", b"x", b"\xff"]
    ),
    max_size=40,
).map(b"".join)
expectations = st.lists(st.booleans(), min_size=1, max_size=4)


@PROPERTY
@given(data=reply_input, expected=expectations, chunk_cuts=cuts)
def test_reply_reader_ignores_chunking(data, expected, chunk_cuts):
    whole = read_replies([data], expected)
    assert read_replies([bytes([b]) for b in data], expected) == whole
    assert read_replies(split_at(data, chunk_cuts), expected) == whole


@PROPERTY
@given(line=st.one_of(st.binary(max_size=80), line_input))
def test_parse_command_raises_only_remote_errors(line):
    try:
        command = p.parse_command(line)
    except p.RemoteProtocolError as exc:
        assert exc.reply.startswith(b"-ERR ") and exc.reply.endswith(b"\r\n")
    else:  # the command is the line, keyword upper-cased
        keyword = command.keyword.encode()
        assert line[: len(keyword)].upper() == keyword
        assert line[len(keyword) :] in (b"", b" " + command.arg_text.encode())
        assert all(arg and " " not in arg for arg in command.args)
        assert "".join(command.args) == command.arg_text.replace(" ", "")


@PROPERTY
@given(data=st.one_of(st.binary(max_size=300), reply_input), expected=expectations)
def test_reply_reader_and_parsers_raise_only_remote_errors(data, expected):
    read_replies([data], expected)  # a RemoteProtocolError becomes "ERROR"; anything else fails
    for parser in (p.parse_scan_listing, p.parse_uidl_listing, p.parse_capa):
        try:
            parser(data)
        except p.RemoteProtocolError:
            pass


@PROPERTY
@given(message=mail_bytes, stuff_cuts=cuts)
def test_wire_size_is_the_unstuffed_size(message, stuff_cuts):
    assert p.wire_size(message) == len(p.to_crlf(message))
    wire = stuff(message, split_at(message, stuff_cuts))
    body = unstuff_reference(wire)
    added = len(body) - p.wire_size(message)
    assert added == (0 if body_of(message) == p.to_crlf(message) else 2)


@settings(max_examples=200, deadline=None)
@given(
    st.binary(max_size=400),
    st.lists(st.integers(1, 50), max_size=10),
    st.one_of(st.none(), st.integers(0, 5)),
)
def test_stuffer_for_crlf_input_matches_the_general_one(message, cuts, top):
    """The stores serve CRLF form; the fast path that trusts it sends exactly what the general one does."""
    data = p.to_crlf(message)
    pieces, rest = [], data
    for cut in cuts:
        pieces.append(rest[:cut])
        rest = rest[cut:]
    pieces.append(rest)
    outputs = []
    for crlf in (False, True):
        stuffer = p.DotStuffer(top, crlf=crlf)
        out = b"".join(stuffer.feed(piece) for piece in pieces if piece)
        outputs.append(out + stuffer.finish())
    assert outputs[0] == outputs[1]
