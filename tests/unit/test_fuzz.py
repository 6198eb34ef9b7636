"""Fuzzing, counted: the command parser, the upstream reply parser, and whole sessions against a model.

Each target runs a bounded number of generated inputs and prints how many it tried (run with ``-s``
to see the counts; they are part of the assertion messages too).
"""

from __future__ import annotations

import base64

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from pop3proxy import pop3 as p
from pop3proxy.pop3 import session as s
from pop3proxy.store.base import MessageInfo

COUNTS: dict[str, int] = {}

KEYWORDS = [b"USER", b"PASS", b"STAT", b"LIST", b"RETR", b"DELE", b"NOOP", b"RSET", b"TOP", b"UIDL", b"QUIT",
            b"CAPA", b"AUTH", b"STLS", b"APOP", b"XYZ", b""]

lines = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda k, args: k + b"".join(b" " + a for a in args),
        st.sampled_from(KEYWORDS),
        st.lists(st.one_of(st.binary(max_size=12), st.integers(-5, 2**40).map(lambda n: str(n).encode())), max_size=3),
    ),
)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for point in points + [len(data)]:
        pieces.append(data[last:point])
        last = point
    return [piece for piece in pieces if piece]


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(lines, max_size=8), st.lists(st.integers(0, 10_000), max_size=6))
def test_fuzz_command_reader_and_parser(commands, cuts):
    COUNTS["commands"] = COUNTS.get("commands", 0) + 1
    data = b"".join(c + b"\r\n" for c in commands)
    events = []
    for pieces in ([data], chunked(data, cuts)):
        reader = p.LineReader()
        got = []
        for piece in pieces:
            reader.receive_data(piece)
            while (event := reader.next_event()) is not p.NEED_DATA:
                got.append(event)
                if isinstance(event, p.Line):
                    try:
                        command = p.parse_command(event.data)
                        assert command.keyword.isupper() or command.keyword.isdigit() or command.keyword.isalnum()
                    except p.RemoteProtocolError as exc:
                        assert exc.reply.startswith(b"-ERR ") and exc.reply.endswith(b"\r\n")
        events.append(got)
    assert events[0] == events[1], f"chunking changed the events (after {COUNTS['commands']} inputs)"


reply_streams = st.lists(
    st.one_of(
        st.just(b"+OK fine\r\n"),
        st.just(b"-ERR [IN-USE] busy\r\n"),
        st.just(b"+OK list\r\n1 2\r\n..dot\r\n.\r\n"),
        st.binary(max_size=200),
        st.builds(lambda b: b"+OK\r\n" + b + b"\r\n.\r\n", st.binary(max_size=200)),
    ),
    max_size=5,
)


@settings(max_examples=1500, deadline=None)
@given(reply_streams, st.lists(st.booleans(), min_size=1, max_size=6), st.lists(st.integers(0, 5000), max_size=6))
def test_fuzz_upstream_reply_parser(replies, kinds, cuts):
    """Any server output either parses or raises RemoteProtocolError, whatever the chunking."""
    COUNTS["replies"] = COUNTS.get("replies", 0) + 1
    data = b"".join(replies)
    results = []
    for pieces in ([data], chunked(data, cuts), [bytes([b]) for b in data[:100]] + [data[100:]]):
        reader = p.ReplyReader()
        for multi in kinds:
            reader.expect(multi)
        got: list = []
        try:
            for piece in pieces:
                if not piece:
                    continue
                reader.receive_data(piece)
                while (event := reader.next_event()) is not p.NEED_DATA:
                    got.append(event)
        except p.RemoteProtocolError:
            got.append("error")
        # Data chunk boundaries may differ; compare with data merged.
        merged: list = []
        for event in got:
            if isinstance(event, p.Data) and merged and isinstance(merged[-1], bytes):
                merged[-1] += event.data
            elif isinstance(event, p.Data):
                merged.append(event.data)
            else:
                merged.append(event)
        results.append(merged)
    # An error may surface at a different point, but what was parsed before it agrees.
    for other in results[1:]:
        common = min(len(results[0]), len(other)) - 1
        assert results[0][: max(common, 0)] == other[: max(common, 0)]


# -- a whole session against a reference model of RFC 1939 ------------------------------------


class Model:
    """What RFC 1939 says a maildrop session looks like, kept as simply as possible."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes
        self.deleted: set[int] = set()
        self.state = "AUTHORIZATION"


class SessionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.session: s.Session | None = None
        self.model: Model | None = None
        self.updates: list[tuple[str, ...]] = []

    @initialize(sizes=st.lists(st.integers(0, 5000), max_size=6), chunk=st.integers(1, 40))
    def start(self, sizes, chunk):
        COUNTS["sessions"] = COUNTS.get("sessions", 0) + 1
        self.session = s.Session(max_bad_commands=10_000)
        self.model = Model(sizes)
        self.messages = [MessageInfo(f"k{i}", f"u{i}", size) for i, size in enumerate(sizes, 1)]
        self.chunk = chunk

    def exchange(self, line: bytes) -> tuple[bytes, list]:
        """Send a command in chunks of the drawn size; answer logins; return what was sent."""
        assert self.session is not None
        data = line + b"\r\n"
        sent, other = b"", []
        for i in range(0, len(data), self.chunk):
            self.session.receive_data(data[i : i + self.chunk])
            while (actions := self.session.next_actions()) is not None:
                queue = list(actions)
                while queue:
                    action = queue.pop(0)
                    if isinstance(action, s.Send):
                        sent += action.data
                    elif isinstance(action, s.SendMessage):
                        sent += action.status  # what a driver sends once the message opens
                        other.append(action)
                    elif isinstance(action, s.Authenticate):
                        if action.password == "good":
                            queue[:0] = self.session.login_succeeded(action.user, self.messages)
                        else:
                            queue[:0] = self.session.login_failed()
                    elif isinstance(action, s.Update):
                        self.updates.append(action.deleted)
                        queue[:0] = self.session.update_done(True)
                    else:
                        other.append(action)
                if self.session.state is s.State.CLOSED:
                    return sent, other
        return sent, other

    def live(self) -> list[int]:
        assert self.model is not None
        return [i for i in range(1, len(self.model.sizes) + 1) if i not in self.model.deleted]

    @precondition(lambda self: self.model.state == "AUTHORIZATION")
    @rule(good=st.booleans(), plain=st.booleans())
    def login(self, good, plain):
        password = b"good" if good else b"bad"
        if plain:
            line = b"AUTH PLAIN " + base64.b64encode(b"\0u\0" + password)
            sent, _ = self.exchange(line)
        else:
            self.exchange(b"USER u")
            sent, _ = self.exchange(b"PASS " + password)
        if good:
            assert sent.startswith(b"+OK"), sent
            self.model.state = "TRANSACTION"
        else:
            assert sent.startswith(b"-ERR [AUTH]"), sent

    @precondition(lambda self: self.model.state == "TRANSACTION")
    @rule()
    def stat(self):
        sent, _ = self.exchange(b"STAT")
        live = self.live()
        assert sent == b"+OK %d %d\r\n" % (len(live), sum(self.model.sizes[i - 1] for i in live))

    @precondition(lambda self: self.model.state == "TRANSACTION")
    @rule(n=st.integers(-2, 8), command=st.sampled_from([b"LIST", b"UIDL", b"RETR", b"DELE", b"TOP"]))
    def numbered(self, n, command):
        line = command + b" %d" % n + (b" 0" if command == b"TOP" else b"")
        sent, other = self.exchange(line)
        if n in self.live():
            assert sent.startswith(b"+OK"), (line, sent)
            if command == b"LIST":
                assert sent == b"+OK %d %d\r\n" % (n, self.model.sizes[n - 1])
            if command == b"UIDL":
                assert sent == b"+OK %d u%d\r\n" % (n, n)
            if command in (b"RETR", b"TOP"):
                assert other and isinstance(other[-1], s.SendMessage) and other[-1].key == f"k{n}"
            if command == b"DELE":
                self.model.deleted.add(n)
        else:
            assert sent.startswith(b"-ERR"), (line, sent)
            assert not other

    @precondition(lambda self: self.model.state == "TRANSACTION")
    @rule()
    def listing(self):
        sent, _ = self.exchange(b"LIST")
        body = sent.split(b"\r\n")[1:-2]
        assert body == [b"%d %d" % (i, self.model.sizes[i - 1]) for i in self.live()]

    @precondition(lambda self: self.model.state == "TRANSACTION")
    @rule()
    def rset(self):
        self.exchange(b"RSET")
        self.model.deleted.clear()

    @precondition(lambda self: self.model.state != "CLOSED")
    @rule(junk=st.binary(max_size=30).filter(lambda b: b"\n" not in b and b"\r" not in b))
    def junk(self, junk):
        before = self.session.state
        sent, _ = self.exchange(b"\x01" + junk)
        assert sent.startswith(b"-ERR"), sent
        assert self.session.state is before

    @precondition(lambda self: self.model.state != "CLOSED")
    @rule()
    def quit(self):
        sent, other = self.exchange(b"QUIT")
        assert sent.startswith(b"+OK")
        if self.model.state == "TRANSACTION":
            assert self.updates[-1] == tuple(f"k{i}" for i in sorted(self.model.deleted))
        else:
            assert not self.updates
        self.model.state = "CLOSED"

    @precondition(lambda self: self.model.state == "CLOSED")
    @rule(line=st.sampled_from([b"STAT", b"QUIT", b"USER u"]))
    def nothing_after_close(self, line):
        sent, other = self.exchange(line)
        assert sent == b"" and other == []

    @invariant()
    def states_agree(self):
        if self.session is not None:
            expected = {"AUTHORIZATION": s.State.AUTHORIZATION, "TRANSACTION": s.State.TRANSACTION,
                        "CLOSED": s.State.CLOSED}[self.model.state]
            assert self.session.state is expected


SessionMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
test_session_against_model = SessionMachine.TestCase


def test_zz_report_counts():
    """Runs after the fuzz targets in this module: prints and checks what they tried."""
    print(f"\nfuzz: {COUNTS.get('commands', 0)} command inputs, {COUNTS.get('replies', 0)} reply inputs, "
          f"{COUNTS.get('sessions', 0)} model sessions")
    assert COUNTS.get("commands", 0) >= 1000, COUNTS
    assert COUNTS.get("replies", 0) >= 1000, COUNTS
    assert COUNTS.get("sessions", 0) >= 100, COUNTS
