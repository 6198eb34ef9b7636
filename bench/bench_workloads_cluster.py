"""Workload 9: cluster mode against one machine, in the same run and in front of the same Dovecot.

Three ways in, measured interleaved: the suite's single-machine pop3proxy (``bench.proxy``), one cluster
node, and two cluster nodes behind HAProxy (plain TCP, ``balance leastconn``). Both nodes share one
PostgreSQL database (started by the benchmark, ``bench_cluster.BenchPostgres``) and one cache root; the
"one node" runs go to the first node directly while the second one idles. Then, from the server's side,
the PostgreSQL statements (each one a round trip) and the server's CPU time per warm session, and what
PostgreSQL alone does on this machine (pgbench), for the sizing in docs/CLUSTER.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from bench import bench_client as bc
from bench.bench_cluster import BenchPostgres, HAProxy, Statement, StatementCounter, pgbench
from bench.bench_harness import Bench, _failure_notes, interleaved
from bench.bench_processes import ServerUnavailable
from bench.bench_report import Row, median, percentile
from bench.bench_servers import REPO, Pop3proxy

DATABASE = "pop3proxy"
# No heartbeat falls into the counted sessions (each is one statement of the node's, not of a login).
HEARTBEAT = 600


def _node(bench: Bench, name: str, url: str, root: Path) -> Pop3proxy:
    """A cluster node with the single-machine pop3proxy's settings, on the shared database and cache root."""
    node = Pop3proxy(bench.tmp / f"cluster-{name}", upstream_port=bench.dovecot.port,
                     extra={"cache": {"root": str(root)},
                            "cluster": {"database": url, "node": name, "heartbeat": HEARTBEAT}})
    node.cache_root = root
    return node


def _upgrade(node: Pop3proxy) -> None:
    """``pop3proxy db upgrade`` with the node's configuration: the schema, before any node starts."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "pop3proxy", "db", "upgrade", "--config", str(node.config)],
                          capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise ServerUnavailable(f"pop3proxy db upgrade failed: {(done.stderr or done.stdout)[-300:]}")


def _start_together(nodes: list[Pop3proxy]) -> None:
    """Start the nodes at once (each takes a second or two to start); the first failure is raised."""
    failed: list[ServerUnavailable] = []

    def start(node: Pop3proxy) -> None:
        try:
            node.start()
        except ServerUnavailable as exc:
            failed.append(exc)

    threads = [threading.Thread(target=start, args=(node,)) for node in nodes]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join()
    except BaseException:  # Ctrl-C: let the starts end (bounded) so that the caller stops what they started
        for thread in threads:
            thread.join()
        raise
    if failed:
        raise failed[0]


def w9_cluster(bench: Bench) -> None:
    users = bench.swarm_users[: bench.scale.cluster_users]
    if not users:
        bench.say("  no users for the cluster workload")
        return
    postgres: BenchPostgres | None = None
    started: list[Pop3proxy | HAProxy] = []
    try:
        try:
            postgres = BenchPostgres().start()
            url = postgres.create_database(DATABASE)
            root = bench.tmp / "cluster-cache"
            nodes = [_node(bench, name, url, root) for name in ("node-a", "node-b")]
            _upgrade(nodes[0])
            started += nodes  # stopped at the end whatever happens (stopping one never started does nothing)
            _start_together(nodes)
        except ServerUnavailable as exc:
            bench.missing["cluster"] = str(exc).splitlines()[0][:200]
            bench.say(f"  cluster not measured: {exc}")
            return
        ports = {"single": bench.proxy.port, "node": nodes[0].port}
        try:
            balancer = HAProxy(bench.tmp / "haproxy", [node.port for node in nodes]).start()
            started.append(balancer)
            ports["nodes2"] = balancer.port
        except ServerUnavailable as exc:
            bench.missing["haproxy"] = str(exc).splitlines()[0][:200]
            bench.say(f"  2 nodes behind HAProxy not measured: {exc}")
        _measure(bench, postgres, ports, users)
    finally:
        for server in reversed(started):
            server.stop()
        if postgres is not None:
            postgres.stop()


def _measure(bench: Bench, postgres: BenchPostgres, ports: dict[str, int], users: list[tuple[str, str]]) -> None:
    s = bench.scale
    title = f"9. cluster, {len(users)} concurrent warm sessions (login + STAT + UIDL + QUIT)"
    # Every mailbox cached (the first pass through a node fetches it), then warm passes through every way in.
    for port in ports.values():
        bc.swarm(port, users, retr=False)
    failures: dict[str, str] = {}
    errors: dict[str, dict[str, int]] = {}

    def run(server: str) -> float:
        r = bc.swarm(ports[server], users, retr=False)
        for text, count in r.errors.items():
            errors.setdefault(server, {}).setdefault(text, 0)
            errors[server][text] += count
        if not r.ok or not r.seconds:
            raise bc.Pop3Error(f"no session succeeded: {r.errors}")
        return r.ok / r.seconds

    samples = interleaved(bench, list(ports), s.reps, run, failures)
    rate = Row("w9.rate", f"{title}: sessions/s", "sessions/s", True, base="single")
    for server, values in samples.items():
        rate.values[server] = median(values)
        rate.runs[server] = len(values)
    rate.notes.append("the single machine is the suite's pop3proxy; the cluster nodes have its settings plus "
                      "[cluster] (one PostgreSQL database, one cache root); all on this machine's 2 cores")
    for server, found in errors.items():
        rate.notes.append(f"{server} failed sessions: {found}")
    _failure_notes(rate, failures)
    _say(bench, bench.add(rate))
    _latency(bench, ports, users)
    counted = {server: _round_trips(bench, postgres, ports[server], users) for server in ("node", "nodes2")
               if server in ports}
    _round_trip_rows(bench, counted)
    _pgbench_rows(bench, postgres, counted.get("node"))


def _say(bench: Bench, row: Row) -> None:
    bench.say(f"  {row.workload}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.values.items() if v is not None))


def _latency(bench: Bench, ports: dict[str, int], users: list[tuple[str, str]]) -> None:
    """Connect → +OK after PASS of warm sessions one at a time, in blocks of 10 per way in, interleaved."""
    samples: dict[str, list[float]] = {server: [] for server in ports}
    failures: dict[str, str] = {}
    block = 10
    who = users[:block]
    for _ in range(max(1, bench.scale.logins // block)):
        for server, port in ports.items():
            if server in failures:
                continue
            try:
                for name, password in who:
                    samples[server].append(bc.login_latency(port, name, password))
            except (bc.Pop3Error, OSError) as exc:
                failures[server] = f"{type(exc).__name__}: {exc}"[:160]
    for key, label, fn in (("median", "median", median), ("p95", "p95", lambda v: percentile(v, 0.95))):
        row = Row(f"w9.login.{key}", f"9. cluster: warm login latency (connect → +OK after PASS), {label}", "ms",
                  False, base="single")
        for server, values in samples.items():
            value = fn(values)
            row.values[server] = None if value is None else value * 1000
            row.runs[server] = len(values)
        if key == "median":
            row.notes.append(f"{len(who)} users in turn, one session at a time; each login logs in to Dovecot and "
                             "checks for new mail (none)")
        _failure_notes(row, failures)
        _say(bench, bench.add(row))


class Counted:
    """What the database saw during ``sessions`` warm sessions run one at a time."""

    def __init__(self, sessions: int, statements: list[Statement], cpu: float, settled: bool) -> None:
        self.sessions = sessions
        self.statements = statements
        self.cpu = cpu  # PostgreSQL server processes' CPU seconds
        self.settled = settled  # every session's lock was given back before the count was read

    @property
    def per_session(self) -> float:
        return sum(st.calls for st in self.statements) / self.sessions

    @property
    def exec_ms(self) -> float:
        return sum(st.exec_ms for st in self.statements) / self.sessions


def _round_trips(bench: Bench, postgres: BenchPostgres, port: int, users: list[tuple[str, str]]) -> Counted:
    sessions = max(20, bench.scale.logins // 4)
    with StatementCounter(postgres, DATABASE) as counter:
        counter.wait_unlocked()
        counter.reset()
        cpu = postgres.cpu_seconds()
        for i in range(sessions):
            name, password = users[i % len(users)]
            bc.login_stat_uidl(port, name, password, wait_close=True)
        settled = counter.wait_unlocked()
        cpu = postgres.cpu_seconds() - cpu
        return Counted(sessions, counter.read(), cpu, settled)


def _round_trip_rows(bench: Bench, counted: dict[str, Counted]) -> None:
    if not counted:
        return
    trips = Row("w9.roundtrips", "9. cluster: PostgreSQL statements (round trips) per warm session", "statements",
                False, base="single")
    cpu = Row("w9.pgcpu", "9. cluster: PostgreSQL server CPU per warm session", "ms", False, base="single")
    for server, c in counted.items():
        trips.values[server] = c.per_session
        trips.runs[server] = c.sessions
        cpu.values[server] = c.cpu / c.sessions * 1000
        cpu.runs[server] = c.sessions
        cpu.notes.append(f"{server}: {c.exec_ms:.3f} ms of statement execution per session (pg_stat_statements)")
        if not c.settled:
            trips.notes.append(f"{server}: some session locks were still held when counted")
    trips.notes.append("counted by the server: pg_stat_statements (BEGIN and COMMIT included) over sessions run "
                       "one at a time, reset before and read after every lock was given back; the nodes' "
                       "heartbeat is set to 10 minutes so that none falls in between")
    cpu.notes.append("CPU: every PostgreSQL process (backends, and the background writer, WAL writer, "
                     "checkpointer, autovacuum) from /proc over the same sessions, divided by their number")
    first = next(iter(counted.values()))
    for st in first.statements:
        trips.notes.append(f"{st.calls / first.sessions:.2f} per session: {st.query[:150]}")
    _say(bench, bench.add(trips))
    _say(bench, bench.add(cpu))
    for st in first.statements:
        bench.say(f"    {st.calls / first.sessions:5.2f} × {st.query[:110]}")


def _pgbench_rows(bench: Bench, postgres: BenchPostgres, node: Counted | None) -> None:
    seconds, transactions = bench.scale.pgbench_seconds, bench.scale.pgbench_transactions
    try:
        results = pgbench(postgres, seconds, transactions)
    except ServerUnavailable as exc:
        bench.missing["pgbench"] = str(exc).splitlines()[0][:200]
        return
    for script, (tps, statements) in results.items():
        row = Row(f"w9.pgbench.{script}", f"9. cluster: PostgreSQL alone, pgbench {script}", "statements/s", True,
                  base="single")
        row.values["postgresql"] = tps * statements
        row.runs["postgresql"] = 1
        length = f"{transactions} transactions per client" if transactions else f"{max(1, round(seconds))} s"
        row.notes.append(f"{tps:,.0f} transactions/s of {statements} statement{'s' if statements > 1 else ''}, "
                         f"8 clients, prepared statements, {length}, scale 1")
        if node is not None and node.per_session:
            row.notes.append(f"at {node.per_session:.1f} statements per warm session: about "
                             f"{tps * statements / node.per_session:,.0f} warm sessions/s of such statements")
        _say(bench, bench.add(row))
