"""``python -m bench [--quick] [--only 1,3] [--docs FILE] [--json FILE]``: the benchmark suite.

Starts everything on 127.0.0.1 (Dovecot, pop3proxy in front of it, perdition and nginx's mail proxy
where installed), runs the workloads, prints a table of medians and ratios against Dovecot measured in
the same run, and (full runs) rewrites the generated block of docs/BENCHMARKS.md. Installs nothing:
``bash bench/install.sh`` does that. Every process started is stopped at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import bench_client as bc
from bench import bench_mail as mail
from bench import bench_report as report
from bench import bench_harness as h
from bench import bench_workloads as w
from bench import bench_workloads_cluster as cluster
from bench import bench_workloads_heavy as heavy
from bench import bench_workloads_login as login
from bench.bench_servers import (
    REPO,
    BenchDovecot,
    Certs,
    DovecotError,
    NginxMail,
    Perdition,
    Pop3proxy,
    ServerUnavailable,
    dovecot_available,
    stop_all,
)

WORKLOADS = {
    1: ("many small messages", w.w1_many_small),
    2: ("few big messages, plain and TLS", w.w2_few_big),
    3: ("login latency, CPU per warm session", login.w3_login_latency),
    4: ("concurrent sessions", w.w4_concurrent),
    5: ("100k-message mailbox", None),  # needs its own setup, see run()
    6: ("one huge message", heavy.w6_giant_message),
    7: ("idle connections", heavy.w7_idle),
    8: ("filters", heavy.w8_filters),
    9: ("cluster: PostgreSQL, 1 and 2 nodes", cluster.w9_cluster),
}


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run of about a minute")
    parser.add_argument("--only", help="comma-separated workload numbers (default: all)")
    parser.add_argument("--docs", type=Path, help="rewrite the results block of this file "
                        "(default for full runs of every workload: docs/BENCHMARKS.md)")
    parser.add_argument("--no-docs", action="store_true", help="do not write any docs file")
    parser.add_argument("--json", type=Path, help="also save the rows as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs) after the run")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="run nothing: print (and with --docs, write) the results saved by --json")
    return parser.parse_args(argv)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        rows, info, header = report.load_json(args.render)
        quick = header.startswith("quick")
        report.print_report(rows, info, header, quick=quick)
        if args.docs and not args.no_docs:
            report.write_docs(args.docs, rows, info, header, quick=quick)
        return 0
    # Ctrl-C and SIGTERM both end the run through the clean-up below (also when started in the background).
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    scale = h.QUICK if args.quick else h.Scale()
    only = sorted({int(x) for x in args.only.split(",")}) if args.only else sorted(WORKLOADS)
    why = dovecot_available()
    if why is not None:
        print(f"bench: cannot run: {why}", file=sys.stderr)
        return 2
    fds = raise_fd_limit()
    if fds < scale.idle + 500:
        print(f"bench: the open-files limit is {fds}; workload 7 needs about {scale.idle + 500}",
              file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix="pb", dir="/tmp"))  # short: Dovecot's unix sockets live below it
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    try:
        rows, missing = run(scale, only, tmp)
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        stop_all()
        if args.keep:
            print(f"bench: logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.monotonic() - started
    info = report.machine()
    kind = "quick (smoke) run" if args.quick else "full run"
    header = (f"{kind} of {code_version()}, {time.strftime('%Y-%m-%d')}, {elapsed / 60:.1f} minutes; medians of "
              f"interleaved runs; load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.")
    if missing:
        header += " Not measured: " + "; ".join(f"{report.MISSING_TITLES.get(k, k)} ({v})" for k, v in missing.items()) + "."
    report.print_report(rows, info, header, quick=args.quick)
    # The results block is the whole suite's: a run of some workloads (--only) writes it only where --docs says.
    docs = args.docs or (None if args.quick or args.only else REPO / "docs" / "BENCHMARKS.md")
    if docs is not None and not args.no_docs:
        report.write_docs(docs, rows, info, header, quick=args.quick)
        print(f"\nbench: wrote the results block of {docs}")
    if args.json:
        report.save_json(args.json, rows, info, header)
    return 0


def code_version() -> str:
    """The commit measured, and whether the serving code had changes not yet committed."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "pop3proxy", "filters"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "this checkout"
    if not head:
        return "this checkout"
    return f"commit {head}" + (" with local changes to pop3proxy/ or filters/" if dirty else "")


def say(text: str) -> None:
    print(text, flush=True)


def run(scale: h.Scale, only: list[int], tmp: Path) -> tuple[list[report.Row], dict[str, str]]:
    missing: dict[str, str] = {}
    users_needed = scale.swarm_users + 10
    say(f"bench: starting Dovecot ({users_needed} users) in {tmp}")
    dovecot = BenchDovecot(users=users_needed)
    try:
        dovecot.start()
    except DovecotError as exc:
        raise SystemExit(f"bench: Dovecot did not start: {exc}")
    try:
        return _run_with(dovecot, scale, only, tmp, missing), missing
    finally:
        dovecot.stop()


def _run_with(dovecot: BenchDovecot, scale: h.Scale, only: list[int], tmp: Path,
              missing: dict[str, str]) -> list[report.Row]:
    t0 = time.monotonic()
    users = {role: dovecot.take_user() for role in ("small", "big", "login", "giant", "huge", "filter")}
    swarm_users = [dovecot.take_user() for _ in range(scale.swarm_users)] if {4, 9} & set(only) else []
    if 1 in only:
        dovecot.bulk_deliver(users["small"][0], mail.messages(scale.small_count, scale.small_size))
    if 2 in only:
        dovecot.bulk_deliver(users["big"][0], mail.messages(scale.big_count, scale.big_size, seed=2))
    dovecot.bulk_deliver(users["login"][0], mail.messages(10, 5_000, seed=3))
    if 6 in only:
        dovecot.bulk_deliver(users["giant"][0], [mail.big_message(scale.giant_size)])
    if 8 in only:
        dovecot.bulk_deliver(users["filter"][0], (
            mail.multipart_message(scale.filter_size, i, dangerous=i % 10 == 0) for i in range(scale.filter_count)))
    for name, _ in swarm_users:
        dovecot.bulk_deliver(name, mail.messages(scale.swarm_messages, scale.swarm_size, seed=4))
    say(f"bench: mail delivered ({time.monotonic() - t0:.1f} s)")

    certs = Certs(tmp)
    proxy = Pop3proxy(tmp / "pop3proxy", upstream_port=dovecot.port, certs=certs)
    try:
        proxy.start()
    except ServerUnavailable as exc:
        raise SystemExit(f"bench: {exc}")
    bench = h.Bench(scale=scale, tmp=tmp, dovecot=dovecot, certs=certs, proxy=proxy, missing=missing,
                    users=users, swarm_users=swarm_users, say=say)
    try:
        bench.perdition = Perdition(tmp / "perdition", dovecot.port).start()
        bench.perdition_tls = Perdition(tmp / "perdition-tls", dovecot.port, certs).start()
    except ServerUnavailable as exc:
        missing["perdition"] = str(exc).splitlines()[0]
    try:
        bench.nginx = NginxMail(tmp / "nginx", dovecot.port, certs).start()
    except ServerUnavailable as exc:
        missing["nginx"] = str(exc).splitlines()[0]
    for server, why in missing.items():
        say(f"bench: {server} not measured: {why}")

    # Dovecot indexes a mailbox at its first login; do that for every mailbox before measuring.
    for role in ("small", "big", "login", "giant", "filter"):
        with bc.Pop3Client(dovecot.port) as c:
            c.greeting()
            c.login(*users[role])
            c.multiline("UIDL")
            c.quit()

    for number in only:
        title, fn = WORKLOADS[number]
        say(f"bench: workload {number}: {title}")
        t1 = time.monotonic()
        if number == 5:
            _huge_mailbox(bench, dovecot, tmp)
        else:
            fn(bench)
        say(f"bench: workload {number} took {time.monotonic() - t1:.0f} s")
    return bench.rows


def _huge_mailbox(bench: h.Bench, dovecot: BenchDovecot, tmp: Path) -> None:
    from pop3proxy.proxy.credentials import set_password

    scale = bench.scale
    t0 = time.monotonic()
    user = bench.users["huge"]
    dovecot.bulk_deliver(user[0], mail.messages(scale.huge_count, scale.huge_size, seed=5))
    root = tmp / "standalone"
    users_file = root / "users"
    root.mkdir()
    set_password(users_file, "bulk", "bulk-password")
    standalone = Pop3proxy(root, users_file=users_file)
    mail.fill_cache(standalone.cache_root, "bulk", mail.messages(scale.huge_count, scale.huge_size, seed=5))
    say(f"  {scale.huge_count:,} messages written twice ({time.monotonic() - t0:.1f} s)")
    t1 = time.monotonic()
    bc.login_stat_uidl(dovecot.port, *user)
    first_login = time.monotonic() - t1
    try:
        standalone.start()
    except ServerUnavailable as exc:
        row = report.Row("w5.time", "5. 100k mailbox", "s", False, notes=[f"pop3proxy did not start: {exc}"])
        bench.add(row)
        return
    try:
        heavy.w5_huge_mailbox(bench, standalone, "bulk", "bulk-password", user, first_login)
    finally:
        standalone.stop()
