"""``python -m bench.run_profile [--quick] [--out DIR]``: where pop3proxy's time goes, and what would help.

1. Profiles the warm-download path of a real ``pop3proxy serve`` in front of Dovecot with py-spy
   (attached to the running process, CPU samples only) and with pyinstrument (the serve process run
   under it), and prints the hot spots.
2. Measures the bench-only prototypes of ``bench/bench_prototypes.py`` against the unchanged code in the
   same run, interleaved: warm downloads (wall-clock MB/s and the proxy's CPU time per MB) and the
   login + STAT + UIDL of a big standalone mailbox.

Needs Dovecot, py-spy and pyinstrument (``bash bench/install.sh``); everything runs on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import bench_client as bc
from bench import bench_mail as mail
from bench.bench_report import median
from bench.bench_servers import (
    BenchDovecot,
    Pop3proxy,
    cpu_seconds,
    dovecot_available,
    stop_all,
)
from bench.run_suite import _interrupt, raise_fd_limit

MB = 1_000_000
IDLE_FRAMES = ("EpollIOManager.get_events", "WorkerThread._work (trio/_core/_thread_cache.py:166)")


def say(text: str = "") -> None:
    print(text, flush=True)


# --- py-spy --------------------------------------------------------------------------------------------


class PySpy:
    """``py-spy record`` attached to a PID, raw (collapsed-stack) output; stopped by its PID."""

    def __init__(self, pid: int, out: Path, rate: int = 250) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            ["py-spy", "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--threads",
             "--nonblocking", "--output", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        time.sleep(1.0)  # attached and sampling

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def summarize_collapsed(path: Path, top: int = 18) -> list[str]:
    """Self and inclusive shares of the busy samples (idle waits in epoll and the thread cache left out)."""
    self_time: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    busy = idle = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")[1:]  # drop the thread name
        if not frames:
            continue
        if any(frames[-1].startswith(f) for f in IDLE_FRAMES):
            idle += n
            continue
        busy += n
        self_time[_short(frames[-1])] += n
        for frame in set(map(_short, frames)):
            inclusive[frame] += n
    lines = [f"busy samples: {busy} ({busy * 100 / max(1, busy + idle):.0f}% of all; the rest is waiting)",
             "self time (share of busy samples):"]
    lines += [f"  {100 * c / max(1, busy):5.1f}%  {f}" for f, c in self_time.most_common(top)]
    lines.append("inclusive time of pop3proxy and trio frames:")
    shown = 0
    for frame, c in inclusive.most_common():
        if ("pop3proxy/" in frame or "trio/" in frame) and "runpy" not in frame and not frame.startswith(
                ("<module>", "main (", "cmd_serve", "_run (", "run (trio", "unrolled_run", "_run_handler",
                 "handle_stream", "Thread.", "WorkerThread._work")):
            lines.append(f"  {100 * c / max(1, busy):5.1f}%  {frame}")
            shown += 1
            if shown >= top:
                break
    return lines


def _short(frame: str) -> str:
    # "func (path/to/file.py:123)" -> keep the function and file:line, drop site-packages prefixes
    return frame.replace("site-packages/", "")


# --- helpers ---------------------------------------------------------------------------------------


def warm_runs(proxy: Pop3proxy, user: tuple[str, str], count: int, runs: int, pipelined: bool) -> tuple[float, float]:
    """(median MB/s, CPU seconds of the proxy per MB) over ``runs`` warm downloads."""
    speeds, cpu = [], []
    for _ in range(runs):
        c0 = cpu_seconds(proxy.pid)
        d = bc.download(proxy.port, *user, pipelined=pipelined, expect=count)
        cpu.append((cpu_seconds(proxy.pid) - c0) / (d.octets / MB))
        speeds.append(d.octets / d.total / MB)
    return median(speeds), median(cpu)


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return [fmt(head), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)]


# --- the run -------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run_profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (about a minute)")
    parser.add_argument("--out", type=Path, help="keep the profiles in this directory")
    parser.add_argument("--skip-profile", action="store_true", help="only the prototype measurements")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    why = dovecot_available()
    if why is not None:
        print(f"bench.run_profile: cannot run: {why}", file=sys.stderr)
        return 2
    for tool in ("py-spy",):
        if shutil.which(tool) is None and not args.skip_profile:
            print(f"bench.run_profile: {tool} is missing (bash bench/install.sh)", file=sys.stderr)
            return 2
    raise_fd_limit()
    count = 300 if args.quick else 2000
    runs = 3 if args.quick else 7
    huge = 10_000 if args.quick else 100_000
    tmp = Path(tempfile.mkdtemp(prefix="pp", dir="/tmp"))  # short: Dovecot's unix sockets live below it
    out = args.out or tmp / "profiles"
    out.mkdir(parents=True, exist_ok=True)
    dovecot = BenchDovecot(users=10)
    dovecot.start()
    try:
        small = dovecot.take_user()
        dovecot.bulk_deliver(small[0], mail.messages(count, 20_000))
        big = dovecot.take_user()
        dovecot.bulk_deliver(big[0], mail.messages(8 if args.quick else 20, 5_000_000, seed=2))
        bc.download(dovecot.port, *small, pipelined=True)
        bc.download(dovecot.port, *big, pipelined=True)
        if not args.skip_profile:
            profile(tmp, out, dovecot, small, count, runs)
        prototypes(tmp, dovecot, small, big, count, runs)
        login_prototypes(tmp, dovecot, small, count, 40 if args.quick else 100)
        huge_mailbox(tmp, huge, runs)
    finally:
        stop_all()
        dovecot.stop()
        if args.out is None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def profile(tmp: Path, out: Path, dovecot: BenchDovecot, user, count: int, runs: int) -> None:
    say(f"== profile: warm downloads of {count} × 20 KB through pop3proxy (py-spy, CPU samples)")
    proxy = Pop3proxy(tmp / "profiled", upstream_port=dovecot.port, workers=1).start()
    try:
        bc.download(proxy.port, *user, pipelined=False, expect=count)  # cold: fills the cache
        for shape, pipelined in (("unpipelined", False), ("pipelined", True)):
            spy = PySpy(proxy.pid, out / f"warm-{shape}.txt")
            c0, t0 = cpu_seconds(proxy.pid), time.perf_counter()
            for _ in range(runs):
                bc.download(proxy.port, *user, pipelined=pipelined, expect=count)
            cpu, wall = cpu_seconds(proxy.pid) - c0, time.perf_counter() - t0
            spy.stop()
            say(f"-- {shape}: {runs} downloads in {wall:.2f} s wall, proxy CPU {cpu:.2f} s "
                f"({cpu * 1e6 / (runs * count):.0f} µs per message)")
            for line in summarize_collapsed(out / f"warm-{shape}.txt"):
                say("   " + line)
        spy = PySpy(proxy.pid, out / "login.txt")
        c0 = cpu_seconds(proxy.pid)
        logins = 60
        for _ in range(logins):
            bc.login_latency(proxy.port, *user)
        cpu = cpu_seconds(proxy.pid) - c0
        spy.stop()
        say(f"-- warm login ({count} cached messages, no new mail): proxy CPU {cpu * 1000 / logins:.1f} ms per login")
        for line in summarize_collapsed(out / "login.txt"):
            say("   " + line)
    finally:
        proxy.stop()
    say()
    say("== pyinstrument: the serve process run under it (main thread, wall-clock)")
    report = out / "pyinstrument-warm.txt"
    proxy = Pop3proxy(tmp / "pyinstrument", upstream_port=dovecot.port, workers=1,
                      python_args=["-m", "pyinstrument", "--renderer", "text", "--outfile", str(report)]).start()
    try:
        bc.download(proxy.port, *user, pipelined=False, expect=count)
        for _ in range(runs):
            bc.download(proxy.port, *user, pipelined=False, expect=count)
    finally:
        proxy.stop(timeout=180)  # pyinstrument renders its report after the server stops
    if report.exists() and report.stat().st_size:
        lines = report.read_text().splitlines()
        say("   " + "\n   ".join(lines[:60]))
        say(f"   (full report: {report})")
    else:
        say("   pyinstrument wrote no report")
    say()


VARIANTS = [("unchanged", ""), ("onehop", "onehop"), ("nohop", "nohop"), ("sendfile", "sendfile")]


def prototypes(tmp: Path, dovecot: BenchDovecot, small, big, count: int, runs: int) -> None:
    say("== prototypes: warm downloads, interleaved, same run (MB/s wall median; proxy CPU ms per MB)")
    proxies = {}
    for name, patches in VARIANTS:
        proxy = Pop3proxy(tmp / f"proto-{name}", upstream_port=dovecot.port, workers=1, module="bench.bench_prototypes",
                          env={"BENCH_PATCHES": patches}).start()
        bc.download(proxy.port, *small, pipelined=False, expect=count)
        bc.download(proxy.port, *big, pipelined=False)
        proxies[name] = proxy
    big_count = len(dovecot.messages(big[0]))
    results: dict[tuple[str, str, str], list[tuple[float, float]]] = collections.defaultdict(list)
    for _ in range(runs):
        for workload, user, n in (("20 KB", small, count), ("5 MB", big, big_count)):
            for shape, pipelined in (("unpipelined", False), ("pipelined", True)):
                d = bc.download(dovecot.port, *user, pipelined=pipelined, expect=n)
                results[(workload, shape, "Dovecot")].append((d.octets / d.total / MB, 0.0))
                for name, proxy in proxies.items():
                    results[(workload, shape, name)].append(warm_runs(proxy, user, n, 1, pipelined))
    for proxy in proxies.values():
        proxy.stop()
    rows = []
    for workload in ("20 KB", "5 MB"):
        for shape in ("unpipelined", "pipelined"):
            base = median([s for s, _ in results[(workload, shape, "unchanged")]])
            base_cpu = median([c for _, c in results[(workload, shape, "unchanged")]])
            direct = median([s for s, _ in results[(workload, shape, "Dovecot")]])
            for name in ["Dovecot"] + [v for v, _ in VARIANTS]:
                speed = median([s for s, _ in results[(workload, shape, name)]])
                cpu = median([c for _, c in results[(workload, shape, name)]])
                rows.append([f"{workload} {shape}", name, f"{speed:.1f}", f"{speed / base:.2f}×",
                             f"{speed / direct:.2f}×",
                             "—" if name == "Dovecot" else f"{cpu * 1000:.1f}",
                             "—" if name == "Dovecot" else f"{cpu / base_cpu:.2f}×"])
    for line in table(["messages", "variant", "MB/s", "vs unchanged", "vs Dovecot", "CPU ms/MB",
                       "CPU vs unchanged"], rows):
        say("   " + line)
    say()


def login_prototypes(tmp: Path, dovecot: BenchDovecot, user, count: int, logins: int) -> None:
    say(f"== prototypes: warm login latency, {count} cached messages, no new mail (ms, interleaved)")
    variants = [("unchanged", ""), ("index", "index")]
    proxies = {}
    samples: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    direct: list[float] = []
    try:
        for name, patches in variants:
            proxies[name] = Pop3proxy(tmp / f"login-{name}", upstream_port=dovecot.port, workers=1,
                                      module="bench.bench_prototypes", env={"BENCH_PATCHES": patches}).start()
            bc.download(proxies[name].port, *user, pipelined=True, expect=count)
            bc.login_latency(proxies[name].port, *user)
        for _ in range(max(1, logins // 10)):
            for _ in range(10):
                direct.append(bc.login_latency(dovecot.port, *user))
            for name, proxy in proxies.items():
                for _ in range(10):
                    c0 = cpu_seconds(proxy.pid)
                    elapsed = bc.login_latency(proxy.port, *user)
                    samples[name].append((elapsed, cpu_seconds(proxy.pid) - c0))
    finally:
        for proxy in proxies.values():
            proxy.stop()
    base = median([t for t, _ in samples["unchanged"]])
    rows = [["Dovecot direct", f"{median(direct) * 1000:.1f}", "—", f"{median(direct) / base:.2f}×"]]
    for name, _ in variants:
        t = median([t for t, _ in samples[name]])
        c = median([c for _, c in samples[name]])
        rows.append([name, f"{t * 1000:.1f}", f"{c * 1000:.1f}", f"{t / base:.2f}×"])
    for line in table(["variant", "median ms", "proxy CPU ms", "vs unchanged"], rows):
        say("   " + line)
    say()


def huge_mailbox(tmp: Path, count: int, runs: int) -> None:
    from pop3proxy.proxy.credentials import set_password

    say(f"== prototypes: login + STAT + UIDL of a {count:,}-message standalone mailbox (seconds, median)")
    root = tmp / "huge"
    root.mkdir()
    users = root / "users"
    set_password(users, "bulk", "bulk-password")
    cache = root / "cache"
    mail.fill_cache(cache, "bulk", mail.messages(count, 400, seed=5))
    variants = [("unchanged", ""), ("index", "index")]
    rows = []
    samples: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    first: dict[str, float] = {}
    proxies = {}
    try:
        for name, patches in variants:
            proxies[name] = Pop3proxy(root / name, users_file=users, workers=1, module="bench.bench_prototypes",
                                      env={"BENCH_PATCHES": patches}, extra={"cache": {"root": str(cache)}}).start()
            first[name] = bc.login_stat_uidl(proxies[name].port, "bulk", "bulk-password")[0]
        for _ in range(runs):
            for name, proxy in proxies.items():
                c0 = cpu_seconds(proxy.pid)
                elapsed, n = bc.login_stat_uidl(proxy.port, "bulk", "bulk-password")
                samples[name].append((elapsed, cpu_seconds(proxy.pid) - c0))
    finally:
        for proxy in proxies.values():
            proxy.stop()
    base = median([t for t, _ in samples["unchanged"]])
    for name, _ in variants:
        t = median([t for t, _ in samples[name]])
        c = median([c for _, c in samples[name]])
        rows.append([name, f"{first[name]:.2f}", f"{t:.3f}", f"{c:.3f}", f"{t / base:.2f}×"])
    for line in table(["variant", "first login s", "later logins s", "CPU s", "vs unchanged"], rows):
        say("   " + line)
    say("   (the index is built at the first login and reused while new/ and cur/ are unchanged)")
    say()


if __name__ == "__main__":
    sys.exit(main())
