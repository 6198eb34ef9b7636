"""Attachment stripping: dangerous parts are replaced by a short note and kept aside (``removed/``).

Configured as ``use = "attachments"`` in a ``[[filters]]`` table::

    [[filters]]
    use = "attachments"
    strip_extensions = ["exe", "scr", "js"]     # default: a long list of executable and script types
    strip_types = ["application/x-msdownload", "application/x-*"]   # globs; default: executable types
    max_size = 10_000_000                       # decoded bytes; default: no limit
    strip_encrypted_archives = true             # zip files with encrypted entries (default true)
    keep_removed = true                         # keep what is removed (default true; old name: quarantine)

A part is stripped when any rule matches, tried in this order:

- ``extension``: one of the part's file names ends in a listed extension. Every name the part declares
  counts (Content-Disposition ``filename``, Content-Type ``name``, each occurrence), decoded from
  RFC 2231 (``filename*=UTF-8''x%2Eexe``, continuations ``filename*0*=``) and RFC 2047
  (``=?UTF-8?B?...?=``), read both the way Python's ``compat32`` and ``default`` email policies read
  parameters (they differ on malformed ones, as mail readers do), also percent-decoded, and compared
  case-insensitively after dropping trailing dots and spaces (which Windows ignores: ``x.exe.`` is
  ``x.exe``) and stray quotes. The declared type does not matter, so ``invoice.pdf.exe`` sent as
  application/pdf is stripped.
- ``type``: the declared Content-Type matches one of the ``strip_types`` globs (case-insensitive).
- ``encrypted archive``: the decoded part is a zip file with an entry whose encryption flag is set
  (read from the central directory and the local headers; content that is no zip is not one).
- ``size``: the decoded part (base64 and quoted-printable undone leniently, as mail readers do; other
  transfer encodings are taken as they are) is larger than ``max_size`` bytes. The message's own text
  (text/* parts with no file name that are not marked as attachments) is never stripped for its size.

The rules apply to single parts and to attached messages; a multipart container is never stripped as
such, only the parts inside it.

Attached messages (message/rfc822 and other message/* parts) are checked as a whole by name, type and
size, then descended into: an ``.exe`` inside a forwarded message is replaced inside that message, and
the rest of it stays. An attached message that is itself base64 or quoted-printable encoded (which
RFC 2046 forbids, but it happens) cannot be edited in place: if anything in it would be stripped, the
whole attached message is stripped (rule ``contains ...``).

A stripped part of a multipart is replaced, headers and body, by a text/plain part (charset utf-8)
naming the file, its declared type, its decoded size, its SHA-256, the rule that matched and where it
is kept. When the whole message is the attachment (a single-part message), its body is replaced and
only its Content-Type, Content-Transfer-Encoding and Content-Disposition fields are rewritten (and
MIME-Version added if it was missing). Every other byte of the message stays exactly as it was: other
parts, preamble, epilogue, top-level headers, delimiter lines and line endings. A message in which
nothing matches is returned as the very same bytes.

Keeping what is removed: with ``keep_removed = true`` and a removed-parts directory for the user
(``removed/`` in the user's cache directory), the decoded part is
written as ``<sha256>.<ext>`` and the original MIME part (its headers and body as they were in the
message) as ``<sha256 of that text>.mime``; the directory is created with mode 0700, the files with
mode 0600, each written to a temporary file, fsync'ed and renamed into place. Identical content shares
one file. The note names both files. With ``keep_removed = false`` or no such directory the note
says "removed, not kept". A directory that cannot be written is an error: the pipeline's ``on_error``
policy then delivers (or holds) the unfiltered message, so nothing is lost.

The verdict is ``stripped 1 part: invoice.pdf.exe (application/octet-stream, 2048 bytes, extension exe)``
or empty when nothing matched; the action is always ``deliver``. MIME nesting deeper than 64 levels is
refused with an error (the ``on_error`` policy applies) rather than filtered partly.
"""

from __future__ import annotations

import binascii
import fnmatch
import hashlib
import io
import os
import re
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

from pop3proxy.filtering import FilterContext, FilterOutcome
from pop3proxy.filters import _mime
from pop3proxy.store.fsutil import replace_file

DEFAULT_EXTENSIONS: tuple[str, ...] = (
    # Windows programs, libraries, installers and shortcuts
    "exe", "com", "scr", "pif", "dll", "cpl", "msi", "msp", "mst", "msc", "msix", "msixbundle", "appx",
    "appxbundle", "application", "appref-ms", "gadget", "lnk", "url", "scf", "inf", "reg", "sys", "drv",
    "ocx", "settingcontent-ms",
    # scripts
    "bat", "cmd", "js", "jse", "vb", "vbs", "vbe", "wsf", "wsh", "wsc", "ws", "sct", "hta", "ps1", "ps1xml",
    "ps2", "ps2xml", "psc1", "psc2", "psm1", "psd1", "msh", "msh1", "msh2", "mshxml", "shs", "chm", "jar",
    "jnlp",
    # disk images that mount with a click
    "iso", "img", "vhd", "vhdx",
    # Office documents and add-ins that carry macros
    "docm", "dotm", "xlsm", "xltm", "xlam", "xll", "pptm", "potm", "ppam", "ppsm", "sldm", "one",
)
DEFAULT_TYPES: tuple[str, ...] = (
    "application/x-msdownload",
    "application/x-msdos-program",
    "application/x-ms-dos-executable",
    "application/x-dosexec",
    "application/x-executable",
    "application/vnd.microsoft.portable-executable",
    "application/x-msi",
    "application/x-ms-installer",
    "application/x-ms-shortcut",
    "application/hta",
    "application/x-javascript",
    "application/javascript",
    "text/javascript",
    "application/x-vbscript",
    "text/vbscript",
    "application/x-bat",
    "application/x-powershell",
    "application/java-archive",
    "application/x-java-archive",
)

_ZIP_READ_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    ValueError,
    OSError,
    EOFError,
    IndexError,
    KeyError,
    OverflowError,
    NotImplementedError,
    struct.error,
)
_SAFE_EXTENSION = re.compile(r"[a-z0-9]{1,10}")
# Trailing characters Windows drops from a file name (dots, spaces), and stray NULs and quotes.
_TRAILING_IGNORED = re.compile(r"[\s.\x00'\"]+\Z")
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


class Config(BaseModel):
    """Options of the attachments filter (a ``[[filters]]`` table with ``use = "attachments"``)."""

    model_config = ConfigDict(extra="forbid")

    strip_extensions: list[str] = Field(
        default_factory=lambda: list(DEFAULT_EXTENSIONS),
        description="File-name extensions to strip (case-insensitive, with or without the dot).",
    )
    strip_types: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TYPES),
        description="Declared MIME types to strip: globs such as application/x-* (case-insensitive).",
    )
    max_size: int | None = Field(
        None, gt=0, description="Strip parts whose decoded size exceeds this many bytes; unset: no limit."
    )
    strip_encrypted_archives: bool = Field(True, description="Strip zip files that have encrypted entries.")
    keep_removed: bool = Field(
        True, validation_alias=AliasChoices("keep_removed", "quarantine"),
        description="Keep stripped parts in the user's removed-parts directory (old name: quarantine).",
    )

    @field_validator("strip_extensions")
    @classmethod
    def _extensions(cls, value: list[str]) -> list[str]:
        result = []
        for ext in value:
            clean = ext.strip().lstrip(".").casefold()
            if not clean or re.search(r"[\s/\\]", clean):
                raise ValueError(f"not a file-name extension: {ext!r}")
            result.append(clean)
        return result

    @field_validator("strip_types")
    @classmethod
    def _types(cls, value: list[str]) -> list[str]:
        result = []
        for pattern in value:
            clean = pattern.strip().lower()
            if clean.count("/") != 1 or re.search(r"\s", clean):
                raise ValueError(f"not a MIME type pattern (type/subtype): {pattern!r}")
            result.append(clean)
        return result


@dataclass
class _Strip:
    """One part to remove, and what the note and the verdict say about it."""

    entity: _mime.Entity
    name: str
    declared_type: str
    size: int
    sha256: str
    rule: str
    decoded: bytes
    extension: str

    def describe(self) -> str:
        return f"{_display(self.name, 120)} ({self.declared_type}, {self.size} bytes, {self.rule})"


class AttachmentsFilter:
    """Replace dangerous attachments by a note; keep the originals aside."""

    name = "attachments"
    Config: TypeAlias = Config
    cpu_bound = True  # MIME parsing computes: it runs in a pool process (filters processes > 0)

    def __init__(self, config: Config | None = None) -> None:
        self.config = config if config is not None else Config()
        # Longest first, so the rule names the most specific listed extension ("tar.gz" before "gz").
        self.extensions = sorted(set(self.config.strip_extensions), key=len, reverse=True)
        self.types = list(dict.fromkeys(self.config.strip_types))

    def __call__(self, message: bytes, context: FilterContext) -> FilterOutcome:
        strips = list(self._find(message, _mime.parse(message)))
        if not strips:
            return FilterOutcome(message)
        edits: list[tuple[int, int, bytes]] = []
        for strip in strips:
            kept = self._keep(message, strip, context)
            edits.extend(_replacement(message, strip, kept))
        count = len(strips)
        verdict = f"stripped {count} part{'s' if count > 1 else ''}: " + "; ".join(s.describe() for s in strips)
        return FilterOutcome(_apply(message, edits), verdict=verdict)

    # -- finding ---------------------------------------------------------------------------------

    def _find(self, data: bytes, entity: _mime.Entity) -> Iterator[_Strip]:
        if entity.kind == "multipart":
            for child in entity.children:
                yield from self._find(data, child)
            return
        if entity.start == entity.end:
            return  # an empty part (no headers, no body): nothing to remove
        names = _mime.file_names(entity)
        if entity.kind == "message":
            # An attached message: judged whole by name, type and size, else looked into.
            body = data[entity.body_start : entity.end]
            rule = self._rule_by_name_or_type(names, entity) or self._rule_by_size(body, names, entity)
            if rule:
                yield self._strip(entity, names, body, rule)
            else:
                yield from self._find(data, entity.children[0])
            return
        decoded = _mime.decode_body(data, entity)
        rule = (
            self._rule_by_name_or_type(names, entity)
            or self._rule_by_encryption(decoded)
            or self._rule_by_size(decoded, names, entity)
            or self._rule_by_contents(decoded, entity)
        )
        if rule:
            yield self._strip(entity, names, decoded, rule)

    def _rule_by_name_or_type(self, names: list[str], entity: _mime.Entity) -> str:
        for name in names:
            folded = _TRAILING_IGNORED.sub("", name).casefold()
            for ext in self.extensions:
                if folded.endswith("." + ext):
                    return f"extension {ext}"
        for pattern in self.types:
            if fnmatch.fnmatchcase(entity.content_type, pattern):
                return f"type {entity.content_type}"
        return ""

    def _rule_by_encryption(self, decoded: bytes) -> str:
        if self.config.strip_encrypted_archives and encrypted_zip(decoded):
            return "encrypted archive"
        return ""

    def _rule_by_size(self, decoded: bytes, names: list[str], entity: _mime.Entity) -> str:
        limit = self.config.max_size
        if limit is None or len(decoded) <= limit:
            return ""
        if entity.content_type.startswith("text/") and not names and _mime.disposition(entity) != "attachment":
            return ""  # the message's own text
        return f"size over {limit} bytes"

    def _rule_by_contents(self, decoded: bytes, entity: _mime.Entity) -> str:
        """An attached message that is transfer-encoded: look inside the decoded copy."""
        if not entity.content_type.startswith("message/") or entity.content_type == "message/delivery-status":
            return ""
        inner = list(self._find(decoded, _mime.parse(decoded, depth=entity.depth + 1)))
        if not inner:
            return ""
        return "contains " + "; ".join(f"{_display(s.name, 60)} ({s.rule})" for s in inner)

    def _strip(self, entity: _mime.Entity, names: list[str], decoded: bytes, rule: str) -> _Strip:
        name = names[0] if names else ""
        extension = ""
        if rule.startswith("extension "):
            extension = rule.split(" ", 1)[1].rsplit(".", 1)[-1]
        elif "." in name:
            extension = _TRAILING_IGNORED.sub("", name).rsplit(".", 1)[-1].casefold()
        if not _SAFE_EXTENSION.fullmatch(extension):
            extension = "eml" if entity.content_type.startswith("message/") else "bin"
        return _Strip(
            entity=entity,
            name=name,
            declared_type=entity.content_type,
            size=len(decoded),
            sha256=hashlib.sha256(decoded).hexdigest(),
            rule=rule,
            decoded=decoded,
            extension=extension,
        )

    # -- keeping ---------------------------------------------------------------------------------

    def _keep(self, data: bytes, strip: _Strip, context: FilterContext) -> tuple[str, str] | None:
        """Keep the removed part: (decoded file name, original MIME part file name)."""
        if not self.config.keep_removed or context.removed_dir is None:
            return None
        directory = Path(context.removed_dir)
        if not directory.is_dir():
            directory.mkdir(parents=True, mode=0o700, exist_ok=True)
            os.chmod(directory, 0o700)
        raw = data[strip.entity.start : strip.entity.end]
        decoded_name = f"{strip.sha256}.{strip.extension}"
        raw_name = f"{hashlib.sha256(raw).hexdigest()}.mime"
        _write_atomic(directory / decoded_name, strip.decoded)
        _write_atomic(directory / raw_name, raw)
        return decoded_name, raw_name


FILTER = AttachmentsFilter


# -- helpers ---------------------------------------------------------------------------------------


def encrypted_zip(data: bytes) -> bool:
    """Is this a zip file with an encrypted entry? Anything that is no readable zip is not one."""
    flagged = False
    if data.startswith(b"PK\x03\x04") and len(data) >= 8:
        flagged = bool(data[6] & 0x01)  # the first local header's general-purpose flags
    if flagged or b"PK\x05\x06" not in data[-(65536 + 22) :]:
        return flagged
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for info in archive.infolist():
                if info.flag_bits & 0x01:
                    return True
                offset = info.header_offset
                if data.startswith(b"PK\x03\x04", offset) and len(data) >= offset + 8 and data[offset + 6] & 0x01:
                    return True
    except _ZIP_READ_ERRORS:
        return False
    return False


def _display(name: str, limit: int = 255) -> str:
    """A file name safe to show on one line: control and direction characters escaped, length capped."""
    if not name:
        return "(no name)"
    out = []
    for char in name:
        if char in _BIDI_CONTROLS or not char.isprintable():
            out.append(f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")
        else:
            out.append(char)
    text = "".join(out)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _note(strip: _Strip, kept: tuple[str, str] | None) -> str:
    if kept is None:
        where = "removed, not kept"
    else:
        where = f"kept aside as {kept[0]}\n{'':17}(the original MIME part as {kept[1]})"
    return (
        "An attachment was removed from this message by pop3proxy.\n"
        "\n"
        f"  File name:     {_display(strip.name)}\n"
        f"  Declared type: {strip.declared_type}\n"
        f"  Size:          {strip.size} bytes\n"
        f"  SHA-256:       {strip.sha256}\n"
        f"  Rule:          {strip.rule}\n"
        f"  Kept:          {where}\n"
    )


def _encode_note(text: str, eol: bytes) -> tuple[bytes, bytes]:
    """(Content-Transfer-Encoding, body) for the note, with the message's own line ending."""
    raw = text.encode("utf-8")
    if raw.isascii() and all(len(line) <= 200 for line in raw.split(b"\n")):
        return b"7bit", raw.replace(b"\n", eol)
    return b"quoted-printable", binascii.b2a_qp(raw, istext=True).replace(b"\n", eol)


def _line_ending(data: bytes, entity: _mime.Entity) -> bytes:
    """The line break the note is written with: the one the part's surroundings use."""
    if not entity.is_message:  # the line break of the delimiter line just before the part
        if data.endswith(b"\r\n", 0, entity.start):
            return b"\r\n"
        if entity.start > 0 and data[entity.start - 1] in b"\r\n":
            return data[entity.start - 1 : entity.start]
    if _mime.has_line_break(data, entity.start, entity.end):
        return _mime.line_ending_at(data, entity.start, entity.end)
    return _mime.line_ending_at(data, 0, len(data))


def _replacement(data: bytes, strip: _Strip, kept: tuple[str, str] | None) -> list[tuple[int, int, bytes]]:
    """The edits (start, end, new bytes) that put the note where the part was."""
    entity = strip.entity
    eol = _line_ending(data, entity)
    encoding, body = _encode_note(_note(strip, kept), eol)
    content_fields = {
        b"content-type": b'Content-Type: text/plain; charset="utf-8"',
        b"content-transfer-encoding": b"Content-Transfer-Encoding: " + encoding,
        b"content-disposition": b"Content-Disposition: inline",
    }
    if not entity.is_message:
        # A part of a multipart: headers and body are all its own.
        head = eol.join(content_fields.values()) + eol
        head += b"Content-Description: attachment removed by pop3proxy" + eol
        return [(entity.start, entity.end, head + eol + body)]
    # A whole message: keep its headers but the content ones, replace its body.
    edits: list[tuple[int, int, bytes]] = []
    seen: set[bytes] = set()
    has_mime_version = False
    for name, start, end in _mime.header_fields(data, entity):
        if name == b"mime-version":
            has_mime_version = True
        if name in content_fields:
            edits.append((start, end, b"" if name in seen else content_fields[name] + eol))
            seen.add(name)
    added = b"" if has_mime_version else b"MIME-Version: 1.0" + eol
    added += b"".join(line + eol for name, line in content_fields.items() if name not in seen)
    edits.append((entity.header_end, entity.end, added + eol + body))
    return edits


def _apply(data: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    pieces = []
    pos = 0
    for start, end, new in sorted(edits, key=lambda edit: (edit[0], edit[1])):
        if start < pos or end < start:
            raise RuntimeError(f"overlapping edits at octet {start}")
        pieces.append(data[pos:start])
        pieces.append(new)
        pos = end
    pieces.append(data[pos:])
    return b"".join(pieces)


def _write_atomic(path: Path, content: bytes) -> None:
    """Write a content-addressed file durably (mode 0600), unless the same content is kept already."""
    if path.exists() and path.stat().st_size == len(content):
        return  # the same content is kept already
    replace_file(path, content)
