"""Shared by the attachments filter's tests (tests/integration/test_attachments*.py): the sample
messages under tests/data/attachments/, building MIME messages and archives, running the filter.
"""

from __future__ import annotations

import base64
import email
import email.policy
import io
import random
import struct
import zipfile
import zlib
from email.message import EmailMessage
from pathlib import Path

from pop3proxy.filtering.api import FilterContext, FilterOutcome
from pop3proxy.filters.attachments import AttachmentsFilter, Config


DATA = Path(__file__).resolve().parents[1] / "data" / "attachments"
EXE = (DATA / "exe.bin").read_bytes()


def sample(name: str) -> bytes:
    return (DATA / name).read_bytes()


def run(message: bytes, keep_in: Path | None = None, **options) -> FilterOutcome:
    flt = AttachmentsFilter(Config(**options))
    return flt(message, FilterContext(user="alice", uid="uid-1", removed_dir=keep_in))


def parse(data: bytes) -> EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)


def leaves(message: EmailMessage) -> list[EmailMessage]:
    return [part for part in message.walk() if not part.is_multipart()]


def shape(message: EmailMessage):
    if message.is_multipart():
        return (message.get_content_type(), tuple(shape(part) for part in message.get_payload()))
    return message.get_content_type()


def b64(data: bytes, eol: bytes = b"\r\n") -> bytes:
    return base64.encodebytes(data).replace(b"\n", eol)


def mixed(*parts: bytes, eol: bytes = b"\r\n", boundary: bytes = b"==b1==", close: bool = True) -> bytes:
    """A multipart/mixed message whose parts are given as raw header+body bytes (without the break
    before the next delimiter)."""
    out = (
        b"From: sender@example.org" + eol + b"To: alice@example.net" + eol + b"Subject: test" + eol
        + b"MIME-Version: 1.0" + eol + b'Content-Type: multipart/mixed; boundary="' + boundary + b'"' + eol + eol
        + b"preamble" + eol
    )
    for part in parts:
        out += b"--" + boundary + eol + part + eol
    if close:
        out += b"--" + boundary + b"--" + eol + b"epilogue" + eol
    return out


def attachment(headers: list[bytes], payload: bytes = EXE, eol: bytes = b"\r\n") -> bytes:
    return eol.join(headers + [b"Content-Transfer-Encoding: base64", b""]) + eol + b64(payload, eol).rstrip(eol)


TEXT_PART = b"Content-Type: text/plain; charset=us-ascii\r\n\r\nHello Alice,\r\nsee the attachment."


def note_of(outcome: FilterOutcome, index: int = -1) -> EmailMessage:
    """The index-th note part in a filtered message."""
    notes = [p for p in leaves(parse(outcome.data)) if "removed" in str(p.get("Content-Description", ""))]
    return notes[index]


def zipcrypto(name: str, content: bytes, password: bytes) -> bytes:
    """A real zip archive with one entry encrypted with traditional PKWARE encryption (stored)."""
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
        table.append(c)
    keys = [0x12345678, 0x23456789, 0x34567890]

    def update(byte: int) -> None:
        keys[0] = (keys[0] >> 8) ^ table[(keys[0] ^ byte) & 0xFF]
        keys[1] = ((keys[1] + (keys[0] & 0xFF)) * 134775813 + 1) & 0xFFFFFFFF
        keys[2] = (keys[2] >> 8) ^ table[(keys[2] ^ (keys[1] >> 24)) & 0xFF]

    for byte in password:
        update(byte)
    crc = zlib.crc32(content)
    plain = bytes(random.Random(7).randrange(256) for _ in range(11)) + bytes([crc >> 24]) + content
    cipher = bytearray()
    for byte in plain:
        temp = (keys[2] | 2) & 0xFFFF
        cipher.append(byte ^ (((temp * (temp ^ 1)) >> 8) & 0xFF))
        update(byte)
    raw_name = name.encode()
    local = struct.pack(
        "<4sHHHHHIIIHH", b"PK\x03\x04", 20, 1, 0, 0, 0, crc, len(cipher), len(content), len(raw_name), 0
    )
    central = struct.pack(
        "<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 1, 0, 0, 0, crc, len(cipher), len(content),
        len(raw_name), 0, 0, 0, 0, 0, 0,
    )
    body = local + raw_name + bytes(cipher)
    directory = central + raw_name
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 1, 1, len(directory), len(body), 0)
    return body + directory + end


def plain_zip(name: str, content: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, content)
    return buffer.getvalue()
