"""The eight workloads. Each takes the running `Bench` and appends rows to ``bench.rows``.

Measurements of different servers are interleaved run by run (server A, B, C, D, then again), so a
noisy moment of the machine hits all of them alike; the table shows medians.
"""

from __future__ import annotations

import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bench import bench_client as bc
from bench import bench_mail as bm
from bench.bench_report import Row, median, percentile
from bench.bench_servers import (
    BenchDovecot,
    Certs,
    NginxMail,
    Perdition,
    Pop3proxy,
    ServerUnavailable,
    cpu_seconds,
    hwm_kb,
    reset_hwm,
    rss_kb,
)

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


QUICK = Scale(
    small_count=100, big_count=3, big_size=2_000_000, logins=20, swarm_users=50, huge_count=5_000,
    giant_size=10_000_000, idle=500, idle_forking=100, filter_count=20, reps=2, cold_reps=1,
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


# --- 1 and 2: downloads ----------------------------------------------------------------------------


def _downloads(bench: Bench, key: str, title: str, user: tuple[str, str], count: int, small: bool) -> None:
    """Warm throughput (both shapes, plain; TLS for key w2) and cold time (pop3proxy) vs direct time."""
    name, password = user
    s = bench.scale
    variants = [("plain", False)] + ([("tls", True)] if key == "w2" else [])
    direct_times: dict[str, list[float]] = {}
    for shape in ("unpipelined", "pipelined"):
        pipelined = shape == "pipelined"
        # Cold: pop3proxy's cache is emptied before each run; the login fetches everything.
        cold: list[float] = []
        cold_fail: dict[str, str] = {}
        for _ in range(s.cold_reps):
            bench.proxy.forget_cache(name)
            try:
                cold.append(bc.download(bench.proxy.port, name, password, pipelined=pipelined, expect=count).total)
            except (bc.Pop3Error, OSError) as exc:
                cold_fail["pop3proxy"] = f"{type(exc).__name__}: {exc}"[:160]
                break
        if not cold:  # leave a warm cache behind for the warm runs all the same
            bench.proxy.forget_cache(name)
            bc.download(bench.proxy.port, name, password, pipelined=False)
        for variant, tls in variants:
            failures: dict[str, str] = {}
            proxy_cpu: list[float] = []
            stalls: dict[str, tuple[float, float]] = {}  # server -> (ms per RETR, MB/s) of a short probe
            if small and not pipelined:
                # A server that stalls ~40 ms per message would take minutes here: probe it with a few
                # messages first and report the probe instead.
                for server in bench.servers(tls):
                    port, ctx = bench.endpoint(server, tls)
                    try:
                        probe = bc.download(port, name, password, pipelined=False, context=ctx, limit=STALL_PROBE)
                    except (bc.Pop3Error, OSError) as exc:
                        failures[server] = f"{type(exc).__name__}: {exc}"[:160]
                        continue
                    if median(probe.retr_times) >= STALL:
                        stalls[server] = (median(probe.retr_times) * 1000,
                                          probe.octets / sum(probe.retr_times) / MB)

            def run(server: str) -> float:
                port, ctx = bench.endpoint(server, tls)
                c0 = sum(map(cpu_seconds, bench.proxy.pids()))
                d = bc.download(port, name, password, pipelined=pipelined, context=ctx, expect=count)
                if server == "pop3proxy":
                    proxy_cpu.append((sum(map(cpu_seconds, bench.proxy.pids())) - c0) / (d.octets / MB))
                if server == "dovecot" and not tls:
                    direct_times.setdefault(shape, []).append(d.total)
                return d.octets / d.total / MB

            servers = [srv for srv in bench.servers(tls) if srv not in stalls]
            samples = interleaved(bench, servers, s.reps, run, failures)
            suffix = f", {variant}" if key == "w2" else ""
            row = Row(f"{key}.warm{'.' + variant if key == 'w2' else ''}.{shape}",
                      f"{title}, warm{suffix}, {shape}", "MB/s", True)
            for server, values in samples.items():
                row.values[server] = median(values)
                row.runs[server] = len(values)
            if proxy_cpu:
                row.notes.append(f"pop3proxy CPU: {median(proxy_cpu) * 1000:.1f} ms per MB served")
            for server, (ms, speed) in stalls.items():
                row.values[server] = speed
                row.runs[server] = 1
                row.notes.append(
                    f"{server}: {ms:.0f} ms per RETR — a Nagle/delayed-ACK stall on its client side (it does not "
                    f"set TCP_NODELAY); its value is RETR throughput over the first {STALL_PROBE} messages, not a "
                    f"whole session")
            _failure_notes(row, failures)
            bench.add(row)
            bench.say(f"  {row.workload}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.values.items() if v))
        row = Row(f"{key}.cold.{shape}", f"{title}, cold, {shape}", "s", False,
                  labels={"pop3proxy": "cold", "dovecot": "direct"})
        row.values["dovecot"] = median(direct_times.get(shape, []))
        row.values["pop3proxy"] = median(cold)
        row.runs = {"dovecot": len(direct_times.get(shape, [])), "pop3proxy": len(cold)}
        if shape == "unpipelined":
            row.notes.append("pop3proxy's first login fetches every message from Dovecot into its cache; "
                             "compared with the same download straight from Dovecot")
        _failure_notes(row, cold_fail)
        bench.add(row)
        bench.say(f"  {row.workload}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.values.items() if v))


def w1_many_small(bench: Bench) -> None:
    s = bench.scale
    _downloads(bench, "w1", f"1. {s.small_count:,} × {s.small_size // 1000} KB", bench.users["small"], s.small_count, small=True)


def w2_few_big(bench: Bench) -> None:
    s = bench.scale
    _downloads(bench, "w2", f"2. {s.big_count} × {s.big_size / MB:g} MB", bench.users["big"], s.big_count, small=False)


# --- 3: login latency ----------------------------------------------------------------------------------


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
        bench.add(row)
        bench.say(f"  {row.workload}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.values.items() if v))
    _w3_auth_cache(bench, name, password, samples.get("dovecot", []))


def _w3_auth_cache(bench: Bench, name: str, password: str, direct: list[float]) -> None:
    """The same logins through a pop3proxy with sync.auth_cache_ttl: served at once, checked behind."""
    row = Row("w3.cached", "3. login latency with sync.auth_cache_ttl = 300, median", "ms", False)

    def measure(workers: int) -> list[float]:
        cached = Pop3proxy(bench.tmp / f"pop3proxy-authcache-{workers}", upstream_port=bench.dovecot.port,
                           extra={"sync": {"auth_cache_ttl": 300}}, workers=workers)
        values: list[float] = []
        try:
            cached.start()
            bc.login_latency(cached.port, name, password)  # the first login asks the provider: the entry
            for _ in range(max(10, bench.scale.logins)):
                values.append(bc.login_latency(cached.port, name, password))
        except (ServerUnavailable, bc.Pop3Error, OSError) as exc:
            row.notes.append(f"not available: {type(exc).__name__}: {str(exc)[:160]}")
        finally:
            cached.stop()
        return values

    values = measure(0)
    single = measure(1)
    if single:
        row.notes.append(f"in one process (listen.workers = 1): {median(single) * 1000:.2f} ms. With several, a "
                         "login that reaches another worker than the previous login of the same account waits for "
                         "that login's background check (the mailbox lock is per process), as here where one "
                         "user logs in again and again")
    row.values = {"dovecot": None if not direct else median(direct) * 1000,
                  "pop3proxy": None if not values else median(values) * 1000}
    row.runs = {"dovecot": len(direct), "pop3proxy": len(values)}
    row.notes.append("the provider is asked in the background after each login (new mail shows at the next)")
    bench.add(row)
    bench.say(f"  {row.workload}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.values.items() if v))


# --- 4: many concurrent sessions -----------------------------------------------------------------------


def w4_concurrent(bench: Bench) -> None:
    s = bench.scale
    users = bench.swarm_users
    n = len(users)
    results: dict[str, bc.SwarmResult] = {}
    # Dovecot builds its index at a mailbox's first login: do that before anything is measured.
    bc.swarm(bench.dovecot.port, users)
    for user, _ in users:
        bench.proxy.forget_cache(user)
    results["pop3proxy-cold"] = bc.swarm(bench.proxy.port, users)
    for server in bench.servers():
        port, _ = bench.endpoint(server)
        results[server] = bc.swarm(port, users)
    title = f"4. {n:,} concurrent sessions × {s.swarm_messages} messages of {s.swarm_size // 1000} KB"
    rate = Row("w4.rate", f"{title}: sessions/s", "sessions/s", True)
    errors = Row("w4.errors", f"{title}: failed sessions", "errors", False)
    cold = Row("w4.cold", f"{title}: sessions/s, pop3proxy cold", "sessions/s", True,
               labels={"pop3proxy": "cold"})
    for server, r in results.items():
        value = r.ok / r.seconds if r.seconds else None
        if server == "pop3proxy-cold":
            cold.values["pop3proxy"] = value
            cold.values["dovecot"] = None
            if r.errors:
                cold.notes.append(f"pop3proxy cold errors: {r.errors}")
            continue
        rate.values[server] = value
        errors.values[server] = float(sum(r.errors.values()))
        if r.errors:
            errors.notes.append(f"{server}: {r.errors}")
    cold.values["dovecot"] = rate.values.get("dovecot")
    cold.labels["dovecot"] = "direct"
    rate.notes.append("one run each, all sessions started at once by one trio client (1 login per user: "
                      "pop3proxy allows one session per mailbox)")
    # The same swarms against pop3proxy in one process (listen.workers = 1): what the workers bring.
    single = Pop3proxy(bench.tmp / "pop3proxy-single", upstream_port=bench.dovecot.port, workers=1).start()
    try:
        single_cold = bc.swarm(single.port, users)
        single_warm = bc.swarm(single.port, users)
    finally:
        single.stop()
    singles = []
    for key, kind, r in (("w4.single", "warm", single_warm), ("w4.single_cold", "cold", single_cold)):
        one = Row(key, f"{title}: sessions/s, pop3proxy {kind} in one process (listen.workers = 1)",
                  "sessions/s", True, labels={"pop3proxy": f"{kind}, 1 process", "dovecot": "direct"})
        one.values = {"pop3proxy": r.ok / r.seconds if r.seconds else None, "dovecot": rate.values.get("dovecot")}
        if r.errors:
            one.notes.append(f"errors: {r.errors}")
        singles.append(one)
    for row in (rate, errors, cold, *singles):
        bench.add(row)
        bench.say(f"  {row.workload}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.values.items() if v is not None))


# --- 5: a 100,000-message mailbox ------------------------------------------------------------------


def w5_huge_mailbox(bench: Bench, standalone: Pop3proxy, name: str, password: str,
                    dovecot_user: tuple[str, str], first_login: float) -> None:
    s = bench.scale
    dname, dpass = dovecot_user
    servers = bench.servers()
    failures: dict[str, str] = {}

    def run(server: str) -> float:
        if server == "pop3proxy":
            elapsed, count = bc.login_stat_uidl(standalone.port, name, password)
        else:
            port, _ = bench.endpoint(server)
            elapsed, count = bc.login_stat_uidl(port, dname, dpass)
        if count != s.huge_count:
            raise bc.Pop3Error(f"{count} messages, expected {s.huge_count}")
        return elapsed

    samples = interleaved(bench, servers, s.reps, run, failures)
    row = Row("w5.time", f"5. {s.huge_count:,}-message mailbox: login + STAT + UIDL", "s", False,
              labels={"pop3proxy": "standalone"})
    for server, values in samples.items():
        row.values[server] = median(values)
        row.runs[server] = len(values)
    row.notes.append(f"pop3proxy in standalone mode (local users file, cache filled beforehand); Dovecot's own "
                     f"first login on this mailbox (building its index) took {first_login:.1f} s and is not counted")
    _failure_notes(row, failures)
    bench.add(row)
    bench.say(f"  {row.workload}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.values.items() if v))


# --- 6: one 200 MB message ---------------------------------------------------------------------------


class PeakSampler:
    """Samples processes' VmRSS every few milliseconds (a cross-check of VmHWM): ``peak`` maps each pid
    to the largest value seen."""

    def __init__(self, pids: list[int], interval: float = 0.005) -> None:
        self.pids, self.interval = pids, interval
        self.peak = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in self.pids:
                self.peak[pid] = max(self.peak[pid], rss_kb(pid))
            time.sleep(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _retr_with_memory(bench: Bench, port: int, name: str, password: str) -> tuple[float, float]:
    """(seconds of the RETR session, pop3proxy's peak RSS growth in MB during it: the largest growth of
    one of its processes, the one that served the session)."""
    pids = bench.proxy.pids()
    hwm_ok = {pid: reset_hwm(pid) for pid in pids}
    time.sleep(0.05)
    base = {pid: rss_kb(pid) for pid in pids}
    with PeakSampler(pids) as sampler:
        d = bc.download(port, name, password, pipelined=False, expect=1)
    growth = max(max(hwm_kb(pid) if hwm_ok[pid] else 0, sampler.peak[pid]) - base[pid] for pid in pids)
    return d.total, growth / 1024


def w6_giant_message(bench: Bench) -> None:
    s = bench.scale
    name, password = bench.users["giant"]
    size = f"{s.giant_size / MB:g} MB"
    bench.proxy.forget_cache(name)
    cold_time, cold_growth = _retr_with_memory(bench, bench.proxy.port, name, password)
    failures: dict[str, str] = {}
    growth: list[float] = []

    def run(server: str) -> float:
        if server == "pop3proxy":
            elapsed, grown = _retr_with_memory(bench, bench.proxy.port, name, password)
            growth.append(grown)
            return elapsed
        port, _ = bench.endpoint(server)
        return bc.download(port, name, password, pipelined=False, expect=1).total

    samples = interleaved(bench, bench.servers(), max(2, s.reps - 2), run, failures)
    row = Row("w6.time", f"6. one {size} message: login + RETR + QUIT", "s", False)
    for server, values in samples.items():
        row.values[server] = median(values)
        row.runs[server] = len(values)
    _failure_notes(row, failures)
    bench.add(row)
    rss = Row("w6.rss", f"6. one {size} message: pop3proxy peak RSS growth during RETR", "MB", False,
              labels={"pop3proxy": "warm"})
    rss.values["pop3proxy"] = max(growth) if growth else None
    rss.runs["pop3proxy"] = len(growth)
    rss.notes.append(f"largest of the warm runs (VmHWM reset before each); the cold login that fetched the "
                     f"message grew RSS by {cold_growth:.0f} MB and took {cold_time:.1f} s")
    bench.add(rss)
    cold = Row("w6.cold", f"6. one {size} message: pop3proxy cold login (fetch) + RETR", "s", False,
               labels={"pop3proxy": "cold", "dovecot": "direct"})
    cold.values = {"dovecot": row.values.get("dovecot"), "pop3proxy": cold_time}
    bench.add(cold)
    for r in (row, rss, cold):
        bench.say(f"  {r.workload}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.values.items() if v is not None))


# --- 7: idle connections -----------------------------------------------------------------------------


def w7_idle(bench: Bench) -> None:
    s = bench.scale
    rss = Row("w7.rss", "7. idle connections (greeted, before login): RSS per connection", "KB", False)
    pss = Row("w7.pss", "7. idle connections: PSS per connection", "KB", False)
    for server in bench.servers():
        port, _ = bench.endpoint(server)
        proc = {"dovecot": bench.dovecot, "pop3proxy": bench.proxy, "perdition": bench.perdition,
                "nginx": bench.nginx}[server]
        count = s.idle_forking if server == "perdition" else s.idle
        before = proc.memory_kb()
        socks, failed = bc.open_idle(port, count)
        time.sleep(0.5)
        after = proc.memory_kb()
        for sock in socks:
            sock.close()
        if socks:
            rss.values[server] = (after[0] - before[0]) / len(socks)
            pss.values[server] = (after[1] - before[1]) / len(socks)
            rss.runs[server] = len(socks)
        note = f"{server}: {len(socks):,} connections held, {after[2]} processes"
        if failed:
            note += f", {failed} failed"
        rss.notes.append(note)
        time.sleep(0.5 if server != "perdition" else 2.0)
    rss.notes.append("Dovecot, perdition and nginx: sums over all their processes; Dovecot's login processes "
                     "run in its high-performance mode (service_count = 0)")
    for row in (rss, pss):
        bench.add(row)
        bench.say(f"  {row.workload}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.values.items() if v is not None))


# --- 8: filters ------------------------------------------------------------------------------------------

# Options for the built-in filters the benchmark knows; any other built-in is tried with its defaults.
FILTER_OPTIONS: dict[str, list[dict]] = {
    "spam": [{"backend": "builtin"}],
    "attachments": [{"strip_extensions": ["exe", "scr", "js"]}],
    "headers": [{"remove": ["X-Tracking-*"], "add": {"X-Filtered-By": "pop3proxy"}}],
}


# Built-in filters that need a daemon the benchmark does not start.
FILTERS_NEEDING_DAEMONS = {"clamav": "needs a running clamd"}


def builtin_filters() -> tuple[list[dict], list[str]]:
    """([[filters]] tables for every built-in filter that loads here, notes on those left out)."""
    from bench.bench_servers import REPO

    try:
        from pop3proxy.filtering.api import FilterConfigError
        from pop3proxy.filtering.loader import load_filter
    except ImportError as exc:
        return [], [f"pop3proxy.filtering cannot be imported: {exc}"]
    last = ""
    names = sorted(p.stem for p in (REPO / "filters").glob("*.py") if not p.stem.startswith("_"))
    tables, notes = [], []
    for name in names:
        if name in FILTERS_NEEDING_DAEMONS:
            notes.append(f"filter {name!r} left out: {FILTERS_NEEDING_DAEMONS[name]}")
            continue
        for options in FILTER_OPTIONS.get(name, []) + [{}]:
            table = {"use": name, **options}
            try:
                load_filter(table)
            except FilterConfigError as exc:
                last = str(exc)
                continue
            except Exception as exc:  # a filter that needs a daemon this run does not start
                last = f"{type(exc).__name__}: {exc}"
                continue
            tables.append(table)
            break
        else:
            notes.append(f"filter {name!r} left out: {last}")
    return tables, notes


def w8_filters(bench: Bench) -> None:
    s = bench.scale
    name, password = bench.users["filter"]
    title = f"8. cold download with filters, {s.filter_count} × {s.filter_size // 1000} KB (1 in 10 with an .exe)"
    tables, notes = builtin_filters()
    row = Row("w8.cold", title, "s", False, labels={"pop3proxy": "cold, filtered", "dovecot": "direct"})
    if not tables:
        row.notes.append("not available: no built-in filter in filters/ loads here" + (f" ({'; '.join(notes)})" if notes else ""))
        bench.add(row)
        bench.say(f"  {row.workload}: not available")
        return
    filtered = Pop3proxy(bench.tmp / "pop3proxy-filters", upstream_port=bench.dovecot.port, filters=tables)
    try:
        filtered.start()
    except ServerUnavailable as exc:
        row.notes.append(f"not available: pop3proxy with filters did not start: {str(exc)[-300:]}")
        bench.add(row)
        return
    try:
        failures: dict[str, str] = {}

        def run(server: str) -> float:
            if server == "pop3proxy":
                filtered.forget_cache(name)
                return bc.download(filtered.port, name, password, pipelined=False, expect=s.filter_count).total
            if server == "unfiltered":
                bench.proxy.forget_cache(name)
                return bc.download(bench.proxy.port, name, password, pipelined=False, expect=s.filter_count).total
            return bc.download(bench.dovecot.port, name, password, pipelined=False, expect=s.filter_count).total

        samples = interleaved(bench, ["dovecot", "unfiltered", "pop3proxy"], s.cold_reps, run, failures)
    finally:
        filtered.stop()
    row.values = {"dovecot": median(samples["dovecot"]), "pop3proxy": median(samples["pop3proxy"])}
    row.runs = {k: len(v) for k, v in samples.items()}
    unfiltered = median(samples["unfiltered"])
    row.notes.append("filters: " + ", ".join(t["use"] for t in tables)
                     + (f"; pop3proxy cold without filters: {unfiltered:.2f} s" if unfiltered else ""))
    row.notes += notes
    costs = filter_costs(tables, [bm.multipart_message(s.filter_size, i, dangerous=i % 10 == 0)
                                  for i in range(min(s.filter_count, 100))], bench.tmp / "filter-costs")
    row.notes.append("CPU per message, each filter alone (best of 3 passes over the corpus): "
                     + ", ".join(f"{use} {ms:.3f} ms" for use, ms in costs.items()))
    _failure_notes(row, {k: v for k, v in failures.items() if k != "unfiltered"})
    bench.add(row)
    bench.say(f"  {row.workload}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.values.items() if v))
    bench.say("  per message: " + ", ".join(f"{use} {ms:.3f} ms" for use, ms in costs.items()))


def filter_costs(tables: list[dict], corpus: list[bytes], removed: Path) -> dict[str, float]:
    """Milliseconds of CPU time per message for each filter, called directly (no pipeline, no threads)."""
    from pop3proxy.filtering.api import FilterContext
    from pop3proxy.filtering.loader import load_filter

    costs: dict[str, float] = {}
    for index, table in enumerate(tables):
        flt, _ = load_filter(dict(table), index)
        best = float("inf")
        for _ in range(3):
            started = time.process_time()
            for i, data in enumerate(corpus):
                flt(data, FilterContext(user="bench", uid=str(i), removed_dir=removed))
            best = min(best, time.process_time() - started)
        costs[table["use"]] = best / len(corpus) * 1000
    return costs
