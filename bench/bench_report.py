"""Results, targets, the printed table and the generated part of docs/BENCHMARKS.md."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import statistics
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

SERVERS = ("dovecot", "pop3proxy", "perdition", "nginx")
TITLES = {"dovecot": "Dovecot direct", "pop3proxy": "pop3proxy", "perdition": "perdition", "nginx": "nginx-mail"}
# The cluster workload's table: its own columns, ratios against the single-machine pop3proxy.
CLUSTER_SERVERS = ("single", "node", "nodes2", "postgresql")
CLUSTER_TITLES = {"single": "single machine", "node": "1 cluster node", "nodes2": "2 nodes + HAProxy",
                  "postgresql": "PostgreSQL (pgbench)"}
MISSING_TITLES = {**TITLES, "haproxy": "HAProxy", "cluster": "cluster (workload 9)", "pgbench": "pgbench"}
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


@dataclass
class Row:
    """One line of the table: a metric per server (the median over the runs unless said otherwise)."""

    key: str
    workload: str
    unit: str
    higher_is_better: bool
    values: dict[str, float | None] = field(default_factory=dict)
    runs: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)  # e.g. {"pop3proxy": "cold"}
    base: str = "dovecot"  # the column ratios are taken against ("single": the cluster table)

    def ratio(self, server: str) -> float | None:
        base, value = self.values.get(self.base), self.values.get(server)
        if base is None or value is None or base == 0:
            return None
        return value / base


@dataclass
class Target:
    text: str
    rows: list[str]
    check: Callable[[dict[str, Row]], bool | None]
    detail: Callable[[dict[str, Row]], str]


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit in ("errors", "connections"):
        return f"{value:.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _ratio(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.3f}×" if value < 0.1 else f"{value:.2f}×"


def table_lines(rows: list[Row], markdown: bool, cluster: bool = False) -> list[str]:
    """The main table (ratios against Dovecot), or with ``cluster`` the cluster workload's table (ratios
    against the single-machine pop3proxy)."""
    if cluster:
        servers, titles = CLUSTER_SERVERS, CLUSTER_TITLES
        ratios = {"node": "1 node / single", "nodes2": "2 nodes / single"}
    else:
        servers, titles = SERVERS, TITLES
        ratios = {"pop3proxy": "pop3proxy / Dovecot", "perdition": "perdition / Dovecot", "nginx": "nginx / Dovecot"}
    head = ["workload", "unit", *(titles[s] for s in servers), *ratios.values()]
    body = []
    for row in rows:
        if (row.base == "single") != cluster:
            continue
        cells = []
        for server in servers:
            cell = _fmt(row.values.get(server), row.unit)
            if server in row.labels and row.values.get(server) is not None:
                cell += f" ({row.labels[server]})"
            cells.append(cell)
        arrow = "↑" if row.higher_is_better else "↓"
        body.append([row.workload, f"{row.unit} {arrow}", *cells, *(_ratio(row.ratio(s)) for s in ratios)])
    if not body:
        return []
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in body]
        return lines
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return [fmt(head), fmt(["-" * w for w in widths]), *(fmt(r) for r in body)]


def notes_lines(rows: list[Row]) -> list[str]:
    lines = []
    for row in rows:
        for note in row.notes:
            lines.append(f"- {row.workload}: {note}")
    return lines


# --- targets ---------------------------------------------------------------------------------------


def _value(rows: dict[str, Row], key: str, server: str = "pop3proxy") -> float | None:
    row = rows.get(key)
    return None if row is None else row.values.get(server)


def _ratio_of(rows: dict[str, Row], key: str) -> float | None:
    row = rows.get(key)
    return None if row is None else row.ratio("pop3proxy")


def _all(values: list[bool | None]) -> bool | None:
    if any(v is None for v in values) or not values:
        return None
    return all(values)


def _ratio_target(keys: list[str], test: Callable[[float], bool]) -> tuple[Callable, Callable]:
    def check(rows):
        return _all([None if _ratio_of(rows, k) is None else test(_ratio_of(rows, k)) for k in keys])

    def detail(rows):
        return ", ".join(f"{rows[k].workload if k in rows else k}: {_ratio(_ratio_of(rows, k))}" for k in keys)

    return check, detail


def _ahead(rows: dict[str, Row]) -> tuple[bool | None, str]:
    """pop3proxy better than both perdition and nginx-mail on every row where all three were measured
    (the cold rows and the 100k-mailbox row, which compare different things, are left out)."""
    wins, losses = 0, []
    for row in rows.values():
        if ".cold" in row.key or row.key.startswith(("w5", "w8", "w6.rss", "w4.errors")):
            continue
        ours = row.values.get("pop3proxy")
        for other in ("perdition", "nginx"):
            theirs = row.values.get(other)
            if ours is None or theirs is None:
                continue
            better = ours > theirs if row.higher_is_better else ours < theirs
            if better:
                wins += 1
            else:
                losses.append(f"{row.workload} vs {TITLES[other]}")
    if not wins and not losses:
        return None, "no comparable rows"
    return not losses, f"{wins} of {wins + len(losses)} comparisons won" + (
        f"; behind on: {'; '.join(losses)}" if losses else "")


def targets(quick: bool = False) -> list[Target]:
    warm_plain = ["w1.warm.unpipelined", "w1.warm.pipelined", "w2.warm.plain.unpipelined", "w2.warm.plain.pipelined"]
    warm_tls = ["w2.warm.tls.unpipelined", "w2.warm.tls.pipelined"]
    cold = ["w1.cold.unpipelined", "w1.cold.pipelined", "w2.cold.unpipelined", "w2.cold.pipelined"]
    out = []
    c, d = _ratio_target(warm_plain, lambda r: r >= 1.2)
    out.append(Target("warm download, plain: ≥ 1.2× Dovecot's throughput (both shapes)", warm_plain, c, d))
    c, d = _ratio_target(warm_tls, lambda r: r >= 1.8)
    out.append(Target("warm download, TLS: ≥ 1.8× Dovecot's throughput (both shapes)", warm_tls, c, d))
    c, d = _ratio_target(cold, lambda r: r <= 1.5)
    out.append(Target("cold download, no filters: ≤ 1.5× the direct time", cold, c, d))
    c, d = _ratio_target(["w8.cold"], lambda r: r <= 4.0)
    out.append(Target("cold download with the built-in filters: ≤ 4× the direct time", ["w8.cold"], c, d))
    c, d = _ratio_target(["w6.cold"], lambda r: r <= 2.0)
    out.append(Target("cold login + RETR of one huge message: ≤ 2× the direct time", ["w6.cold"], c, d))
    c, d = _ratio_target(["w3.median"], lambda r: r <= 1.5)
    out.append(Target("login latency: ≤ 1.5× Dovecot's (median)", ["w3.median"], c, d))
    c, d = _ratio_target(["w3.cached"], lambda r: r <= 1.0)
    out.append(Target("login latency with sync.auth_cache_ttl: ≤ 1.0× Dovecot's (median)", ["w3.cached"], c, d))
    c, d = _ratio_target(["w4.rate"], lambda r: r >= 1.0)
    out.append(Target("concurrent sessions, warm: ≥ 1.0× Dovecot's sessions/s", ["w4.rate"], c, d))
    c, d = _ratio_target(["w4.cold"], lambda r: r >= 0.5)
    out.append(Target("concurrent sessions, cold: ≥ 0.5× Dovecot's sessions/s", ["w4.cold"], c, d))

    def absolute(key: str, limit: float, unit: str, sized: bool = False) -> tuple[Callable, Callable]:
        def check(rows):
            v = _value(rows, key)
            return None if v is None or (sized and quick) else v < limit

        def detail(rows):
            v = _value(rows, key)
            if v is None:
                return "not measured"
            return f"{_fmt(v, unit)} {unit}" + (" (quick run: smaller than the target's size)" if sized and quick else "")

        return check, detail

    out += cluster_targets()
    c, d = absolute("w5.time", 0.5, "s", sized=True)
    out.append(Target("100,000-message mailbox: login + STAT + UIDL < 0.5 s", ["w5.time"], c, d))
    c, d = absolute("w6.rss", 64.0, "MB", sized=True)
    out.append(Target("200 MB message: RSS growth < 64 MB", ["w6.rss"], c, d))
    c, d = absolute("w7.rss", 4.0, "KB")
    out.append(Target("idle connection: ≤ 4 KB RSS", ["w7.rss"], c, d))
    out.append(Target("ahead of perdition and nginx-mail", [], lambda rows: _ahead(rows)[0],
                      lambda rows: _ahead(rows)[1]))
    return out


def cluster_targets() -> list[Target]:
    """Workload 9: what cluster mode may cost against one machine."""

    def value(rows: dict[str, Row], key: str, server: str) -> float | None:
        row = rows.get(key)
        return None if row is None else row.values.get(server)

    def ratios(rows: dict[str, Row]) -> list[float | None]:
        row = rows.get("w9.rate")
        return [None if row is None else row.ratio(s) for s in ("node", "nodes2")]

    def added(rows: dict[str, Row]) -> float | None:
        node, single = value(rows, "w9.login.median", "node"), value(rows, "w9.login.median", "single")
        return None if node is None or single is None else node - single

    def added_detail(rows: dict[str, Row]) -> str:
        if added(rows) is None:
            return "not measured"
        text = f"1 node: {added(rows):+.2f} ms"
        two, single = value(rows, "w9.login.median", "nodes2"), value(rows, "w9.login.median", "single")
        return text + ("" if two is None or single is None else f"; 2 nodes + HAProxy: {two - single:+.2f} ms")

    def trips(rows: dict[str, Row]) -> float | None:
        return value(rows, "w9.roundtrips", "node")

    return [
        Target("cluster: ≥ 0.85× the single machine's warm sessions/s (1 node; 2 nodes behind HAProxy)",
               ["w9.rate"], lambda rows: _all([r >= 0.85 for r in ratios(rows) if r is not None]),
               lambda rows: ", ".join(f"{CLUSTER_TITLES[s]}: {_ratio(r)}"
                                      for s, r in zip(("node", "nodes2"), ratios(rows), strict=True))),
        Target("cluster: a warm login adds ≤ 1 ms (median, 1 node against the single machine)",
               ["w9.login.median"], lambda rows: None if added(rows) is None else added(rows) <= 1.0, added_detail),
        Target("cluster: ≤ 3 PostgreSQL round trips per warm session (login + STAT + UIDL + QUIT)",
               ["w9.roundtrips"], lambda rows: None if trips(rows) is None else trips(rows) <= 3,
               lambda rows: "not measured" if trips(rows) is None else f"{trips(rows):.2f}"),
    ]


def target_lines(rows: list[Row], markdown: bool, quick: bool = False) -> list[str]:
    by_key = {r.key: r for r in rows}
    lines = []
    if markdown:
        lines += ["| target | result | measured |", "|---|---|---|"]
    for t in targets(quick):
        verdict = t.check(by_key)
        word = {True: "met", False: "NOT MET", None: "not measured"}[verdict]
        if markdown:
            lines.append(f"| {t.text} | {word} | {t.detail(by_key)} |")
        else:
            lines.append(f"[{word:^12}] {t.text}: {t.detail(by_key)}")
    return lines


# --- the machine -------------------------------------------------------------------------------------


def _run(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        return (out.stdout or out.stderr).strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _dpkg_version(package: str) -> str:
    return _run(["dpkg-query", "-W", "-f=${Version}", package]) or "not installed"


def machine() -> dict[str, str]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())[1])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, TypeError):
        pass
    versions = {}
    for module in ("trio", "pyinstrument", "trustme", "pydantic"):
        try:
            from importlib.metadata import version

            versions[module] = version(module)
        except Exception:
            versions[module] = "not installed"
    pyspy = _run(["py-spy", "--version"]) if shutil.which("py-spy") else "not installed"
    distro = ""
    try:
        distro = re.search(r'PRETTY_NAME="([^"]+)"', Path("/etc/os-release").read_text())[1]
    except (OSError, TypeError):
        pass
    return {
        "CPU": cpu or platform.processor() or "unknown",
        "cores": str(os.cpu_count()),
        "RAM": mem,
        "kernel": platform.release(),
        "OS": distro,
        "Python": platform.python_version(),
        "trio": versions["trio"],
        "Dovecot": _dpkg_version("dovecot-core"),
        "perdition": _dpkg_version("perdition"),
        "nginx (mail module)": _dpkg_version("libnginx-mod-mail"),
        "py-spy": pyspy.replace("py-spy ", ""),
        "pyinstrument": versions["pyinstrument"],
    }


def machine_lines(info: dict[str, str], markdown: bool) -> list[str]:
    if markdown:
        return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in info.items())]
    return [f"{k}: {v}" for k, v in info.items()]


# --- output ------------------------------------------------------------------------------------------


def print_report(rows: list[Row], info: dict[str, str], header: str, quick: bool = False) -> None:
    print()
    print(header)
    print()
    for line in table_lines(rows, markdown=False):
        print(line)
    cluster = table_lines(rows, markdown=False, cluster=True)
    if cluster:
        print("\ncluster (ratios against the single-machine pop3proxy):")
        for line in cluster:
            print(line)
    notes = notes_lines(rows)
    if notes:
        print("\nnotes:")
        for line in notes:
            print(line)
    print("\ntargets:")
    for line in target_lines(rows, markdown=False, quick=quick):
        print(line)
    print("\nmachine:")
    for line in machine_lines(info, markdown=False):
        print("  " + line)


def results_markdown(rows: list[Row], info: dict[str, str], header: str, quick: bool = False) -> str:
    parts = [BEGIN, "", header, "", "### Results", ""]
    parts += table_lines(rows, markdown=True)
    cluster = table_lines(rows, markdown=True, cluster=True)
    if cluster:
        parts += ["", "### Cluster", "", "Ratios against the single-machine pop3proxy of the same run.", "", *cluster]
    notes = notes_lines(rows)
    if notes:
        parts += ["", "Notes:", "", *notes]
    parts += ["", "### Targets", "", *target_lines(rows, markdown=True, quick=quick)]
    parts += ["", "### Machine", "", *machine_lines(info, markdown=True), "", END]
    return "\n".join(parts)


def write_docs(path: Path, rows: list[Row], info: dict[str, str], header: str, quick: bool = False) -> None:
    """Replace the generated block of ``path`` (between the results markers), keeping the prose around it."""
    block = results_markdown(rows, info, header, quick)
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        before, rest = text.split(BEGIN, 1)
        after = rest.split(END, 1)[1]
        text = before + block + after
    else:
        text = (text.rstrip() + "\n\n" if text else "# Benchmarks\n\n") + block + "\n"
    path.write_text(text)


def save_json(path: Path, rows: list[Row], info: dict[str, str], header: str) -> None:
    path.write_text(json.dumps({"header": header, "machine": info, "rows": [asdict(r) for r in rows]}, indent=1))


def load_json(path: Path) -> tuple[list[Row], dict[str, str], str]:
    data = json.loads(path.read_text())
    return [Row(**r) for r in data["rows"]], data["machine"], data["header"]
