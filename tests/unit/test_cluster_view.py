"""What the console and the metrics show of a cluster, over a directory of nodes held in memory: the
reading kept for a few seconds, a database that does not answer within the bound, the gauges, who sees
what on the console. With real nodes on a real PostgreSQL: tests/integration/test_cluster_console.py."""

from __future__ import annotations

import re
import threading

import pytest
from helpers.waiting import eventually
from prometheus_client import CollectorRegistry, generate_latest
from starlette.testclient import TestClient

from pop3proxy.admin.cluster_view import ClusterWatch
from pop3proxy.admin.metrics_http import ClusterCollector
from pop3proxy.config import Settings
from pop3proxy.net.gate import Gate
from pop3proxy.net.throttle import Throttle
from pop3proxy.proxy.credentials import hash_password
from pop3proxy.proxy.local import LocalBackend
from pop3proxy.store.api import StateError
from pop3proxy.store.postgres.nodes import NodeInfo, ServingInfo
from pop3proxy.web.app import build_app

PASSWORDS = {"alice": "alice-pw", "root": "root-pw"}


def client(app) -> TestClient:
    return TestClient(app, backend="trio", follow_redirects=False)


def sign_in(c: TestClient, user: str) -> None:
    token = re.search(r'name="csrf" value="([^"]+)"', c.get("/login").text).group(1)
    assert c.post("/login", data={"user": user, "password": PASSWORDS[user], "csrf": token}).status_code == 303


class Directory:
    """A `NodeDirectory`'s reads, from lists; ``gate``: each read waits for it (a database that hangs)."""

    def __init__(self) -> None:
        self.nodes_now = [NodeInfo("alpha", 11, "1.2", "serving", 60.0, 0.4),
                          NodeInfo("beta", 12, "1.2", "draining", 50.0, 0.9),
                          NodeInfo("gamma", 13, "1.1", "gone", 900.0, 700.0)]
        self.serving_now = [ServingInfo("alice", "alpha", 11, 3.0), ServingInfo("bob", "beta", 12, 1.0)]
        self.reads = 0
        self.gate: threading.Event | None = None
        self.error: Exception | None = None

    def nodes(self) -> list[NodeInfo]:
        self.reads += 1
        if self.gate is not None:
            self.gate.wait(30)
        if self.error is not None:
            raise self.error
        return list(self.nodes_now)

    def serving(self) -> list[ServingInfo]:
        return list(self.serving_now)


def test_a_reading_is_kept_for_a_few_seconds():
    directory, clock = Directory(), [100.0]
    watch = ClusterWatch(directory, "db:5432/x", bound=5, fresh=2, clock=lambda: clock[0])
    first = watch.view()
    assert [n.node for n in first.nodes] == ["alpha", "beta", "gamma"] and not first.problem
    clock[0] += 1.9
    assert watch.view() is first and directory.reads == 1
    clock[0] += 0.2
    assert watch.view() is not first and directory.reads == 2


def test_a_database_that_does_not_answer_is_a_problem_within_the_bound():
    directory = Directory()
    directory.gate = threading.Event()
    watch = ClusterWatch(directory, "db:5432/x", bound=0.2, fresh=60)
    try:
        view = watch.view()
        assert "did not answer within 0.2 s" in view.problem and not view.nodes
        assert "did not answer" in watch.view().problem and directory.reads == 1  # one reading at a time
    finally:
        directory.gate.set()
    shown = eventually(lambda: None if watch.view().problem else watch.view())  # the reading ends, is shown
    assert [n.node for n in shown.nodes] == ["alpha", "beta", "gamma"]


def scrape(collector: ClusterCollector) -> str:
    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode()


def test_the_gauges_of_the_nodes():
    collector = ClusterCollector()
    assert scrape(collector).strip() == ""  # one machine: nothing
    collector.watch = ClusterWatch(Directory(), "db:5432/x", bound=5)
    text = scrape(collector)
    for line in ('pop3proxy_cluster_database_up 1.0', 'pop3proxy_cluster_node_up{node="alpha"} 1.0',
                 'pop3proxy_cluster_node_up{node="beta"} 1.0', 'pop3proxy_cluster_node_up{node="gamma"} 0.0',
                 'pop3proxy_cluster_node_draining{node="beta"} 1.0',
                 'pop3proxy_cluster_node_draining{node="alpha"} 0.0',
                 'pop3proxy_cluster_node_heartbeat_age_seconds{node="gamma"} 700.0',
                 'pop3proxy_cluster_accounts_served{node="alpha"} 1.0',
                 'pop3proxy_cluster_accounts_served{node="gamma"} 0.0'):
        assert line in text.splitlines(), (line, text)


def test_a_database_that_cannot_be_read_is_one_gauge_at_0():
    directory = Directory()
    directory.error = StateError("cannot reach the cluster database: connection refused")
    text = scrape_with(directory)
    assert "pop3proxy_cluster_database_up 0.0" in text.splitlines()
    assert "pop3proxy_cluster_node_up" not in text


def scrape_with(directory: Directory) -> str:
    collector = ClusterCollector()
    collector.watch = ClusterWatch(directory, "db:5432/x", bound=5)
    return scrape(collector)


@pytest.fixture
def apps(tmp_path):
    """The console of a cluster node (root is an admin) and of one machine."""
    users = tmp_path / "users"
    users.write_text("".join(f"{u}:{hash_password(p, n=2)}\n" for u, p in PASSWORDS.items()))
    settings = Settings(listen={"host": "127.0.0.1", "port": 0}, local={"users_file": users},
                        cache={"root": tmp_path / "cache"}, web={"port": 0, "admins": ["root"]})
    backend = LocalBackend(users, tmp_path / "cache")
    directory = Directory()
    cluster = build_app(settings, backend, Gate(Throttle()), secure=False,
                        cluster=ClusterWatch(directory, "db:5432/x", bound=5, fresh=0))
    alone = build_app(settings, backend, Gate(Throttle()), secure=False)
    return cluster, alone, directory


def test_an_admin_sees_every_node_and_the_accounts_each_serves(apps):
    with client(apps[0]) as c:
        sign_in(c, "root")
        page = c.get("/").text
        assert 'id="cluster"' in page and 'data-node="alpha"' in page and 'data-node="gamma"' in page
        assert '<span class="account">alice</span>' in page and "draining" in page and "gone" in page
        found = c.get("/api/cluster").json()
        assert found["database"] == "db:5432/x" and found["problem"] is None
        assert [(n["node"], n["state"], n["accounts"]) for n in found["nodes"]] == [
            ("alpha", "serving", ["alice"]), ("beta", "draining", ["bob"]), ("gamma", "gone", [])]
        assert found["nodes"][0]["version"] == "1.2" and found["nodes"][2]["heartbeat_age"] == 700.0


def test_a_user_sees_only_which_node_serves_their_own_account(apps):
    with client(apps[0]) as c:
        sign_in(c, "alice")
        page = c.get("/").text
        words = re.sub(r'name="csrf" value="[^"]*"', "", page)  # a random token may spell "bob"
        assert 'id="cluster"' not in page and "beta" not in words and "bob" not in words
        assert "served now by node <strong>alpha</strong>" in page
        assert c.get("/api/cluster").json() == {"user": "alice", "served_by": "alpha"}
    apps[2].serving_now = []
    with client(apps[0]) as c:
        sign_in(c, "alice")
        assert "served now" not in c.get("/").text
        assert c.get("/api/cluster").json() == {"user": "alice", "served_by": None}


def test_a_cluster_database_away_shows_as_a_problem_and_no_traceback(apps):
    apps[2].error = StateError("cannot reach the cluster database: connection refused")
    with client(apps[0]) as c:
        sign_in(c, "root")
        page = c.get("/")
        assert page.status_code == 200 and "connection refused" in page.text and 'id="nodes"' not in page.text
        assert "connection refused" in c.get("/api/cluster").json()["problem"]


def test_one_machine_shows_no_cluster(apps):
    with client(apps[1]) as c:
        sign_in(c, "root")
        assert 'id="cluster"' not in c.get("/").text
        reply = c.get("/api/cluster")
        assert reply.status_code == 404 and "not a cluster" in reply.json()["error"]


def test_the_console_reads_no_cluster_on_the_event_loop(apps):
    """The directory is read in a worker thread: a read from trio's thread would fail here."""
    directory = apps[2]
    original = directory.nodes

    def nodes():
        import trio

        try:
            trio.lowlevel.current_trio_token()
        except RuntimeError:
            return original()
        raise AssertionError("the cluster was read on the event loop's thread")

    directory.nodes = nodes  # type: ignore[method-assign]
    with client(apps[0]) as c:
        sign_in(c, "root")
        assert 'data-node="alpha"' in c.get("/").text
