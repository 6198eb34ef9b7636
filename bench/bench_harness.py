"""What every workload runs in: the `Scale` of a run (full or ``--quick``), the running `Bench` (its
servers, users and rows), and measuring servers interleaved run by run (server A, B, C, D, then
again), so that a noisy moment of the machine hits all of them alike; the table shows medians.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bench import bench_client as bc
from bench.bench_report import Row
from bench.bench_servers import BenchDovecot, Certs, NginxMail, Perdition, Pop3proxy


MB = 1_000_000
STALL = 0.035  # a median RETR slower than this in the unpipelined shape is a Nagle/delayed-ACK stall
STALL_PROBE = 30  # messages fetched to look for such a stall


@dataclass(frozen=True)
class Scale:
    small_count: int = 2000
    small_size: int = 20_000
    big_count: int = 20
    big_size: int = 5_000_000
    logins: int = 200
    cpu_sessions: int = 200  # warm sessions per server of the CPU row and the per-phase table (workload 3)
    swarm_users: int = 1000
    swarm_messages: int = 5
    swarm_size: int = 2_000
    huge_count: int = 100_000
    huge_size: int = 400
    giant_size: int = 200_000_000
    idle: int = 10_000
    idle_forking: int = 1_000  # perdition forks a process per connection: fewer of those
    filter_count: int = 300
    filter_size: int = 20_000
    reps: int = 5
    cold_reps: int = 1
    cluster_users: int = 300  # concurrent warm sessions of workload 9 (taken from the swarm users)
    pgbench_seconds: float = 5.0
    pgbench_transactions: int = 0  # per client, instead of pgbench_seconds (0: by time)


QUICK = Scale(
    small_count=100, big_count=3, big_size=2_000_000, logins=20, cpu_sessions=30, swarm_users=50, huge_count=5_000,
    giant_size=10_000_000, idle=500, idle_forking=100, filter_count=20, reps=2, cold_reps=1,
    cluster_users=30, pgbench_transactions=300,
)


@dataclass
class Bench:
    scale: Scale
    tmp: Path
    dovecot: BenchDovecot
    certs: Certs
    proxy: Pop3proxy
    perdition: Perdition | None = None
    perdition_tls: Perdition | None = None
    nginx: NginxMail | None = None
    missing: dict[str, str] = field(default_factory=dict)  # server -> why it is not measured
    users: dict[str, tuple[str, str]] = field(default_factory=dict)
    swarm_users: list[tuple[str, str]] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    say: Callable[[str], None] = print

    def endpoint(self, server: str, tls: bool = False) -> tuple[int, ssl.SSLContext | None] | None:
        if server == "dovecot":
            return (self.dovecot.tls_port, self.dovecot.client_context()) if tls else (self.dovecot.port, None)
        if server == "pop3proxy":
            return (self.proxy.tls_port, self.certs.client_context()) if tls else (self.proxy.port, None)
        if server == "perdition":
            srv = self.perdition_tls if tls else self.perdition
            return None if srv is None else (srv.port, self.certs.client_context() if tls else None)
        if server == "nginx":
            if self.nginx is None:
                return None
            return (self.nginx.tls_port, self.certs.client_context()) if tls else (self.nginx.port, None)
        raise KeyError(server)

    def servers(self, tls: bool = False) -> list[str]:
        return [s for s in ("dovecot", "pop3proxy", "perdition", "nginx") if self.endpoint(s, tls) is not None]

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row


def interleaved(bench: Bench, servers: list[str], reps: int, run: Callable[[str], float],
                failures: dict[str, str], once: set[str] | None = None) -> dict[str, list[float]]:
    """``reps`` rounds of ``run(server)`` over all servers; a server that fails once is dropped (noted), a
    server that ``run`` puts into ``once`` is not run again (a stalled one: more runs would only cost time)."""
    samples: dict[str, list[float]] = {s: [] for s in servers}
    once = set() if once is None else once
    for _ in range(reps):
        for server in servers:
            if server in failures or (server in once and samples[server]):
                continue
            try:
                samples[server].append(run(server))
            except (bc.Pop3Error, OSError) as exc:
                failures[server] = f"{type(exc).__name__}: {exc}"[:160]
    return samples


def _failure_notes(row: Row, failures: dict[str, str]) -> None:
    for server, text in failures.items():
        row.notes.append(f"{server} failed: {text}")
        row.values[server] = None
