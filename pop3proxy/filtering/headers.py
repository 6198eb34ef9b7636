"""Byte-exact header editing: split, add, remove and format header fields without touching
any other octet of the message (signatures stay valid).
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from email.header import Header

log = logging.getLogger("pop3proxy.filters")


_HEADER_NAME = re.compile(rb"[!-9;-~]+")
_MAX_LINE = 78  # where added header lines are folded (RFC 5322 2.1.1)


@dataclass(frozen=True)
class HeaderField:
    """One field of a header block, exactly as it is in the message.

    ``raw`` holds the field's octets with its continuation lines and line endings. ``name`` is the field
    name (decoded as Latin-1, so any octet survives), or None for a line that is not a header field (no
    colon, or octets that cannot be part of a name).
    """

    name: str | None
    raw: bytes


_ANY_EOL = re.compile(rb"\r\n|\r|\n")
_BLANK = {False: (b"\r\n", b"\n"), True: (b"\r\n", b"\n", b"\r")}


def _lines(data: bytes, start: int = 0, end: int | None = None, lone_cr: bool = False) -> Iterable[tuple[int, int]]:
    """(start, end) of each line of data[start:end]; a line ends just after its line break (LF, CR LF,
    or also a lone CR when ``lone_cr``, as Python's email parser reads MIME parts)."""
    end = len(data) if end is None else end
    while start < end:
        if lone_cr:
            eol = _ANY_EOL.search(data, start, end)
            stop = eol.end() if eol else end
        else:
            stop = data.find(b"\n", start, end)
            stop = end if stop < 0 else stop + 1
        yield start, stop
        start = stop


def field_spans(data: bytes, start: int = 0, end: int | None = None, *, lone_cr: bool = False
                ) -> tuple[list[tuple[int, int]], int]:
    """Where the header fields of the block at data[start:end] lie, and where the block stops.

    Returns the (start, end) of each field, continuation lines included, and the offset of the blank line
    that ends the block (``end`` when there is none). A line starting with a space or a tab continues the
    field before it. This is the one header reader: `split_header` and the MIME parts of the built-in
    filters both use it.
    """
    end = len(data) if end is None else end
    spans: list[tuple[int, int]] = []
    for line_start, line_end in _lines(data, start, end, lone_cr):
        if data[line_start] in b"\r\n" and data[line_start:line_end] in _BLANK[lone_cr]:
            return spans, line_start
        if data[line_start:line_start + 1] in (b" ", b"\t") and spans:
            spans[-1] = (spans[-1][0], line_end)
        else:
            spans.append((line_start, line_end))
    return spans, end


def _field_name(line: bytes) -> str | None:
    colon = line.find(b":")
    if colon <= 0:
        return None
    name = line[:colon].rstrip(b" \t")  # RFC 5322 obsolete syntax allows blanks before the colon
    return name.decode("latin-1") if _HEADER_NAME.fullmatch(name) else None


def split_header(message: bytes) -> tuple[list[HeaderField], bytes]:
    """The header block as fields, and the rest (the blank line and the body, or b"").

    ``b"".join(f.raw for f in fields) + rest == message`` always holds. The header block ends at the first
    empty line (CRLF or a bare LF); a line starting with a space or a tab continues the field before it.
    """
    spans, stop = field_spans(message)
    fields = [HeaderField(_field_name(message[a:b]), message[a:b]) for a, b in spans]
    return fields, message[stop:]


def header_end(message: bytes) -> int:
    """Offset of the blank line that ends the header block (or len(message) if there is none)."""
    fields, rest = split_header(message)
    return len(message) - len(rest)


def line_ending(message: bytes) -> bytes:
    """The message's own line ending (CRLF unless its first line ends with a bare LF)."""
    first = message.find(b"\n")
    return b"\n" if first == 0 or (first > 0 and message[first - 1] != 0x0D) else b"\r\n"


_CONTROLS = re.compile(r"[\x00-\x1f\x7f]")


def _clean(value: str) -> str:
    """One line of text: control characters, line breaks and runs of blanks become single spaces."""
    return " ".join(_CONTROLS.sub(" ", value).split())


def _check_name(name: str) -> None:
    if not name.isascii() or not _HEADER_NAME.fullmatch(name.encode("ascii")):
        raise ValueError(f"invalid header name {name!r}")


def _fold(name: str, value: str) -> list[str]:
    """``name: value`` as physical lines of at most 78 characters where the words allow it."""
    lines: list[str] = []
    current = f"{name}:"
    for word in value.split(" "):
        while len(word) > 900:  # a single word never pushes a line past RFC 5322's 998 octets
            lines.append(current)
            current, word = f" {word[:900]}", word[900:]
        if len(current) + 1 + len(word) > _MAX_LINE and current.strip() and current != f"{name}:":
            lines.append(current)
            current = f" {word}"
        else:
            current += f" {word}"
    lines.append(current)
    return lines


def format_header(name: str, value: str, eol: bytes = b"\r\n") -> bytes:
    """One header field ready to put into a message: folded, ``eol``-terminated, 7-bit.

    A value with non-ASCII characters (or with text that a reader would take for an encoded word) is
    written as RFC 2047 encoded words (UTF-8); control characters, line breaks and runs of blanks in the
    value become single spaces.
    """
    _check_name(name)
    value = _clean(value)
    if value.isascii() and "=?" not in value:
        lines = _fold(name, value)
    else:
        encoded = Header(value, "utf-8", maxlinelen=_MAX_LINE, header_name=name).encode(linesep="\n")
        lines = f"{name}: {encoded}".split("\n")
    return eol.join(line.encode("ascii") for line in lines) + eol


def add_header(message: bytes, name: str, value: str) -> bytes:
    """Prepend ``name: value``; every other byte of the message stays as it was."""
    return format_header(name, value, line_ending(message)) + message


def remove_headers(message: bytes, patterns: Iterable[str]) -> tuple[bytes, list[str]]:
    """Drop every header field whose name matches one of the glob ``patterns`` (case-insensitive).

    A field goes with all its continuation lines; every other byte stays as it was. Returns the new
    message and the names of the removed fields, in message order.
    """
    globs = [pattern.lower() for pattern in patterns]
    fields, rest = split_header(message)
    kept: list[bytes] = []
    removed: list[str] = []
    for fld in fields:
        if fld.name is not None and any(fnmatch.fnmatchcase(fld.name.lower(), g) for g in globs):
            removed.append(fld.name)
        else:
            kept.append(fld.raw)
    if not removed:
        return message, []
    return b"".join(kept) + rest, removed
