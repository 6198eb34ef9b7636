"""Cluster nodes behind a real HAProxy (send-proxy-v2, health checks, redispatch), sharing one real
PostgreSQL and one cache root, in front of a real Dovecot: logins spread over the nodes; a node killed
during a cold sync or a download costs nothing (the client reconnects through HAProxy to the other node,
which finishes the sync: every message once, byte for byte); what one node learnt of a password (the
offline hash, the auth cache's digest) serves a login on the other."""

from __future__ import annotations

import hashlib
import poplib
import threading

import psycopg
import pytest
from helpers.cluster import Cluster, url_of
from helpers.common import HOST
from helpers.haproxy import HAProxy, Route
from helpers.proxy import closed_port, retr_all, sample
from helpers.waiting import eventually, wait_for

pytestmark = pytest.mark.dovecot


@pytest.fixture
def cluster(server_process, tmp_path, dovecot, postgres_db):
    made = Cluster(server_process, tmp_path, dovecot, url_of(postgres_db),
                   listen={"proxy_protocol": True})
    assert made.upgrade().returncode == 0
    yield made
    for node in made.nodes.values():
        assert dovecot.password not in node.output()


@pytest.fixture
def balanced(cluster, tmp_path):
    """Two nodes behind HAProxy: returns the port clients connect to."""
    alpha, beta = cluster.start("alpha"), cluster.start("beta")
    haproxy = HAProxy(tmp_path, [Route(alpha.port, more=(beta.port,))]).start()
    yield haproxy.routes[0].port
    haproxy.stop()


def login(port: int, user: str, password: str) -> poplib.POP3:
    client = poplib.POP3(HOST, port, timeout=60)
    client.user(user)
    client.pass_(password)
    return client


def digests(messages: list[bytes]) -> list[str]:
    return sorted(hashlib.sha256(m).hexdigest() for m in messages)


def serving_node(cluster: Cluster, account: str) -> str | None:
    with psycopg.connect(cluster.database) as conn:
        row = conn.execute("SELECT node FROM serving WHERE account = %s", (account,)).fetchone()
    return row[0] if row else None


def cached_files(cluster: Cluster, user: str) -> int:
    return sum(1 for sub in ("new", "cur") for directory in cluster.root.glob(f"*/Maildir/{sub}")
               for path in directory.iterdir() if path.is_file())


def test_logins_are_spread_over_the_nodes_and_see_the_same_mailbox(cluster, balanced, dovecot):
    user, password = dovecot.user, dovecot.password
    delivered = [sample(i, 3000) for i in range(4)]
    for message in delivered:
        dovecot.deliver(user, message)
    seen = []
    for _ in range(4):
        client = login(balanced, user, password)
        seen.append([line.split()[1] for line in client.uidl()[1]])
        assert digests(retr_all(client)) == digests(delivered)
        client.quit()
    assert all(uidls == seen[0] for uidls in seen)
    for name in ("alpha", "beta"):  # round robin: each node served some of them
        wait_for(cluster.nodes[name].output, f"login {user!r} from 127.0.0.1")


def test_a_node_killed_during_a_cold_sync_loses_nothing(cluster, balanced, dovecot):
    user, password = dovecot.user, dovecot.password
    delivered = [sample(i, 200_000) for i in range(40)]
    for message in delivered:
        dovecot.deliver(user, message)
    outcome: list[BaseException | None] = []

    def first_login() -> None:
        try:
            login(balanced, user, password).quit()
            outcome.append(None)
        except (poplib.error_proto, OSError) as exc:
            outcome.append(exc)

    thread = threading.Thread(target=first_login, daemon=True)
    thread.start()
    # Mid-sync: some messages are in the cache, not all, and a node holds the account.
    node = eventually(lambda: 0 < cached_files(cluster, user) < len(delivered) and serving_node(cluster, user),
                      message="a cold sync in progress")
    cluster.nodes[node].kill()
    thread.join(60)

    def served_whole() -> list[bytes] | None:
        try:
            client = login(balanced, user, password)
        except (poplib.error_proto, OSError):
            return None  # the lock of the killed node's connection, for a moment; a refused connect
        try:
            if client.stat()[0] < len(delivered):
                return None  # the other node finishes the sync (in the background past the login budget)
            return retr_all(client)
        finally:
            client.quit()

    assert digests(eventually(served_whole, timeout=120)) == digests(delivered)
    assert cached_files(cluster, user) == len(delivered)  # none twice, none partial
    assert len(dovecot.messages(user)) == len(delivered)


def test_a_node_killed_during_a_download_loses_nothing(cluster, balanced, dovecot):
    user, password = dovecot.user, dovecot.password
    delivered = [sample(i, 50_000) for i in range(10)]
    for message in delivered:
        dovecot.deliver(user, message)
    client = login(balanced, user, password)
    assert client.stat()[0] == len(delivered)
    client.retr(1)
    client.dele(1)  # never applied: the session does not reach QUIT
    node = serving_node(cluster, user)
    assert node is not None
    cluster.nodes[node].kill()
    with pytest.raises((poplib.error_proto, OSError, EOFError)):
        client.retr(2)

    def served() -> list[bytes] | None:
        try:
            again = login(balanced, user, password)
        except (poplib.error_proto, OSError):
            return None
        try:
            return retr_all(again)
        finally:
            again.quit()

    assert digests(eventually(served, timeout=60)) == digests(delivered)
    assert cached_files(cluster, user) == len(delivered)


def test_what_one_node_learnt_of_a_password_serves_a_login_on_the_other(cluster, dovecot):
    user, password = dovecot.user, dovecot.password
    dovecot.deliver(user, sample(1))
    direct = {"proxy_protocol": False}  # no HAProxy here: each client picks its node
    cluster.start("alpha", listen=direct, sync={"auth_cache_ttl": 600})
    login(cluster.nodes["alpha"].port, user, password).quit()
    # beta cannot reach the provider: its logins are served by what alpha wrote.
    unreachable = {"port": closed_port(), "timeout": 2}
    cluster.start("beta", listen=direct, upstream=unreachable)
    client = login(cluster.nodes["beta"].port, user, password)  # the offline hash alpha wrote
    assert client.stat()[0] == 1
    client.quit()
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        login(cluster.nodes["beta"].port, user, "not-the-password")
    cluster.nodes["beta"].stop()
    cluster.start("gamma", listen=direct, upstream=unreachable, offline={"enabled": False},
                  sync={"auth_cache_ttl": 600})
    client = login(cluster.nodes["gamma"].port, user, password)  # the auth cache's digest, keyed alike
    assert client.stat()[0] == 1
    client.quit()
