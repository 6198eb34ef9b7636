"""What the metrics show of a cluster, over a directory of nodes held in memory: the reading kept for a
few seconds, a database that does not answer within the bound, the gauges."""

from __future__ import annotations

import threading

from helpers.waiting import eventually
from prometheus_client import CollectorRegistry, generate_latest

from pop3proxy.admin.cluster_view import ClusterWatch
from pop3proxy.admin.metrics_http import ClusterCollector
from pop3proxy.store.api import StateError
from pop3proxy.store.postgres.nodes import NodeInfo, ServingInfo


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
