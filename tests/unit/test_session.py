"""The session state machine, bytes in and actions out, no sockets."""

from __future__ import annotations

import base64

import pytest

from pop3proxy import pop3 as p
from pop3proxy.pop3 import session as s
from pop3proxy.store.base import MessageInfo

MESSAGES = [
    MessageInfo("k1", "uid-1", 120),
    MessageInfo("k2", "uid-2", 200),
    MessageInfo("k3", "uid-3", 5),
]


def drive(session: s.Session, data: bytes) -> tuple[bytes, list[s.Action]]:
    """Feed ``data``; return what was sent and the other actions, answering logins as 'ok'."""
    session.receive_data(data)
    sent: list[bytes] = []
    other: list[s.Action] = []
    while True:
        actions = session.next_actions()
        if actions is None:
            break
        queue = list(actions)
        while queue:
            action = queue.pop(0)
            if isinstance(action, s.Send):
                sent.append(action.data)
                continue
            if isinstance(action, s.SendMessage):
                sent.append(action.status)  # what a driver sends once the message opens
            other.append(action)
            if isinstance(action, s.Authenticate):
                if action.password == "secret":
                    queue[:0] = session.login_succeeded(action.user, MESSAGES)
                else:
                    queue[:0] = session.login_failed()
            elif isinstance(action, s.Update):
                queue[:0] = session.update_done(True)
            elif isinstance(action, s.StartTLS):
                queue[:0] = session.tls_started()
        if session.state is s.State.CLOSED:
            break
    return b"".join(sent), other


def logged_in() -> s.Session:
    session = s.Session()
    out, _ = drive(session, b"USER alice\r\nPASS secret\r\n")
    assert out.startswith(b"+OK"), out
    assert session.state is s.State.TRANSACTION
    return session


def test_greeting_is_positive():
    assert s.Session().greeting().startswith(b"+OK ")


def test_user_pass_login_and_stat():
    session = s.Session()
    out, actions = drive(session, b"user alice\r\npass secret\r\nSTAT\r\n")
    assert actions == [s.Authenticate("alice", "secret", "USER")]
    assert out.splitlines()[-1] == b"+OK 3 325"


def test_password_with_spaces_is_kept_whole():
    session = s.Session()
    _, actions = drive(session, b"USER bob\r\nPASS two words \r\n")
    assert isinstance(actions[0], s.Authenticate)
    assert actions[0].password == "two words "


def test_password_is_not_in_repr():
    assert "hunter2" not in repr(s.Authenticate("a", "hunter2", "USER"))


def test_wrong_password_gives_auth_code_and_session_goes_on():
    session = s.Session()
    out, _ = drive(session, b"USER alice\r\nPASS wrong\r\n")
    assert out.splitlines()[-1].startswith(b"-ERR [AUTH]")
    assert session.state is s.State.AUTHORIZATION
    out, _ = drive(session, b"USER alice\r\nPASS secret\r\n")
    assert session.state is s.State.TRANSACTION


def test_pass_without_user():
    out, _ = drive(s.Session(), b"PASS secret\r\n")
    assert out == b"-ERR USER first\r\n"


@pytest.mark.parametrize("command", [b"STAT", b"LIST", b"RETR 1", b"DELE 1", b"NOOP", b"RSET", b"TOP 1 1", b"UIDL"])
def test_transaction_commands_refused_before_login(command):
    out, _ = drive(s.Session(), command + b"\r\n")
    assert out.startswith(b"-ERR ") and b"before login" in out


@pytest.mark.parametrize("command", [b"USER x", b"PASS x", b"STLS", b"AUTH PLAIN"])
def test_authorization_commands_refused_after_login(command):
    session = logged_in()
    out, _ = drive(session, command + b"\r\n")
    assert out.startswith(b"-ERR ") and b"after login" in out
    assert session.state is s.State.TRANSACTION


def test_unknown_command():
    out, _ = drive(s.Session(), b"XYZZY\r\n")
    assert out == b"-ERR unknown command XYZZY\r\n"


def test_list_all_and_one():
    session = logged_in()
    out, _ = drive(session, b"LIST\r\nLIST 2\r\n")
    assert out == b"+OK 3 messages (325 octets)\r\n1 120\r\n2 200\r\n3 5\r\n.\r\n+OK 2 200\r\n"


@pytest.mark.parametrize(
    "arg, expected",
    [
        (b"0", b"-ERR no such message, only 3 messages in maildrop\r\n"),
        (b"4", b"-ERR no such message, only 3 messages in maildrop\r\n"),
        (b"-1", b"-ERR invalid message number -1\r\n"),
        (b"x", b"-ERR invalid message number x\r\n"),
        (b"99999999999999999999", b"-ERR invalid message number 99999999999999999999\r\n"),
    ],
)
def test_bad_message_numbers(arg, expected):
    session = logged_in()
    for command in (b"LIST", b"RETR", b"DELE", b"UIDL"):
        out, _ = drive(session, command + b" " + arg + b"\r\n")
        assert out == expected


def test_missing_and_extra_arguments():
    session = logged_in()
    out, _ = drive(session, b"RETR\r\nRETR 1 2\r\nSTAT 1\r\nTOP 1\r\n")
    lines = out.splitlines()
    assert lines == [
        b"-ERR wrong number of arguments for RETR",
        b"-ERR wrong number of arguments for RETR",
        b"-ERR STAT takes no arguments",
        b"-ERR wrong number of arguments for TOP",
    ]


def test_retr_and_top_stream_the_message():
    session = logged_in()
    out, actions = drive(session, b"RETR 2\r\nTOP 1 0\r\n")
    assert out == b"+OK 200 octets\r\n+OK top of message follows\r\n"
    assert [(a.key, a.top_lines, a.size) for a in actions[-2:]] == [("k2", None, 200), ("k1", 0, 120)]
    assert all(a.error.startswith(b"-ERR [SYS/TEMP]") for a in actions[-2:])


@pytest.mark.parametrize("count", [b"-1", b"x", b"1.5"])
def test_top_rejects_bad_line_counts(count):
    session = logged_in()
    out, actions = drive(session, b"TOP 1 " + count + b"\r\n")
    assert out.startswith(b"-ERR invalid line count")
    assert not any(isinstance(a, s.SendMessage) for a in actions)


def test_dele_marks_then_rset_unmarks():
    session = logged_in()
    out, _ = drive(session, b"DELE 1\r\nDELE 1\r\nRETR 1\r\nLIST 1\r\nSTAT\r\nLIST\r\nUIDL\r\n")
    lines = out.split(b"\r\n")
    assert lines[0] == b"+OK message 1 deleted"
    assert lines[1] == b"-ERR message 1 already deleted"
    assert lines[2] == b"-ERR message 1 already deleted"
    assert lines[3] == b"-ERR message 1 already deleted"
    assert lines[4] == b"+OK 2 205"
    assert b"1 120" not in out and b"uid-1" not in out
    out, _ = drive(session, b"RSET\r\nSTAT\r\n")
    assert out.splitlines() == [b"+OK maildrop has 3 messages (325 octets)", b"+OK 3 325"]


def test_quit_in_transaction_asks_for_update_with_marked_keys():
    session = logged_in()
    out, actions = drive(session, b"DELE 3\r\nDELE 1\r\nQUIT\r\n")
    assert s.Update(("k1", "k3")) in actions
    assert out.splitlines()[-1] == b"+OK pop3proxy signing off (1 messages left)"
    assert isinstance(actions[-1], s.Close)
    assert session.state is s.State.CLOSED


def test_failed_update_reports_sys_temp():
    session = logged_in()
    session.receive_data(b"DELE 1\r\nQUIT\r\n")
    session.next_actions()
    actions = session.next_actions()
    assert actions == [s.Update(("k1",))]
    reply = session.update_done(False)
    assert reply[0] == s.Send(b"-ERR [SYS/TEMP] some deleted messages not removed\r\n")


def test_quit_in_authorization_deletes_nothing():
    out, actions = drive(s.Session(), b"QUIT\r\n")
    assert out.startswith(b"+OK")
    assert actions == [s.Close()]


def test_uidl_listing_and_single():
    session = logged_in()
    out, _ = drive(session, b"UIDL\r\nUIDL 3\r\n")
    assert out == b"+OK unique-id listing follows\r\n1 uid-1\r\n2 uid-2\r\n3 uid-3\r\n.\r\n+OK 3 uid-3\r\n"


def test_pipelined_commands_answer_in_order():
    session = s.Session()
    out, _ = drive(session, b"CAPA\r\nUSER alice\r\nPASS secret\r\nSTAT\r\nNOOP\r\nLIST 1\r\nQUIT\r\n")
    lines = [line for line in out.split(b"\r\n") if line.startswith((b"+OK", b"-ERR"))]
    assert lines == [
        b"+OK capability list follows",
        b"+OK send your password",
        b"+OK alice has 3 messages (325 octets)",
        b"+OK 3 325",
        b"+OK",
        b"+OK 1 120",
        b"+OK pop3proxy signing off (3 messages left)",
    ]


def test_capa_lists_rfc2449_capabilities():
    session = s.Session(stls_available=True)
    out, _ = drive(session, b"CAPA\r\n")
    caps = out.split(b"\r\n")[1:-2]
    for cap in (b"TOP", b"UIDL", b"USER", b"RESP-CODES", b"PIPELINING", b"SASL PLAIN", b"STLS"):
        assert cap in caps
    assert any(c.startswith(b"IMPLEMENTATION ") for c in caps)


def test_capa_without_tls_has_no_stls():
    out, _ = drive(s.Session(), b"CAPA\r\n")
    assert b"STLS" not in out


def test_plaintext_refused_until_tls_when_not_allowed():
    session = s.Session(stls_available=True, plaintext_auth=False)
    out, _ = drive(session, b"CAPA\r\n")
    assert b"USER" not in out and b"SASL" not in out and b"STLS" in out
    out, actions = drive(session, b"USER alice\r\n")
    assert out.startswith(b"-ERR [AUTH] plaintext authentication disallowed")
    out, actions = drive(session, b"STLS\r\n")
    assert out == b"+OK begin TLS negotiation\r\n"
    assert session.tls_active
    out, _ = drive(session, b"CAPA\r\n")
    assert b"USER" in out and b"STLS" not in out


def test_plaintext_pipelined_after_stls_is_discarded():
    session = s.Session(stls_available=True)
    out, actions = drive(session, b"STLS\r\nUSER mallory\r\nPASS secret\r\n")
    assert s.StartTLS() in actions
    assert not any(isinstance(a, s.Authenticate) for a in actions)
    assert session.state is s.State.AUTHORIZATION


def test_stls_twice_and_without_certificate():
    out, _ = drive(s.Session(), b"STLS\r\n")
    assert out.startswith(b"-ERR STLS is not available")
    out, _ = drive(s.Session(stls_available=True, tls_active=True), b"STLS\r\n")
    assert out == b"-ERR TLS is already active\r\n"


def plain(authz: bytes, user: bytes, password: bytes) -> bytes:
    return base64.b64encode(authz + b"\0" + user + b"\0" + password)


def test_auth_plain_initial_response():
    session = s.Session()
    out, actions = drive(session, b"AUTH PLAIN " + plain(b"", b"alice", b"secret") + b"\r\n")
    assert actions == [s.Authenticate("alice", "secret", "PLAIN")]
    assert session.state is s.State.TRANSACTION


def test_auth_plain_continuation():
    session = s.Session()
    out, _ = drive(session, b"AUTH PLAIN\r\n")
    assert out == b"+ \r\n"
    out, actions = drive(session, plain(b"alice", b"alice", b"secret") + b"\r\n")
    assert actions == [s.Authenticate("alice", "secret", "PLAIN")]


def test_auth_plain_cancel_and_bad_base64():
    session = s.Session()
    drive(session, b"AUTH PLAIN\r\n")
    out, _ = drive(session, b"*\r\n")
    assert out == b"-ERR [AUTH] authentication cancelled\r\n"
    out, _ = drive(session, b"AUTH PLAIN !!notbase64\r\n")
    assert out.startswith(b"-ERR [AUTH] invalid base64")
    out, _ = drive(session, b"AUTH PLAIN " + base64.b64encode(b"no-nul-here") + b"\r\n")
    assert out.startswith(b"-ERR [AUTH] malformed")
    out, _ = drive(session, b"AUTH PLAIN " + plain(b"bob", b"alice", b"secret") + b"\r\n")
    assert out.startswith(b"-ERR [AUTH] authorization identity")
    assert session.state is s.State.AUTHORIZATION


def test_auth_unknown_mechanism_and_listing():
    out, _ = drive(s.Session(), b"AUTH CRAM-MD5\r\nAUTH\r\n")
    assert out.startswith(b"-ERR unsupported authentication mechanism CRAM-MD5\r\n")
    assert out.endswith(b"+OK SASL mechanisms follow\r\nPLAIN\r\n.\r\n")


def test_overlong_line_is_answered_and_next_command_works():
    session = s.Session()
    out, _ = drive(session, b"USER " + b"a" * 400 + b"\r\nCAPA\r\n")
    assert out.startswith(b"-ERR command line too long\r\n+OK capability list follows")


def test_too_many_bad_commands_close_the_session():
    session = s.Session()
    out, actions = drive(session, b"BOGUS\r\n" * (s.MAX_BAD_COMMANDS + 5))
    assert out.count(b"-ERR unknown command") == s.MAX_BAD_COMMANDS
    assert out.endswith(b"-ERR too many errors, closing connection\r\n")
    assert actions == [s.Close()]


def test_driver_answer_required_before_more_input():
    session = s.Session()
    session.receive_data(b"USER a\r\nPASS b\r\nSTAT\r\n")
    session.next_actions()
    assert isinstance(session.next_actions()[0], s.Authenticate)
    with pytest.raises(p.LocalProtocolError):
        session.next_actions()
    with pytest.raises(p.LocalProtocolError):
        session.tls_started()


def test_session_module_is_free_of_io():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(s))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"trio", "os", "socket", "asyncio"}


@pytest.mark.parametrize("uid", ["x" * 71, "has space", "ünïcode", ""])
def test_uids_outside_rfc1939_limits_are_served_as_stable_digests(uid):
    session = s.Session()
    drive(session, b"USER a\r\n")
    session.receive_data(b"PASS secret\r\n")
    actions = session.next_actions()
    session.login_succeeded("a", [MessageInfo("k", uid, 10)])
    out, _ = drive(session, b"UIDL\r\nUIDL 1\r\n")
    listed = out.split(b"\r\n")[1].split(b" ", 1)[1]
    assert out.split(b"\r\n")[-2] == b"+OK 1 " + listed
    assert 1 <= len(listed) <= 70 and all(0x21 <= c <= 0x7E for c in listed)
    assert listed == s.wire_uid(uid).encode()


@pytest.mark.parametrize("line", [b"AUTH A\rB", b"RETR 3\ruser", b"USER a\x01b", b"FOO a\rb"])
def test_a_lone_cr_or_control_is_a_client_error_never_an_internal_one(line):
    session = s.Session()
    out, _ = drive(session, line + b"\r\n")
    assert out.startswith(b"-ERR ") and out.count(b"\r") == 1, out


def test_ordinary_errors_do_not_close_a_long_session():
    session = logged_in()
    _, _ = drive(session, b"DELE 1\r\n")
    out, actions = drive(session, b"RETR 1\r\nRETR 99\r\nTOP 1 0\r\nLIST 1\r\nUIDL 99\r\nDELE 1\r\n" * 20)
    assert out.count(b"-ERR") == 120 and b"too many errors" not in out
    assert not any(isinstance(a, s.Close) for a in actions)
    out, _ = drive(session, b"NOOP\r\n")
    assert out == b"+OK\r\n"


def test_garbage_still_closes_the_session():
    session = logged_in()
    out, actions = drive(session, b"RETR x\r\n" * s.MAX_BAD_COMMANDS)
    assert b"too many errors" in out and isinstance(actions[-1], s.Close)


def test_credential_lines_may_be_long_other_commands_not():
    session = s.Session()
    out, actions = drive(session, b"USER u\r\nPASS " + b"p" * 300 + b"\r\n")
    assert isinstance(actions[-1], s.Authenticate) and actions[-1].password == "p" * 300
    session = s.Session()
    out, actions = drive(session, b"NOOP " + b"x" * 260 + b"\r\n")
    assert out == b"-ERR command line too long\r\n"
