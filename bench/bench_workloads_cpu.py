"""Workload 3's CPU rows: the CPU time a server spends on one warm session (connect, USER, PASS, STAT,
RETR 1, QUIT), and where in such a session it goes.

``w3.cpu``: N sessions one after another per server, in blocks of ten, the servers interleaved block by
block. Each block's CPU is read from all the server's processes (bench_cpu.clock_seconds: the processes'
CPU clocks plus their reaped children) once the server is idle before and after it; the row shows the
median over the blocks, per session.

``w3.phases.*`` (the per-phase table): the same session with a reading of the server's per-thread CPU
time (bench_cpu.ThreadTimes) after each reply, after the close, and once the server is idle again;
pop3proxy in one process (``listen.workers = 1``: no phase is split across processes), Dovecot direct for
comparison.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from bench import bench_client as bc
from bench.bench_cpu import ThreadTimes, clock_seconds, settle, stat_seconds
from bench.bench_harness import Bench, _failure_notes
from bench.bench_processes import ServerUnavailable
from bench.bench_rows import PHASES, TITLES, Row, median
from bench.bench_servers import Pop3proxy

BLOCK = 10  # sessions per server before the next server's turn


def warm_session(port: int, user: str, password: str, mark: Callable[[], object] = lambda: None) -> None:
    """Connect, greeting, USER, PASS, STAT, RETR 1, QUIT and wait until the server closes; ``mark()`` after
    each reply and after the close."""
    with bc.Pop3Client(port) as c:
        c.greeting()
        mark()
        for command in (f"USER {user}", f"PASS {password}", "STAT"):
            c.command(command)
            mark()
        c.multiline("RETR 1")
        mark()
        c.quit()
        mark()


@dataclass
class Meter:
    """One server's CPU over blocks of warm sessions; ``helper``: processes not counted whose CPU is noted
    (nginx's auth_http endpoint)."""

    pgids: tuple[int, ...]
    helper: tuple[int, ...] = ()
    blocks: list[float] = field(default_factory=list)  # seconds per session, one value per block
    stat: float = 0.0  # the same blocks from /proc/PID/stat alone
    helper_cpu: float = 0.0
    sessions: int = 0
    unsettled: int = 0  # blocks after which the server was still busy when settle gave up

    def block(self, port: int, user: str, password: str, count: int) -> None:
        def read() -> float:
            return clock_seconds(*self.pgids)

        c0, settled0 = settle(read)
        s0, h0 = stat_seconds(*self.pgids), clock_seconds(*self.helper)
        for _ in range(count):
            warm_session(port, user, password)
        c1, settled1 = settle(read)
        self.stat += stat_seconds(*self.pgids) - s0
        self.helper_cpu += clock_seconds(*self.helper) - h0
        self.blocks.append((c1 - c0) / count)
        self.sessions += count
        self.unsettled += not (settled0 and settled1)


def _meter(bench: Bench, server: str) -> Meter:
    if server == "nginx":
        return Meter((bench.nginx.pid,), helper=(bench.nginx.auth.pid,))
    return Meter(({"dovecot": bench.dovecot, "pop3proxy": bench.proxy, "perdition": bench.perdition}[server].pid,))


def w3_cpu(bench: Bench) -> None:
    """Row w3.cpu: the server's CPU per warm session, every server."""
    name, password = bench.users["login"]
    meters = {server: _meter(bench, server) for server in bench.servers()}
    failures: dict[str, str] = {}

    def port(server: str) -> int:
        return bench.endpoint(server)[0]

    # A first session each: pop3proxy's cache of the account and Dovecot's index exist before measuring.
    _each(meters, failures, lambda server, _: warm_session(port(server), name, password))
    for _ in range(max(1, bench.scale.cpu_sessions // BLOCK)):
        _each(meters, failures, lambda server, meter: meter.block(port(server), name, password, BLOCK))
    row = Row("w3.cpu", "3. server CPU per warm session (connect, login, STAT, RETR 1, QUIT)", "ms", False)
    for server, meter in meters.items():
        row.values[server] = None if not meter.blocks else median(meter.blocks) * 1000
        row.runs[server] = meter.sessions
    _cpu_notes(row, meters)
    _failure_notes(row, failures)
    bench.add(row)
    bench.say(f"  {row.workload}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.values.items() if v is not None))


def _each(meters: dict[str, Meter], failures: dict[str, str], run: Callable[[str, Meter], object]) -> None:
    """``run(server, meter)`` for every server that has not failed yet; a failure is kept in ``failures``."""
    for server, meter in meters.items():
        if server in failures:
            continue
        try:
            run(server, meter)
        except (bc.Pop3Error, OSError) as exc:
            failures[server] = f"{type(exc).__name__}: {exc}"[:160]


def _cpu_notes(row: Row, meters: dict[str, Meter]) -> None:
    row.notes.append(
        f"sessions one after another, blocks of {BLOCK} per server interleaved; CPU of every process of the "
        "server (process CPU clocks, ns, plus reaped children's cutime/cstime: Dovecot's pop3 process and "
        "perdition's process of each session) from before to after each block, both read once the server is "
        "idle; median over the blocks; pop3proxy with its default workers, the account's cache warm")
    row.notes.append("cross-check, /proc/PID/stat utime+stime+cutime+cstime alone (10 ms ticks) over all the "
                     "sessions: " + ", ".join(f"{TITLES[s]} {m.stat / m.sessions * 1000:.2f} ms"
                                             for s, m in meters.items() if m.sessions))
    nginx = meters.get("nginx")
    if nginx is not None and nginx.sessions:
        row.notes.append(f"nginx-mail: its master and workers; the auth_http endpoint it asks at each login (the "
                         f"suite's Python helper) is not counted: {nginx.helper_cpu / nginx.sessions * 1000:.2f} ms "
                         "per session")
    for server, meter in meters.items():
        if meter.unsettled:
            row.notes.append(f"{server}: still busy 2 s after {meter.unsettled} of {len(meter.blocks)} blocks "
                             "(counted until then)")


# --- the per-phase table ---------------------------------------------------------------------------


class PhaseMeter:
    """Sums, over warm sessions, the CPU one server's processes spend in each phase (``PHASES``)."""

    def __init__(self, pgid: int) -> None:
        self.pgid = pgid
        self.threads = ThreadTimes(pgid)
        self.sums = [0.0] * len(PHASES)
        self.sessions = self.unsettled = 0
        self.stat = self.clock = 0.0  # the same sessions' totals from the other two readings

    def session(self, port: int, user: str, password: str) -> None:
        readings = [settle(self.threads)[0]]
        s0, c0 = stat_seconds(self.pgid), clock_seconds(self.pgid)
        warm_session(port, user, password, mark=lambda: readings.append(self.threads()))
        end, settled = settle(self.threads)  # after QUIT: until the server is idle again
        readings.append(end)
        self.stat += stat_seconds(self.pgid) - s0
        self.clock += clock_seconds(self.pgid) - c0
        for i in range(len(PHASES)):
            self.sums[i] += readings[i + 1] - readings[i]
        self.sessions += 1
        self.unsettled += not settled

    def row(self, server: str, workload: str, title: str) -> Row:
        row = Row(f"w3.phases.{server}", workload, "ms", False, base="phases", labels={"title": title})
        if not self.sessions:
            return row
        per = 1000 / self.sessions
        row.values = {phase: total * per for phase, total in zip(PHASES, self.sums, strict=True)}
        row.runs = dict.fromkeys(PHASES, self.sessions)
        threads, clock = sum(self.sums) * per, self.clock * per
        row.notes.append(f"{workload}: {threads:.2f} ms per session from schedstat; cross-check over the same "
                         f"sessions: process CPU clocks + reaped children {clock:.2f} ms, /proc/PID/stat "
                         f"utime+stime+cutime+cstime {self.stat * per:.2f} ms (10 ms ticks)")
        if clock > threads * 1.03 + 0.02:
            row.notes.append(f"{workload}: schedstat misses {clock - threads:.2f} ms per session: what threads or "
                             "processes ran between their last reading and their exit (Dovecot's pop3 process of "
                             "each session exits after QUIT; the clocks count it through its parent's cutime)")
        if self.unsettled:
            row.notes.append(f"{workload}: still busy 2 s after the close in {self.unsettled} of {self.sessions} "
                             "sessions (after QUIT counted until then)")
        return row


def w3_phases(bench: Bench) -> None:
    """Rows w3.phases.pop3proxy and w3.phases.dovecot: the per-phase table."""
    name, password = bench.users["login"]
    n = max(BLOCK, bench.scale.cpu_sessions)
    single = Pop3proxy(bench.tmp / "pop3proxy-phases", upstream_port=bench.dovecot.port, workers=1)
    meters: dict[str, PhaseMeter] = {}
    problem = ""
    try:
        single.start()
        meters = {"pop3proxy": PhaseMeter(single.pid), "dovecot": PhaseMeter(bench.dovecot.pid)}
        ports = {"pop3proxy": single.port, "dovecot": bench.dovecot.port}
        for port in ports.values():  # the account cached, Dovecot's index built
            warm_session(port, name, password)
        for _ in range(n // BLOCK):
            for server, meter in meters.items():
                for _ in range(BLOCK):
                    meter.session(ports[server], name, password)
    except (ServerUnavailable, bc.Pop3Error, OSError) as exc:
        problem = f"not measured: {type(exc).__name__}: {str(exc)[:160]}"
    finally:
        single.stop()
    _phase_rows(bench, meters, n, problem)


def _phase_rows(bench: Bench, meters: dict[str, PhaseMeter], n: int, problem: str) -> None:
    title = (f"CPU per phase of a warm session, mean of {n} sessions one after another; pop3proxy in one "
             f"process (listen.workers = 1), Dovecot direct for comparison; source: {ThreadTimes.source} (ns on "
             "CPU), summed over every thread of the server's processes")
    names = {"pop3proxy": "pop3proxy, 1 process (listen.workers = 1)", "dovecot": "Dovecot direct"}
    for server in ("pop3proxy", "dovecot"):
        meter = meters.get(server) or PhaseMeter(0)
        row = bench.add(meter.row(server, names[server], title))
        if problem and not meter.sessions:
            row.notes.append(f"{names[server]}: {problem}")
        bench.say(f"  phases, {names[server]}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.values.items()))
