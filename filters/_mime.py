"""MIME structure located in a message's own bytes, for filters that rewrite single parts.

``parse(data)`` returns a tree of ``Entity`` objects. Each one records where its header block and body
lie in ``data`` (offsets, never copies), its parsed headers (a ``compat32`` message holding only that
header block), and its children: the parts of a multipart, or the embedded message of a ``message/*``
part. A filter can then replace one part's byte range and leave every other byte as it was.

The part boundaries are found the way Python's ``email`` feed parser finds them, so both agree on the
number of parts: a delimiter is a line ``--boundary`` (``--boundary--`` closes) followed only by spaces
or tabs; lines end with CRLF, LF or a lone CR; the line break before a delimiter belongs to the
delimiter; repeated delimiter lines make no empty parts; a part ends at the next delimiter of its own
multipart or of any enclosing one; a multipart whose first delimiter never comes is a single body.
Scanning is linear in the message size per nesting level (``bytes.find`` over each body).
"""

from __future__ import annotations

import binascii
import contextlib
import re
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import policy
from email.header import decode_header, make_header
from email.message import Message
from email.parser import BytesHeaderParser
from email.utils import unquote
from typing import Literal

from pop3proxy.filtering.headers import field_spans

MAX_DEPTH = 64
"""Deeper nesting than this is refused (``MimeError``) rather than filtered partly."""

_EOL = re.compile(rb"\r\n|\r|\n")
# A header line or a continuation, exactly as email.feedparser decides it.
_HEADER_LINE = re.compile(rb"From |[\x21-\x39\x3b-\x7e]*:|[\t ]")
_FOLD = re.compile(r"(?:\r\n|\r|\n)(?=[ \t])")
_IDENTITY_ENCODINGS = frozenset({"", "7bit", "8bit", "binary"})
_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_NOT_B64 = bytes(b for b in range(256) if b not in _B64_ALPHABET)
_HEADER_PARSER = BytesHeaderParser(policy=policy.compat32)
_ALT_HEADER_PARSER = BytesHeaderParser(policy=policy.default)

Kind = Literal["leaf", "multipart", "message"]


class MimeError(Exception):
    """The message's structure is beyond what the scanner handles (too deep a nesting)."""


@dataclass
class Entity:
    """One MIME entity: the whole message, a part of a multipart, or the message inside a message/*.

    ``start`` is the first octet of the header block; ``header_end`` the octet after the last header
    line's line break; ``body_start`` the first octet of the body (after the blank line, when there is
    one); ``end`` the octet after the body (the line break before the next delimiter is not part of
    it). ``headers`` is the header block parsed with the ``compat32`` policy, ``alt_headers`` the same
    block parsed with the ``default`` policy (None where that parser fails on junk). ``is_message`` is
    true for a whole message (the top level or the body of a message/* part): its headers are the
    message's own, not only MIME headers.
    """

    start: int
    header_end: int
    body_start: int
    end: int
    headers: Message
    content_type: str
    kind: Kind
    is_message: bool
    depth: int
    alt_headers: Message | None
    children: list[Entity] = field(default_factory=list)

    @property
    def transfer_encoding(self) -> str:
        return str(self.headers.get("content-transfer-encoding", "")).strip().lower()

    def walk(self) -> Iterator[Entity]:
        yield self
        for child in self.children:
            yield from child.walk()


def parse(data: bytes, depth: int = 0) -> Entity:
    """The MIME tree of a whole message (``depth``: how deep it already sits inside another one)."""
    return _parse_entity(data, 0, len(data), "text/plain", is_message=True, depth=depth)


def _parse_entity(data: bytes, start: int, end: int, default_type: str, *, is_message: bool, depth: int) -> Entity:
    if depth > MAX_DEPTH:
        raise MimeError(f"MIME parts nested deeper than {MAX_DEPTH} levels")
    header_end, body_start = _split_header_block(data, start, end)
    block = data[start:header_end]
    headers = _HEADER_PARSER.parsebytes(block)
    headers.set_default_type(default_type)
    alt_headers = _alt_headers(block, default_type, headers)
    content_type = headers.get_content_type()
    entity = Entity(start, header_end, body_start, end, headers, content_type, "leaf", is_message, depth, alt_headers)
    multipart = _multipart(data, entity)
    if multipart is not None:
        entity.content_type, ranges = multipart
        entity.kind = "multipart"
        child_default = "message/rfc822" if entity.content_type == "multipart/digest" else "text/plain"
        entity.children = [
            _parse_entity(data, s, e, child_default, is_message=False, depth=depth + 1) for s, e in ranges
        ]
    elif (
        content_type.startswith("message/")
        and content_type != "message/delivery-status"
        and entity.transfer_encoding in _IDENTITY_ENCODINGS
    ):
        entity.kind = "message"
        entity.children = [_parse_entity(data, body_start, end, "text/plain", is_message=True, depth=depth + 1)]
    return entity


# A Content-Type or Content-Disposition value both policies read alike: a token, then `; name=value`
# parameters whose values are tokens or quoted strings without escapes; ASCII, no RFC 2231 `*` or `'`,
# no encoded words, no comments. Real mail almost always looks like this; whatever does not is read twice.
_PLAIN_VALUE = re.compile(
    r"[ \t]*[A-Za-z0-9!#$%&+.^_`{|}~/-]+[ \t]*"
    r"(?:;[ \t]*[A-Za-z0-9!#$%&+.^_`{|}~-]+=(?:[A-Za-z0-9!#$%&+.^_`{|}~-]+|\"[^\"\\\x00-\x1f\x7f-\uffff]*\")[ \t]*)*"
    r";?[ \t]*"
)


_PARAM_NAME = re.compile(r""";[ \t]*([A-Za-z0-9!#$%&+.^_`{|}~-]+)=""")


def _plainly_alike(headers: Message) -> bool:
    """True when the ``default`` policy would read this block's Content-Type and Content-Disposition
    exactly as ``compat32`` does (so parsing it a second time can be skipped)."""
    for name in ("content-type", "content-disposition"):
        values = headers.get_all(name) or []
        if len(values) > 1:
            return False
        if values:
            value = _FOLD.sub("", str(values[0]))
            if "=?" in value or not _PLAIN_VALUE.fullmatch(value):
                return False
            names = [n.lower() for n in _PARAM_NAME.findall(value)]
            if len(names) != len(set(names)):  # compat32 takes the first of a repeated parameter, default the last
                return False
    return True


def _alt_headers(block: bytes, default_type: str, headers: Message | None = None) -> Message | None:
    """The header block as the ``default`` policy reads it (``headers`` itself when its reading cannot
    differ, see `_plainly_alike`); None where that parser fails on junk."""
    if headers is not None and _plainly_alike(headers):
        return headers
    try:
        headers = _ALT_HEADER_PARSER.parsebytes(block)
        headers.set_default_type(default_type)
        headers.get_content_type()
    except Exception:  # its structured header parser has failed on malformed parameters before
        return None
    return headers


def _multipart(data: bytes, entity: Entity) -> tuple[str, list[tuple[int, int]]] | None:
    """(content type, part ranges) if the entity is a multipart with parts, else None.

    Header parameters are read both the way the ``compat32`` policy and the ``default`` policy read
    them (they differ on malformed headers, and so do mail readers): a boundary either reading finds
    delimiters for is used; if both find different parts the message is refused as ambiguous, since a
    filter that chose one reading could be walked around by a reader that chose the other.
    """
    readings = [(entity.content_type, entity.headers.get_boundary())]
    if entity.alt_headers is not None:
        with contextlib.suppress(Exception):  # the default policy's parser failed on junk: compat32's stands
            readings.append((entity.alt_headers.get_content_type(), entity.alt_headers.get_boundary()))
    found: list[tuple[str, list[tuple[int, int]]]] = []
    tried: set[bytes] = set()
    for content_type, boundary in readings:
        sep = _boundary_bytes(boundary) if content_type.startswith("multipart/") else None
        if sep is None or sep in tried:
            continue
        tried.add(sep)
        ranges = _split_multipart(data, entity.body_start, entity.end, sep)
        if ranges is not None:
            found.append((content_type, ranges))
    if len({tuple(ranges) for _, ranges in found}) > 1:
        raise MimeError("ambiguous multipart boundary parameter (the readings find different parts)")
    return found[0] if found else None


def _split_header_block(data: bytes, start: int, end: int) -> tuple[int, int]:
    """(header_end, body_start): header lines run until a blank line (dropped) or a non-header line."""
    pos = start
    while pos < end:
        eol = _EOL.search(data, pos, end)
        line_end = eol.end() if eol else end
        if eol is not None and eol.start() == pos:  # the blank line
            return pos, line_end
        if not _HEADER_LINE.match(data, pos, line_end):
            return pos, pos
        pos = line_end
    return end, end


def _boundary_bytes(boundary: str | None) -> bytes | None:
    if not boundary:
        return None
    try:
        # The feed parser compares it with lines decoded as ASCII + surrogateescape.
        return boundary.encode("ascii", "surrogateescape")
    except UnicodeEncodeError:
        return None


def _delimiter_at(data: bytes, pos: int, end: int, sep: bytes) -> tuple[int, bool] | None:
    """If a delimiter line starts at ``pos``: (offset after its line break, is it the closing one)."""
    if not data.startswith(sep, pos, end):
        return None
    j = pos + len(sep)
    close = data.startswith(b"--", j, end)
    for k, is_close in (((j + 2), True), (j, False)) if close else ((j, False),):
        while k < end and data[k] in b" \t":
            k += 1
        if k == end:
            return k, is_close
        if data[k] == 0x0D:
            return (k + 2 if data.startswith(b"\n", k + 1, end) else k + 1), is_close
        if data[k] == 0x0A:
            return k + 1, is_close
    return None


def _next_delimiter(data: bytes, pos: int, end: int, sep: bytes, region_start: int) -> tuple[int, int, bool] | None:
    """The first delimiter line at or after ``pos``: (its offset, offset after its line break, closing)."""
    while True:
        i = data.find(sep, pos, end)
        if i < 0:
            return None
        if i == region_start or data[i - 1] in b"\r\n":
            found = _delimiter_at(data, i, end, sep)
            if found is not None:
                return i, found[0], found[1]
        pos = i + 1


def _eol_before(data: bytes, pos: int, floor: int) -> int:
    """``pos`` moved back over the line break just before it (not below ``floor``)."""
    if pos - 2 >= floor and data[pos - 2 : pos] == b"\r\n":
        return pos - 2
    if pos - 1 >= floor and data[pos - 1] in b"\r\n":
        return pos - 1
    return pos


def _split_multipart(data: bytes, start: int, end: int, boundary: bytes) -> list[tuple[int, int]] | None:
    """The (start, end) ranges of the parts of a multipart body, or None if it has no first delimiter."""
    sep = b"--" + boundary
    first = _next_delimiter(data, start, end, sep, start)
    if first is None or first[2]:
        return None
    ranges: list[tuple[int, int]] = []
    pos = first[1]
    while True:
        # Repeated delimiter lines (even a closing one) make no empty parts.
        while pos < end and (again := _delimiter_at(data, pos, end, sep)) is not None:
            pos = again[0]
        nxt = _next_delimiter(data, pos, end, sep, start)
        if nxt is None:  # no closing delimiter: the part runs to the end
            ranges.append((pos, end))
            return ranges
        ranges.append((pos, max(pos, _eol_before(data, nxt[0], pos))))
        if nxt[2]:
            return ranges
        pos = nxt[1]


# -- part contents ---------------------------------------------------------------------------------


def decode_body(data: bytes, entity: Entity) -> bytes:
    """The part's body with its Content-Transfer-Encoding undone, leniently (junk never raises)."""
    body = data[entity.body_start : entity.end]
    encoding = entity.transfer_encoding
    if encoding == "base64":
        return decode_base64(body)
    if encoding == "quoted-printable":
        return binascii.a2b_qp(body)
    return body


def decode_base64(body: bytes) -> bytes:
    """Base64 as Python's ``email`` takes it: characters outside the alphabet are ignored, decoding
    stops at the padding, missing padding is supplied; a stray last character is dropped."""
    for candidate in (body, body + b"=="):
        try:
            return binascii.a2b_base64(candidate)
        except binascii.Error:
            continue
    clean = body.translate(None, _NOT_B64)
    clean = clean[: len(clean) - len(clean) % 4] if len(clean) % 4 == 1 else clean
    return binascii.a2b_base64(clean + b"==")


def _unescape_8bit(text: str) -> str:
    """Header text parsed as ASCII + surrogateescape, with raw UTF-8 (RFC 6532) bytes restored."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text
    return raw.decode("utf-8", "replace")


def _decode_words(text: str) -> str:
    """RFC 2047 encoded words decoded (also inside quoted strings, as mail readers do)."""
    if "=?" not in text:
        return text
    try:
        return str(make_header(decode_header(text)))
    except (ValueError, LookupError, UnicodeError, binascii.Error):
        return text


def file_names(entity: Entity) -> list[str]:
    """Every file name the part declares: the Content-Disposition ``filename`` and Content-Type ``name``
    parameters (all occurrences, either header), RFC 2231 (charset, continuations) and RFC 2047
    decoded. Percent-decoded forms are added too, for RFC 2231 values a reader might still decode."""
    names: list[str] = []
    for header in ("content-disposition", "content-type"):
        for value in entity.headers.get_all(header) or ():
            for raw in _name_params(str(value)):
                for name in _name_forms(raw):
                    if name and name not in names:
                        names.append(name)
    alternatives: list[object] = []
    if entity.alt_headers is not None:
        try:  # the default policy's reading of the same parameters, where it differs
            alternatives = [entity.alt_headers.get_filename(), entity.alt_headers.get_param("name")]
        except Exception:  # its parser failed on junk; the compat32 reading stands
            alternatives = []
    for alternative in alternatives:
        if isinstance(alternative, str):
            for name in _name_forms(alternative):
                if name and name not in names:
                    names.append(name)
    return names


def _name_params(value: str) -> list[str]:
    value = _FOLD.sub("", value)
    single = Message(policy=policy.compat32)
    single["content-type"] = value
    try:
        params = single.get_params(header="content-type") or []
        found = []
        for key, param in params[1:]:
            if key.strip().lower() in ("filename", "name"):
                found.append(_collapse(param))
        return found
    except (ValueError, LookupError, IndexError, TypeError, UnicodeError):
        # Parameters too broken for the email package: take every name=value it could mean.
        return [m.group(2) for m in re.finditer(r'(?i)\b(file)?name\*?[0-9]*\*?\s*=\s*"?([^";]*)', value)]


def _collapse(param: str | tuple) -> str:
    if isinstance(param, tuple) and len(param) == 3:
        charset, _language, text = param
        rawbytes = text.encode("raw-unicode-escape", "surrogateescape")
        for codec in (charset or "utf-8", "utf-8"):
            try:
                return rawbytes.decode(codec, "replace")
            except LookupError:
                continue
    return unquote(param) if isinstance(param, str) else str(param)


def _name_forms(raw: str) -> list[str]:
    name = _decode_words(_unescape_8bit(raw))
    forms = [name]
    if "%" in name:
        forms.append(urllib.parse.unquote(name, errors="replace"))
    return forms


def disposition(entity: Entity) -> str:
    value = entity.headers.get("content-disposition")
    return str(value).split(";", 1)[0].strip().lower() if value is not None else ""


# -- header fields ---------------------------------------------------------------------------------


def header_fields(data: bytes, entity: Entity) -> list[tuple[bytes, int, int]]:
    """(lower-case name, start, end) of each header field of the entity, continuation lines included."""
    spans, _ = field_spans(data, entity.start, entity.header_end, lone_cr=True)
    fields: list[tuple[bytes, int, int]] = []
    for start, end in spans:
        colon = data.find(b":", start, end)
        fields.append((data[start:colon].strip().lower() if colon >= 0 else b"", start, end))
    return fields


def has_line_break(data: bytes, start: int, end: int) -> bool:
    return _EOL.search(data, start, end) is not None


def line_ending_at(data: bytes, pos: int, end: int) -> bytes:
    """The line break of the line that starts at ``pos`` (CRLF when it has none)."""
    eol = _EOL.search(data, pos, end)
    return eol.group() if eol is not None else b"\r\n"
