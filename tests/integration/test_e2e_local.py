"""End to end in standalone mode: a real server process and real clients (poplib, curl, fetchmail)."""

from __future__ import annotations

import poplib
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
from helpers.common import HOST, ServerProcess, drop_connection, require_tool, write_config

from pop3proxy.demo import sample_messages
from pop3proxy.pop3.dotstuff import to_crlf
from pop3proxy.proxy.credentials import set_password
from pop3proxy.store import open_store

PASSWORD = "s3cret pass"

EXTRA = [
    # dot-stuffing on the first body line, mid-message, and a lone dot line
    b"Subject: dots\r\n\r\n.starts with a dot\r\n\r\n.\r\n..two dots\r\nend\r\n",
    # bare LF line endings are served as CRLF
    b"Subject: bare LF\n\nline one\nline two\n",
    # 8-bit bytes and invalid UTF-8 in a header and the body
    b"Subject: \xe4\xf6\xfc \xff\xfe\r\nFrom: x@example.org\r\n\r\nbody \x80\x81\r\n",
    # no final newline
    b"Subject: no final newline\r\n\r\nlast line without CRLF",
]


def expected_messages() -> list[bytes]:
    """What the cache holds and serves: CRLF line endings, ending with a CRLF."""
    return normalise_last([to_crlf(m) for m in sample_messages() + EXTRA])


@pytest.fixture(params=["maildir", "mbox"])
def standalone(request, tmp_path, server_cert, server_process) -> ServerProcess:
    certfile, keyfile, _ = server_cert
    users = tmp_path / "users"
    set_password(users, "alice", PASSWORD)
    set_password(users, "bob", "bobpw")
    root = tmp_path / "cache"
    mailbox = open_store(root, "alice", request.param)
    for message in sample_messages() + EXTRA:
        mailbox.add(message)
    mailbox.close()
    config = write_config(
        tmp_path / "pop3proxy.toml",
        {
            "listen": {"host": HOST, "port": 0, "tls_port": 0, "certfile": certfile, "keyfile": keyfile},
            "local": {"users_file": users},
            "cache": {"root": root, "backend": request.param},
        },
    )
    server = server_process(config).start(tls=True)
    server.root = root
    server.backend = request.param
    return server


def client_context(server_cert) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(server_cert[2]))
    return ctx


def retr_all(client: poplib.POP3) -> list[bytes]:
    count, _ = client.stat()
    out = []
    for i in range(1, count + 1):
        _, lines, octets = client.retr(i)
        body = b"\r\n".join(lines) + b"\r\n"
        out.append(body)
    return out


def normalise_last(messages: list[bytes]) -> list[bytes]:
    """poplib cannot tell a message that lacked a final CRLF from one that had it."""
    return [m if m.endswith(b"\r\n") else m + b"\r\n" for m in messages]


def test_poplib_plain_reads_every_message_byte_exact(standalone):
    client = poplib.POP3(HOST, standalone.port, timeout=10)
    client.user("alice")
    client.pass_(PASSWORD)
    assert retr_all(client) == normalise_last(expected_messages())
    sizes = [int(line.split()[1]) for line in client.list()[1]]
    assert sizes == [len(m) for m in expected_messages()]
    uids = client.uidl()[1]
    client.quit()
    # UIDs are stable across sessions
    client = poplib.POP3(HOST, standalone.port, timeout=10)
    client.user("alice")
    client.pass_(PASSWORD)
    assert client.uidl()[1] == uids
    client.quit()


def test_poplib_stls_and_pop3s(standalone, server_cert):
    client = poplib.POP3(HOST, standalone.port, timeout=10)
    assert "STLS" in client.capa()
    client.stls(client_context(server_cert))
    client.user("alice")
    client.pass_(PASSWORD)
    assert retr_all(client) == normalise_last(expected_messages())
    client.quit()
    client = poplib.POP3_SSL(HOST, standalone.tls_port, timeout=10, context=client_context(server_cert))
    client.user("alice")
    client.pass_(PASSWORD)
    top = client.top(2, 0)[1]
    assert b"Subject: Your invoice" in top and top[-1] == b""
    client.quit()


def test_wrong_password_and_in_use(standalone):
    client = poplib.POP3(HOST, standalone.port, timeout=10)
    client.user("alice")
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        client.pass_("wrong")
    client.user("alice")
    client.pass_(PASSWORD)
    second = poplib.POP3(HOST, standalone.port, timeout=10)
    second.user("alice")
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        second.pass_(PASSWORD)
    second.quit()
    client.quit()


def test_dele_applies_only_on_quit(standalone):
    total = len(expected_messages())
    client = poplib.POP3(HOST, standalone.port, timeout=10)
    client.user("alice")
    client.pass_(PASSWORD)
    client.dele(1)
    client.dele(3)
    # drop the connection without QUIT: nothing is deleted (RFC 1939 section 6)
    drop_connection(client)
    client = poplib.POP3(HOST, standalone.port, timeout=10)
    client.user("alice")
    client.pass_(PASSWORD)
    assert client.stat()[0] == total
    client.dele(1)
    client.dele(3)
    client.quit()
    client = poplib.POP3(HOST, standalone.port, timeout=10)
    client.user("alice")
    client.pass_(PASSWORD)
    assert client.stat()[0] == total - 2
    assert retr_all(client) == normalise_last([m for i, m in enumerate(expected_messages()) if i not in (0, 2)])
    client.quit()


def test_pipelined_commands_in_one_packet(standalone):
    with socket.create_connection((HOST, standalone.port), timeout=10) as sock:
        sock.recv(1024)
        sock.sendall(b"USER alice\r\nPASS " + PASSWORD.encode() + b"\r\nSTAT\r\nLIST 1\r\nNOOP\r\nQUIT\r\n")
        data = b""
        while not data.endswith(b"messages left)\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    lines = data.split(b"\r\n")
    assert lines[0] == b"+OK send your password"
    assert lines[1].startswith(b"+OK alice has")
    assert lines[2].startswith(b"+OK %d " % len(expected_messages()))
    assert lines[3] == b"+OK 1 %d" % len(expected_messages()[0])
    assert lines[4] == b"+OK"
    assert lines[5].startswith(b"+OK pop3proxy signing off")


def curl(*args: str) -> bytes:
    result = subprocess.run(
        [require_tool("curl", "curl"), "-s", "-S", "--max-time", "20", *args], capture_output=True, timeout=30
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout


def test_curl_plain_stls_and_pop3s(standalone, server_cert):
    ca_file = str(server_cert[2])
    url = f"pop3://alice:{PASSWORD.replace(' ', '%20')}@{HOST}:{standalone.port}"
    listing = curl(url + "/")
    assert listing.splitlines()[0].startswith(b"1 ")
    assert len(listing.splitlines()) == len(expected_messages())
    for i, message in enumerate(normalise_last(expected_messages()), 1):
        assert curl(url + f"/{i}") == message
    assert curl("--ssl-reqd", "--cacert", ca_file, url + "/1") == expected_messages()[0]
    tls_url = f"pop3s://alice:{PASSWORD.replace(' ', '%20')}@localhost:{standalone.tls_port}"
    assert curl("--cacert", ca_file, tls_url + "/3") == expected_messages()[2]


def run_fetchmail(tmp_path: Path, port: int, keep: bool) -> list[bytes]:
    fetchmail = require_tool("fetchmail", "fetchmail")
    outdir = tmp_path / f"fetched-{'keep' if keep else 'flush'}"
    outdir.mkdir()
    deliver = tmp_path / "deliver.py"
    deliver.write_text(
        "import sys, os, itertools\n"
        "d = sys.argv[1]\n"
        "n = len(os.listdir(d))\n"
        "open(os.path.join(d, '%05d' % n), 'wb').write(sys.stdin.buffer.read())\n"
    )
    rc = tmp_path / "fetchmailrc"
    rc.write_text(
        f'poll {HOST} protocol pop3 port {port} user "alice" password "{PASSWORD}"'
        f" {'keep' if keep else 'nokeep'} fetchall no rewrite no stripcr\n"
        f' mda "python3 {deliver} {outdir}"\n'
    )
    rc.chmod(0o600)
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [fetchmail, "-f", str(rc), "--invisible", "--nosyslog", "--sslproto", "", "-d0", "-v", "--pidfile", str(tmp_path / "fm.pid")],
        capture_output=True,
        timeout=60,
        env=env,
    )
    # fetchmail exits 0 when mail was fetched
    assert result.returncode == 0, (result.stdout + result.stderr).decode(errors="replace")
    return [path.read_bytes() for path in sorted(outdir.iterdir())]


def test_fetchmail_keep_then_delete(standalone, tmp_path):
    expected = expected_messages()
    kept = run_fetchmail(tmp_path, standalone.port, keep=True)
    assert [m.replace(b"\r\n", b"\n") for m in kept] == [m.replace(b"\r\n", b"\n") for m in expected]
    client = poplib.POP3(HOST, standalone.port, timeout=10)
    client.user("alice")
    client.pass_(PASSWORD)
    assert client.stat()[0] == len(expected)
    client.quit()
    flushed = run_fetchmail(tmp_path, standalone.port, keep=False)
    assert flushed == kept
    mailbox = open_store(standalone.root, "alice", standalone.backend)
    assert mailbox.list() == []
    mailbox.close()


def test_server_survives_garbage_and_abrupt_clients(standalone):
    for junk in (b"\x00\xff\xfe garbage\r\n", b"A" * 100_000, b"\r\n\r\n", b"USER \x80\x81\r\n"):
        with socket.create_connection((HOST, standalone.port), timeout=10) as sock:
            sock.recv(1024)
            sock.sendall(junk)
            sock.shutdown(socket.SHUT_WR)
            reply = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
            assert b"Traceback" not in reply
            for line in reply.split(b"\r\n"):
                assert line == b"" or line.startswith((b"+OK", b"-ERR"))
    client = poplib.POP3(HOST, standalone.port, timeout=10)
    client.user("alice")
    client.pass_(PASSWORD)
    client.quit()
    assert "Traceback" not in standalone.output()


@pytest.mark.parametrize("backend", ["maildir", "mbox"])
def test_large_messages_byte_exact(tmp_path, server_process, backend):
    """Large messages take the kernel's copy path when they need no dot-stuffing: every shape arrives
    byte-exact (no dots, dots at line starts, bare LF on disk, TOP of a large one)."""
    line = b"x" * 70 + b"\r\n"
    plain = b"Subject: large, no dots\r\n\r\n" + line * 20_000
    dotted = b"Subject: large, with dots\r\n\r\n" + (line * 999 + b".dot line\r\n") * 20
    users = tmp_path / "users"
    set_password(users, "big", PASSWORD)
    root = tmp_path / "cache"
    with open_store(root, "big", backend) as box:
        box.add(plain)
        box.add(dotted)
    if backend == "maildir":  # a file written by another tool, bare LF
        (root / "big" / "Maildir" / "new" / "1.foreign.host").write_bytes(plain.replace(b"\r\n", b"\n"))
    config = write_config(
        tmp_path / "c.toml",
        {"listen": {"host": HOST, "port": 0}, "local": {"users_file": users}, "cache": {"root": root, "backend": backend}},
    )
    server = server_process(config).start()
    client = poplib.POP3(HOST, server.port, timeout=30)
    client.user("big")
    client.pass_(PASSWORD)
    got = retr_all(client)
    expected = [plain, dotted] + ([plain] if backend == "maildir" else [])
    assert sorted(got) == sorted(expected)
    sizes = sorted(int(l.split()[1]) for l in client.list()[1])
    assert sizes == sorted(len(m) for m in expected)
    top = client.top(1, 2)[1]
    assert len(top) == 4 and top[0].startswith(b"Subject: large")
    client.quit()
    url = f"pop3://big:{PASSWORD.replace(' ', '%20')}@{HOST}:{server.port}/1"
    assert curl(url) in expected
