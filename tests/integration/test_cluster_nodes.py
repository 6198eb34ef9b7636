"""Cluster mode: `pop3proxy serve` nodes sharing one PostgreSQL (a real server, see helpers/postgres.py)
and one cache root, in front of a real Dovecot. What every node of a cluster must agree on: the UIDLs,
sizes and bytes a client sees whichever node serves it, one session per account across nodes, the schema
version; and what the people running it see: `db upgrade`, `status`, clear refusals."""

from __future__ import annotations

import hashlib
import os
import poplib
import subprocess
import sys

import psycopg
import pytest
from helpers.cluster import Cluster, url_of
from helpers.proxy import retr_all, sample
from helpers.waiting import eventually, wait_for

pytestmark = pytest.mark.dovecot


@pytest.fixture
def cluster(server_process, tmp_path, dovecot, postgres_db):
    made = Cluster(server_process, tmp_path, dovecot, url_of(postgres_db))
    yield made
    for node in made.nodes.values():
        assert dovecot.password not in node.output()  # no password ever reaches a log


def listing(client: poplib.POP3) -> list[tuple[bytes, bytes, str]]:
    """(uidl, size, sha256) of every message a session sees."""
    uidls = [line.split() for line in client.uidl()[1]]
    sizes = dict(line.split() for line in client.list()[1])
    bodies = retr_all(client)
    return [(uid, sizes[number], hashlib.sha256(body).hexdigest()) for (number, uid), body in zip(uidls, bodies)]


def test_db_upgrade_creates_the_schema_once_and_serve_refuses_a_database_without_it(cluster):
    refused = cluster.run("serve", node="early")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "pop3proxy db upgrade" in refused.stderr and "Traceback" not in refused.stderr
    first = cluster.upgrade()
    assert first.returncode == 0, first.stderr
    assert "created" in first.stdout
    again = cluster.upgrade()
    assert again.returncode == 0 and "up to date" in again.stdout, again.stdout + again.stderr


def test_two_nodes_serve_the_same_mailbox_and_hold_one_session_per_account(cluster, dovecot):
    assert cluster.upgrade().returncode == 0
    user, password = dovecot.user, dovecot.password
    for i in range(3):
        dovecot.deliver(user, sample(i, 2000))
    cluster.start("alpha")
    cluster.start("beta")

    first = cluster.client("alpha", user, password)
    seen_on_alpha = listing(first)
    assert len(seen_on_alpha) == 3
    busy = poplib.POP3("127.0.0.1", cluster.nodes["beta"].port, timeout=30)
    busy.user(user)
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        busy.pass_(password)
    busy.close()
    status = cluster.run("status")
    assert "node alpha: serving" in status.stdout and "node beta: serving" in status.stdout, status.stdout
    assert f"serving 1 account: {user}" in status.stdout, status.stdout
    first.quit()

    second = cluster.client("beta", user, password)  # right after the QUIT, on the other node
    assert listing(second) == seen_on_alpha
    second.quit()
    # The state lives in the database, not beside the cache.
    assert not list(cluster.root.rglob("state.db"))
    with psycopg.connect(cluster.database) as conn:
        count = conn.execute("SELECT count(*) FROM messages WHERE status = 'cached'").fetchone()
    assert count is not None and count[0] == 3


def test_a_killed_node_lets_go_of_its_accounts_at_once(cluster, dovecot):
    assert cluster.upgrade().returncode == 0
    user, password = dovecot.user, dovecot.password
    dovecot.deliver(user, sample(1))
    cluster.start("alpha")
    cluster.start("beta")
    held = cluster.client("alpha", user, password)
    assert held.stat()[0] == 1
    cluster.nodes["alpha"].kill()  # SIGKILL: its database connections die with it
    held.sock.close()

    def logs_in_on_beta() -> int | None:
        try:
            client = cluster.client("beta", user, password)
        except poplib.error_proto as exc:
            assert b"[IN-USE]" in exc.args[0], exc  # only the lock may still be held, for a moment
            return None
        try:
            return client.stat()[0]
        finally:
            client.quit()

    assert eventually(logs_in_on_beta, timeout=30) == 1
    # Three heartbeats (of a second here) later, the node is shown as gone.
    eventually(lambda: "node alpha: gone" in cluster.run("status").stdout, timeout=60)


def test_a_readable_password_file_and_an_unreachable_database_are_clear_errors(cluster, tmp_path):
    secret = tmp_path / "db-password"
    secret.write_text("s3cret-db-password\n")
    os.chmod(secret, 0o644)
    config = cluster.config("x", cluster={"database_password_file": str(secret)})
    run = subprocess.run([sys.executable, "-m", "pop3proxy", "serve", "--config", str(config)],
                         capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert run.returncode == 1 and "chmod 600" in run.stderr, run.stderr
    assert "s3cret-db-password" not in run.stdout + run.stderr
    config = cluster.config("x", cluster={"database": "postgresql://nobody@127.0.0.1:1/none"})
    run = subprocess.run([sys.executable, "-m", "pop3proxy", "serve", "--config", str(config)],
                         capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert run.returncode == 1, run.stderr
    assert "cluster database 127.0.0.1:1/none" in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_a_node_that_loses_the_database_refuses_logins_clearly_and_recovers(server_process, tmp_path, dovecot,
                                                                            own_postgres):
    cluster = Cluster(server_process, tmp_path, dovecot, own_postgres.url())
    assert cluster.upgrade().returncode == 0
    user, password = dovecot.user, dovecot.password
    for i in range(2):
        dovecot.deliver(user, sample(i))
    other, other_password = dovecot.new_user()
    node = cluster.start("alpha")
    first = cluster.client("alpha", user, password)
    before = listing(first)
    assert len(before) == 2

    own_postgres.stop()
    try:
        refused = poplib.POP3("127.0.0.1", node.port, timeout=60)
        refused.user(other)
        with pytest.raises(poplib.error_proto, match=r"^b'-ERR \[SYS/TEMP\]"):
            refused.pass_(other_password)
        refused.close()
        try:  # the session in progress ends with an answer, whatever it is, and no hang
            first.quit()
        except poplib.error_proto as exc:
            assert exc.args[0].startswith(b"-ERR"), exc
    finally:
        own_postgres.start_again()

    def serves_again() -> list | None:
        try:
            client = cluster.client("alpha", user, password)
        except poplib.error_proto as exc:
            assert b"[SYS/TEMP]" in exc.args[0] or b"[IN-USE]" in exc.args[0], exc
            return None
        try:
            return listing(client)
        finally:
            client.quit()

    assert eventually(serves_again, timeout=60) == before  # nothing lost
    assert "Traceback" not in node.output()


def test_a_session_whose_lock_was_lost_applies_no_deletion(cluster, dovecot):
    """The lock connection broke (the database restarted, a network cut): another node may serve the
    account now, so QUIT's deletions are refused and nothing is deleted, here or at the provider."""
    assert cluster.upgrade().returncode == 0
    user, password = dovecot.user, dovecot.password
    for i in range(2):
        dovecot.deliver(user, sample(i))
    cluster.start("alpha", upstream={"delete": "mirror"})
    client = cluster.client("alpha", user, password)
    assert client.stat()[0] == 2
    client.dele(1)
    with psycopg.connect(cluster.database, autocommit=True) as admin:
        ended = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                              "WHERE application_name LIKE 'pop3proxy session locks%'").fetchone()
    assert ended is not None and ended[0] == 1
    with pytest.raises(poplib.error_proto, match=r"^b'-ERR"):
        client.quit()
    assert len(dovecot.messages(user)) == 2  # nothing deleted at the provider
    again = cluster.client("alpha", user, password)
    assert again.stat()[0] == 2  # nor in the cache
    again.quit()
    wait_for(cluster.nodes["alpha"].output, "was lost; no deletion applied")


def test_an_account_one_node_prefetched_lately_is_left_alone_by_the_other(cluster, dovecot, tmp_path):
    assert cluster.upgrade().returncode == 0
    user, password = dovecot.user, dovecot.password
    dovecot.deliver(user, sample(1))
    secret = tmp_path / "password"
    secret.write_text(password)
    secret.chmod(0o600)
    accounts = {f'accounts."{user}"': {"password_file": str(secret)}}
    alpha = cluster.start("alpha", **accounts)
    wait_for(alpha.output, f"prefetch of {user!r} complete")
    beta = cluster.start("beta", **accounts)
    wait_for(beta.output, f"prefetch of {user!r} left to the node that synced it lately")
    assert f"prefetch of {user!r} complete" not in beta.output()
