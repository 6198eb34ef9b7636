"""Workload 3: login latency (connect → +OK after PASS) of every server, pop3proxy's with the auth cache
and with ``sync.min_check_interval``, and (bench_workloads_cpu.py) the CPU of a warm session. Takes the
running `Bench` (bench_harness.py) and appends rows to ``bench.rows``.
"""

from __future__ import annotations

from bench import bench_client as bc
from bench.bench_harness import Bench, _failure_notes
from bench.bench_processes import ServerUnavailable
from bench.bench_report import Row, median, percentile
from bench.bench_servers import Pop3proxy
from bench.bench_workloads_cpu import w3_cpu, w3_phases

MIN_CHECK = {"min_check_interval": 60, "auth_cache_ttl": 300}
MIN_CHECK_UNKNOWN = "not available: the setting sync.min_check_interval is not known to this pop3proxy"


def w3_login_latency(bench: Bench) -> None:
    name, password = bench.users["login"]
    s = bench.scale
    servers = bench.servers()
    samples: dict[str, list[float]] = {srv: [] for srv in servers}
    failures: dict[str, str] = {}
    block = 10
    for _ in range(max(1, s.logins // block)):
        for server in servers:
            if server in failures:
                continue
            port, _ = bench.endpoint(server)
            try:
                for _ in range(block):
                    samples[server].append(bc.login_latency(port, name, password))
            except (bc.Pop3Error, OSError) as exc:
                failures[server] = f"{type(exc).__name__}: {exc}"[:160]
    for key, label, fn in (("median", "median", median), ("p95", "p95", lambda v: percentile(v, 0.95))):
        row = Row(f"w3.{key}", f"3. login latency (connect → +OK after PASS), {label}", "ms", False)
        for server, values in samples.items():
            value = fn(values)
            row.values[server] = None if value is None else value * 1000
            row.runs[server] = len(values)
        if key == "median":
            row.notes.append("warm: no new mail; pop3proxy logs in to Dovecot and checks for new mail at each login")
        _failure_notes(row, failures)
        _add(bench, row)
    direct = samples.get("dovecot", [])
    _w3_auth_cache(bench, name, password, direct)
    _w3_min_check(bench, name, password, direct)
    w3_cpu(bench)
    w3_phases(bench)


def _add(bench: Bench, row: Row) -> None:
    bench.add(row)
    bench.say(f"  {row.workload}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.values.items() if v))


def _latencies(bench: Bench, tag: str, sync: dict, workers: int, user: tuple[str, str], row: Row) -> list[float]:
    """Login latencies through a pop3proxy of its own with these ``sync`` settings, after one first login
    (which asks the provider); a failure becomes a note of ``row``."""
    proxy = Pop3proxy(bench.tmp / f"pop3proxy-{tag}-{workers}", upstream_port=bench.dovecot.port,
                      extra={"sync": sync}, workers=workers)
    values: list[float] = []
    try:
        refused = proxy.config_refused()
        if refused:
            row.notes.append(f"not available: pop3proxy refuses the configuration: {refused[:200]}")
            return values
        proxy.start()
        bc.login_latency(proxy.port, *user)
        for _ in range(max(10, bench.scale.logins)):
            values.append(bc.login_latency(proxy.port, *user))
    except (ServerUnavailable, bc.Pop3Error, OSError) as exc:
        row.notes.append(f"not available: {type(exc).__name__}: {str(exc)[:160]}")
    finally:
        proxy.stop()
    return values


def _fill(row: Row, values: list[float], direct: list[float]) -> None:
    row.values = {"dovecot": None if not direct else median(direct) * 1000,
                  "pop3proxy": None if not values else median(values) * 1000}
    row.runs = {"dovecot": len(direct), "pop3proxy": len(values)}


def _w3_auth_cache(bench: Bench, name: str, password: str, direct: list[float]) -> None:
    """The same logins through a pop3proxy with sync.auth_cache_ttl: served at once, checked behind."""
    row = Row("w3.cached", "3. login latency with sync.auth_cache_ttl = 300, median", "ms", False)
    values = _latencies(bench, "authcache", {"auth_cache_ttl": 300}, 0, (name, password), row)
    single = _latencies(bench, "authcache", {"auth_cache_ttl": 300}, 1, (name, password), row)
    if single:
        row.notes.append(f"in one process (listen.workers = 1): {median(single) * 1000:.2f} ms. With several, a "
                         "login that reaches another worker than the previous login of the same account waits for "
                         "that login's background check (the mailbox lock is per process), as here where one "
                         "user logs in again and again")
    _fill(row, values, direct)
    row.notes.append("the provider is asked in the background after each login (new mail shows at the next)")
    _add(bench, row)


def _w3_min_check(bench: Bench, name: str, password: str, direct: list[float]) -> None:
    """Logins through a pop3proxy with sync.min_check_interval and the auth cache: an account synced less
    than a minute ago whose password the auth cache verifies is served without asking the provider."""
    row = Row("w3.min_check", "3. login latency with sync.min_check_interval = 60 and sync.auth_cache_ttl = 300, "
              "median", "ms", False)
    values = _latencies(bench, "mincheck", MIN_CHECK, 0, (name, password), row)
    if not values and any("min_check_interval" in note for note in row.notes):
        row.notes = [MIN_CHECK_UNKNOWN]
    elif values:
        row.notes.append("default workers; a login of an account synced less than 60 s ago, whose password the "
                         "auth cache verifies, does not ask the provider")
    _fill(row, values, direct)
    _add(bench, row)
