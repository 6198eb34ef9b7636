"""Workloads 5 to 8, the heavy ones: a 100,000-message mailbox, one 200 MB message, idle connections,
filters. Each takes the running `Bench` (bench_harness.py) and appends rows to ``bench.rows``.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from bench import bench_client as bc
from bench import bench_mail as bm
from bench.bench_harness import Bench, MB, _failure_notes, interleaved
from bench.bench_processes import ServerUnavailable, hwm_kb, reset_hwm, rss_kb
from bench.bench_report import Row, median
from bench.bench_servers import Pop3proxy


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
