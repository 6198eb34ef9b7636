"""What ``pop3proxy status`` (and the web console) show of a cluster: its nodes with their last
heartbeat, which node serves which account now, and each account's state as the cluster's database
holds it (the state a one-machine service keeps in ``state.db``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pop3proxy.ops.units import human_age
from pop3proxy.store.api import StateError, StateStore, Stores
from pop3proxy.store.engines import database_name, open_stores

__all__ = ["ClusterView", "cluster_view", "format_cluster", "read_account_state"]


@dataclass
class ClusterView:
    database: str
    nodes: list[Any] = field(default_factory=list)  # store.postgres.nodes.NodeInfo
    serving: list[Any] = field(default_factory=list)  # store.postgres.nodes.ServingInfo
    problem: str = ""


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
    try:
        view.nodes = stores.directory.nodes()
        view.serving = stores.directory.serving()
    except StateError as exc:
        view.problem = f"cannot read the cluster's tables: {exc}"
    return view, stores


def format_cluster(view: ClusterView) -> list[str]:
    lines = [f"cluster database {view.database}"]
    if view.problem:
        return [*lines, f"  problem     {view.problem}"]
    if not view.nodes:
        lines.append("  no node has started yet")
    serving: dict[str, list[str]] = {}
    for entry in view.serving:
        serving.setdefault(entry.node, []).append(entry.account)
    for node in view.nodes:
        accounts = serving.get(node.node, [])
        what = f"serving {len(accounts)} account{'s' if len(accounts) != 1 else ''}"
        if accounts:
            what += ": " + ", ".join(sorted(accounts)[:10]) + (" ..." if len(accounts) > 10 else "")
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
