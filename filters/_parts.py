"""A message's parts as Python's ``email`` feed parser finds them (``compat32``), read from its own bytes.

The built-in spam filter's tokens and GTUBE look are defined over ``email.message_from_bytes(data,
policy=compat32)``: its top-level header fields, whether it is multipart, and ``walk()``'s parts
that hold no other part. That parse splits every body into lines and copies them, most of the
filter's cost. `parse` finds the same things touching only header lines and delimiter lines: a body is
found with ``bytes.find`` and sliced only when its text is asked for (`Part.content`).

The feed parser's rules (email/feedparser.py), followed line for line:

- lines end with CRLF, LF or a lone CR; header lines run until a line that is not one (a blank line
  is dropped, any other starts the body); a ``From `` line last among several header lines is no
  header: it becomes the body's first line;
- a line that is a delimiter of any enclosing multipart is a false end of input, checked before
  anything else reads it; inside message/delivery-status a blank line is one too;
- a multipart/* with a boundary parameter (even an empty one) whose first delimiter never comes holds
  no parts; repeated delimiter lines, a closing one too, make no empty parts; without a closing
  delimiter the last part runs to the (false) end;
- the line break before a delimiter belongs to it: the last message begun inside the part loses one
  trailing line break from its body, unless it is a multipart;
- message/delivery-status holds header blocks separated by blank lines; any other message/* holds one
  message, whatever its Content-Transfer-Encoding; parts of a multipart/digest are message/rfc822
  unless they say otherwise.

The one case left to ``email`` itself: a message nested deeper than `MAX_DEPTH` (see `parse`).
"""

from __future__ import annotations

import email
from dataclasses import dataclass, field
from email import policy
from email.message import Message

from pop3proxy.filters._mime import _EOL, _HEADER_LINE, _delimiter_at, _next_delimiter

MAX_DEPTH = 64
"""Deeper nesting than this is left to ``email`` (see `parse`)."""

Line = tuple[int, int]  # a line's start and end (after its line break) in the message


class TooDeep(Exception):
    """The message nests parts deeper than `MAX_DEPTH`."""


@dataclass
class Part:
    """A part that holds no other part: its header fields (a ``compat32`` message; its default content
    type set as the feed parser sets it) and where its body lies."""

    message: Message
    data: bytes = b""
    ranges: list[Line] | None = None  # the body's pieces, in order; None once set on ``message``
    text: str | None = None  # a slot for the caller's decoded text

    def content(self) -> Message:
        """``message`` with its body set as the feed parser sets it (``get_payload(decode=True)`` works)."""
        if self.ranges is not None:
            body = b"".join(self.data[start:end] for start, end in self.ranges)
            self.message.set_payload(body.decode("ascii", "surrogateescape"))
            self.ranges = None
        return self.message


@dataclass
class Reading:
    """What the tokens are read from: the top-level header fields, whether the message is multipart
    (``Message.is_multipart()``: a multipart with parts, or any message/*), and its parts that hold no
    other part in ``walk()`` order."""

    headers: Message
    multipart: bool
    parts: list[Part] = field(default_factory=list)


def parse(data: bytes) -> Reading:
    """The message's reading, as ``email.message_from_bytes(data, policy=compat32)`` gives it."""
    scanner = _Scanner(data)
    try:
        headers, multipart = scanner.entity("text/plain", 0)
    except TooDeep:
        # The feed parser and ``walk()`` recurse once per level, so how a message nested a few hundred
        # levels deep fares (parts, or a RecursionError) depends on Python's recursion limit and the
        # stack in use: only ``email`` gives its answer. Real mail nests a handful of levels.
        return reading_of(email.message_from_bytes(data, policy=policy.compat32))
    return Reading(headers, multipart, scanner.parts)


def reading_of(msg: Message) -> Reading:
    """The reading of a message ``email`` has parsed (its parts hold their bodies already)."""
    return Reading(msg, msg.is_multipart(), [Part(part) for part in msg.walk() if not part.is_multipart()])


class _Scanner:
    """The feed parser's walk over the message, on offsets: ``pos`` is the start of the next line to
    read, ``stops`` the false ends of input in force (``b"--" + boundary`` for a multipart's delimiter
    lines, None for a blank line)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.end = len(data)
        self.pos = 0
        # A line pushed back out of order: only ever a "From " header line (never a false end), read
        # again first, right after the header lines it ended.
        self.pending: Line | None = None
        self.stops: list[bytes | None] = []
        self.found: dict[bytes, tuple[int, int]] = {}  # delimiter -> (searched from, first line found)
        self.parts: list[Part] = []
        self.last: Part | None = None  # the last message begun, if it is a part to trim

    # -- lines -------------------------------------------------------------------------------------

    def stops_at(self, start: int) -> bool:
        """Whether the line at ``start`` is a false end of input."""
        for stop in self.stops:
            if stop is None:
                if self.data[start] in b"\r\n":
                    return True
            elif _delimiter_at(self.data, start, self.end, stop) is not None:
                return True
        return False

    def line_end(self, start: int) -> int:
        eol = _EOL.search(self.data, start)
        return eol.end() if eol else self.end

    def readline(self) -> Line | None:
        """The next line, or None at the (false) end of input."""
        if self.pending is not None:
            line, self.pending = self.pending, None
            return line
        if self.pos >= self.end or self.stops_at(self.pos):
            return None
        start, self.pos = self.pos, self.line_end(self.pos)
        return start, self.pos

    def unread(self, line: Line) -> None:
        """Push a line back: the one just read, or a From line before a dropped blank line (read again
        first, before anything else is pushed back)."""
        if line[1] == self.pos:
            self.pos = line[0]
        else:
            assert self.pending is None
            self.pending = line

    def next_stop(self, delimiter: bytes | None = None) -> int:
        """Where the next false end of input is (or the next ``delimiter`` line, if sooner)."""
        if None in self.stops:  # a blank line stops: only inside message/delivery-status, line by line
            at = self.pos
            while at < self.end and not self.stops_at(at):
                if delimiter is not None and _delimiter_at(self.data, at, self.end, delimiter) is not None:
                    break
                at = self.line_end(at)
            return at
        at = self.end
        for stop in [*self.stops, delimiter]:
            if stop is not None:
                at = min(at, self.find(stop))
        return at

    def find(self, delimiter: bytes) -> int:
        """The first line at or after ``pos`` that starts with ``delimiter`` as a delimiter line does."""
        searched = self.found.get(delimiter)
        if searched is not None and searched[0] <= self.pos <= searched[1]:
            return searched[1]
        hit = _next_delimiter(self.data, self.pos, self.end, delimiter, self.pos)
        at = hit[0] if hit is not None else self.end
        self.found[delimiter] = (self.pos, at)
        return at

    def rest(self) -> list[Line]:
        """Every line up to the false end of input, read."""
        ranges = [] if self.pending is None else [self.pending]
        self.pending = None
        stop = self.next_stop()
        ranges.append((self.pos, stop))
        self.pos = stop
        return ranges

    # -- messages ----------------------------------------------------------------------------------

    def entity(self, default_type: str, depth: int) -> tuple[Message, bool]:
        """Read one message or part: (its header fields, whether it holds parts)."""
        if depth > MAX_DEPTH:
            raise TooDeep(f"parts nested deeper than {MAX_DEPTH} levels")
        self.last = None
        message = self.headers(self.header_lines(), default_type)
        if message.get_content_type() == "message/delivery-status":
            self.blocks(depth)
            return message, True
        if message.get_content_maintype() == "message":
            self.entity("text/plain", depth + 1)
            return message, True
        if message.get_content_maintype() == "multipart":
            boundary = message.get_boundary()
            body = self.rest() if boundary is None else self.multipart(_delimiter(boundary), message, depth)
            if body is None:
                return message, True
            self.parts.append(Part(message, self.data, body))  # a multipart holding no parts: never trimmed
            return message, False
        part = Part(message, self.data, self.rest())
        self.parts.append(part)
        self.last = part
        return message, False

    def header_lines(self) -> list[Line]:
        lines = []
        while (line := self.readline()) is not None:
            if not _HEADER_LINE.match(self.data, line[0], line[1]):
                if self.data[line[0]] not in b"\r\n":  # the body's first line; a blank line is dropped
                    self.unread(line)
                break
            lines.append(line)
        return lines

    def headers(self, lines: list[Line], default_type: str) -> Message:
        """The header fields of these lines, read as ``FeedParser._parse_headers`` reads them."""
        message = Message()
        message.set_default_type(default_type)
        value: list[str] = []
        for number, (start, end) in enumerate(lines):
            line = self.data[start:end].decode("ascii", "surrogateescape")
            if line[0] in " \t":
                if value:
                    value.append(line)
                continue
            if value:
                message.set_raw(*policy.compat32.header_source_parse(value))
                value = []
            if line.startswith("From "):
                if 0 < number == len(lines) - 1:  # the body's first line after all
                    self.unread((start, end))
                    return message
                continue  # the envelope line, or a misplaced one
            if line.find(":") > 0:
                value = [line]
        if value:
            message.set_raw(*policy.compat32.header_source_parse(value))
        return message

    def multipart(self, delimiter: bytes | None, message: Message, depth: int) -> list[Line] | None:
        """Read a multipart's parts; when its first delimiter never comes it holds none, and the lines
        before that (or before its closing delimiter) are its body (returned)."""
        preamble = [] if self.pending is None else [self.pending]
        self.pending = None
        start, self.pos = self.pos, self.next_stop(delimiter)
        preamble.append((start, self.pos))
        if delimiter is None or self.pos >= self.end or self.stops_at(self.pos):
            return preamble
        if self.is_close(delimiter, self.pos):
            self.pos = self.line_end(self.pos)
            self.rest()
            return preamble
        child_type = "message/rfc822" if message.get_content_type() == "multipart/digest" else "text/plain"
        line = self.readline()
        while line is not None:
            if self.is_close(delimiter, line[0]):
                self.rest()  # the epilogue
                break
            while (line := self.readline()) is not None and self.is_close(delimiter, line[0]) is not None:
                pass  # repeated delimiter lines
            if line is not None:
                self.unread(line)
            self.stops.append(delimiter)
            self.entity(child_type, depth + 1)
            self.trim_last()
            self.stops.pop()
            line = self.readline()  # this multipart's next delimiter, or the false end
        return None

    def is_close(self, delimiter: bytes, start: int) -> bool | None:
        """Whether the line at ``start`` is this closing delimiter; None: no delimiter line."""
        found = _delimiter_at(self.data, start, self.end, delimiter)
        return None if found is None else found[1]

    def trim_last(self) -> None:
        """The line break before a delimiter is the delimiter's: off the last message begun."""
        part, self.last = self.last, None
        if part is None or not part.ranges:
            return
        while len(part.ranges) > 1 and part.ranges[-1][0] == part.ranges[-1][1]:
            part.ranges.pop()
        start, end = part.ranges[-1]
        if end - start >= 2 and self.data[end - 2 : end] == b"\r\n":
            end -= 2
        elif end > start and self.data[end - 1] in b"\r\n":
            end -= 1
        part.ranges[-1] = (start, end)

    def blocks(self, depth: int) -> None:
        """message/delivery-status: header blocks up to blank lines, each a message of its own."""
        while True:
            self.stops.append(None)
            self.entity("text/plain", depth + 1)
            self.stops.pop()
            self.readline()  # the blank line
            line = self.readline()
            if line is None:
                return
            self.unread(line)


def _delimiter(boundary: str) -> bytes | None:
    """``b"--" + boundary`` as the feed parser matches it against lines (ASCII + surrogateescape);
    None for a boundary no line can start with."""
    if "\r" in boundary or "\n" in boundary:
        return None
    try:
        return b"--" + boundary.encode("ascii", "surrogateescape")
    except UnicodeEncodeError:
        return None
