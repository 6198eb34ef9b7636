"""The metrics endpoint: disk usage collectors for the cache and the outgoing queue, the nodes of a
cluster, and a small HTTP server answering GET /metrics.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import trio
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    ProcessCollector,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily

from pop3proxy.admin.cluster_view import ClusterWatch
from pop3proxy.config import queue_dir
from pop3proxy.errors import ListenError
from pop3proxy.ops.metrics import REGISTRY
from pop3proxy.store.state_read import account_name
from pop3proxy.submission.queue import valid_id

log = logging.getLogger("pop3proxy.metrics")

MAX_USERS = 2000
MAX_REQUEST = 8192
REQUEST_TIMEOUT = 10.0

_SIZE = re.compile(r",S=(\d+)")


def _maildir_totals(maildir: Path) -> tuple[int, int]:
    count = octets = 0
    for sub in ("new", "cur"):
        try:
            with os.scandir(maildir / sub) as it:
                for item in it:
                    if item.name.startswith("."):
                        continue
                    count += 1
                    match = _SIZE.search(item.name)
                    if match:
                        octets += int(match.group(1))
                    else:
                        try:
                            octets += item.stat().st_size
                        except FileNotFoundError:
                            count -= 1
        except (FileNotFoundError, NotADirectoryError):
            continue
    return count, octets


_memo_lock = threading.Lock()


def _mbox_totals(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except FileNotFoundError:
        return 0, 0
    stamp = (st.st_size, st.st_mtime_ns)
    with _memo_lock:
        memo = _mbox_memo.get(str(path))
    if memo is not None and memo[0] == stamp:
        return memo[1]
    count, tail = 0, b"\n"  # the file's start counts as a line start
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            data = tail + chunk
            count += data.count(b"\nFrom ")
            tail = data[-5:]  # shorter than the pattern: nothing is counted twice
    result = (count, st.st_size)
    with _memo_lock:
        _mbox_memo[str(path)] = (stamp, result)
    return result


_mbox_memo: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {}


class DiskCollector:
    """Queue size and per-mailbox cache totals, read from disk when Prometheus scrapes."""

    def __init__(self, cache_root: Path, queue_dir: Path) -> None:
        self.cache_root = Path(cache_root)
        self.queue_dir = Path(queue_dir)

    def describe(self):
        return []

    def collect(self):
        queue = GaugeMetricFamily("pop3proxy_queue_size", "Messages waiting in the outgoing SMTP queue.")
        try:
            queue.add_metric([], sum(1 for name in os.listdir(self.queue_dir) if valid_id(name)))
        except OSError:
            queue.add_metric([], 0)
        yield queue

        messages = GaugeMetricFamily("pop3proxy_cache_messages", "Messages in a cached mailbox.", labels=["user"])
        octets = GaugeMetricFamily("pop3proxy_cache_bytes", "Octets in a cached mailbox.", labels=["user"])
        try:
            names = sorted(os.listdir(self.cache_root))
        except OSError:
            names = []
        reported = 0
        for name in names:
            if reported >= MAX_USERS:
                break
            if name.startswith("."):
                continue
            directory = self.cache_root / name
            if (directory / "Maildir").is_dir():
                count, size = _maildir_totals(directory / "Maildir")
            elif (directory / "mbox").is_file():
                try:
                    count, size = _mbox_totals(directory / "mbox")
                except OSError:
                    continue
            else:
                continue
            user = account_name(directory)
            messages.add_metric([user], count)
            octets.add_metric([user], size)
            reported += 1
        yield messages
        yield octets


_disk_collector: DiskCollector | None = None
_disk_lock = threading.Lock()


def watch_disk(cache_root: Path, queue_dir: Path) -> None:
    """Report the queue and the cache below ``cache_root`` at every scrape (one service per process:
    a second call points the same collector at the new paths)."""
    global _disk_collector
    with _disk_lock:
        if _disk_collector is None:
            _disk_collector = DiskCollector(cache_root, queue_dir)
            REGISTRY.register(_disk_collector)
        else:
            _disk_collector.cache_root, _disk_collector.queue_dir = Path(cache_root), Path(queue_dir)


class ClusterCollector:
    """A cluster's nodes, as the service's `ClusterWatch` reads them (at most every few seconds, bounded
    by the database's timeout; `render` runs in a worker thread). Nothing on one machine (no watch)."""

    def __init__(self) -> None:
        self.watch: ClusterWatch | None = None

    def describe(self):
        return []

    def collect(self):
        watch = self.watch
        if watch is None:
            return
        view = watch.view()
        up = GaugeMetricFamily("pop3proxy_cluster_database_up",
                               "1 when the cluster's database answered the last reading of the nodes, else 0.")
        up.add_metric([], 0 if view.problem else 1)
        yield up
        if view.problem:
            return
        families: dict[str, Any] = {
            name: GaugeMetricFamily(f"pop3proxy_cluster_{name}", text, labels=["node"])
            for name, text in (
                ("node_up", "1 for a node serving or draining with a fresh heartbeat, 0 stopped or gone."),
                ("node_heartbeat_age_seconds", "Seconds since the node's last heartbeat."),
                ("node_draining", "1 while the node drains (stopping: no new sessions), else 0."),
                ("accounts_served", "Accounts the node serves now (their session lock held)."),
            )
        }
        served = Counter(entry.node for entry in view.serving)
        for node in view.nodes:
            families["node_up"].add_metric([node.node], 1 if node.state in ("serving", "draining") else 0)
            families["node_heartbeat_age_seconds"].add_metric([node.node], max(0.0, node.heartbeat_ago))
            families["node_draining"].add_metric([node.node], 1 if node.state == "draining" else 0)
        for name in view.node_names():
            families["accounts_served"].add_metric([name], served.get(name, 0))
        yield from families.values()


_cluster_collector = ClusterCollector()
_cluster_registered = False


def watch_cluster(watch: ClusterWatch | None) -> None:
    """Report the cluster ``watch`` reads at every scrape (None: stop, one machine again)."""
    global _cluster_registered
    with _disk_lock:
        _cluster_collector.watch = watch
        if watch is not None and not _cluster_registered:
            REGISTRY.register(_cluster_collector)
            _cluster_registered = True


_combined: CollectorRegistry | None = None


def render() -> bytes:
    """The current metrics in the Prometheus text format. With several worker processes
    (``PROMETHEUS_MULTIPROC_DIR`` set) the counters and gauges of all of them, added up."""
    global _combined
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        return generate_latest(REGISTRY)
    with _disk_lock:
        if _combined is None:
            _combined = CollectorRegistry()
            multiprocess.MultiProcessCollector(_combined, path)
            ProcessCollector(registry=_combined)  # this process's: the supervising parent
            if _disk_collector is not None:
                _combined.register(_disk_collector)
            _combined.register(_cluster_collector)  # nothing without a cluster
    return generate_latest(_combined)


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


async def _handle(stream: trio.abc.Stream) -> None:
    try:
        data = b""
        with trio.move_on_after(REQUEST_TIMEOUT):
            while b"\r\n\r\n" not in data and b"\n\n" not in data and len(data) < MAX_REQUEST:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                data += chunk
        request_line = data.split(b"\n", 1)[0].strip().decode("latin-1")
        parts = request_line.split()
        if len(parts) < 2:
            reply = _response("400 Bad Request", b"bad request\n")
        else:
            method, target = parts[0], parts[1].split("?", 1)[0]
            if method in ("GET", "HEAD") and target == "/metrics":
                body = await trio.to_thread.run_sync(render)
                reply = _response("200 OK", body, CONTENT_TYPE_LATEST)
                if method == "HEAD":
                    reply = reply[: reply.index(b"\r\n\r\n") + 4]
            else:
                reply = _response("404 Not Found", b"not found; try /metrics\n")
        with trio.move_on_after(REQUEST_TIMEOUT):
            await stream.send_all(reply)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    except Exception as exc:  # never take the endpoint down; never print a traceback
        log.error("metrics request failed: %s: %s", type(exc).__name__, exc)
    finally:
        with trio.move_on_after(1) as cleanup:
            cleanup.shield = True
            await trio.aclose_forcefully(stream)


async def serve_metrics(settings, cluster: ClusterWatch | None = None, *,
                        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``GET /metrics`` on ``[metrics] host/port`` until cancelled; ``started(port)`` (0 works).
    ``cluster``: the nodes of the cluster this service is a node of, reported too."""
    host, port = settings.metrics.host, settings.metrics.port
    if port is None:
        raise ValueError("metrics.port is not set: the metrics endpoint is disabled")
    watch_disk(settings.cache.root, queue_dir(settings))
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise ListenError(f"cannot listen for metrics on {host}:{port}: {(exc.strerror or str(exc)).lower()}") from None
    bound = listeners[0].socket.getsockname()[1]
    log.info("listening for metrics on %s port %d", host, bound)
    watch_cluster(cluster)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, _handle, listeners)
            task_status.started(bound)
    finally:
        if cluster is not None:
            watch_cluster(None)
