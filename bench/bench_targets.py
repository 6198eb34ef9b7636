"""The performance issue's targets: each one checked against the rows of a run (met, NOT MET, or not
measured when a row it needs is missing)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bench.bench_rows import TITLES, Row, fmt_ratio, fmt_value

CLUSTER_TITLES = {"single": "single machine", "node": "1 cluster node", "nodes2": "2 nodes + HAProxy",
                  "postgresql": "PostgreSQL (pgbench)"}


@dataclass
class Target:
    text: str
    rows: list[str]
    check: Callable[[dict[str, Row]], bool | None]
    detail: Callable[[dict[str, Row]], str]



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
        return ", ".join(f"{rows[k].workload if k in rows else k}: {fmt_ratio(_ratio_of(rows, k))}" for k in keys)

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
            smaller = " (quick run: smaller than the target's size)" if sized and quick else ""
            return f"{fmt_value(v, unit)} {unit}{smaller}"

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
               lambda rows: ", ".join(f"{CLUSTER_TITLES[s]}: {fmt_ratio(r)}"
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
