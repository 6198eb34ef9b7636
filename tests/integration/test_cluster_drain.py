"""A cluster node stopping (SIGTERM) drains: it stops accepting at once (its listeners close, so a load
balancer's health check fails and new clients reach other nodes), lets the sessions open finish for
``cluster.drain_timeout``, then ends those left with ``-ERR [SYS/TEMP]``. One machine stops at once."""

from __future__ import annotations

import poplib
import signal
import socket

import pytest
from helpers.cluster import Cluster, url_of
from helpers.common import HOST
from helpers.haproxy import HAProxy, Route
from helpers.proxy import sample
from helpers.waiting import eventually, wait_for

pytestmark = pytest.mark.dovecot


@pytest.fixture
def cluster(server_process, tmp_path, dovecot, postgres_db):
    made = Cluster(server_process, tmp_path, dovecot, url_of(postgres_db))
    assert made.upgrade().returncode == 0
    dovecot.deliver(dovecot.user, sample(1))
    return made


def refused(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.parametrize("workers", [1, 2])
def test_sessions_finish_while_the_node_drains_and_new_clients_are_refused(cluster, dovecot, workers):
    node = cluster.start("alpha", cluster={"drain_timeout": 120}, listen={"workers": workers})
    client = cluster.client("alpha", dovecot.user, dovecot.password)
    assert node.proc is not None
    node.proc.send_signal(signal.SIGTERM)
    wait_for(node.output, "draining: no new connections; 1 session open")
    assert eventually(lambda: refused(node.port))  # the listeners are closed
    assert "node alpha: draining" in cluster.run("status").stdout
    assert client.stat()[0] == 1  # the session goes on
    client.retr(1)
    client.quit()
    assert node.proc.wait(60) == 0  # and the node stops once it has ended
    assert "node alpha: stopped" in cluster.run("status").stdout


def test_sessions_left_at_the_drain_timeout_are_told_and_closed(cluster, dovecot):
    node = cluster.start("alpha", cluster={"drain_timeout": 1})
    client = cluster.client("alpha", dovecot.user, dovecot.password)
    assert node.proc is not None
    node.proc.send_signal(signal.SIGTERM)
    wait_for(node.output, "draining: closing 1 session still open")
    with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\] this server is shutting down"):
        client.stat()
    assert node.proc.wait(60) == 0


def test_a_draining_node_behind_haproxy_gets_no_new_client(cluster, dovecot, tmp_path):
    alpha = cluster.start("alpha", cluster={"drain_timeout": 120}, listen={"proxy_protocol": True})
    beta = cluster.start("beta", listen={"proxy_protocol": True})
    haproxy = HAProxy(tmp_path, [Route(alpha.port, more=(beta.port,))]).start()
    try:
        port = haproxy.routes[0].port
        held = poplib.POP3(HOST, port, timeout=30)  # round robin: the first goes to alpha
        held.user(dovecot.user)
        held.pass_(dovecot.password)
        wait_for(alpha.output, f"login {dovecot.user!r}")  # the log line may reach us after the reply
        assert alpha.proc is not None
        alpha.proc.send_signal(signal.SIGTERM)
        wait_for(alpha.output, "draining: no new connections")
        other, other_password = dovecot.new_user()
        for _ in range(4):  # every new client is served by beta (alpha refuses; HAProxy redispatches)
            client = poplib.POP3(HOST, port, timeout=30)
            client.user(other)
            client.pass_(other_password)
            client.quit()
        eventually(lambda: beta.output().count(f"login {other!r}") == 4, message="four logins on beta")
        assert f"login {other!r}" not in alpha.output()
        held.quit()
        assert alpha.proc.wait(60) == 0
    finally:
        haproxy.stop()


def test_one_machine_still_stops_at_once(proxy, dovecot):
    proxy.start()
    client = proxy.client(dovecot.user, dovecot.password)
    assert proxy.process is not None and proxy.process.proc is not None
    proxy.process.proc.send_signal(signal.SIGTERM)
    assert proxy.process.proc.wait(30) == 0
    assert "draining" not in proxy.output()
    client.close()
