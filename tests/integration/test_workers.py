"""Several worker processes (``listen.workers = 2``): real `pop3proxy serve` processes, real clients.

Which worker serves a connection is read from /proc (the worker holding the server side of that TCP
connection), so the tests can place sessions on both workers and kill one of them.
"""

from __future__ import annotations

import hashlib
import os
import poplib
import signal
import socket
import urllib.request

import pytest
from helpers.common import HOST, children_of, write_config
from helpers.proxy import sample
from helpers.waiting import eventually, wait_for

from pop3proxy.proxy.credentials import set_password
from pop3proxy.store import open_store


def socket_inode(server_port: int, client_port: int) -> str | None:
    """The inode of the server side of the loopback connection from ``client_port``."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if int(local.rsplit(":", 1)[1], 16) == server_port and int(remote.rsplit(":", 1)[1], 16) == client_port:
                return fields[9]
    return None


def serving_worker(server, client: poplib.POP3, port: int | None = None) -> int:
    """The pid of the worker process that serves ``client`` (connected to ``port``, the plain one by default)."""
    inode = socket_inode(port or server.port, client.sock.getsockname()[1])
    assert inode is not None, "the server side of the connection is not in /proc/net/tcp"
    for pid in children_of(server.proc.pid):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    raise AssertionError("no worker process holds the connection")


def on_both_workers(server, connect, limit: int = 60) -> dict[int, list[poplib.POP3]]:
    """Connections (made by ``connect``) until each of the two workers serves at least one."""
    by_worker: dict[int, list[poplib.POP3]] = {}
    for _ in range(limit):
        client = connect()
        by_worker.setdefault(serving_worker(server, client), []).append(client)
        if len(by_worker) == 2:
            return by_worker
    raise AssertionError(f"{limit} connections all went to one worker process")


def local_server(tmp_path, server_process, users=("alice",), **sections):
    users_file = tmp_path / "users"
    for user in users:
        set_password(users_file, user, "pw")
        with open_store(tmp_path / "cache", user) as box:
            box.add(sample(1))
    listen = {"host": HOST, "port": 0, "workers": 2, **sections.pop("listen", {})}
    config = write_config(tmp_path / "pop3proxy.toml", {
        "listen": listen, "local": {"users_file": users_file}, "cache": {"root": tmp_path / "cache"}, **sections})
    server = server_process(config).start()
    assert len(children_of(server.proc.pid)) == 2
    return server


def test_failed_logins_count_across_workers(tmp_path, server_process):
    server = local_server(tmp_path, server_process,
                          throttle={"max_failures": 3, "base_delay": 0, "max_delay": 0})
    clients = on_both_workers(server, lambda: poplib.POP3(HOST, server.port, timeout=10))
    first, second = (clients[pid][0] for pid in clients)
    for client in (first, second, first):  # three failures, on two workers
        client.user("alice")
        with pytest.raises(poplib.error_proto, match="invalid"):
            client.pass_("wrong")
    second.user("alice")
    with pytest.raises(poplib.error_proto, match=r"LOGIN-DELAY"):
        second.pass_("pw")  # the right password, but this pair has used its tries: refused at once
    for group in clients.values():
        for client in group:
            client.close()


def test_session_limits_hold_across_workers(tmp_path, server_process):
    server = local_server(tmp_path, server_process, users=[f"u{i}" for i in range(4)],
                          listen={"max_sessions_per_address": 4})
    for _ in range(20):  # four logged-in sessions (never closed to make room), on both workers
        # (a slot given back by the previous try may still be on its way to the supervisor: retried)
        open_ = [eventually(lambda i=i: _logged_in(server.port, f"u{i}")) for i in range(4)]
        if len({serving_worker(server, c) for c in open_}) == 2:
            break
        for client in open_:
            client.quit()
    else:
        raise AssertionError("20 tries put all four sessions on one worker")
    with socket.create_connection((HOST, server.port), timeout=10) as extra:
        assert b"too many sessions from your address" in extra.recv(200)
    open_.pop().quit()
    eventually(lambda: _greeted(server.port))  # the slot given back on one worker is free on all
    for client in open_:
        client.quit()


def _greeted(port: int) -> bool:
    with socket.create_connection((HOST, port), timeout=10) as sock:
        return sock.recv(200).startswith(b"+OK")


def _logged_in(port: int, user: str) -> poplib.POP3 | None:
    """A session of ``user``, or None when the server refused the connection for want of room."""
    try:
        client = poplib.POP3(HOST, port, timeout=10)
    except poplib.error_proto as exc:
        assert b"too many sessions" in exc.args[0], exc
        return None
    client.user(user)
    client.pass_("pw")
    return client


@pytest.mark.dovecot
def test_a_login_right_after_quit_on_another_worker_is_not_in_use(tmp_path, server_process, dovecot):
    # The worker that answered QUIT may still be closing the mailbox when the client's next login
    # reaches the other worker: that login waits for the lock instead of being told IN-USE.
    name, password = dovecot.new_user()
    dovecot.deliver(name, sample(1))
    config = write_config(tmp_path / "proxy.toml", {
        "listen": {"host": HOST, "port": 0, "workers": 2},
        "upstream": {"host": HOST, "port": dovecot.port, "tls": "none", "timeout": 10},
        "sync": {"auth_cache_ttl": 60},  # a login served at once: it reaches for the lock at once
        "cache": {"root": tmp_path / "cache"},
    })
    server = server_process(config).start()
    workers = set()
    for _ in range(80):
        client = poplib.POP3(HOST, server.port, timeout=10)
        workers.add(serving_worker(server, client))
        client.user(name)
        assert client.pass_(password).startswith(b"+OK")
        assert client.stat()[0] == 1
        client.quit()
    assert len(workers) == 2, "every session went to one worker: nothing was shown"


@pytest.mark.dovecot
def test_a_killed_worker_is_replaced_and_the_others_sessions_go_on(tmp_path, server_process, dovecot):
    users = [dovecot.new_user() for _ in range(12)]
    digests = {}
    for name, _ in users:
        for i in range(3):
            data = sample(i, 2000 + 5000 * i)
            dovecot.deliver(name, data)
            digests[(name, i)] = hashlib.sha256(data).hexdigest()
    config = write_config(tmp_path / "proxy.toml", {
        "listen": {"host": HOST, "port": 0, "workers": 2},
        "upstream": {"host": HOST, "port": dovecot.port, "tls": "none", "timeout": 10},
        "cache": {"root": tmp_path / "cache"},
        "metrics": {"host": HOST, "port": 0},
    })
    server = server_process(config).start()
    metrics_port = int(next(line for line in server.log if "listening for metrics" in line).split()[-1])
    first_workers = children_of(server.proc.pid)
    assert len(first_workers) == 2

    sessions: dict[int, list[tuple[poplib.POP3, str]]] = {}
    pending = list(users)
    while len(sessions) < 2 or len(sum(sessions.values(), [])) < 4:
        assert pending, "could not place sessions on both workers"
        name, password = pending.pop()
        client = poplib.POP3(HOST, server.port, timeout=15)
        client.user(name)
        client.pass_(password)
        sessions.setdefault(serving_worker(server, client), []).append((client, name))
    victim, survivor = sorted(sessions, key=lambda pid: len(sessions[pid]))
    os.kill(victim, signal.SIGKILL)

    # The survivor's sessions notice nothing: every message arrives whole, QUIT is answered.
    for client, name in sessions[survivor]:
        for i in range(3):
            body = b"\r\n".join(client.retr(i + 1)[1]) + b"\r\n"
            assert hashlib.sha256(body).hexdigest() == digests[(name, i)]
        assert client.quit().startswith(b"+OK")
    # The victim's clients lost their connection.
    for client, _ in sessions[victim]:
        with pytest.raises((poplib.error_proto, OSError, EOFError)):
            client.stat()
        client.close()
    # A new worker takes the dead one's place, and the service serves as before.
    eventually(lambda: len(children_of(server.proc.pid)) == 2 and victim not in children_of(server.proc.pid),
             timeout=30)
    assert survivor in children_of(server.proc.pid)
    for name, password in users:
        client = poplib.POP3(HOST, server.port, timeout=15)
        client.user(name)
        client.pass_(password)
        assert client.stat()[0] == 3
        client.quit()
    assert "worker process" in server.output() and "starting a new one" in server.output()

    # Counters of all workers (the dead one's too) are added up; no session is open now.
    scrape = urllib.request.urlopen(f"http://{HOST}:{metrics_port}/metrics", timeout=10).read().decode()
    values = {line.split()[0]: float(line.split()[1]) for line in scrape.splitlines()
              if line and not line.startswith("#")}
    assert values['pop3proxy_logins_total{result="ok"}'] >= len(sessions[survivor]) + len(users)
    eventually(lambda: _sessions_active(metrics_port) == 0)

    # A clean stop takes the workers with it, and none is replaced on the way out.
    workers = children_of(server.proc.pid)
    assert server.stop() == 0
    assert server.output().count("starting a new one") == 1
    for pid in workers:
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()


def _sessions_active(port: int) -> float:
    scrape = urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10).read().decode()
    return next(float(line.split()[1]) for line in scrape.splitlines() if line.startswith("pop3proxy_sessions_active "))


def test_the_parent_alone_runs_what_runs_once(tmp_path, server_process):
    server = local_server(tmp_path, server_process, smtp={"host": HOST, "port": 0},
                          metrics={"host": HOST, "port": 0})
    wait_for(server.output, "serving with 2 worker processes")  # logged just after the POP3 line
    out = server.output()
    assert out.count("listening for SMTP") == 1 and out.count("listening for metrics") == 1
    assert out.count("listening for POP3") == 1


def test_tls_and_certificate_reload_in_every_worker(tmp_path, server_process, server_cert, ca):
    import ssl

    certfile, keyfile, ca_file = server_cert
    live_cert, live_key = tmp_path / "cert.pem", tmp_path / "key.pem"
    live_cert.write_bytes(certfile.read_bytes())
    live_key.write_bytes(keyfile.read_bytes())
    users_file = tmp_path / "users"
    set_password(users_file, "alice", "pw")
    config = write_config(tmp_path / "pop3proxy.toml", {
        "listen": {"host": HOST, "port": 0, "tls_port": 0, "workers": 2, "certfile": live_cert, "keyfile": live_key},
        "local": {"users_file": users_file}, "cache": {"root": tmp_path / "cache"}})
    server = server_process(config).start(tls=True)
    context = ssl.create_default_context(cafile=str(ca_file))

    def serial_numbers() -> set[int]:
        seen, workers = set(), set()
        for _ in range(40):
            client = poplib.POP3_SSL(HOST, server.tls_port, context=context, timeout=10)
            workers.add(serving_worker(server, client, server.tls_port))
            seen.add(ssl.DER_cert_to_PEM_cert(client.sock.getpeercert(True)))
            client.user("alice")
            client.pass_("pw")
            client.quit()
            if len(workers) == 2:
                break
        assert len(workers) == 2, "every TLS session went to one worker"
        return seen

    assert serial_numbers() == {certfile.read_text().split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"}
    fresh = ca.issue_cert("localhost", "127.0.0.1")
    fresh.cert_chain_pems[0].write_to_path(str(live_cert))
    for pem in fresh.cert_chain_pems[1:]:
        pem.write_to_path(str(live_cert), append=True)
    fresh.private_key_pem.write_to_path(str(live_key))
    server.proc.send_signal(signal.SIGHUP)
    eventually(lambda: server.output().count("SIGHUP: certificate reloaded") == 3)  # supervisor and both workers
    assert serial_numbers() == {fresh.cert_chain_pems[0].bytes().decode()}
