"""Workloads 1, 2 and 4: many small and few big downloads, concurrent sessions. Each takes the running
`Bench` (bench_harness.py) and appends rows to ``bench.rows``; workload 3 (login latency, CPU per
session) is in bench_workloads_login.py, workloads 5 to 8 in bench_workloads_heavy.py.
"""

from __future__ import annotations


from bench import bench_client as bc
from bench.bench_harness import Bench, MB, STALL, STALL_PROBE, _failure_notes, interleaved
from bench.bench_processes import cpu_seconds
from bench.bench_report import Row, median
from bench.bench_servers import Pop3proxy


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
