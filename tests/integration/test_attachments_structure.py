"""Tests for the attachments filter's raw-byte MIME scanner on the structures a message can take:
nesting, attached messages, damaged messages, and big messages.
"""

from __future__ import annotations

import base64
import email
import email.policy
import hashlib
import os
import stat
import time

import pytest
from helpers.attachments import EXE, TEXT_PART, attachment, b64, leaves, mixed, parse, run, sample, shape

from pop3proxy.filters import _mime


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
