"""The performance issue's targets: each one checked against the rows of a run (met, NOT MET, or not
measured when a row it needs is missing) with the values it was judged on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bench.bench_rows import TITLES, Row, fmt_ratio, fmt_value

CLUSTER_TITLES = {"single": "single machine", "node": "1 cluster node", "nodes2": "2 nodes + HAProxy",
                  "postgresql": "PostgreSQL (pgbench)"}
Rows = dict[str, Row]


@dataclass
class Target:
    text: str
    rows: list[str]
    check: Callable[[Rows], bool | None]
    detail: Callable[[Rows], str]


def _value(rows: Rows, key: str, server: str = "pop3proxy") -> float | None:
    row = rows.get(key)
    return None if row is None else row.values.get(server)


def _ratio_of(rows: Rows, key: str) -> float | None:
    row = rows.get(key)
    return None if row is None else row.ratio("pop3proxy")


def _all(values: list[bool | None]) -> bool | None:
    """NOT MET as soon as one measured part fails; met when every part was measured and passes."""
    if any(v is False for v in values):
        return False
    if not values or any(v is None for v in values):
        return None
    return True


def _with_values(rows: Rows, key: str, server: str = "dovecot") -> str:
    """``pop3proxy value vs server value unit``, for a target's detail."""
    row = rows[key]
    return (f"{fmt_value(row.values.get('pop3proxy'), row.unit)} vs {fmt_value(row.values.get(server), row.unit)} "
            f"{row.unit}")


def _ratio_target(keys: list[str], test: Callable[[float], bool]) -> tuple[Callable, Callable]:
    """Every row of ``keys`` passes ``test`` on its pop3proxy / Dovecot ratio."""

    def check(rows: Rows) -> bool | None:
        return _all([None if _ratio_of(rows, k) is None else test(_ratio_of(rows, k)) for k in keys])

    def detail(rows: Rows) -> str:
        parts = []
        for k in keys:
            if k not in rows:
                parts.append(f"{k}: not measured")
                continue
            ratio = _ratio_of(rows, k)
            parts.append(f"{rows[k].workload}: {fmt_ratio(ratio)}"
                         + ("" if ratio is None else f" ({_with_values(rows, k)})"))
        return ", ".join(parts)

    return check, detail


def _beats(rows: Rows, key: str, other: str, strict: bool = False) -> bool | None:
    """pop3proxy's value at least as good as ``other``'s (``strict``: better), None where either was not
    measured."""
    row = rows.get(key)
    ours, theirs = _value(rows, key), _value(rows, key, other)
    if row is None or ours is None or theirs is None:
        return None
    if ours == theirs:
        return not strict
    return ours > theirs if row.higher_is_better else ours < theirs


def _versus(key: str, test: Callable[[float], bool], others: tuple[str, ...]) -> tuple[Callable, Callable]:
    """The ratio against Dovecot passes ``test`` and pop3proxy is at least as good as each of ``others``."""
    check_ratio, detail_ratio = _ratio_target([key], test)

    def check(rows: Rows) -> bool | None:
        return _all([check_ratio(rows), *(_beats(rows, key, o) for o in others)])

    def detail(rows: Rows) -> str:
        text = detail_ratio(rows)
        row = rows.get(key)
        for other in others:
            value = _value(rows, key, other)
            text += (f"; {TITLES[other]}: not measured" if row is None or value is None
                     else f"; {TITLES[other]}: {fmt_value(value, row.unit)} {row.unit}")
        return text

    return check, detail


def _ahead(rows: Rows) -> tuple[bool | None, str]:
    """pop3proxy better than both perdition and nginx-mail on every row where all three were measured
    (the cold rows and the 100k-mailbox row, which compare different things, are left out)."""
    wins, losses = 0, []
    for row in rows.values():
        if row.base != "dovecot" or ".cold" in row.key or row.key.startswith(("w5", "w8", "w6.rss", "w4.errors")):
            continue
        for other in ("perdition", "nginx"):
            better = _beats(rows, row.key, other, strict=True)
            if better is None:
                continue
            if better:
                wins += 1
            else:
                losses.append(f"{row.workload} vs {TITLES[other]}")
    if not wins and not losses:
        return None, "no comparable rows"
    return not losses, f"{wins} of {wins + len(losses)} comparisons won" + (
        f"; behind on: {'; '.join(losses)}" if losses else "")


def _absolute(key: str, limit: float, unit: str, quick: bool, sized: bool = False) -> tuple[Callable, Callable]:
    """pop3proxy's own value under ``limit``; ``sized`` targets are not judged on a quick run's smaller sizes."""

    def check(rows: Rows) -> bool | None:
        v = _value(rows, key)
        return None if v is None or (sized and quick) else v < limit

    def detail(rows: Rows) -> str:
        v = _value(rows, key)
        if v is None:
            return "not measured"
        smaller = " (quick run: smaller than the target's size)" if sized and quick else ""
        return f"{fmt_value(v, unit)} {unit}{smaller}"

    return check, detail


# (text, rows, test of the pop3proxy / Dovecot ratio) of the targets that are one ratio per row.
_RATIO_TARGETS = [
    ("warm download, plain, 20 KB messages: ≥ 1.2× Dovecot's throughput (both shapes)",
     ["w1.warm.unpipelined", "w1.warm.pipelined"], lambda r: r >= 1.2),
    ("warm download, plain, 5 MB messages: ≥ 1.0× Dovecot's throughput (both shapes)",
     ["w2.warm.plain.unpipelined", "w2.warm.plain.pipelined"], lambda r: r >= 1.0),
    ("warm download, TLS, 5 MB messages: ≥ 1.8× Dovecot's throughput (both shapes)",
     ["w2.warm.tls.unpipelined", "w2.warm.tls.pipelined"], lambda r: r >= 1.8),
    ("cold download, no filters, 20 KB messages: ≤ 2× the direct time", ["w1.cold.unpipelined", "w1.cold.pipelined"],
     lambda r: r <= 2.0),
    ("cold download, no filters, 5 MB messages: ≤ 1.5× the direct time", ["w2.cold.unpipelined", "w2.cold.pipelined"],
     lambda r: r <= 1.5),
    ("cold download with the built-in filters: ≤ 4× the direct time", ["w8.cold"], lambda r: r <= 4.0),
    ("cold login + RETR of one 200 MB message: ≤ 2× the direct time", ["w6.cold"], lambda r: r <= 2.0),
]


def session_targets() -> list[Target]:
    """CPU, concurrent sessions and login latency: against Dovecot, and some against the other proxies."""
    return [
        Target("CPU per warm session (login, STAT, RETR 1, QUIT): ≤ 3× Dovecot's", ["w3.cpu"],
               *_ratio_target(["w3.cpu"], lambda r: r <= 3.0)),
        Target("concurrent sessions, warm: ≥ nginx-mail's and ≥ 0.8× Dovecot's sessions/s", ["w4.rate"],
               *_versus("w4.rate", lambda r: r >= 0.8, ("nginx",))),
        Target("concurrent sessions, cold: ≥ 0.4× Dovecot's sessions/s", ["w4.cold"],
               *_ratio_target(["w4.cold"], lambda r: r >= 0.4)),
        Target("login latency, no auth cache: ≤ 1.5× Dovecot's and ≤ perdition's and nginx-mail's (median)",
               ["w3.median"], *_versus("w3.median", lambda r: r <= 1.5, ("perdition", "nginx"))),
        Target("login latency with sync.auth_cache_ttl, default workers: ≤ 1.0× Dovecot's (median)", ["w3.cached"],
               *_ratio_target(["w3.cached"], lambda r: r <= 1.0)),
    ]


def targets(quick: bool = False) -> list[Target]:
    out = session_targets()
    out += [Target(text, keys, *_ratio_target(keys, test)) for text, keys, test in _RATIO_TARGETS]
    out += [
        Target("100,000-message mailbox: login + STAT + UIDL < 0.5 s", ["w5.time"],
               *_absolute("w5.time", 0.5, "s", quick, sized=True)),
        Target("200 MB message: RSS growth < 64 MB", ["w6.rss"], *_absolute("w6.rss", 64.0, "MB", quick, sized=True)),
        Target("idle connection: ≤ 4 KB RSS", ["w7.rss"], *_absolute("w7.rss", 4.0, "KB", quick)),
        Target("ahead of perdition and nginx-mail", [], lambda rows: _ahead(rows)[0], lambda rows: _ahead(rows)[1]),
    ]
    return out + cluster_targets()


def cluster_targets() -> list[Target]:
    """Workload 9: what cluster mode may cost against one machine."""

    def ratios(rows: Rows) -> list[float | None]:
        row = rows.get("w9.rate")
        return [None if row is None else row.ratio(s) for s in ("node", "nodes2")]

    def added(rows: Rows) -> float | None:
        node, single = _value(rows, "w9.login.median", "node"), _value(rows, "w9.login.median", "single")
        return None if node is None or single is None else node - single

    def added_detail(rows: Rows) -> str:
        if added(rows) is None:
            return "not measured"
        text = f"1 node: {added(rows):+.2f} ms"
        two, single = _value(rows, "w9.login.median", "nodes2"), _value(rows, "w9.login.median", "single")
        return text + ("" if two is None or single is None else f"; 2 nodes + HAProxy: {two - single:+.2f} ms")

    def trips(rows: Rows) -> float | None:
        return _value(rows, "w9.roundtrips", "node")

    return [
        Target("cluster: ≥ 0.85× the single machine's warm sessions/s (1 node; 2 nodes behind HAProxy)",
               ["w9.rate"], lambda rows: _all([r >= 0.85 for r in ratios(rows) if r is not None] or [None]),
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
    lines = ["| target | result | measured |", "|---|---|---|"] if markdown else []
    for t in targets(quick):
        word = {True: "met", False: "NOT MET", None: "not measured"}[t.check(by_key)]
        detail = t.detail(by_key)
        if markdown:
            escaped = detail.replace("|", "\\|")
            lines.append(f"| {t.text} | {word} | {escaped} |")
        else:
            lines.append(f"[{word:^12}] {t.text}: {detail}")
    return lines
