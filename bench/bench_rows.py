"""What a workload measures: `Row` (one line of a table: a value per server), the servers' column
titles, the phases of a warm session, medians, and how values and ratios are written."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

SERVERS = ("dovecot", "pop3proxy", "perdition", "nginx")
TITLES = {"dovecot": "Dovecot direct", "pop3proxy": "pop3proxy", "perdition": "perdition", "nginx": "nginx-mail"}
# The parts of a warm session whose CPU time the per-phase table shows (workload 3), in order; each runs
# from the client's previous reply to this one's (the last: from the close until the server is idle).
PHASES = ("accept + greeting", "USER", "PASS", "STAT", "RETR 1", "QUIT", "after QUIT (background)")


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
    """One line of the table: a metric per server (the median over the runs unless said otherwise).

    ``base`` names the table: "dovecot" the main one (ratios against Dovecot), "single" the cluster's
    (ratios against the single-machine pop3proxy), "phases" the per-phase CPU table (one row per server,
    ``values`` keyed by phase)."""

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


def fmt_value(value: float | None, unit: str) -> str:
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


def fmt_ratio(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.3f}×" if value < 0.1 else f"{value:.2f}×"
