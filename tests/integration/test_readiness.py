"""Readiness: the "listening" line of `pop3proxy serve`, and READY=1 to systemd (``Type=notify``),
come once every worker process accepts connections, so whatever waits for them (a test, an
administrator, systemd and the units ordered after pop3proxy) can connect at once."""

from __future__ import annotations

import os
import poplib
import socket
import urllib.request

import pytest
from helpers.common import HOST, START_BOUND, children_of, write_config
from helpers.proxy import sample
from test_workers import serving_worker

from pop3proxy.proxy.credentials import set_password


def proxy_config(tmp_path, dovecot):
    return write_config(tmp_path / "proxy.toml", {
        "listen": {"host": HOST, "port": 0, "workers": 2},
        "upstream": {"host": HOST, "port": dovecot.port, "tls": "none", "timeout": 10},
        "cache": {"root": tmp_path / "cache"},
    })


def both_workers_greet_and_log_in(server, name: str, password: str) -> None:
    """Connections in a row until each of the two workers has greeted one (1 in 2^59 to miss one),
    then a login on each: refused or hanging connections fail it."""
    greeted_by: dict[int, poplib.POP3] = {}
    for _ in range(60):
        client = poplib.POP3(HOST, server.port, timeout=30)
        assert client.getwelcome().startswith(b"+OK")
        pid = serving_worker(server, client)
        if pid in greeted_by:
            client.quit()
            continue
        greeted_by[pid] = client
        if len(greeted_by) == 2:
            break
    assert len(greeted_by) == 2 and set(greeted_by) == set(children_of(server.proc.pid))
    for client in greeted_by.values():  # one session at a time: the mailbox is locked while in use
        client.user(name)
        assert client.pass_(password).startswith(b"+OK")
        assert client.stat()[0] == 1
        client.quit()


@pytest.mark.dovecot
def test_right_after_the_listening_line_both_workers_greet_and_log_in(tmp_path, server_process, dovecot):
    name, password = dovecot.new_user()
    dovecot.deliver(name, sample(1))
    server = server_process(proxy_config(tmp_path, dovecot)).start()  # returns as the line is read
    both_workers_greet_and_log_in(server, name, password)


@pytest.mark.dovecot
def test_systemd_is_told_ready_once_the_workers_accept_and_stopping_at_sigterm(tmp_path, server_process, dovecot):
    name, password = dovecot.new_user()
    dovecot.deliver(name, sample(1))
    address = f"pop3proxy-test-notify-{os.getpid()}-{id(tmp_path)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind("\0" + address)
        notify.settimeout(START_BOUND)
        server = server_process(proxy_config(tmp_path, dovecot), env={"NOTIFY_SOCKET": "@" + address}).start()
        assert notify.recv(4096) == b"READY=1"  # once: the next datagram is STOPPING=1
        both_workers_greet_and_log_in(server, name, password)
        assert server.stop() == 0
        assert notify.recv(4096) == b"STOPPING=1"


@pytest.mark.parametrize("workers", [1, 2])
def test_the_pop3_listening_line_comes_after_every_other_listener(tmp_path, server_process, workers):
    users = tmp_path / "users"
    set_password(users, "alice", "pw")
    config = write_config(tmp_path / "local.toml", {
        "listen": {"host": HOST, "port": 0, "workers": workers}, "local": {"users_file": users},
        "cache": {"root": tmp_path / "cache"}, "metrics": {"host": HOST, "port": 0}})
    server = server_process(config).start()  # returns as the POP3 line is read: the lines before it are in
    line = next((line for line in server.log if "listening for metrics" in line), None)
    assert line is not None, server.output()
    with urllib.request.urlopen(f"http://{HOST}:{int(line.split()[-1])}/metrics", timeout=30) as response:
        assert response.status == 200
