"""A client going away is not an error; a real error is logged as itself, not as its exception group.

The service runs in-process in front of the real Dovecot (so its error statistics can be read); the
clients are real sockets that misbehave: they send commands and close without QUIT, politely (FIN)
or abruptly (RST, SO_LINGER 0).
"""

from __future__ import annotations

import logging
import socket
import struct

import pytest
import trio
from helpers.common import HOST

from pop3proxy.app import run_service
from pop3proxy.config import Settings
from pop3proxy.ops.logs import TextFormatter
from pop3proxy.proxy import backend as backend_module

BIG = 4 << 20  # a RETR of this much cannot all fit in the socket buffers


def settings_for(tmp_path, dovecot) -> Settings:
    return Settings(
        listen={"host": HOST, "port": 0},
        upstream={"host": HOST, "port": dovecot.tls_port, "tls": "implicit", "ca_file": str(dovecot.ca_file)},
        cache={"root": tmp_path / "cache"},
    )


def read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def talk_and_vanish(port: int, lines: list[bytes], *, reset: bool, replies: int = 0) -> list[bytes]:
    """Connect, read the greeting, send ``lines`` at once, read ``replies`` status lines, and close
    without QUIT (with RST when ``reset``)."""
    sock = socket.create_connection((HOST, port), timeout=30)
    got = [read_line(sock)]
    sock.sendall(b"".join(lines))
    for _ in range(replies):
        got.append(read_line(sock))
    if reset:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    return got


async def sessions_over(ports) -> None:
    """Wait until every session of the service has ended (the gate holds none)."""
    gate = ports.state.gate
    while gate.sessions:
        await trio.sleep(0.01)


def errors_in(caplog) -> list[str]:
    return [TextFormatter().format(r) for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
async def test_a_client_that_logs_in_and_leaves_is_no_error(tmp_path, dovecot, caplog, reset):
    caplog.set_level(logging.INFO)
    async with trio.open_nursery() as nursery:
        ports = await nursery.start(run_service, settings_for(tmp_path, dovecot))
        stats = ports.state.stats
        for password in ("not the password", dovecot.password):  # a failed login, a good one
            lines = [b"USER %s\r\n" % dovecot.user.encode(), b"PASS %s\r\n" % password.encode()]
            await trio.to_thread.run_sync(lambda: talk_and_vanish(ports.plain, lines, reset=reset))
            await sessions_over(ports)
        nursery.cancel_scope.cancel()
    assert stats["sessions"] == 2
    assert stats["errors"] == 0
    assert errors_in(caplog) == []


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
async def test_a_client_that_leaves_during_a_retr_is_no_error(tmp_path, dovecot, caplog, reset):
    user, password = dovecot.new_user()
    dovecot.deliver(user, b"Subject: big\r\n\r\n" + b"x" * 998 + b"\r\n" + (b"y" * 78 + b"\r\n") * (BIG // 80))
    caplog.set_level(logging.INFO)
    async with trio.open_nursery() as nursery:
        ports = await nursery.start(run_service, settings_for(tmp_path, dovecot))
        stats = ports.state.stats
        lines = [b"USER %s\r\n" % user.encode(), b"PASS %s\r\n" % password.encode(), b"RETR 1\r\n"]
        got = await trio.to_thread.run_sync(
            lambda: talk_and_vanish(ports.plain, lines, reset=reset, replies=3))
        assert got[2].startswith(b"+OK") and got[3].startswith(b"+OK"), got  # logged in, RETR begun
        await sessions_over(ports)
        nursery.cancel_scope.cancel()
    assert stats["errors"] == 0
    assert errors_in(caplog) == []
    assert any("went away" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


async def test_a_real_error_is_logged_as_itself(tmp_path, dovecot, caplog, monkeypatch):
    async def buggy_login(self, *args, **kwargs):
        raise ZeroDivisionError("a bug in the login")

    monkeypatch.setattr(backend_module.ProxyBackend, "login", buggy_login)
    caplog.set_level(logging.INFO)
    async with trio.open_nursery() as nursery:
        ports = await nursery.start(run_service, settings_for(tmp_path, dovecot))
        stats = ports.state.stats
        lines = [b"USER %s\r\n" % dovecot.user.encode(), b"PASS %s\r\n" % dovecot.password.encode()]
        got = await trio.to_thread.run_sync(lambda: talk_and_vanish(ports.plain, lines, reset=False, replies=2))
        assert got[2].startswith(b"-ERR [SYS/TEMP]"), got  # the client is told
        await sessions_over(ports)
        nursery.cancel_scope.cancel()
    assert stats["errors"] == 1
    errors = errors_in(caplog)
    assert len(errors) == 1, errors
    assert "ZeroDivisionError: a bug in the login" in errors[0]
    assert "ExceptionGroup" not in errors[0]
