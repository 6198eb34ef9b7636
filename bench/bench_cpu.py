"""The CPU time a server has used so far, summed over its processes, read from /proc while it runs.

A server's processes are its process group: every server the suite starts leads a session of its own,
and the processes it forks (Dovecot's login, auth and per-session pop3 processes, perdition's process per
connection, nginx's and pop3proxy's workers) stay in its group. Three readings:

- `stat_seconds`: utime + stime + cutime + cstime from /proc/PID/stat of every member, zombies
  included. A child that exited and was reaped is in its parent's cutime/cstime. Clock ticks (10 ms).
- `clock_seconds`: the same, but each live process's own time from its CPU clock (clock_gettime on the
  process's clock: nanoseconds, and it keeps the time of the process's threads that have exited); the
  reaped children still from cutime/cstime, the zombies from their /proc/PID/stat.
- `ThreadTimes`: the nanoseconds on CPU of every thread (first field of /proc/PID/task/TID/schedstat),
  summed. A thread or process that is gone keeps its last reading: what it ran after that is lost.

`settle` waits until a reading stops changing: the server is idle again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
CPUCLOCK_SCHED = 2  # the process CPU clock of another process: clockid ((~pid) << 3) | 2 (Linux)


def _group(pgid: int) -> list[tuple[int, list[str]]]:
    """(pid, the /proc/PID/stat fields after the command name) of every process of group ``pgid``,
    zombies included (their time is not yet in their parent's cutime)."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "X":
            members.append((int(entry.name), fields))
    return members


def _ticks(fields: list[str], *indexes: int) -> int:
    return sum(int(fields[i]) for i in indexes)


def stat_seconds(*pgids: int) -> float:
    """utime + stime + cutime + cstime of every process of the groups, in seconds (10 ms steps)."""
    return sum(_ticks(f, 11, 12, 13, 14) for pgid in pgids for _, f in _group(pgid)) / TICK


def process_clock(pid: int) -> float | None:
    """Seconds on CPU of process ``pid`` (all its threads, also those that exited), None if unreadable."""
    try:
        return time.clock_gettime_ns(((~pid) << 3) | CPUCLOCK_SCHED) / 1e9
    except OSError:
        return None


def clock_seconds(*pgids: int) -> float:
    """Every live process's CPU clock plus its reaped children's cutime + cstime; zombies (and a process
    whose clock cannot be read) by their utime + stime."""
    total = 0.0
    for pgid in pgids:
        for pid, fields in _group(pgid):
            own = None if fields[0] == "Z" else process_clock(pid)
            total += _ticks(fields, 13, 14) / TICK + (_ticks(fields, 11, 12) / TICK if own is None else own)
    return total


class ThreadTimes:
    """Calling it returns the seconds on CPU of every thread the groups have had, from schedstat (ns)."""

    source = "per-thread /proc/PID/task/TID/schedstat"

    def __init__(self, *pgids: int) -> None:
        self.pgids = pgids
        self.last: dict[int, int] = {}  # thread id -> its last reading, kept once the thread is gone

    def __call__(self) -> float:
        for pgid in self.pgids:
            for pid, _ in _group(pgid):
                try:
                    tids = os.listdir(f"/proc/{pid}/task")
                except OSError:
                    continue
                for tid in tids:
                    try:
                        self.last[int(tid)] = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
                    except (OSError, ValueError, IndexError):
                        continue
        return sum(self.last.values()) / 1e9


def settle(read: Callable[[], float], interval: float = 0.02, limit: float = 2.0) -> tuple[float, bool]:
    """Read every ``interval`` until two consecutive readings are equal (the processes are idle), at most
    ``limit`` seconds; the last reading, and whether it settled."""
    deadline = time.monotonic() + limit
    last = read()
    while time.monotonic() < deadline:
        time.sleep(interval)
        now = read()
        if now == last:
            return now, True
        last = now
    return last, False
