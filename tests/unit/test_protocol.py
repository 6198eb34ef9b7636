"""The sans-IO POP3 core: bytes in, events out; no sockets.

This file: reading commands, writing replies, message bodies (dot-stuffing, TOP). Reading replies and
the client side are in test_protocol_replies.py, the properties in test_protocol_properties.py; the
helpers in helpers/protocol.py.
"""

from __future__ import annotations

import pytest
from helpers.protocol import read_lines, stuff

from pop3proxy import pop3 as p


# --- reading commands ---------------------------------------------------------------


def test_line_crlf_and_lone_lf():
    assert read_lines([b"USER alice\r\nPASS x\nNOOP\r\n"]) == [
        p.Line(b"USER alice"),
        p.Line(b"PASS x"),
        p.Line(b"NOOP"),
    ]


def test_lone_cr_inside_a_line_is_data():
    assert read_lines([b"NOOP\rX\r\n"]) == [p.Line(b"NOOP\rX")]


def test_partial_line_waits_for_its_terminator():
    reader = p.LineReader()
    reader.receive_data(b"USER al")
    assert reader.next_event() is p.NEED_DATA
    assert reader.buffered == 7
    reader.receive_data(b"ice\r")
    assert reader.next_event() is p.NEED_DATA
    reader.receive_data(b"\n")
    assert reader.next_event() == p.Line(b"USER alice")
    assert reader.buffered == 0


def test_empty_line_is_a_line():
    assert read_lines([b"\r\n\n"]) == [p.Line(b""), p.Line(b"")]


def test_line_length_limit_counts_the_terminator():
    fits = b"X" * (p.MAX_COMMAND_LINE - 2) + b"\r\n"
    too_long = b"X" * (p.MAX_COMMAND_LINE - 1) + b"\r\n"
    assert read_lines([fits]) == [p.Line(fits[:-2])]
    assert read_lines([too_long]) == [p.LineTooLong(p.MAX_COMMAND_LINE + 1)]


def test_over_long_line_is_reported_and_the_next_command_still_parsed():
    data = b"USER " + b"x" * 300 + b"\r\nNOOP\r\n"
    for chunks in ([data], [bytes([b]) for b in data]):
        events = read_lines(chunks)
        assert events == [p.LineTooLong(307), p.Line(b"NOOP")]


def test_endless_line_keeps_memory_bounded():
    reader = p.LineReader()
    for _ in range(100):
        reader.receive_data(b"A" * 1000)
        assert reader.next_event() is p.NEED_DATA
        assert reader.buffered <= p.MAX_COMMAND_LINE
    reader.receive_data(b"\r\nQUIT\r\n")
    assert reader.next_event() == p.LineTooLong(100_002)
    assert reader.next_event() == p.Line(b"QUIT")


def test_auth_lines_may_be_longer():
    line = b"A" * 1000
    assert read_lines([line + b"\r\n"], max_length=p.MAX_AUTH_LINE) == [p.Line(line)]
    assert read_lines([line + b"\r\n"]) == [p.LineTooLong(1002)]


def test_discard_buffer_drops_everything_pending():
    reader = p.LineReader()
    reader.receive_data(b"STLS\r\nUSER injected\r\nPA")
    assert reader.next_event() == p.Line(b"STLS")
    assert reader.discard_buffer() == len(b"USER injected\r\nPA")
    assert reader.buffered == 0
    assert reader.next_event() is p.NEED_DATA
    reader.receive_data(b"CAPA\r\n")
    assert reader.next_event() == p.Line(b"CAPA")


def test_discard_buffer_ends_an_over_long_line():
    reader = p.LineReader()
    reader.receive_data(b"Z" * 400)
    assert reader.next_event() is p.NEED_DATA
    reader.receive_data(b"ZZ")
    assert reader.discard_buffer() == 2
    reader.receive_data(b"NOOP\r\n")
    assert reader.next_event() == p.Line(b"NOOP")


def test_parse_command_keyword_is_case_insensitive():
    assert p.parse_command(b"uSeR alice") == p.Command("USER", ("alice",), "alice")
    assert p.parse_command(b"stat") == p.Command("STAT", (), "")


def test_parse_command_pass_keeps_spaces():
    command = p.parse_command(b"PASS  my secret  pass ")
    assert command.keyword == "PASS"
    assert command.arg_text == " my secret  pass "
    assert command.args == ("my", "secret", "pass")


def test_parse_command_splits_on_runs_of_spaces():
    assert p.parse_command(b"TOP  1   5").args == ("1", "5")


def test_parse_command_utf8_arguments():
    assert p.parse_command("USER jürgen".encode()).args == ("jürgen",)


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b" USER alice",
        b"US\0ER alice",
        b"USER al\0ice",
        b"\xff\xfe\xfd",
        b"USER \xff\xfe",
        b"US-ER x",
        b"USER\talice",
        b"A" * 41,
    ],
)
def test_parse_command_rejects(line):
    with pytest.raises(p.RemoteProtocolError) as caught:
        p.parse_command(line)
    assert caught.value.reply.startswith(b"-ERR ")
    assert caught.value.reply.endswith(b"\r\n")
    assert caught.value.reply.count(b"\n") == 1


def test_parse_command_forty_character_keyword():
    assert p.parse_command(b"a" * 40).keyword == "A" * 40


def test_command_validates_itself():
    with pytest.raises(p.LocalProtocolError):
        p.Command("user", (), "")


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("1", 1),
        ("42", 42),
        ("007", 7),
        ("9999999999", 9999999999),
        ("0", None),
        ("-1", None),
        ("+1", None),
        (" 1", None),
        ("1 ", None),
        ("12345678901", None),
        ("1.0", None),
        ("\u0663", None),
        ("", None),
    ],
)
def test_parse_number(text, number):
    assert p.parse_number(text) == number


# --- writing replies ----------------------------------------------------------------


def test_ok_and_err():
    assert p.ok() == b"+OK\r\n"
    assert p.ok("2 320") == b"+OK 2 320\r\n"
    assert p.err("no such message") == b"-ERR no such message\r\n"
    assert p.err("mailbox locked", "IN-USE") == b"-ERR [IN-USE] mailbox locked\r\n"
    assert p.err("try later", "SYS/TEMP") == b"-ERR [SYS/TEMP] try later\r\n"
    assert p.err("", "AUTH") == b"-ERR [AUTH]\r\n"


def test_formatters_refuse_line_breaks_and_bad_codes():
    with pytest.raises(p.LocalProtocolError):
        p.ok("a\r\n+OK injected")
    with pytest.raises(p.LocalProtocolError):
        p.err("x", "IN USE")
    with pytest.raises(p.LocalProtocolError):
        p.multiline("x", ["one\ntwo"])


def test_multiline_stuffs_and_terminates():
    assert p.multiline("2 messages", ["1 120", b".hidden", ""]) == (
        b"+OK 2 messages\r\n1 120\r\n..hidden\r\n\r\n.\r\n"
    )
    assert p.multiline("", []) == b"+OK\r\n.\r\n"


def test_continuation():
    assert p.continuation() == b"+ \r\n"
    assert p.continuation(b"PDE4OTYuNjk3MTcwOTUyQHBvc3RvZmZpY2U+") == (
        b"+ PDE4OTYuNjk3MTcwOTUyQHBvc3RvZmZpY2U+\r\n"
    )


# --- message bodies -----------------------------------------------------------------


def test_dot_on_first_line_is_doubled():
    assert stuff(b".foo\r\nbar\r\n") == b"..foo\r\nbar\r\n.\r\n"


def test_dot_at_chunk_boundary_is_doubled():
    stuffer = p.DotStuffer()
    assert stuffer.feed(b"a\r\n") == b"a\r\n"
    assert stuffer.feed(b".b\r\n") == b"..b\r\n"
    assert stuffer.feed(b"c.\r\n.") == b"c.\r\n.."
    assert stuffer.finish() == b"\r\n.\r\n"


def test_crlf_split_across_chunks_is_not_doubled():
    assert stuff(b"", [b"a\r", b"\n.b\r", b"\n"]) == b"a\r\n..b\r\n.\r\n"


def test_bare_lf_becomes_crlf():
    assert stuff(b"a\nb\n\n.c\n") == b"a\r\nb\r\n\r\n..c\r\n.\r\n"
    assert stuff(b"", [b"a", b"\n", b"\n", b".c"]) == b"a\r\n\r\n..c\r\n.\r\n"


def test_message_without_final_crlf_gets_one():
    assert stuff(b"a\r\nb") == b"a\r\nb\r\n.\r\n"
    assert stuff(b"a\r") == b"a\r\r\n.\r\n"


def test_empty_message():
    assert stuff(b"") == b".\r\n"


def test_lone_cr_is_not_a_line_start():
    assert stuff(b"a\r.b\r\n") == b"a\r.b\r\n.\r\n"


def test_stuffer_misuse():
    stuffer = p.DotStuffer()
    stuffer.finish()
    with pytest.raises(p.LocalProtocolError):
        stuffer.feed(b"x")
    with pytest.raises(p.LocalProtocolError):
        stuffer.finish()
    with pytest.raises(p.LocalProtocolError):
        p.DotStuffer(top_lines=-1)


MESSAGE = b"From: a@example.org\r\nSubject: s\r\n\r\nl1\r\nl2\r\n.l3\r\n"


def test_top_zero_sends_headers_and_blank_line():
    stuffer = p.DotStuffer(top_lines=0)
    assert stuffer.feed(MESSAGE) == b"From: a@example.org\r\nSubject: s\r\n\r\n"
    assert stuffer.done
    assert stuffer.feed(b"more\r\n") == b""
    assert stuffer.finish() == b".\r\n"


def test_top_n_body_lines():
    stuffer = p.DotStuffer(top_lines=2)
    out = stuffer.feed(MESSAGE[:25])
    assert not stuffer.done
    out += stuffer.feed(MESSAGE[25:])
    assert stuffer.done
    assert out + stuffer.finish() == b"From: a@example.org\r\nSubject: s\r\n\r\nl1\r\nl2\r\n.\r\n"


def test_top_beyond_end_sends_everything():
    stuffer = p.DotStuffer(top_lines=10)
    out = stuffer.feed(MESSAGE)
    assert not stuffer.done
    assert out + stuffer.finish() == MESSAGE.replace(b".l3", b"..l3") + b".\r\n"


def test_top_message_without_body_separator():
    assert stuff(b"From: a\nSubject: s", top=0) == b"From: a\r\nSubject: s\r\n.\r\n"


def test_top_message_starting_with_blank_line():
    assert stuff(b"\nbody\n", top=0) == b"\r\n.\r\n"
    assert stuff(b"", [b"\r", b"\n", b"body\r\n", b"more\r\n"], top=1) == b"\r\nbody\r\n.\r\n"


def test_top_blank_line_split_across_chunks():
    chunks = [b"H: 1\r", b"\n\r", b"\nb1\nb2\n"]
    assert stuff(b"", chunks, top=1) == b"H: 1\r\n\r\nb1\r\n.\r\n"
    chunks = [b"H: 1\n", b"\n", b".b1\n"]
    assert stuff(b"", chunks, top=1) == b"H: 1\r\n\r\n..b1\r\n.\r\n"


def test_wire_size_and_to_crlf():
    assert p.to_crlf(b"a\nb\r\nc\r") == b"a\r\nb\r\nc\r"
    assert p.wire_size(b"a\nb\r\nc\r") == 8
    assert p.wire_size(b"") == 0
    data = b"x\r\n"
    assert p.to_crlf(data) is data
