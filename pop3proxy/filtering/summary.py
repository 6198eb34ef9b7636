"""What a filter changed in a message, in lines a person reads (`pop3proxy filter`)."""

from __future__ import annotations

import difflib
import logging
import re

from pop3proxy.filtering.headers import _lines, split_header

log = logging.getLogger("pop3proxy.filters")

_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
_SHOW_MAX = 200


def _printable(raw: bytes) -> str:
    """A header line for a terminal: control characters escaped, long lines shortened."""
    text = raw.rstrip(b"\r\n").decode("utf-8", "backslashreplace").replace("\r", "\\r")
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    return text if len(text) <= _SHOW_MAX else text[: _SHOW_MAX - 3] + "..."


def _body(rest: bytes) -> bytes:
    """The body: what follows the blank line after the header block."""
    return rest[2:] if rest.startswith(b"\r\n") else rest[1:] if rest.startswith(b"\n") else rest


def change_summary(before: bytes, after: bytes) -> list[str]:
    """Lines telling what changed between two versions of a message, for people.

    The size, each header line removed (``- ``) or added (``+ ``), and whether the body changed. The
    body itself is never shown.
    """
    lines = [f"size: {len(before)} -> {len(after)} bytes"]
    old_fields, old_rest = split_header(before)
    new_fields, new_rest = split_header(after)
    old_rest, new_rest = _body(old_rest), _body(new_rest)
    old_raw, new_raw = [f.raw for f in old_fields], [f.raw for f in new_fields]
    diff: list[str] = []
    matcher = difflib.SequenceMatcher(None, old_raw, new_raw, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        for sign, chunk in (("-", old_raw[i1:i2]), ("+", new_raw[j1:j2])):
            for raw in chunk:
                for start, end in _lines(raw):
                    diff.append(f"  {sign} {_printable(raw[start:end])}")
    lines += ["headers changed:", *diff] if diff else ["headers unchanged"]
    if old_rest == new_rest:
        lines.append("body unchanged")
    else:
        detail = f"{len(old_rest)} -> {len(new_rest)} bytes"
        if len(old_rest) + len(new_rest) <= 4 << 20:
            old_lines, new_lines = old_rest.splitlines(True), new_rest.splitlines(True)
            body = difflib.SequenceMatcher(None, old_lines, new_lines, autojunk=False)
            removed = added = 0
            for tag, i1, i2, j1, j2 in body.get_opcodes():
                if tag != "equal":
                    removed += i2 - i1
                    added += j2 - j1
            detail += f", {removed} lines removed, {added} added"
        lines.append(f"body changed ({detail})")
    return lines
