"""Tests for the attachments filter (filters/attachments.py) and its raw-byte MIME scanner.

The sample messages under tests/data/attachments/ are compared byte for byte; the property tests build
random MIME trees and random damage and check that the filter never loses or garbles mail.
"""

from __future__ import annotations

import base64
import binascii
import email
import email.policy
import hashlib
import io
import mailbox
import os
import pty
import random
import select
import stat
import struct
import subprocess
import time
import urllib.parse
import zipfile
import zlib
from email.message import EmailMessage
from pathlib import Path

import pytest
from helpers.common import require_tool
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pop3proxy.filtering.api import (
    WARNING_HEADER,
    FilterConfigError,
    FilterContext,
    FilterOutcome,
)
from pop3proxy.filtering.loader import load_filter
from pop3proxy.filtering.pipeline import Pipeline
from pop3proxy.filters import _mime
from pop3proxy.filters.attachments import (
    DEFAULT_EXTENSIONS,
    FILTER,
    AttachmentsFilter,
    Config,
    encrypted_zip,
)

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


# -- configuration ---------------------------------------------------------------------------------


def test_loads_through_the_pipeline_loader_with_its_options():
    flt, common = load_filter({"use": "attachments", "strip_extensions": [".EXE", "js"], "max_size": 10}, 0)
    assert FILTER is AttachmentsFilter
    assert isinstance(flt, AttachmentsFilter) and flt.name == "attachments" and common.use == "attachments"
    assert flt.config.strip_extensions == ["exe", "js"] and flt.config.max_size == 10
    assert flt.config.keep_removed is True and flt.config.strip_encrypted_archives is True


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"strip_extension": ["exe"]}, "strip_extension"),
        ({"strip_extensions": ["ex e"]}, "strip_extensions"),
        ({"strip_extensions": [""]}, "strip_extensions"),
        ({"strip_types": ["application"]}, "strip_types"),
        ({"max_size": 0}, "max_size"),
    ],
)
def test_bad_options_fail_at_load_time_naming_them(options, fragment):
    with pytest.raises(FilterConfigError, match=fragment):
        load_filter({"use": "attachments", **options}, 3)


def test_default_extensions_cover_the_executable_and_script_types():
    wanted = "exe scr js jse vbs vbe bat cmd com pif jar lnk iso img hta ps1 msi msp dll cpl reg wsf wsh docm xlsm pptm"
    for ext in wanted.split():
        assert ext in DEFAULT_EXTENSIONS
        assert Config().strip_extensions.count(ext) == 1


# -- the rules ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", "exe scr js vbs bat cmd lnk iso hta ps1 msi dll docm xlsm".split())
def test_extension_rule_strips_default_extensions(ext):
    message = mixed(TEXT_PART, attachment([f'Content-Disposition: attachment; filename="file.{ext}"'.encode()]))
    outcome = run(message)
    assert outcome.verdict.startswith(f"stripped 1 part: file.{ext} (text/plain, {len(EXE)} bytes, extension {ext})")
    assert outcome.action == "deliver"
    assert b64(EXE)[:76] not in outcome.data
    assert [p.get_content_type() for p in leaves(parse(outcome.data))] == ["text/plain", "text/plain"]


def test_extension_rule_uses_the_configured_list_only():
    message = mixed(TEXT_PART, attachment([b'Content-Disposition: attachment; filename="a.exe"']))
    assert run(message, strip_extensions=["js"]).data is message
    message = mixed(TEXT_PART, attachment([b'Content-Disposition: attachment; filename="a.tar.gz"']))
    assert "extension tar.gz" in run(message, strip_extensions=["gz", "tar.gz"]).verdict


@pytest.mark.parametrize(
    "name",
    ["report.pdf", "exe", "exe.pdf", "notes.exe.txt", "x.executable", "x.ex", "setup-exe", "a.jsx", "archive.zip"],
)
def test_harmless_names_are_left_alone(name):
    message = mixed(TEXT_PART, attachment([f'Content-Disposition: attachment; filename="{name}"'.encode()]))
    outcome = run(message)
    assert outcome.data is message and outcome.verdict == ""


def test_type_rule_matches_globs_case_insensitively():
    part = attachment([b"Content-Type: Application/X-Custom-Thing", b"Content-Disposition: attachment"])
    message = mixed(TEXT_PART, part)
    outcome = run(message, strip_types=["application/x-*"])
    assert outcome.verdict == (
        f"stripped 1 part: (no name) (application/x-custom-thing, {len(EXE)} bytes, type application/x-custom-thing)"
    )
    assert run(message, strip_types=["application/pdf"]).data is message
    default = mixed(TEXT_PART, attachment([b"Content-Type: application/x-msdownload; name=tool.bin"]))
    assert "type application/x-msdownload" in run(default).verdict


def test_size_rule_strips_large_attachments_but_not_the_message_text():
    big = bytes(range(256)) * 8  # 2048 bytes decoded
    message = mixed(
        b"Content-Type: text/plain\r\n\r\n" + b"long text line\r\n" * 300,
        attachment([b"Content-Type: image/png", b'Content-Disposition: inline; filename="big.png"'], big),
        attachment([b"Content-Type: image/png", b'Content-Disposition: inline; filename="small.png"'], big[:100]),
    )
    outcome = run(message, max_size=1000)
    assert outcome.verdict == "stripped 1 part: big.png (image/png, 2048 bytes, size over 1000 bytes)"
    assert run(message, max_size=2048).data is message  # the limit itself is allowed
    named_text = mixed(b'Content-Type: text/plain; name="dump.txt"\r\n\r\n' + b"x" * 5000)
    assert "dump.txt (text/plain, 5000 bytes, size over 1000 bytes)" in run(named_text, max_size=1000).verdict
    text_attachment = mixed(
        b'Content-Type: text/plain\r\nContent-Disposition: attachment; filename="log.txt"\r\n\r\n' + b"x" * 5000
    )
    assert "log.txt (text/plain, 5000 bytes, size over 1000 bytes)" in run(text_attachment, max_size=1000).verdict


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


def test_the_encrypted_zip_helper_makes_a_real_encrypted_archive():
    data = zipcrypto("invoice.exe", EXE, b"1234")
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        with pytest.raises(RuntimeError, match="encrypted"):
            archive.read("invoice.exe")
        assert archive.read("invoice.exe", pwd=b"1234") == EXE


def test_encrypted_archive_rule():
    secret = zipcrypto("invoice.exe", EXE, b"1234")
    headers = [b"Content-Type: application/zip", b'Content-Disposition: attachment; filename="Invoice.zip"']
    message = mixed(TEXT_PART, attachment(headers, secret))
    verdict = f"stripped 1 part: Invoice.zip (application/zip, {len(secret)} bytes, encrypted archive)"
    assert run(message).verdict == verdict
    assert run(message, strip_encrypted_archives=False).data is message
    # Also when the type lies and there is no name: detection is from the decoded bytes.
    hidden = mixed(TEXT_PART, attachment([b"Content-Type: image/jpeg"], secret))
    assert "encrypted archive" in run(hidden).verdict
    # Self-extracting style: data in front of the archive; the central directory still says encrypted.
    prefixed = mixed(TEXT_PART, attachment([b"Content-Type: application/octet-stream"], b"stub" * 100 + secret))
    assert "encrypted archive" in run(prefixed).verdict
    clear = mixed(TEXT_PART, attachment(headers, plain_zip("a.txt", b"hello" * 50)))
    assert run(clear).data is clear


def test_encrypted_zip_detection_on_damaged_archives():
    secret = zipcrypto("a.exe", EXE, b"pw")
    assert encrypted_zip(secret)
    assert encrypted_zip(secret[: len(secret) // 2])  # truncated: the local header still says so
    assert not encrypted_zip(plain_zip("a.txt", b"x" * 100))
    assert not encrypted_zip(b"PK\x03\x04")
    assert not encrypted_zip(b"PK\x05\x06" + b"\xff" * 18)
    assert not encrypted_zip(b"")


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=400), flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6))
def test_encrypted_zip_detection_never_raises_on_junk(data, flips):
    assert encrypted_zip(data) in (True, False)
    damaged = bytearray(plain_zip("a.txt", b"hello" * 20) if len(data) % 2 else zipcrypto("b", b"hi" * 30, b"k"))
    for position, value in flips:
        damaged[position % len(damaged)] = value
    assert encrypted_zip(bytes(damaged)) in (True, False)


# -- file names in all their disguises --------------------------------------------------------------

OBFUSCATED = {
    "rfc2231 percent-encoded dots": [
        b"Content-Type: application/octet-stream",
        b"Content-Disposition: attachment; filename*=UTF-8''invoice%2Epdf%2Eexe",
    ],
    "rfc2231 continuations": [
        b"Content-Type: application/octet-stream",
        b"Content-Disposition: attachment;\r\n filename*0*=UTF-8''inv%6Fice; filename*1*=.pdf%2E;\r\n filename*2=exe",
    ],
    "rfc2231 with language": [b"Content-Disposition: attachment; filename*=iso-8859-1'de'Rechnung%E4.exe"],
    "rfc2047 base64": [b'Content-Disposition: attachment; filename="=?UTF-8?B?aW52b2ljZS5wZGYuZXhl?="'],
    "rfc2047 quoted-printable": [b'Content-Disposition: attachment; filename="=?utf-8?Q?Rechnung=5F=C3=A4=2Eexe?="'],
    "rfc2047 in pieces": [b"Content-Type: application/pdf;\r\n name==?UTF-8?B?aW52b2ljZS5wZGY=?= =?UTF-8?B?LmV4ZQ==?="],
    "content-type name only": [b'Content-Type: application/pdf; name="invoice.pdf.exe"'],
    "name differs from filename": [
        b'Content-Type: application/pdf; name="invoice.exe"',
        b'Content-Disposition: attachment; filename="invoice.pdf"',
    ],
    "second filename parameter": [
        b"Content-Disposition: attachment; filename=\"invoice.pdf\"; filename*=UTF-8''invoice.exe"
    ],
    "upper case": [b"Content-Disposition: attachment; filename=INVOICE.EXE"],
    "mixed case": [b"Content-Disposition: ATTACHMENT; FILENAME=Invoice.ExE"],
    "trailing dot": [b'Content-Disposition: attachment; filename="invoice.exe."'],
    "trailing spaces and dots": [b'Content-Disposition: attachment; filename="invoice.exe . .  "'],
    "declared pdf": [b'Content-Type: application/pdf', b'Content-Disposition: attachment; filename="invoice.pdf.exe"'],
    "windows path": [b'Content-Disposition: attachment; filename="C:\\\\Users\\\\x\\\\invoice.exe"'],
    "raw utf-8 name": [b'Content-Disposition: attachment; filename="Rechnung-\xc3\xa4\xc3\xb6.exe"'],
    "folded header": [
        b'Content-Type: application/octet-stream;\r\n\tname="a-very-long-file-name-that-needs-folding-to-fit.exe"'
    ],
    "right-to-left override": [b"Content-Disposition: attachment; filename*=UTF-8''invoice%E2%80%AEfdp.exe"],
    "no content type": [b'Content-Disposition: attachment; filename="invoice.exe"'],
    "unquoted percent form": [b"Content-Disposition: attachment; filename*=invoice%2Eexe"],
    "unknown charset": [b"Content-Disposition: attachment; filename*=x-unknown''invoice%2Eexe"],
    "percent escapes in a plain parameter": [b'Content-Disposition: attachment; filename="invoice%2Eexe"'],
    "comment after the name": [b"Content-Disposition: attachment; filename=invoice.exe (see inside)"],
    "comment before the parameter": [b"Content-Disposition: attachment; (c) filename=invoice.exe"],
    "single quotes": [b"Content-Disposition: attachment; filename='invoice.exe'"],
    "continuations beside a harmless name": [
        b"Content-Disposition: attachment; filename*0=invoice.; filename*1=exe; filename=invoice.pdf"
    ],
}


@pytest.mark.parametrize("headers", list(OBFUSCATED.values()), ids=list(OBFUSCATED))
def test_every_name_disguise_is_seen_through(headers):
    message = mixed(TEXT_PART, attachment(headers))
    outcome = run(message)
    assert outcome.verdict.startswith("stripped 1 part: "), outcome.verdict
    assert "extension exe" in outcome.verdict
    assert "\n" not in outcome.verdict and "\u202e" not in outcome.verdict
    result = parse(outcome.data)
    assert len(leaves(result)) == 2 and leaves(result)[1].get_content_type() == "text/plain"
    assert b"TVqQ" not in outcome.data and EXE not in outcome.data


def test_note_shows_the_decoded_name_and_escapes_direction_tricks(tmp_path):
    message = mixed(TEXT_PART, attachment(OBFUSCATED["right-to-left override"]))
    text = note_of(run(message)).get_content()
    assert "invoice\\u202efdp.exe" in text and "\u202e" not in text
    message = mixed(TEXT_PART, attachment(OBFUSCATED["rfc2047 quoted-printable"]))
    outcome = run(message)
    assert "Rechnung_ä.exe" in note_of(outcome).get_content()
    assert note_of(outcome)["Content-Transfer-Encoding"] == "quoted-printable"
    assert outcome.verdict.startswith("stripped 1 part: Rechnung_ä.exe (")


# -- byte exactness ---------------------------------------------------------------------------------


def test_nothing_to_strip_returns_the_very_same_bytes():
    for name in ("dkim-clean.eml", "no-content-type.eml"):
        message = sample(name)
        outcome = run(message)
        assert outcome.data is message and outcome.verdict == "" and outcome.action == "deliver"


def test_stripping_keeps_every_other_byte(tmp_path):
    message = sample("dkim-exe.eml")
    boundary = b"--=_outer_6f1c2e"
    start = message.index(b"Content-Type: application/pdf;\r\n name=\"Rechnung-2025-1127.pdf.exe\"")
    end = message.index(b"\r\n" + boundary, start)
    assert message[start - len(boundary) - 2 : start] == boundary + b"\r\n"
    outcome = run(message, tmp_path / "q")
    before, after = message[:start], message[end:]
    assert outcome.data.startswith(before)  # top-level headers (DKIM, folded, 8-bit), preamble, first parts
    assert outcome.data.endswith(after)  # the delimiter, the PDF, the closing delimiter, the epilogue
    middle = outcome.data[len(before) : len(outcome.data) - len(after)]
    assert middle.startswith(b'Content-Type: text/plain; charset="utf-8"\r\n')
    assert b"\n" not in middle.replace(b"\r\n", b"")  # the note uses the message's CRLF
    assert outcome.verdict == (
        f"stripped 1 part: Rechnung-2025-1127.pdf.exe (application/pdf, {len(EXE)} bytes, extension exe)"
    )
    # The quarantined MIME text is exactly the range that was replaced.
    kept = {p.suffix: p for p in (tmp_path / "q").iterdir()}
    assert kept[".mime"].read_bytes() == message[start:end]


def test_lf_messages_stay_lf():
    message = sample("forwarded-js.eml")
    assert b"\r" not in message
    outcome = run(message)
    assert outcome.verdict.startswith("stripped 1 part: label.js (application/octet-stream")
    assert b"\r" not in outcome.data


def test_output_parses_without_defects_and_keeps_the_structure(tmp_path):
    for name in ("dkim-exe.eml", "forwarded-js.eml", "single-part-scr.eml", "dkim-clean.eml", "no-content-type.eml"):
        message = sample(name)
        original, result = parse(message), parse(run(message, tmp_path / name).data)
        assert [p.defects for p in result.walk()] == [[] for _ in result.walk()], name
        assert len(leaves(result)) == len(leaves(original)), name
        assert [p.is_multipart() for p in result.walk()] == [p.is_multipart() for p in original.walk()], name


def test_filtering_twice_changes_nothing_more(tmp_path):
    once = run(sample("dkim-exe.eml"), tmp_path / "q")
    twice = run(once.data, tmp_path / "q")
    assert twice.data is once.data and twice.verdict == ""


# -- the note and the quarantine --------------------------------------------------------------------


def test_note_and_quarantined_original(tmp_path):
    quarantine = tmp_path / "users" / "alice" / "removed"
    message = sample("dkim-exe.eml")
    outcome = run(message, quarantine)
    digest = hashlib.sha256(EXE).hexdigest()
    note = note_of(outcome)
    assert note.get_content_type() == "text/plain" and note.get_content_charset() == "utf-8"
    assert note.get_content_disposition() == "inline"
    text = note.get_content()
    for expected in (
        "File name:     Rechnung-2025-1127.pdf.exe",
        "Declared type: application/pdf",
        f"Size:          {len(EXE)} bytes",
        f"SHA-256:       {digest}",
        "Rule:          extension exe",
        f"Kept:          kept aside as {digest}.exe",
    ):
        assert expected in text, expected
    assert stat.S_IMODE(quarantine.stat().st_mode) == 0o700
    kept = sorted(p.name for p in quarantine.iterdir())
    start = message.index(b'Content-Type: application/pdf;\r\n name="Rechnung-2025-1127.pdf.exe"')
    raw_part = message[start : message.index(b"\r\n--=_outer_6f1c2e", start)]
    raw_name = hashlib.sha256(raw_part).hexdigest() + ".mime"
    assert kept == sorted([f"{digest}.exe", raw_name])  # no temporary files left behind
    assert raw_name in text
    decoded = (quarantine / f"{digest}.exe").read_bytes()
    assert decoded == EXE and hashlib.sha256(decoded).hexdigest() == digest
    for path in quarantine.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert (quarantine / raw_name).read_bytes() == raw_part
    kept_part = email.message_from_bytes(raw_part, policy=email.policy.default)
    assert kept_part.get_filename() == "Rechnung-2025-1127.pdf.exe" and kept_part.get_content() == EXE


def test_same_attachment_twice_is_kept_once(tmp_path):
    part = attachment([b'Content-Disposition: attachment; filename="a.exe"'])
    outcome = run(mixed(TEXT_PART, part, part), tmp_path)
    assert outcome.verdict.startswith("stripped 2 parts: a.exe (") and "; a.exe (" in outcome.verdict
    assert len(list(tmp_path.iterdir())) == 2
    assert len(leaves(parse(outcome.data))) == 3


@pytest.mark.parametrize("how", ["option", "old option name", "no directory"])
def test_removed_not_kept(tmp_path, how):
    message = mixed(TEXT_PART, attachment([b'Content-Disposition: attachment; filename="a.exe"']))
    if how == "option":
        outcome = run(message, tmp_path / "q", keep_removed=False)
    elif how == "old option name":  # ``quarantine`` is still read, for configurations written before
        outcome = run(message, tmp_path / "q", quarantine=False)
    else:
        outcome = run(message, None)
    assert "Kept:          removed, not kept" in note_of(outcome).get_content()
    assert not (tmp_path / "q").exists()


def test_a_quarantine_that_cannot_be_written_is_an_error_and_the_pipeline_delivers_unchanged(tmp_path):
    blocker = tmp_path / "quarantine"
    blocker.write_bytes(b"a file where the directory should be")
    message = sample("dkim-exe.eml")
    with pytest.raises(OSError):
        run(message, blocker)
    flt, options = load_filter({"use": "attachments"}, 0)
    result = Pipeline([(flt, options)]).run_sync(message, FilterContext("alice", "u1", blocker))
    assert result.data.endswith(message)
    assert result.data.startswith(WARNING_HEADER.encode() + b": filter attachments failed")
    assert result.errors and result.action == "deliver"


# -- structure: nesting, attached messages, damaged messages ---------------------------------------


def test_nested_multiparts():
    eol = b"\r\n"
    inner_mixed = (
        b'Content-Type: multipart/mixed; boundary="inner-mixed"' + eol + eol
        + b"--inner-mixed" + eol + b"Content-Type: text/plain" + eol + eol + b"deep text" + eol
        + b"--inner-mixed" + eol + attachment([b"Content-Type: application/octet-stream; name=deep.vbs"]) + eol
        + b"--inner-mixed--"
    )
    alternative = (
        b'Content-Type: multipart/alternative; boundary="alt"' + eol + eol
        + b"--alt" + eol + b"Content-Type: text/plain" + eol + eol + b"plain" + eol
        + b"--alt" + eol + inner_mixed + eol
        + b"--alt--"
    )
    message = mixed(TEXT_PART, alternative, attachment([b"Content-Type: application/pdf; name=ok.pdf"], b"%PDF-1.4"))
    outcome = run(message)
    assert outcome.verdict.startswith("stripped 1 part: deep.vbs (")
    original, result = parse(message), parse(outcome.data)
    assert shape(result) == (
        "multipart/mixed",
        (
            "text/plain",
            ("multipart/alternative", ("text/plain", ("multipart/mixed", ("text/plain", "text/plain")))),
            "application/pdf",
        ),
    )
    assert shape(original)[1][1][1][1][1][1] == "application/octet-stream"
    assert leaves(result)[-1].get_content() == b"%PDF-1.4"


def test_attached_message_is_filtered_inside():
    message = sample("forwarded-js.eml")
    outcome = run(message)
    original, result = parse(message), parse(outcome.data)
    inner_shape = ("multipart/mixed", ("text/plain", "text/plain"))
    assert shape(result) == ("multipart/mixed", ("text/plain", ("message/rfc822", (inner_shape,))))
    inner = result.get_payload()[1].get_payload()[0]
    assert inner["Subject"] == "Your parcel" and inner["From"] == original.get_payload()[1].get_payload()[0]["From"]
    # Everything up to the script part is untouched, and so is the tail from the inner delimiter on.
    start = message.index(b"Content-Type: application/octet-stream; name=\"label.js\"")
    end = message.index(b"\n--fwd-inner--")
    assert outcome.data.startswith(message[:start]) and outcome.data.endswith(message[end:])


def test_attached_single_part_message_gets_its_content_headers_fixed():
    inner = (
        b"From: x@example.org\r\nSubject: inner\r\nMIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n"
        b'Content-Disposition: attachment; filename="tool.exe"\r\nContent-Transfer-Encoding: base64\r\n\r\n' + b64(EXE)
    )
    message = mixed(TEXT_PART, b"Content-Type: message/rfc822\r\n\r\n" + inner.rstrip(b"\r\n"))
    outcome = run(message)
    assert outcome.verdict.startswith("stripped 1 part: tool.exe (application/octet-stream")
    attached = parse(outcome.data).get_payload()[1].get_payload()[0]
    assert attached["Subject"] == "inner" and attached.get_content_type() == "text/plain"
    assert "tool.exe" in attached.get_content()


def test_transfer_encoded_attached_message_is_stripped_whole():
    inner = b"From: x@example.org\r\nSubject: inner\r\nContent-Type: application/x-msdownload\r\n\r\nMZ..."
    encoded = b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    message = mixed(TEXT_PART, encoded + b64(inner).rstrip(b"\r\n"))
    outcome = run(message)
    assert outcome.verdict == (
        f"stripped 1 part: (no name) (message/rfc822, {len(inner)} bytes, "
        "contains (no name) (type application/x-msdownload))"
    )
    assert len(parse(outcome.data).get_payload()) == 2
    harmless = mixed(TEXT_PART, encoded + b64(b"Subject: hi\r\n\r\nhello"))
    assert run(harmless).data is harmless


def test_attached_message_judged_whole_by_its_name():
    message = mixed(TEXT_PART, b'Content-Type: message/rfc822; name="mail.exe"\r\n\r\nSubject: hi\r\n\r\nhello')
    outcome = run(message)
    assert outcome.verdict == "stripped 1 part: mail.exe (message/rfc822, 20 bytes, extension exe)"


def test_missing_closing_boundary():
    message = sample("missing-close-boundary.eml")
    outcome = run(message)
    assert outcome.verdict == (
        "stripped 1 part: tool.bin (application/x-msdownload, 300 bytes, type application/x-msdownload)"
    )
    start = message.index(b"Content-Type: application/x-msdownload")
    assert outcome.data.startswith(message[:start])
    result = parse(outcome.data)
    assert len(result.get_payload()) == 2 and result.get_payload()[1].get_content_type() == "text/plain"


def test_part_without_content_type_and_message_without_mime():
    message = mixed(TEXT_PART, b"Content-Disposition: attachment; filename=\"a.js\"\r\n\r\nalert(1)")
    assert run(message).verdict == "stripped 1 part: a.js (text/plain, 8 bytes, extension js)"
    plain = sample("no-content-type.eml")
    assert run(plain, max_size=10).data is plain  # the message's own text, however long


def test_single_part_message_whose_body_is_the_attachment():
    message = sample("single-part-scr.eml")
    outcome = run(message)
    assert outcome.verdict == (
        f"stripped 1 part: scan0042.pdf.scr (application/octet-stream, {len(EXE)} bytes, extension scr)"
    )
    head, _, body = outcome.data.partition(b"\r\n\r\n")
    original_head = message.partition(b"\r\n\r\n")[0]
    expected = original_head
    for old, new in (
        (
            b'Content-Type: application/octet-stream;\r\n name="scan0042.pdf.scr"',
            b'Content-Type: text/plain; charset="utf-8"',
        ),
        (b"Content-Transfer-Encoding: base64", b"Content-Transfer-Encoding: 7bit"),
        (b'Content-Disposition: attachment;\r\n filename="scan0042.pdf.scr"', b"Content-Disposition: inline"),
    ):
        expected = expected.replace(old, new)
    assert head == expected
    result = parse(outcome.data)
    assert result.get_content_type() == "text/plain" and "scan0042.pdf.scr" in result.get_content()
    assert result["X-Scanner"] == "MFP 3000" and result.defects == []


def test_single_part_without_mime_version_gets_one():
    message = b"From: a@example.org\nSubject: x\nContent-Disposition: attachment; filename=run.bat\n\n@echo off\n"
    outcome = run(message)
    assert outcome.data.startswith(b"From: a@example.org\nSubject: x\nContent-Disposition: inline\nMIME-Version: 1.0\n")
    assert b"\r" not in outcome.data
    assert parse(outcome.data).get_content_type() == "text/plain"


def test_junk_base64_and_quoted_printable_are_decoded_leniently(tmp_path):
    junk = b"TVqQ!!AAMA\r\n  AAAE**AAAA//8A\r\n\x00\xffALgAAAAA=\r\n=garbage"
    head = b'Content-Type: application/octet-stream; name="a.exe"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
    message = mixed(TEXT_PART, head + junk)
    outcome = run(message, tmp_path)
    decoded = parse(message).get_payload()[1].get_payload(decode=True)  # what Python's email makes of it
    assert (tmp_path / f"{hashlib.sha256(decoded).hexdigest()}.exe").read_bytes() == decoded
    head = b'Content-Type: text/plain; name="a.vbs"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n'
    qp = mixed(TEXT_PART, head + b"MsgBox =22hi=22=\r\n!")
    assert run(qp).verdict == "stripped 1 part: a.vbs (text/plain, 12 bytes, extension vbs)"  # MsgBox "hi"!
    assert outcome.verdict.startswith("stripped 1 part: a.exe (")


def test_malformed_headers_do_not_crash():
    broken = [
        b"Content-Type: multipart/mixed;\x9b\xd0*\rt boundary=\"==b1==\"",
        b'Content-Type: application/pdf\xd7\x8a; name="a.exe"\r\nContent-Transfe\x00r-Encoding: base64',
        b"Content-Disposition: ;;;==;\"\r\nContent-Type: ;;;",
        b'Content-Type: text/plain; name*0*=\'\'; name*1="x.exe',
    ]
    for header in broken:
        message = mixed(TEXT_PART, header + b"\r\n\r\n" + b64(EXE))
        outcome = run(message)
        assert isinstance(outcome.data, bytes)
        # Python's default policy itself fails on some of these headers; compat32 reads them all.
        email.message_from_bytes(outcome.data, policy=email.policy.compat32).as_bytes()


def test_parser_differences_on_a_damaged_boundary_are_resolved_or_refused():
    # compat32 reads the boundary as '"XX" junk', the default policy as 'XX': the one with delimiters wins.
    part = attachment([b'Content-Disposition: attachment; filename="a.exe"'])
    message = mixed(TEXT_PART, part).replace(b'boundary="==b1=="', b'boundary="==b1==" junk')
    assert run(message).verdict.startswith("stripped 1 part: a.exe (")
    # When both readings find different parts, a filter could be walked around: refuse.
    both = message.replace(b"--==b1==\r\nContent-Disposition", b'--"==b1==" junk\r\nContent-Disposition', 1)
    with pytest.raises(_mime.MimeError, match="ambiguous"):
        run(both.replace(b'--==b1==--', b'--"==b1==" junk--'))


def test_delimiters_read_as_python_reads_them():
    exe_part = attachment([b"Content-Type: application/x-msdownload"])
    # Transport padding after a delimiter is allowed.
    padded = mixed(TEXT_PART, exe_part).replace(b"--==b1==\r\n", b"--==b1== \t \r\n")
    assert len(parse(padded).get_payload()) == 2
    assert run(padded).verdict.startswith("stripped 1 part: (no name) (application/x-msdownload")
    # A delimiter line followed by a closing one makes no empty part, and what follows is a part.
    tricky = mixed(TEXT_PART, close=False) + b"--==b1==\r\n--==b1==--\r\n" + exe_part + b"\r\n"
    assert [p.get_content_type() for p in parse(tricky).get_payload()] == ["text/plain", "application/x-msdownload"]
    outcome = run(tricky)
    assert outcome.verdict.startswith("stripped 1 part: (no name) (application/x-msdownload")
    assert [p.get_content_type() for p in parse(outcome.data).get_payload()] == ["text/plain", "text/plain"]


def test_digest_parts_default_to_attached_messages():
    inner = b'From: x@example.org\r\nSubject: one\r\nContent-Disposition: attachment; filename="x.exe"\r\n\r\nMZ'
    message = (
        b'Subject: digest\r\nMIME-Version: 1.0\r\nContent-Type: multipart/digest; boundary="dg"\r\n\r\n'
        b"--dg\r\n\r\n" + inner + b"\r\n--dg--\r\n"
    )
    assert parse(message).get_payload()[0].get_content_type() == "message/rfc822"
    outcome = run(message)
    assert outcome.verdict == "stripped 1 part: x.exe (text/plain, 2 bytes, extension exe)"
    assert parse(outcome.data).get_payload()[0].get_payload()[0]["Subject"] == "one"


def test_quarantine_directory_is_private_whatever_the_umask(tmp_path):
    message = mixed(TEXT_PART, attachment([b'Content-Disposition: attachment; filename="a.exe"']))
    old = os.umask(0o277)
    try:
        run(message, tmp_path / "q")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "q").stat().st_mode) == 0o700


def test_bare_cr_line_endings_and_empty_parts():
    message = (
        b"Subject: cr\rMIME-Version: 1.0\rContent-Type: multipart/mixed; boundary=b\r\r"
        b"--b\rContent-Type: text/plain\r\rhi\r"
        b"--b\rContent-Type: application/x-msdownload\r\rMZ\r--b"
    )
    assert len(parse(message).get_payload()) == 3  # the delimiter at the very end opens an empty part
    outcome = run(message, strip_types=["application/*", "text/*"])
    assert outcome.verdict.count("(text/plain, 2 bytes") == 1 and outcome.verdict.startswith("stripped 2 parts: ")
    assert b"\n" not in outcome.data and outcome.data.endswith(b"\r--b")
    assert [p.get_content_type() for p in parse(outcome.data).get_payload()] == ["text/plain"] * 3


def test_too_deep_nesting_is_refused_not_half_filtered():
    eol = b"\r\n"
    body = attachment([b'Content-Disposition: attachment; filename="a.exe"'])
    for depth in range(80):
        b = f"d{depth}".encode()
        head = b'Content-Type: multipart/mixed; boundary="' + b + b'"' + eol + eol
        body = head + b"--" + b + eol + body + eol + b"--" + b + b"--"
    message = b"Subject: deep" + eol + body
    with pytest.raises(_mime.MimeError, match="deeper than 64"):
        run(message)


def test_boundary_lookalikes_do_not_split_parts():
    lines = b"--==b1==x\r\n ----==b1==\r\n--==b1== trailing text\r\n"
    exe_part = attachment([b"Content-Type: application/x-msdownload"])
    message = mixed(b"Content-Type: text/plain\r\n\r\n" + lines * 3, exe_part)
    outcome = run(message)
    assert outcome.verdict.startswith("stripped 1 part: (no name) (application/x-msdownload")
    assert parse(outcome.data).get_payload()[0].get_content() == (lines * 3).decode()


# -- big messages ------------------------------------------------------------------------------------


def test_fifty_megabyte_attachment_is_fast(tmp_path):
    line = base64.b64encode(bytes(range(57)) * 1) + b"\r\n"  # 57 decoded bytes per 76-character line
    lines = 50 * 1024 * 1024 // 57 + 1
    head = b'Content-Type: application/pdf; name="big.pdf"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
    message = mixed(TEXT_PART, head + line * lines)
    started = time.perf_counter()
    outcome = run(message, tmp_path)
    passed = time.perf_counter() - started
    assert outcome.data is message
    started = time.perf_counter()
    stripped = run(message, tmp_path, max_size=50_000_000)
    took = time.perf_counter() - started
    assert stripped.verdict == (
        f"stripped 1 part: big.pdf (application/pdf, {57 * lines} bytes, size over 50000000 bytes)"
    )
    assert len(stripped.data) < 2000
    assert (tmp_path / f"{hashlib.sha256(bytes(range(57)) * lines).hexdigest()}.pdf").stat().st_size == 57 * lines
    # Linear work takes about a second here; anything quadratic would take hours.
    assert passed < 15 and took < 20, (passed, took)


def test_many_small_parts_scale_linearly():
    parts = [
        attachment([f'Content-Disposition: attachment; filename="f{i}.txt"'.encode()], b"x" * 30) for i in range(3000)
    ]
    message = mixed(TEXT_PART, *parts)
    started = time.perf_counter()
    assert run(message).data is message
    assert time.perf_counter() - started < 10


# -- properties ------------------------------------------------------------------------------------

LEAF_NAMES = [
    None, "report.pdf", "photo.png", "notes.txt", "Übersicht-ß.docx",
    "invoice.pdf.exe", "run.JS", "setup.exe. ", "macro.xlsm", "ä€.bat",
]
DANGEROUS_NAMES = {"invoice.pdf.exe", "run.JS", "setup.exe. ", "macro.xlsm", "ä€.bat"}
LEAF_TYPES = [
    "text/plain", "text/html", "application/pdf", "application/octet-stream", "image/png", "application/x-msdownload"
]
DANGEROUS_TYPES = {"application/x-msdownload"}
TEXT = st.text(alphabet="abcdefghij KLMNOP.,!?äöü€\n", max_size=120)

leaf_strategy = st.tuples(
    st.just("leaf"),
    st.sampled_from(LEAF_TYPES),
    st.sampled_from(LEAF_NAMES),
    st.sampled_from(["quoted", "rfc2231", "rfc2047", "type-name"]),
    st.sampled_from(["7bit", "base64", "quoted-printable"]),
    TEXT,
    st.binary(max_size=120),
)


def tree_strategy():
    return st.recursive(
        leaf_strategy,
        lambda children: st.one_of(
            st.tuples(
                st.just("multipart"),
                st.sampled_from(["mixed", "alternative", "related"]),
                st.lists(children, min_size=1, max_size=3),
                st.booleans(),
            ),
            st.tuples(st.just("message"), children),
        ),
        max_leaves=6,
    )


class Renderer:
    """Turns a generated tree into message bytes; records, leaf by leaf, whether it must be stripped."""

    def __init__(self, eol: bytes) -> None:
        self.eol = eol
        self.count = 0
        self.dangerous: list[bool] = []

    def name_params(self, name: str, form: str) -> tuple[bytes, bytes]:
        """(Content-Type parameters, Content-Disposition) for a file name."""
        encoded_word = "=?UTF-8?B?" + base64.b64encode(name.encode()).decode() + "?="
        quoted = name if name.isascii() else encoded_word
        if form == "type-name":
            return f'; name="{quoted}"'.encode(), b"Content-Disposition: attachment"
        if form == "rfc2047":
            return b"", f'Content-Disposition: attachment; filename="{encoded_word}"'.encode()
        if form == "rfc2231":
            percent = urllib.parse.quote(name, safe="")
            return b"", ("Content-Disposition: attachment; filename*=UTF-8''" + percent).encode()
        return b"", f'Content-Disposition: attachment; filename="{quoted}"'.encode()

    def leaf(self, node) -> bytes:
        _, ctype, name, form, cte, text, data = node
        self.dangerous.append(ctype in DANGEROUS_TYPES or name in DANGEROUS_NAMES)
        params, disposition = self.name_params(name, form) if name else (b"", b"")
        charset = b"; charset=utf-8" if ctype.startswith("text/") else b""
        headers = [f"Content-Type: {ctype}".encode() + charset + params]
        if disposition:
            headers.append(disposition)
        if cte == "base64":
            body = b64(b"\x00data" + data, self.eol).rstrip(self.eol)
        elif cte == "quoted-printable":
            body = binascii.b2a_qp(text.encode(), istext=True).replace(b"\n", self.eol)
        else:
            body = text.encode("ascii", "replace").replace(b"\n", self.eol)
        headers.append(f"Content-Transfer-Encoding: {cte}".encode())
        return self.eol.join(headers) + self.eol + self.eol + body

    def entity(self, node) -> bytes:
        eol = self.eol
        if node[0] == "leaf":
            return self.leaf(node)
        if node[0] == "message":
            return b"Content-Type: message/rfc822" + eol + eol + b"Subject: inner" + eol + self.entity(node[1])
        _, subtype, children, extras = node
        self.count += 1
        boundary = f"=_b{self.count}_{subtype}".encode()
        out = f'Content-Type: multipart/{subtype}; boundary="{boundary.decode()}"'.encode() + eol + eol
        if extras:
            out += b"preamble text" + eol
        for child in children:
            out += b"--" + boundary + eol + self.entity(child) + eol
        out += b"--" + boundary + b"--"
        if extras:
            out += eol + b"epilogue text" + eol
        return out

    def message(self, tree) -> bytes:
        eol = self.eol
        head = [b"From: a@example.org", b"To: b@example.net", b"Subject: random", b"MIME-Version: 1.0"]
        return eol.join(head) + eol + self.entity(tree)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=tree_strategy(), crlf=st.booleans())
def test_random_mime_trees(tree, crlf, tmp_path_factory):
    renderer = Renderer(b"\r\n" if crlf else b"\n")
    message = renderer.message(tree)
    outcome = run(message, tmp_path_factory.mktemp("q"))
    original, result = parse(message), parse(outcome.data)
    before, after = leaves(original), leaves(result)
    assert len(before) == len(renderer.dangerous) == len(after)
    if not any(renderer.dangerous):
        assert outcome.data is message and outcome.verdict == ""
        return
    assert outcome.verdict.startswith(f"stripped {sum(renderer.dangerous)} part")
    if not crlf:
        assert b"\r" not in outcome.data
    expected_types = iter(["text/plain" if d else p.get_content_type() for p, d in zip(before, renderer.dangerous)])

    def expected_shape(message):
        if message.is_multipart():
            return (message.get_content_type(), tuple(expected_shape(p) for p in message.get_payload()))
        return next(expected_types)

    assert shape(result) == expected_shape(original)
    for old, new, dangerous in zip(before, after, renderer.dangerous):
        if dangerous:
            assert "removed from this message" in new.get_content() and new.defects == []
        else:
            assert new.items() == old.items()
            assert new.get_payload(decode=True) == old.get_payload(decode=True)
            assert [type(d) for d in new.defects] == [type(d) for d in old.defects]


TOKENS = [
    b"\r\n", b"\n", b"\r", b"--=_outer_6f1c2e", b"--=_outer_6f1c2e--", b"Content-Type: multipart/mixed; boundary=x\r\n",
    b"--x\r\n", b"Content-Type: message/rfc822\r\n\r\n", b"filename*0*=UTF-8''a%2E; filename*1*=exe", b"=?UTF-8?B?",
    b"\x00", b"\xff", b";", b'"', b":",
]
EDITS = st.lists(
    st.tuples(st.floats(0, 1), st.integers(0, 20), st.one_of(st.sampled_from(TOKENS), st.binary(max_size=6))),
    max_size=8,
)


@settings(max_examples=150, deadline=None)
@given(edits=EDITS)
def test_damaged_messages_never_crash_the_filter(edits):
    data = bytearray(sample("dkim-exe.eml"))
    for where, cut, insert in edits:
        position = int(where * len(data))
        data[position : position + cut] = insert
    message = bytes(data)
    try:
        outcome = run(message)
    except _mime.MimeError:
        return  # an ambiguous structure is refused, and the pipeline delivers it unchanged with a warning
    assert isinstance(outcome, FilterOutcome) and outcome.action == "deliver"
    if not outcome.verdict:
        assert outcome.data is message


# -- a real mail reader ----------------------------------------------------------------------------


def test_mutt_reads_a_stripped_message(tmp_path):
    mutt = require_tool("mutt", "mutt")
    outcome = run(sample("dkim-exe.eml"), tmp_path / "q")
    box = mailbox.mbox(tmp_path / "mbox")
    box.add(outcome.data)
    box.close()
    (tmp_path / "muttrc").write_text(f"set folder={tmp_path}\nset pipe_decode=yes\nset wait_key=no\n")
    env = dict(os.environ, HOME=str(tmp_path), TERM="vt100", LC_ALL="C.UTF-8", MAIL=str(tmp_path / "mbox"))
    out = tmp_path / "shown.txt"
    command = [mutt, "-n", "-F", str(tmp_path / "muttrc"), "-R", "-f", str(tmp_path / "mbox"),
               "-e", f'push "<pipe-message>cat >{out}<enter>"']
    controller, terminal = pty.openpty()
    process = subprocess.Popen(command, stdin=terminal, stdout=terminal, stderr=terminal, env=env, cwd=tmp_path)
    os.close(terminal)
    try:
        deadline, quit_sent = time.monotonic() + 20, False
        while process.poll() is None and time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.1)
            if ready:
                try:
                    os.read(controller, 65536)
                except OSError:
                    break
            elif out.exists() and not quit_sent:
                os.write(controller, b"q")  # back in the index after the pipe: quit
                quit_sent = True
        assert process.wait(timeout=5) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(controller)
    shown = out.read_text("utf-8")
    assert "Grüße aus Köln" in shown  # the 8-bit text part, decoded
    assert "An attachment was removed from this message by pop3proxy." in shown
    assert "File name:     Rechnung-2025-1127.pdf.exe" in shown and "Rule:          extension exe" in shown
    assert "This program cannot be run" not in shown
