"""How sizes, ages and times are written for people (``status``, ``queue list``, the web console)."""

from __future__ import annotations

import time

_AGE_UNITS = ((90, 1, "s", " s"), (5400, 60, "m", " min"), (172800, 3600, "h", " h"), (None, 86400, "d", " days"))


def human_size(octets: int) -> str:
    size = float(octets)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{octets} B"


def human_age(seconds: float, *, compact: bool = False) -> str:
    """``75 s``, ``12 min``, ``5 h``, ``3 days``; compact (for tables): ``75s``, ``12m``, ``5h``, ``3d``."""
    seconds = max(0, int(seconds))
    for below, unit, short, long in _AGE_UNITS:
        if below is None or seconds < below:
            return f"{seconds // unit}{short if compact else long}"
    raise AssertionError("unreachable")


def utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))
