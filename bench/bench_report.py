"""The printed tables (the main one, the cluster's, the per-phase CPU of a warm session), the targets
(bench_targets.py), the machine, and the generated part of docs/BENCHMARKS.md; rows saved as JSON."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
from dataclasses import asdict
from pathlib import Path

from bench.bench_rows import PHASES, SERVERS, TITLES, Row, fmt_ratio, fmt_value, median, percentile
from bench.bench_targets import CLUSTER_TITLES, target_lines

# Re-exported: the workloads take Row, median and percentile from here.
__all__ = ["PHASES", "Row", "median", "percentile", "print_report", "results_markdown", "write_docs", "save_json",
           "load_json", "machine", "MISSING_TITLES", "target_lines"]

# The cluster workload's table: its own columns, ratios against the single-machine pop3proxy.
CLUSTER_SERVERS = ("single", "node", "nodes2", "postgresql")
MISSING_TITLES = {**TITLES, "haproxy": "HAProxy", "cluster": "cluster (workload 9)", "pgbench": "pgbench"}
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


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
        if row.base != ("single" if cluster else "dovecot"):
            continue
        cells = []
        for server in servers:
            cell = fmt_value(row.values.get(server), row.unit)
            if server in row.labels and row.values.get(server) is not None:
                cell += f" ({row.labels[server]})"
            cells.append(cell)
        arrow = "↑" if row.higher_is_better else "↓"
        body.append([row.workload, f"{row.unit} {arrow}", *cells, *(fmt_ratio(row.ratio(s)) for s in ratios)])
    return _grid(head, body, markdown) if body else []


def notes_lines(rows: list[Row]) -> list[str]:
    return [f"- {row.workload}: {note}" for row in rows if row.base != "phases" for note in row.notes]


def phase_title(rows: list[Row]) -> str | None:
    """The per-phase table's title (what was measured, how often, from which source), None without one."""
    phases = [r for r in rows if r.base == "phases"]
    if not phases:
        return None
    return phases[0].labels.get("title", "CPU per phase of a warm session")


def phase_lines(rows: list[Row], markdown: bool) -> list[str]:
    """The per-phase CPU table of a warm session: ms per phase (its share of the total), one line per
    server, then the notes of those rows."""
    phases = [r for r in rows if r.base == "phases"]
    if not phases:
        return []
    head = ["server", *(f"{p} (ms)" for p in PHASES), "total (ms)"]
    body = []
    for row in phases:
        values = [row.values.get(p) for p in PHASES]
        total = sum(v for v in values if v is not None) if any(v is not None for v in values) else None
        cells = [fmt_value(v, "ms") + ("" if v is None or not total else f" ({v / total:.0%})") for v in values]
        body.append([row.workload, *cells, fmt_value(total, "ms")])
    notes = [f"- {note}" for row in phases for note in row.notes]
    return _grid(head, body, markdown) + ([""] if notes else []) + notes


def _grid(head: list[str], body: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return lines + ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in body]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return [fmt(head), fmt(["-" * w for w in widths]), *(fmt(r) for r in body)]


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
    if phase_title(rows):
        print(f"\n{phase_title(rows)}:")
        for line in phase_lines(rows, markdown=False):
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
    if phase_title(rows):
        parts += ["", "### CPU per phase of a warm session", "", phase_title(rows) + ".", "",
                  *phase_lines(rows, markdown=True)]
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
