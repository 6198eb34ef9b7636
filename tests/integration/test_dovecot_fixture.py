"""The Dovecot test server is real and behaves as the fixture promises (checked with poplib)."""

from __future__ import annotations

import contextlib
import os
import poplib
import pwd
import re
import socket
import ssl
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers.dovecot import (
    MAIL_USER,
    NOT_INSTALLED,
    Dovecot,
    DovecotError,
    _process_group_members,
    free_port,
)
from helpers.waiting import wait_for

pytestmark = pytest.mark.dovecot

TESTS_DIR = Path(__file__).resolve().parents[1]


def message(subject: str, *body_lines: str) -> bytes:
    lines = [
        "From: Sender <sender@example.org>",
        "To: Receiver <receiver@example.org>",
        f"Subject: {subject}",
        "Message-ID: <%s@example.org>" % subject.replace(" ", "."),
        "",
        *body_lines,
    ]
    return "".join(line + "\r\n" for line in lines).encode()


def login(server, user: str, password: str) -> poplib.POP3:
    pop = poplib.POP3(server.host, server.port, timeout=10)
    pop.user(user)
    pop.pass_(password)
    return pop


def test_greets_and_lists_delivered_mail_on_plain_port(dovecot):
    first = message("first", "hello")
    second = message("second", "world", "again")
    dovecot.deliver(dovecot.user, first)
    dovecot.deliver(dovecot.user, second)

    pop = poplib.POP3(dovecot.host, dovecot.port, timeout=10)
    try:
        assert pop.getwelcome().startswith(b"+OK Dovecot")
        assert "STLS" in pop.capa()
        pop.user(dovecot.user)
        pop.pass_(dovecot.password)
        assert pop.stat() == (2, len(first) + len(second))
        _, listing, _ = pop.list()
        assert listing == [b"1 %d" % len(first), b"2 %d" % len(second)]
    finally:
        pop.quit()


def test_stls_with_the_test_ca(dovecot):
    data = message("over stls", "secret body")
    dovecot.deliver(dovecot.user, data)
    context = ssl.create_default_context()
    dovecot.ca.configure_trust(context)

    pop = poplib.POP3(dovecot.host, dovecot.port, timeout=10)
    try:
        pop.stls(context=context)
        assert isinstance(pop.sock, ssl.SSLSocket)
        assert pop.sock.version() in ("TLSv1.2", "TLSv1.3")
        pop.user(dovecot.user)
        pop.pass_(dovecot.password)
        assert pop.stat() == (1, len(data))
    finally:
        pop.quit()


def test_stls_certificate_is_not_trusted_without_the_test_ca(dovecot):
    context = ssl.create_default_context()  # the system store knows nothing of the test CA
    pop = poplib.POP3(dovecot.host, dovecot.port, timeout=10)
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            pop.stls(context=context)
    finally:
        with contextlib.suppress(OSError):  # the failed handshake already closed the socket
            pop.close()


def test_ca_file_is_the_pem_of_the_signing_ca(dovecot):
    context = ssl.create_default_context(cafile=str(dovecot.ca_file))
    with socket.create_connection((dovecot.host, dovecot.tls_port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.recv(100).startswith(b"+OK")
    assert dovecot.ca_file.read_bytes() == dovecot.ca.cert_pem.bytes()


def test_pop3s_on_tls_port(dovecot):
    data = message("over pop3s", "body")
    dovecot.deliver(dovecot.user, data)
    pop = poplib.POP3_SSL(
        dovecot.host, dovecot.tls_port, context=dovecot.client_context(), timeout=10
    )
    try:
        assert pop.getwelcome().startswith(b"+OK")
        pop.user(dovecot.user)
        pop.pass_(dovecot.password)
        assert pop.stat() == (1, len(data))
    finally:
        pop.quit()


def test_uidl_is_stable_between_sessions(dovecot):
    for i in range(3):
        dovecot.deliver(dovecot.user, message(f"uidl {i}", "x"))

    def uidls() -> list[bytes]:
        pop = login(dovecot, dovecot.user, dovecot.password)
        try:
            return pop.uidl()[1]
        finally:
            pop.quit()

    first = uidls()
    second = uidls()
    assert first == second
    assert len(first) == 3
    ids = [entry.split()[1] for entry in first]
    assert len(set(ids)) == 3
    # pop3_uidl_format = %08Xu%08Xv: eight hex digits of UID, eight of UIDVALIDITY
    assert all(re.fullmatch(rb"[0-9a-f]{16}", uid) for uid in ids), ids
    assert [int(uid[:8], 16) for uid in ids] == [1, 2, 3]


def test_wrong_password_is_refused(dovecot):
    with pytest.raises(poplib.error_proto):
        login(dovecot, dovecot.user, dovecot.password + "x")
    wait_for(dovecot, re.compile(re.escape(f"({dovecot.user},") + r".*[Pp]assword mismatch"))
    # the right password still works
    login(dovecot, dovecot.user, dovecot.password).quit()


def test_unknown_user_is_refused(dovecot):
    with pytest.raises(poplib.error_proto):
        login(dovecot, "nobody-" + dovecot.user, dovecot.password)


def test_retr_returns_crlf_message_byte_exact(dovecot):
    data = message(
        "exact",
        "line one",
        ".a line that starts with a dot",
        "..two dots",
        "",
        "  trailing spaces  ",
        "\tand a tab",
    )
    name = dovecot.deliver(dovecot.user, data)
    assert (dovecot.maildir(dovecot.user) / "new" / name).read_bytes() == data

    pop = login(dovecot, dovecot.user, dovecot.password)
    try:
        _, lines, octets = pop.retr(1)
    finally:
        pop.quit()
    assert b"".join(line + b"\r\n" for line in lines) == data
    assert dovecot.messages(dovecot.user) == [data]


def test_dele_and_quit_remove_the_file(dovecot):
    keep = message("keep", "k")
    drop = message("drop", "d")
    dovecot.deliver(dovecot.user, drop)
    dovecot.deliver(dovecot.user, keep)
    assert dovecot.messages(dovecot.user) == [drop, keep]

    pop = login(dovecot, dovecot.user, dovecot.password)
    pop.dele(1)
    assert dovecot.messages(dovecot.user) == [drop, keep]  # nothing happens before QUIT
    pop.quit()

    assert dovecot.messages(dovecot.user) == [keep]


def test_rset_keeps_messages(dovecot):
    data = message("rset", "r")
    dovecot.deliver(dovecot.user, data)
    pop = login(dovecot, dovecot.user, dovecot.password)
    pop.dele(1)
    pop.rset()
    pop.quit()
    assert dovecot.messages(dovecot.user) == [data]


def test_add_user_takes_effect_without_restart(dovecot, dovecot_server):
    master = dovecot_server.process
    assert master is not None
    name = dovecot.user + "-late"
    with pytest.raises(poplib.error_proto):
        login(dovecot, name, "late-password")

    dovecot.add_user(name, "late-password")
    dovecot.deliver(name, message("late", "l"))
    pop = login(dovecot, name, "late-password")
    try:
        assert pop.stat()[0] == 1
    finally:
        pop.quit()
    assert dovecot_server.process is master and master.poll() is None
    assert dovecot.log_text().count("starting up") == 1

    # changing a password (same length: only the mtime tells the files apart) takes effect too
    dovecot.add_user(name, "next-password")
    with pytest.raises(poplib.error_proto):
        login(dovecot, name, "late-password")
    login(dovecot, name, "next-password").quit()


def test_users_do_not_see_each_others_mail(dovecot):
    other, other_password = dovecot.new_user()
    assert other != dovecot.user
    dovecot.deliver(dovecot.user, message("mine", "m"))

    pop = login(dovecot, other, other_password)
    try:
        assert pop.stat() == (0, 0)
    finally:
        pop.quit()
    assert dovecot.messages(other) == []
    assert len(dovecot.messages(dovecot.user)) == 1


def test_maildir_and_deliveries_belong_to_the_mail_user(dovecot):
    mail_uid = pwd.getpwnam(MAIL_USER).pw_uid
    assert mail_uid != 0
    maildir = dovecot.maildir(dovecot.user)
    for sub in ("", "cur", "new", "tmp"):
        assert (maildir / sub).is_dir()
        assert (maildir / sub).stat().st_uid == mail_uid
    name = dovecot.deliver(dovecot.user, message("owned", "o"))
    delivered = maildir / "new" / name
    assert delivered.stat().st_uid == mail_uid
    assert list((maildir / "tmp").iterdir()) == []


def test_messages_keep_delivery_order(dovecot):
    sent = [message(f"order {i}", str(i)) for i in range(12)]
    names = [dovecot.deliver(dovecot.user, data) for data in sent]
    assert names == sorted(names)
    assert dovecot.messages(dovecot.user) == sent

    pop = login(dovecot, dovecot.user, dovecot.password)
    try:
        served = [b"".join(l + b"\r\n" for l in pop.retr(i + 1)[1]) for i in range(len(sent))]
    finally:
        pop.quit()
    assert served == sent
    # after a session Dovecot has moved the files to cur/; the order is unchanged
    assert list((dovecot.maildir(dovecot.user) / "new").iterdir()) == []
    assert dovecot.messages(dovecot.user) == sent


def test_add_user_rejects_names_that_break_the_passwd_file(dovecot):
    for name, password in (("a:b", "pw"), ("ok", "p:w"), ("ok", "p\nw"), ("../x", "pw"), ("", "pw")):
        with pytest.raises(ValueError):
            dovecot.add_user(name, password)


# -- the server's lifecycle, on servers of its own ------------------------------------------


def test_stop_ends_every_process_of_the_server():
    server = Dovecot()
    server.start()
    try:
        root = server.root
        pgid = server.process.pid
        user, password = server.take_user()
        pop = login(server, user, password)  # a logged-in session has its own pop3 process
        pop.noop()
        members = _process_group_members(pgid)
        assert pgid in members and len(members) >= 3, members
    finally:
        server.stop()
    assert _process_group_members(pgid) == []
    for pid in members:
        assert not _alive(pid), pid
    assert not root.exists()
    assert not _accepts(server.port)
    pop.close()


def test_start_retries_when_a_port_is_taken():
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    taken = busy.getsockname()[1]
    picks = iter([taken])

    def pick_port() -> int:
        return next(picks, None) or free_port()

    server = Dovecot(pick_port=pick_port)
    try:
        server.start()
        assert taken not in (server.port, server.tls_port)
        login_ok = poplib.POP3(server.host, server.port, timeout=10)
        assert login_ok.getwelcome().startswith(b"+OK")
        login_ok.quit()
    finally:
        server.stop()
        busy.close()


def test_start_gives_up_with_the_log_when_ports_stay_taken():
    busy = [socket.socket(), socket.socket()]
    for s in busy:
        s.bind(("127.0.0.1", 0))
        s.listen()
    ports = [s.getsockname()[1] for s in busy]
    calls = []

    def pick_port() -> int:
        calls.append(1)
        return ports[len(calls) % 2]

    server = Dovecot(pick_port=pick_port, attempts=2)
    try:
        with pytest.raises(DovecotError, match="Address already in use"):
            server.start()
        assert server.process is None
    finally:
        server.stop()
        for s in busy:
            s.close()


def test_fixture_fails_naming_the_package_when_dovecot_is_missing(tmp_path):
    (tmp_path / "test_needs_dovecot.py").write_text(
        textwrap.dedent(
            """
            from helpers.dovecot import dovecot, dovecot_server

            def test_uses_it(dovecot):
                pass
            """
        )
    )
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    env = dict(os.environ, TEST_DOVECOT_BINARY=str(tmp_path / "no-such-dovecot"))
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # the inner run needs no plugins; starts faster
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert NOT_INSTALLED in output
    assert "1 error" in output
    assert "skipped" not in output


def _alive(pid: int) -> bool:
    try:
        stat = Path("/proc", str(pid), "stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False
