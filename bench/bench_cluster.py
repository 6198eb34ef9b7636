"""What the cluster workload (9) starts and reads besides pop3proxy and Dovecot.

* `BenchPostgres`: the test suite's throw-away PostgreSQL (``tests/helpers/postgres.py``: initdb in a
  temporary directory, a free loopback port, trust authentication) with ``pg_stat_statements`` loaded, so
  that the statements every database sees can be counted from the server's side (`StatementCounter`).
* `HAProxy`: ``haproxy -f CFG -db`` in the foreground in plain TCP mode in front of cluster nodes.
* `pgbench`: the server's capacity on this machine, read-only (``-S``) and simple updates.

Both servers are `Managed` ones: `stop_all` stops them (PostgreSQL with ``pg_ctl stop``) also on Ctrl-C.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest  # helpers.postgres reports a missing server with pytest.fail

from bench.bench_processes import HOST, Managed, ServerUnavailable, _running, free_port, wait_port
from bench.bench_servers import find

# isort: split
# (bench_processes put tests/ on the path)
from helpers.postgres import PostgresServer, _private_root, server_bindir  # noqa: E402

# Every statement a client sends at top level is counted (BEGIN and COMMIT too: pg_stat_statements.track_utility).
PG_SETTINGS = ("shared_preload_libraries=pg_stat_statements", "pg_stat_statements.track=top",
               "pg_stat_statements.track_utility=on", "max_connections=200")


class BenchPostgres(Managed):
    """A PostgreSQL server of the benchmark's own, stopped with ``pg_ctl stop -m fast`` and removed."""

    name = "postgresql"

    def __init__(self) -> None:
        self.server: PostgresServer | None = None

    def start(self) -> BenchPostgres:
        try:
            bindir = server_bindir()
            root = _private_root()
        except pytest.fail.Exception as exc:
            raise ServerUnavailable(str(exc)) from None
        self.server = PostgresServer(bindir=bindir, root=root, settings=PG_SETTINGS)
        _running.append(self)
        try:
            self.server.start()
            with self.connect() as admin:
                admin.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            self.stop()
            raise ServerUnavailable(f"PostgreSQL did not start: {str(exc)[-500:]}") from None
        return self

    @property
    def bindir(self) -> Path:
        assert self.server is not None
        return self.server.bindir

    @property
    def pid(self) -> int:
        """The postmaster's PID (first line of ``postmaster.pid``)."""
        assert self.server is not None
        return int((self.server.data / "postmaster.pid").read_text().split()[0])

    def connect(self, dbname: str = "postgres"):
        import psycopg

        assert self.server is not None
        return psycopg.connect(self.server.conninfo(dbname), autocommit=True)

    def create_database(self, name: str) -> str:
        """A new database; its ``postgresql://`` URL (what ``cluster.database`` takes)."""
        assert self.server is not None
        with self.connect() as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        return self.server.url(name)

    def cpu_seconds(self) -> float:
        """CPU time of the server so far: the postmaster, its live children (backends, background
        workers) and the children it has already reaped (``cutime``/``cstime``)."""
        return process_tree_cpu(self.pid)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        server, self.server = self.server, None
        if server is None:
            return
        if self in _running:
            _running.remove(self)
        try:
            server.stop()
        except (RuntimeError, OSError, subprocess.TimeoutExpired):
            try:  # pg_ctl could not: the postmaster itself, by its PID (SIGQUIT: immediate shutdown)
                os.kill(int((server.data / "postmaster.pid").read_text().split()[0]), signal.SIGQUIT)
                time.sleep(1.0)
            except (OSError, ValueError, IndexError):
                pass
        finally:
            shutil.rmtree(server.root, ignore_errors=True)


def _stat_fields(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def process_tree_cpu(pid: int) -> float:
    """User + system seconds of ``pid``, its reaped children, and its live children (one level: the
    postmaster's processes are all its children)."""
    ticks = 0
    own = _stat_fields(pid)
    if own:
        ticks += sum(int(own[i]) for i in (11, 12, 13, 14))
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields and fields[1] == str(pid):
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


# --- what a database's clients sent ----------------------------------------------------------------


@dataclass
class Statement:
    query: str  # as pg_stat_statements normalises it ($1 for values), whitespace collapsed
    calls: int
    exec_ms: float  # total execution time in the server


class StatementCounter:
    """Counts the statements clients run in one database, from the server's side: ``pg_stat_statements``
    reset, then read. It reads on one connection of its own, kept open (a new connection would start a
    server process, whose CPU time would count), to another database (``postgres``), so that its own
    statements are not counted."""

    def __init__(self, postgres: BenchPostgres, dbname: str) -> None:
        self.postgres = postgres
        self.dbname = dbname
        self.conn = postgres.connect()

    def __enter__(self) -> StatementCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.close()

    def reset(self) -> None:
        self.conn.execute("SELECT pg_stat_statements_reset()")

    def read(self) -> list[Statement]:
        found = self.conn.execute(
            "SELECT query, calls, total_exec_time FROM pg_stat_statements"
            " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = %s) ORDER BY calls DESC, query",
            (self.dbname,)).fetchall()
        return [Statement(" ".join(query.split()), int(calls), float(ms)) for query, calls, ms in found]

    def wait_unlocked(self, timeout: float = 10.0) -> bool:
        """Wait until no session holds an advisory lock in the database (every session's lock given back,
        the last statement of a session); False when some still do after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.conn.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                " AND database = (SELECT oid FROM pg_database WHERE datname = %s)", (self.dbname,)).fetchone()
            if found is not None and found[0] == 0:
                return True
            time.sleep(0.01)
        return False


# --- pgbench --------------------------------------------------------------------------------------

# Statements (round trips: pgbench does not pipeline) per transaction of its built-in scripts.
PGBENCH_SCRIPTS = {"select-only": (["-S"], 1), "simple-update": (["-b", "simple-update"], 5)}
_TPS = re.compile(r"tps = ([0-9.]+) \(without initial connection time\)")


def pgbench(postgres: BenchPostgres, seconds: float, transactions: int = 0,
            clients: int = 8) -> dict[str, tuple[float, int]]:
    """{script: (transactions/s, statements per transaction)} of short pgbench runs on a database of
    their own (scale 1, prepared statements, ``clients`` connections over 2 threads), each ``seconds``
    long, or ``transactions`` per client when given (shorter than pgbench's shortest time, a second)."""
    assert postgres.server is not None
    srv = postgres.server
    postgres.create_database("pgbench")
    base = [str(postgres.bindir / "pgbench"), "-h", srv.host, "-p", str(srv.port), "-U", srv.user]
    done = subprocess.run([*base, "-i", "-s", "1", "-q", "pgbench"], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise ServerUnavailable(f"pgbench -i failed: {done.stderr[-300:]}")
    results: dict[str, tuple[float, int]] = {}
    for script, (args, statements) in PGBENCH_SCRIPTS.items():
        length = ["-t", str(transactions)] if transactions else ["-T", str(max(1, round(seconds)))]
        done = subprocess.run([*base, "-n", "-M", "prepared", "-c", str(clients), "-j", "2", *length, *args,
                               "pgbench"],
                              capture_output=True, text=True, timeout=seconds + 120, stdin=subprocess.DEVNULL)
        found = _TPS.search(done.stdout)
        if done.returncode != 0 or found is None:
            raise ServerUnavailable(f"pgbench {script} failed: {(done.stderr or done.stdout)[-300:]}")
        results[script] = (float(found[1]), statements)
    return results


# --- HAProxy ----------------------------------------------------------------------------------------

_HAPROXY_CFG = """\
global
    maxconn 4000

defaults
    mode tcp
    timeout connect 5s
    timeout client 300s
    timeout server 300s

frontend pop3
    bind {host}:{port}
    default_backend nodes

backend nodes
    balance leastconn
    # With the PROXY protocol: `send-proxy-v2` on each server line, and listen.proxy_protocol = true on the nodes.
{servers}
"""


class HAProxy(Managed):
    """HAProxy in plain TCP mode spreading connections over ``backends`` (ports on 127.0.0.1)."""

    name = "haproxy"

    def __init__(self, directory: Path, backends: list[int]) -> None:
        self.binary = find("haproxy")
        if self.binary is None:
            raise ServerUnavailable("HAProxy is not installed (bash bench/install.sh)")
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.backends = backends
        self.port = 0

    def write_config(self) -> Path:
        servers = "\n".join(f"    server node{i} {HOST}:{port}" for i, port in enumerate(self.backends, 1))
        path = self.directory / "haproxy.cfg"
        path.write_text(_HAPROXY_CFG.format(host=HOST, port=self.port, servers=servers))
        return path

    def start(self) -> HAProxy:
        self.port = free_port()
        config = self.write_config()
        self._spawn([self.binary, "-f", str(config), "-db"], self.directory / "haproxy.log")
        try:
            wait_port(self.port)
        except ServerUnavailable:
            self.stop()
            log = (self.directory / "haproxy.log").read_text(errors="replace")[-500:]
            raise ServerUnavailable(f"HAProxy did not start: {log}") from None
        return self
