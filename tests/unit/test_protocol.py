"""The sans-IO POP3 core: bytes in, events out; no sockets."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
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


# --- reading replies ----------------------------------------------------------------


def test_single_line_reply():
    assert read_replies([b"+OK hello there\r\n"], [False]) == [p.Status(True, None, "hello there")]
    assert read_replies([b"+OK\r\n"], [False]) == [p.Status(True, None, "")]


def test_multi_line_reply():
    events = read_replies([b"+OK 2 messages\r\n1 10\r\n2 20\r\n.\r\n"], [True])
    assert events == [p.Status(True, None, "2 messages"), p.Data(b"1 10\r\n2 20\r\n"), p.EndOfData()]


def test_empty_multi_line_reply():
    assert read_replies([b"+OK\r\n.\r\n"], [True]) == [p.Status(True, None, ""), p.EndOfData()]


def test_negative_reply_to_multi_line_command_is_single_line():
    events = read_replies([b"-ERR no such message\r\n+OK 1 10\r\n"], [True, False])
    assert events == [p.Status(False, None, "no such message"), p.Status(True, None, "1 10")]


def test_response_codes():
    assert read_replies([b"-ERR [IN-USE] locked\r\n"], [False]) == [p.Status(False, "IN-USE", "locked")]
    assert read_replies([b"-ERR [SYS/TEMP]\r\n"], [False]) == [p.Status(False, "SYS/TEMP", "")]
    assert read_replies([b"-ERR [not a code\r\n"], [False]) == [p.Status(False, None, "[not a code")]


def test_lf_only_status_line_is_accepted():
    assert read_replies([b"+OK ready\n"], [False]) == [p.Status(True, None, "ready")]


def test_unstuffing():
    wire = b"+OK\r\n..dot\r\n...\r\nx.\r\n\r\n..\r\n.\r\n"
    assert read_replies([wire], [True])[1] == p.Data(b".dot\r\n..\r\nx.\r\n\r\n.\r\n")


def test_terminator_split_at_every_position():
    wire = b"+OK\r\n.a\r\n..\r\nline\r\n.\r\n+OK next\r\n"
    whole = read_replies([wire], [True, False])
    assert whole == [
        p.Status(True, None, ""),
        p.Data(b"a\r\n.\r\nline\r\n"),
        p.EndOfData(),
        p.Status(True, None, "next"),
    ]
    for i in range(len(wire) + 1):
        for j in range(i, len(wire) + 1):
            assert read_replies([wire[:i], wire[i:j], wire[j:]], [True, False]) == whole


def test_large_body_comes_in_large_chunks():
    body = (b"x" * 78 + b"\r\n") * 20_000
    reader = p.ReplyReader()
    reader.expect(True)
    reader.receive_data(b"+OK\r\n" + body + b".\r\n")
    assert reader.next_event() == p.Status(True, None, "")
    assert reader.next_event() == p.Data(body)
    assert reader.next_event() == p.EndOfData()


def test_held_back_octets_are_few():
    reader = p.ReplyReader()
    reader.expect(True)
    reader.receive_data(b"+OK\r\nabc\r\n.\r")
    assert reader.next_event() == p.Status(True, None, "")
    assert reader.next_event() == p.Data(b"abc\r\n")
    assert reader.next_event() is p.NEED_DATA
    assert reader.buffered == 2
    reader.receive_data(b"X\r\n.\r\n")
    assert reader.next_event() == p.Data(b"\rX\r\n")
    assert reader.next_event() == p.EndOfData()


@pytest.mark.parametrize(
    "wire",
    [
        b"HELLO\r\n",
        b"+OKAY\r\n",
        b"\r\n",
        b"OK fine\r\n",
        b"+" + b"O" * 600,
        b"+OK " + b"x" * 600 + b"\r\n",
    ],
)
def test_garbage_raises(wire):
    reader = p.ReplyReader()
    reader.expect(False)
    reader.receive_data(wire)
    with pytest.raises(p.RemoteProtocolError):
        reader.next_event()
    with pytest.raises(p.RemoteProtocolError):
        reader.next_event()


def test_unexpected_data_raises():
    reader = p.ReplyReader()
    assert reader.next_event() is p.NEED_DATA
    reader.receive_data(b"+OK\r\n")
    with pytest.raises(p.RemoteProtocolError):
        reader.next_event()


def test_continuation_reply():
    assert read_replies([b"+ dGVzdA==\r\n"], [False]) == [p.Status(True, None, "dGVzdA==", continuation=True)]
    assert read_replies([b"+\r\n"], [False]) == [p.Status(True, None, "", continuation=True)]
    assert read_replies([b"+ x\r\n"], [True]) == ["ERROR"]


def test_status_validates_itself():
    with pytest.raises(p.LocalProtocolError):
        p.Status(False, None, "", continuation=True)


def test_client_connection_expects_greeting_first():
    client = p.ClientConnection()
    with pytest.raises(p.LocalProtocolError):
        client.send("CAPA")
    client.receive_data(b"+OK POP3 ready <1.2@host>\r\n")
    assert client.next_event() == p.Status(True, None, "POP3 ready <1.2@host>")
    assert not client.pending


@pytest.mark.parametrize(
    ("command", "args", "line", "multi"),
    [
        ("CAPA", (), b"CAPA\r\n", True),
        ("LIST", (), b"LIST\r\n", True),
        ("LIST", (1,), b"LIST 1\r\n", False),
        ("UIDL", (), b"UIDL\r\n", True),
        ("uidl", ("2",), b"uidl 2\r\n", False),
        ("RETR", (1,), b"RETR 1\r\n", True),
        ("TOP", (1, 0), b"TOP 1 0\r\n", True),
        ("STAT", (), b"STAT\r\n", False),
        ("USER", ("alice",), b"USER alice\r\n", False),
        ("PASS", ("my secret",), b"PASS my secret\r\n", False),
        ("AUTH", ("PLAIN",), b"AUTH PLAIN\r\n", False),
        ("AUTH", (), b"AUTH\r\n", True),
    ],
)
def test_client_connection_send(command, args, line, multi):
    client = p.ClientConnection()
    client.receive_data(b"+OK hi\r\n")
    client.next_event()
    assert client.send(command, *args) == line
    client.receive_data(b"+OK\r\n")
    assert client.next_event() == p.Status(True, None, "")
    assert client.pending is multi
    assert client.next_event() is p.NEED_DATA
    if multi:
        client.receive_data(b".\r\n")
        assert client.next_event() == p.EndOfData()
        assert not client.pending


def test_client_connection_refuses_injection_and_overlap():
    client = p.ClientConnection()
    client.receive_data(b"+OK hi\r\n")
    client.next_event()
    with pytest.raises(p.LocalProtocolError):
        client.send("USER", "alice\r\nDELE 1")
    client.send("NOOP")
    with pytest.raises(p.LocalProtocolError):
        client.send("NOOP")


def test_greeting_timestamp_anywhere():
    stamp = "<1896.697170952@dbc.mtview.ca.us>"
    assert p.parse_greeting_timestamp(f"POP3 server ready {stamp}") == stamp
    assert p.parse_greeting_timestamp(f"{stamp} POP3 server ready") == stamp
    assert p.parse_greeting_timestamp(f"Dovecot {stamp} ready.") == stamp
    assert p.parse_greeting_timestamp("Dovecot ready.") is None
    assert p.parse_greeting_timestamp("ready <no-at-sign>") is None


def test_apop_digest_rfc1939_example():
    digest = p.apop_digest("<1896.697170952@dbc.mtview.ca.us>", "tanstaaf")
    assert digest == "c4c9334bac560ecc979e58001b3e22fb"


def test_parse_capa():
    lines = [b"TOP\r\n", "USER", "SASL PLAIN LOGIN", "resp-codes", "IMPLEMENTATION Dovecot ready", ""]
    assert p.parse_capa(lines) == {
        "TOP": [],
        "USER": [],
        "SASL": ["PLAIN", "LOGIN"],
        "RESP-CODES": [],
        "IMPLEMENTATION": ["Dovecot", "ready"],
    }
    assert p.parse_capa(b"STLS\r\nUIDL\r\n") == {"STLS": [], "UIDL": []}


def test_parse_scan_listing():
    assert p.parse_scan_listing([b"1 120\r\n", "2 200", "3 0 extra info"]) == {1: 120, 2: 200, 3: 0}
    assert p.parse_scan_listing(b"") == {}
    for bad in (["x 1"], ["1"], ["1 -5"], ["0 10"], ["1 10", "1 20"], ["1 1e3"]):
        with pytest.raises(p.RemoteProtocolError):
            p.parse_scan_listing(bad)


def test_parse_uidl_listing():
    lines = b"1 whqtswO00WBw418f9t5JxYwZ\r\n2 QhdPYR:00WBw1Ph7x7\r\n"
    assert p.parse_uidl_listing(lines) == {1: "whqtswO00WBw418f9t5JxYwZ", 2: "QhdPYR:00WBw1Ph7x7"}
    for bad in (["1"], ["1 a b"], ["1 " + "u" * 71], ["a uid"], ["1 u\x01"]):
        with pytest.raises(p.RemoteProtocolError):
            p.parse_uidl_listing(bad)


def test_protocol_imports_no_io():
    imported: set[str] = set()
    nodes = []
    for module in Path(p.__file__).parent.glob("*.py"):
        nodes.extend(ast.walk(ast.parse(module.read_text(encoding="utf-8"))))
    for node in nodes:
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert "re" in imported  # the walk does see the imports
    assert not imported & {"trio", "os", "socket", "asyncio", "selectors", "ssl"}


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
