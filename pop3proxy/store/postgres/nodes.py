"""The nodes of a cluster and what each serves now, for status pages and metrics; the secrets they share.

- ``nodes``: one row per node name. The node's supervising process writes it at start (`NodeDirectory.
  register`), beats every ``cluster.heartbeat`` seconds (`beat`), says when it drains and when it stops.
  A node whose heartbeat is older than three beats is shown as *gone* (killed, or cut off).
- ``serving``: written by the session locks (`locks.PostgresSessionLocks` with a node name); `serving`
  lists only the rows whose advisory lock is held now, so a dead process's rows never show.
- ``cluster_keys``: random keys made once by the first node that asks (`shared_key`), the same for all.

Synchronous (worker threads); every database error is `StateError`.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from typing import Any, LiteralString

import psycopg
from psycopg_pool import ConnectionPool

from pop3proxy.store.postgres.connections import single_statements
from pop3proxy.store.state import StateError

__all__ = ["NodeDirectory", "NodeInfo", "ServingInfo"]

STALE_BEATS = 3  # a node is gone when its heartbeat is this many beats old

_SERVING: LiteralString = """
    SELECT s.account, s.node, s.pid, extract(epoch FROM now() - s.since)
    FROM serving s
    WHERE EXISTS (SELECT 1 FROM pg_locks l
                  WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
                    AND ((l.classid::bigint << 32) | l.objid::bigint) = s.lock_key)
    ORDER BY s.node, s.account"""


@dataclass(frozen=True)
class NodeInfo:
    node: str
    pid: int
    version: str
    state: str  # serving, draining, stopped, or gone (no heartbeat for three beats)
    started_ago: float  # seconds
    heartbeat_ago: float  # seconds


@dataclass(frozen=True)
class ServingInfo:
    account: str  # the cache id
    node: str
    pid: int
    since: float  # seconds


class NodeDirectory:
    """The ``nodes`` table as one node (``node``) sees it, on a pool of the node's."""

    def __init__(self, pool: ConnectionPool, node: str, heartbeat: float = 5.0) -> None:
        self.pool = pool
        self.node = node
        self.heartbeat = heartbeat

    def _run(self, query: LiteralString, params: Any = None, *, rows: bool = False) -> list[tuple[Any, ...]]:
        try:
            with single_statements(self.pool) as conn:  # each one its own transaction: one round trip
                cursor = conn.execute(query, params)
                return cursor.fetchall() if rows else []
        except (psycopg.Error, OSError) as exc:  # the pool's timeout is a psycopg error too
            raise StateError(f"cannot reach the cluster database: {exc}") from exc

    def register(self, version: str) -> None:
        """This node starts serving (a node of this name that was killed is replaced)."""
        self._run("""INSERT INTO nodes (node, pid, version, state) VALUES (%s, %s, %s, 'serving')
                     ON CONFLICT (node) DO UPDATE SET pid = excluded.pid, version = excluded.version,
                         state = 'serving', started_at = now(), heartbeat_at = now()""",
                  (self.node, os.getpid(), version))

    def beat(self, state: str = "serving") -> None:
        self._run("UPDATE nodes SET heartbeat_at = now(), state = %s WHERE node = %s", (state, self.node))

    def stopped(self) -> None:
        self._run("UPDATE nodes SET state = 'stopped', heartbeat_at = now() WHERE node = %s", (self.node,))

    def nodes(self) -> list[NodeInfo]:
        found = self._run("""SELECT node, pid, version, state, extract(epoch FROM now() - started_at),
                                    extract(epoch FROM now() - heartbeat_at)
                             FROM nodes ORDER BY node""", rows=True)
        stale = STALE_BEATS * self.heartbeat
        return [NodeInfo(node, pid, version, "gone" if state != "stopped" and float(ago) > stale else state,
                         float(started), float(ago))
                for node, pid, version, state, started, ago in found]

    def serving(self) -> list[ServingInfo]:
        """Which node serves which account now (sessions and syncs holding the account's lock)."""
        return [ServingInfo(account, node, pid, float(since))
                for account, node, pid, since in self._run(_SERVING, rows=True)]

    def shared_key(self, name: str) -> bytes:
        """The cluster's key ``name`` (32 random bytes made by the first node that asks)."""
        found = self._run("""WITH made AS (INSERT INTO cluster_keys (name, value) VALUES (%s, %s)
                                           ON CONFLICT (name) DO NOTHING RETURNING value)
                             SELECT value FROM made UNION ALL SELECT value FROM cluster_keys WHERE name = %s""",
                          (name, secrets.token_bytes(32), name), rows=True)
        if not found:
            raise StateError(f"the cluster key {name!r} could not be read")
        return bytes(found[0][0])
