"""Tests for the attachments filter (filters/attachments.py): its options, its rules, file names in all
their disguises, byte exactness, the note and the quarantine.

The sample messages under tests/data/attachments/ are compared byte for byte. The structures a message
can take are tested in test_attachments_structure.py, random trees and damage in
test_attachments_properties.py; the helpers are in helpers/attachments.py.
"""

from __future__ import annotations

import email
import email.policy
import hashlib
import io
import stat
import zipfile

import pytest
from helpers.attachments import (
    EXE,
    TEXT_PART,
    attachment,
    b64,
    leaves,
    mixed,
    note_of,
    parse,
    plain_zip,
    run,
    sample,
    zipcrypto,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from pop3proxy.filtering.api import WARNING_HEADER, FilterConfigError, FilterContext
from pop3proxy.filtering.loader import load_filter
from pop3proxy.filtering.pipeline import Pipeline
from pop3proxy.filters.attachments import (
    DEFAULT_EXTENSIONS,
    FILTER,
    AttachmentsFilter,
    Config,
    encrypted_zip,
)


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
