"""The sans-IO POP3 core, client side: reading replies, the client connection, parsing CAPA, LIST,
UIDL; and that the core imports no I/O.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from helpers.protocol import read_replies

from pop3proxy import pop3 as p


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
