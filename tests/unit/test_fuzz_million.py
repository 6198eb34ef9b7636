"""A million fuzz inputs, counted: h11's invariant for the sans-IO core.

Any byte sequence either parses or raises the *remote* protocol error (`RemoteProtocolError`), never
our `LocalProtocolError` or anything else, whether it arrives in one chunk or one byte at a time. The
inputs are drawn from an alphabet that is mostly POP3 (keywords, numbers, base64, status indicators)
with CR, LF, NUL, other controls and 8-bit octets mixed in, so that the parsers' edges are hit often.
The seed is fixed (``POP3PROXY_FUZZ_SEED`` picks another) and the counts are printed.
"""

from __future__ import annotations

import os
import random

from pop3proxy import pop3 as p
from pop3proxy.pop3 import session as s
from pop3proxy.store.base import MessageInfo

SEED = int(os.environ.get("POP3PROXY_FUZZ_SEED", "1939"))
COMMAND_INPUTS = int(os.environ.get("POP3PROXY_FUZZ_COMMANDS", "500000"))
REPLY_INPUTS = int(os.environ.get("POP3PROXY_FUZZ_REPLIES", "250000"))
SESSION_INPUTS = int(os.environ.get("POP3PROXY_FUZZ_SESSIONS", "250000"))

TOKENS = [
    b"\r", b"\n", b"\r\n", b"\0", b" ", b"  ", b"\t", b"\x01", b"\x1b", b"\x7f", b"\xff", b"\xc3\xa4", b"\xe2\x80\xa8",
    b".", b"..", b"\r\n.\r\n", b".\r\n", b"+", b"+OK", b"-ERR", b"+ ", b"[", b"]", b"[IN-USE]", b"[AUTH]", b"[SYS/TEMP]",
    b"USER", b"PASS", b"STAT", b"LIST", b"RETR", b"DELE", b"NOOP", b"RSET", b"TOP", b"UIDL", b"QUIT", b"CAPA",
    b"AUTH", b"STLS", b"APOP", b"PLAIN", b"XOAUTH2", b"OAUTHBEARER", b"*", b"=", b"AGFAYg==", b"AQ==",
    b"user", b"good", b"bad", b"0", b"1", b"2", b"3", b"-1", b"4294967296", b"99999999999", b"x" * 70, b"x" * 300,
    b"<1.2@host>", b"abc", b"SASL", b"IMPLEMENTATION",
]
MESSAGES = [MessageInfo(f"k{i}", f"u{i}", 100 + i) for i in range(1, 4)]


def inputs(rng: random.Random, count: int, max_tokens: int = 8):
    choices, randint = rng.choices, rng.randint
    for _ in range(count):
        yield b"".join(choices(TOKENS, k=randint(1, max_tokens)))


KEYWORDS = [b"USER", b"PASS", b"STAT", b"LIST", b"RETR", b"DELE", b"NOOP", b"RSET", b"TOP", b"UIDL", b"QUIT",
            b"CAPA", b"AUTH", b"STLS", b"APOP", b"XYZ"]
ARGS = [b"1", b"2", b"3", b"0", b"9", b"user", b"good", b"PLAIN", b"XOAUTH2", b"OAUTHBEARER", b"*", b"AGFAYg==", b"=",
        b"AQ==", b"bad", b"x" * 70]


def commands(rng: random.Random, count: int):
    """Mostly command-shaped lines (a keyword, arguments, CRLF) with noise from the alphabet mixed in."""
    choices, random_ = rng.choices, rng.random
    for _ in range(count):
        if random_() < 0.3:
            yield b"".join(choices(TOKENS, k=rng.randint(1, 6)))
            continue
        parts = [rng.choice(KEYWORDS) if random_() < 0.9 else rng.choice(KEYWORDS).lower()]
        parts += choices(ARGS if random_() < 0.7 else TOKENS, k=rng.randint(0, 3))
        yield b" ".join(parts) + (b"\r\n" if random_() < 0.9 else rng.choice([b"\n", b"\r", b""]))


def replies(rng: random.Random, count: int):
    """Mostly reply-shaped output (status lines, multi-line bodies, the terminator) with noise."""
    for _ in range(count):
        kind = rng.random()
        if kind < 0.3:
            yield b"".join(rng.choices(TOKENS, k=rng.randint(1, 12)))
        elif kind < 0.6:
            yield rng.choice([b"+OK", b"-ERR", b"+", b"+ok", b"-err"]) + b" " + b"".join(
                rng.choices(TOKENS, k=rng.randint(0, 4))
            ) + b"\r\n"
        else:
            body = b"".join(rng.choices(TOKENS, k=rng.randint(0, 8)))
            yield body + rng.choice([b"\r\n", b"\r\n.\r\n", b"\n.\n", b".\r\n"])


def test_command_reader_and_parser_raise_only_the_remote_error():
    rng = random.Random(SEED)
    reader = p.LineReader()
    parsed = rejected = 0
    for i, data in enumerate(commands(rng, COMMAND_INPUTS)):
        if i % 50 == 0:  # every 50th input arrives one octet at a time
            pieces = [data[j : j + 1] for j in range(len(data))]
        else:
            pieces = [data]
        for piece in pieces:
            reader.receive_data(piece)
            while (event := reader.next_event()) is not p.NEED_DATA:
                if isinstance(event, p.Line):
                    try:
                        p.parse_command(event.data)
                        parsed += 1
                    except p.RemoteProtocolError as exc:
                        assert exc.reply.startswith(b"-ERR ") and exc.reply.endswith(b"\r\n")
                        assert exc.reply.count(b"\r") == 1 and exc.reply.count(b"\n") == 1
                        rejected += 1
        # also the parser alone, on input that never went through the reader (lone CRs included)
        try:
            p.parse_command(data)
        except p.RemoteProtocolError:
            pass
    print(f"fuzz: {COMMAND_INPUTS} command-reader inputs: {parsed} lines parsed, {rejected} rejected")
    assert parsed and rejected


def test_reply_parser_raises_only_the_remote_error():
    rng = random.Random(SEED + 1)
    count = errors = events = 0
    reader = None
    for i, data in enumerate(replies(rng, REPLY_INPUTS)):
        if reader is None or i % 200 == 0:
            reader = p.ReplyReader()
            for _ in range(64):
                reader.expect(rng.random() < 0.5)
        pieces = [data[j : j + 1] for j in range(len(data))] if i % 50 == 0 else [data]
        try:
            for piece in pieces:
                reader.receive_data(piece)
                while (event := reader.next_event()) is not p.NEED_DATA:
                    events += 1
        except p.RemoteProtocolError:
            errors += 1
            reader = None  # a client gives up on a provider that sent garbage
        count += 1
    print(f"fuzz: {count} reply-parser inputs: {events} events, {errors} remote errors")
    assert count == REPLY_INPUTS and events and errors


def _run(session: s.Session, rng: random.Random) -> int:
    """Carry out the session's actions the way a driver would; return the octets it sent."""
    sent = 0
    while (actions := session.next_actions()) is not None:
        queue = list(actions)
        while queue:
            action = queue.pop(0)
            if isinstance(action, s.Send):
                assert action.data.endswith(b"\r\n")
                sent += len(action.data)
            elif isinstance(action, s.SendMessage):
                sent += len(action.status)
            elif isinstance(action, s.Authenticate):
                if action.password == "good" or rng.random() < 0.3:
                    queue[:0] = session.login_succeeded(action.user, MESSAGES)
                else:
                    queue[:0] = session.login_failed()
            elif isinstance(action, s.StartTLS):
                queue[:0] = session.tls_started()
            elif isinstance(action, s.Update):
                queue[:0] = session.update_done(rng.random() < 0.8)
            elif isinstance(action, s.Close):
                return -1
    return sent


def test_whole_session_raises_nothing_of_its_own():
    rng = random.Random(SEED + 2)
    count = sessions = closed = 0
    session = None
    for data in commands(rng, SESSION_INPUTS):
        if session is None:
            session = s.Session(stls_available=rng.random() < 0.5, bearer_auth=rng.random() < 0.5)
            sessions += 1
            session.receive_data(b"USER user\r\nPASS good\r\n" if rng.random() < 0.5 else b"")
        session.receive_data(data)
        try:
            result = _run(session, rng)
        except p.RemoteProtocolError:
            result = -1
        if result < 0:
            closed += 1
            session = None
        count += 1
    print(f"fuzz: {count} whole-session inputs over {sessions} sessions ({closed} closed by the session)")
    assert count == SESSION_INPUTS and sessions > 1


def test_zz_the_count_is_at_least_a_million():
    total = COMMAND_INPUTS + REPLY_INPUTS + SESSION_INPUTS
    print(f"fuzz: {total} inputs in all")
    assert total >= 1_000_000 or os.environ.get("POP3PROXY_FUZZ_COMMANDS"), total
