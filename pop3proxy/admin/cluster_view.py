"""What ``pop3proxy status``, the web console and the metrics show of a cluster: its nodes with their
last heartbeat, which node serves which account now, and each account's state as the cluster's database
holds it (the state a one-machine service keeps in ``state.db``).

A running service reads the nodes through `ClusterWatch`: in a worker thread, at most every few seconds,
and never waiting longer than the database's timeout (a database that does not answer is a ``problem``).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pop3proxy.ops.units import human_age
from pop3proxy.store.api import StateError, StateStore, Stores
from pop3proxy.store.engines import database_name, open_stores

__all__ = ["ClusterView", "ClusterWatch", "cluster_json", "cluster_view", "cluster_watch", "format_cluster",
           "read_account_state", "read_cluster"]

FRESH = 2.0  # seconds a reading of the nodes is shown before the next one is made


@dataclass
class ClusterView:
    database: str
    nodes: list[Any] = field(default_factory=list)  # store.postgres.nodes.NodeInfo
    serving: list[Any] = field(default_factory=list)  # store.postgres.nodes.ServingInfo
    problem: str = ""

    def accounts_of(self, node: str) -> list[str]:
        """The accounts (cache ids) ``node`` serves now, sorted."""
        return sorted(entry.account for entry in self.serving if entry.node == node)

    def node_names(self) -> list[str]:
        """Every node: those registered, then any other that serves an account."""
        names = [node.node for node in self.nodes]
        return names + sorted({entry.node for entry in self.serving} - set(names))


def read_cluster(directory, database: str) -> ClusterView:
    """The nodes and what they serve as ``directory`` (a `NodeDirectory`) reads them now; blocking."""
    view = ClusterView(database)
    try:
        view.nodes = directory.nodes()
        view.serving = directory.serving()
    except StateError as exc:
        view.problem = f"cannot read the cluster's tables: {exc}"
    return view


class ClusterWatch:
    """The cluster for a running service's pages and metrics: `view` (blocking: call it in a worker
    thread) reads the directory again when the last reading is ``fresh`` seconds old, in a thread of its
    own, and waits for it at most ``bound`` seconds (the database's timeout): a database that does not
    answer gives a view with a problem at once, the reading in progress is used when it ends."""

    def __init__(self, directory, database: str, *, bound: float, fresh: float = FRESH,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.directory, self.database = directory, database
        self.bound, self.fresh, self.clock = bound, fresh, clock
        self._lock = threading.Lock()
        self._view: ClusterView | None = None
        self._read_at = 0.0
        self._reading: threading.Thread | None = None

    def _read(self) -> None:
        try:
            view = read_cluster(self.directory, self.database)
        except Exception as exc:  # noqa: BLE001  never leave the reading unfinished
            view = ClusterView(self.database, problem=f"cannot read the cluster's tables: {type(exc).__name__}")
        with self._lock:
            self._view, self._read_at, self._reading = view, self.clock(), None

    def view(self) -> ClusterView:
        with self._lock:
            if self._view is not None and self.clock() - self._read_at < self.fresh:
                return self._view
            if self._reading is None:
                self._reading = threading.Thread(target=self._read, name="cluster view", daemon=True)
                self._reading.start()
            reading = self._reading
        reading.join(self.bound)
        with self._lock:
            if self._reading is reading or self._view is None:  # still reading
                return ClusterView(self.database,
                                   problem=f"the cluster database did not answer within {self.bound:g} s")
            return self._view


def cluster_watch(settings, stores: Stores | None) -> ClusterWatch | None:
    """The running service's `ClusterWatch` over its own stores' directory; None on one machine."""
    if settings.cluster is None or stores is None or stores.directory is None:
        return None
    return ClusterWatch(stores.directory, database_name(settings.cluster), bound=settings.cluster.database_timeout)


def cluster_json(view: ClusterView) -> dict[str, Any]:
    """The view for the console's JSON API: every node with its state, heartbeat and accounts."""
    known = {node.node: node for node in view.nodes}
    nodes = []
    for name in view.node_names():
        node = known.get(name)
        nodes.append({"node": name, "state": node.state if node else "unregistered",
                      "pid": node.pid if node else None, "version": node.version if node else None,
                      "heartbeat_age": round(node.heartbeat_ago, 3) if node else None,
                      "started_age": round(node.started_ago, 3) if node else None,
                      "accounts": view.accounts_of(name)})
    return {"database": view.database, "problem": view.problem or None, "nodes": nodes}


def cluster_view(settings, stores: Stores | None = None) -> tuple[ClusterView | None, Stores | None]:
    """The cluster as its database has it (None on one machine), and the stores opened to read it
    (the caller closes them; None when they could not be opened, the problem is in the view)."""
    if settings.cluster is None:
        return None, None
    view = ClusterView(database_name(settings.cluster))
    try:
        stores = stores or open_stores(settings)
    except Exception as exc:  # StartupError: unreachable, another schema version
        view.problem = str(exc)
        return view, None
    return read_cluster(stores.directory, view.database), stores


def format_cluster(view: ClusterView) -> list[str]:
    lines = [f"cluster database {view.database}"]
    if view.problem:
        return [*lines, f"  problem     {view.problem}"]
    if not view.nodes:
        lines.append("  no node has started yet")
    for node in view.nodes:
        accounts = view.accounts_of(node.node)
        what = f"serving {len(accounts)} account{'s' if len(accounts) != 1 else ''}"
        if accounts:
            what += ": " + ", ".join(accounts[:10]) + (" ..." if len(accounts) > 10 else "")
        lines.append(f"  node {node.node}: {node.state}, pid {node.pid}, version {node.version}, "
                     f"last heartbeat {human_age(node.heartbeat_ago)} ago, {what}")
    return lines


def read_account_state(states: StateStore, cache_id: str) -> tuple[dict[str, str], dict[str, int], set[str]] | None:
    """(meta, row counts by status, hidden keys) of an account from a state store, or None when it has
    no state there; `StateError` when it cannot be read."""
    state = states.open_existing(cache_id)
    if state is None:
        return None
    try:
        meta = {name: value for name in ("last_sync", "user") if (value := state.get_meta(name)) is not None}
        counts: dict[str, int] = {}
        for row in state.rows():
            counts[row.status] = counts.get(row.status, 0) + 1
        return meta, counts, state.hidden_keys()
    finally:
        state.close()


def last_sync(meta: dict[str, str]) -> dict | None:
    if not meta.get("last_sync"):
        return None
    try:
        return json.loads(meta["last_sync"])
    except ValueError:
        return {"result": "unreadable"}
