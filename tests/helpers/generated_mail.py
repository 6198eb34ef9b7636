"""Generated mail for comparing the spam filter's tokenizer with its reference
(tests/unit/test_tokens_reference.py): MIME trees of text, HTML and attachments in every transfer
encoding and several charsets, encoded header words, file names in their several forms, rendered
with CRLF, LF, lone CR or mixed line breaks, then damaged line by line.
"""

from __future__ import annotations

import base64
import binascii
import urllib.parse

from hypothesis import strategies as st

GTUBE_TEXT = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"

WORDS = st.sampled_from([
    "hello", "Meeting", "tomorrow", "FREE", "viagra", "Grüße", "naïve", "€100", "don't", "e-mail",
    "it's.", "x", "ab", "https://www.shop.example/x?y=1", "http://a.b.example.org.", "ftp://files.example",
    "<a href=\"http://click.example.com/t\">here</a>", "&amp;", "&eacute;t&eacute;", "<p>", "</div>",
    "someone@mail.example.net", "supercalifragilisticexpialidocious-and-more", "=", "=3D", "=\n", "--b1",
    "From the desk", "日本語", "\u00a0", "a_b", "$5", "100%", GTUBE_TEXT,
])
TEXT = st.lists(WORDS, max_size=12).map(" ".join)
LINES_OF_TEXT = st.lists(TEXT, min_size=0, max_size=4).map("\n".join)

CHARSETS = st.sampled_from([None, "utf-8", "UTF-8", "iso-8859-1", "latin-1", "us-ascii", "x-unknown-8bit",
                            "windows-1252", "bogus charset", "utf-8\"", "*utf-8''"])
ENCODINGS = st.sampled_from([None, "7bit", "8bit", "binary", "base64", "quoted-printable", "BASE64 ",
                             " Quoted-Printable", "x-uuencode", "x-token"])
TYPES = st.sampled_from([None, "text/plain", "text/html", "TEXT/HTML", "text/calendar", "application/pdf",
                         "application/octet-stream", "image/png", "text", "text/plain/extra"])
NAMES = st.sampled_from([None, "report.pdf", "README", "photo.JPG", "archive.tar.gz", "naïve file.doc",
                         "=?utf-8?b?w6TDtsO8LnR4dA==?=", ".hidden", "trailing.", "a.b.c.exe"])
NAME_FORMS = st.sampled_from(["filename", "name", "rfc2231", "rfc2231-continued", "unquoted", "both"])

HEADER_NAMES = ["Subject", "From", "To", "Cc", "Reply-To", "Return-Path", "X-Mailer", "User-Agent", "List-Id",
                "Precedence", "Organization", "Date", "Message-ID", "X-Other", "subject", "FROM"]
HEADER_VALUES = st.sampled_from([
    "Quarterly report", "=?utf-8?b?R3LDvMOfZSBhdXMgS8O2bG4=?=", "=?iso-8859-1?q?caf=E9_cr=E8me?=",
    "=?x-unknown?q?abc?=", "=?utf-8?q?broken", "Anna Berg <anna.berg@example.org>",
    "=?utf-8?q?J=C3=BCrgen?= <j@mail.example.com>", "<bounce@lists.example.net>", "bulk",
    "Mailer 2.0 (compatible)", "a, b@c.example, \"Last, First\" <lf@x.example>", "", "caf\u00e9 8bit",
    "WIN BIG MONEY NOW!!!", "=?utf-8?b?!!!?=",
])
EOLS = st.sampled_from(["crlf", "lf", "cr", "mixed"])
BOUNDARIES = st.sampled_from(["b1", "b2", "b1", "b2", "=_outer=", "b1 ", "", "x:y"])

# Damage done to the rendered lines: (where, what) pairs, where is a fraction of the line count.
DAMAGE_LINES = [
    "", "--b1", "--b1--", "--b2", "--b2--", "--", "From x@y Mon Jan 1", "From: again@example.org",
    "Content-Type: multipart/mixed; boundary=b1", "Content-Type: message/rfc822",
    "Content-Type: message/delivery-status", "Content-Transfer-Encoding: base64", " folded continuation",
    ": no name", "not a header line", "=?utf-8?b?", "--b1  ", "--b1--trailing",
]
DAMAGE = st.lists(
    st.tuples(st.floats(0, 1), st.one_of(st.sampled_from(["delete", "duplicate", "truncate"]),
                                         st.sampled_from(DAMAGE_LINES))),
    max_size=3,
)


@st.composite
def leaf(draw) -> list[str]:
    """A part that holds no other part, as header lines, a blank line and body lines (str: bytes
    beyond ASCII are written as latin-1 characters)."""
    ctype, charset, cte = draw(TYPES), draw(CHARSETS), draw(ENCODINGS)
    text = draw(LINES_OF_TEXT)
    if ctype and "html" in ctype.lower():
        text = f"<html><body><p>{text}</p><a href='http://{draw(st.sampled_from(['x.example', 'a.b.c.example']))}'>"
    headers = []
    if ctype:
        headers.append(f"Content-Type: {ctype}" + (f"; charset={charset}" if charset else ""))
    name = draw(NAMES)
    if name:
        headers += _name_headers(name, draw(NAME_FORMS), ctype)
    if cte:
        headers.append(f"Content-Transfer-Encoding: {cte}")
    body = _encode(text, charset, (cte or "").strip().lower(), draw(st.booleans()))
    return headers + [""] + body


def _name_headers(name: str, form: str, ctype: str | None) -> list[str]:
    quoted = name if name.isascii() else name.encode().decode("latin-1")
    if form == "name":
        return [f"Content-Type: {ctype or 'application/octet-stream'}; name=\"{quoted}\""]
    if form == "rfc2231":
        return ["Content-Disposition: attachment; filename*=UTF-8''" + urllib.parse.quote(name)]
    if form == "rfc2231-continued":
        half = len(name) // 2
        return [f"Content-Disposition: attachment; filename*0=\"{name[:half]}\";", f" filename*1=\"{name[half:]}\""]
    if form == "unquoted":
        return [f"Content-Disposition: attachment; filename={quoted}"]
    if form == "both":
        return [f"Content-Disposition: inline; filename=\"{quoted}\"; filename=\"other.txt\""]
    return [f"Content-Disposition: attachment; filename=\"{quoted}\""]


def _encode(text: str, charset: str | None, cte: str, broken: bool) -> list[str]:
    try:
        raw = text.encode(charset or "utf-8")
    except (LookupError, UnicodeError):
        raw = text.encode("utf-8")
    if cte == "base64":
        encoded = base64.encodebytes(raw).decode("ascii")
        if broken:
            encoded = encoded[: max(0, len(encoded) - 3)] + "!*"
        return encoded.splitlines() or [""]
    if cte == "quoted-printable":
        encoded = binascii.b2a_qp(raw, istext=True).decode("ascii")
        return (encoded + ("=ZZ=" if broken else "")).split("\n")
    if cte == "x-uuencode":
        return ["begin 644 file.txt", "#86)C", "`", "end"] if not broken else ["begin 644 x", "!!!"]
    return raw.decode("latin-1").split("\n")


def tree(depth: int = 3):
    children = st.deferred(lambda: tree(depth - 1)) if depth > 0 else leaf()
    return st.one_of(
        leaf(),
        leaf(),
        st.builds(_multipart, st.sampled_from(["mixed", "alternative", "related", "digest", "report"]), BOUNDARIES,
                  st.lists(children, min_size=0, max_size=3), st.booleans(), st.booleans()),
        st.builds(_message, children, st.sampled_from(["message/rfc822", "message/delivery-status",
                                                       "message/partial"]), st.sampled_from([None, "base64"])),
    )


def _multipart(subtype: str, boundary: str, parts: list[list[str]], preamble: bool, close: bool) -> list[str]:
    param = boundary if boundary.isalnum() else f'"{boundary}"'
    lines = [f"Content-Type: multipart/{subtype}; boundary={param}", ""]
    if preamble:
        lines.append("This is a multi-part message in MIME format.")
    for part in parts:
        lines += [f"--{boundary}", *part]
    if close:
        lines += [f"--{boundary}--", "epilogue"]
    return lines


def _message(inner: list[str], ctype: str, cte: str | None) -> list[str]:
    headers = [f"Content-Type: {ctype}"] + ([f"Content-Transfer-Encoding: {cte}"] if cte else [])
    inner_headers = ["Subject: inner", "Reporting-MTA: dns; mx.example"] if "status" in ctype else ["Subject: inner"]
    return headers + [""] + inner_headers + inner


@st.composite
def messages(draw) -> bytes:
    """A whole message: top header fields, a MIME tree, damage, line breaks."""
    top = []
    for name in draw(st.lists(st.sampled_from(HEADER_NAMES), max_size=6)):
        value = draw(HEADER_VALUES)
        top.append(f"{name}: {value}")
        if draw(st.integers(0, 4)) == 0:
            top.append(f"\t{draw(HEADER_VALUES)}")
    if draw(st.booleans()):
        top.insert(0, "From sender@example.org Mon Jan  1 00:00:00 2024")
    lines = top + (["MIME-Version: 1.0"] if draw(st.booleans()) else []) + draw(tree())
    for where, what in draw(DAMAGE):
        at = int(where * len(lines))
        if what == "delete":
            del lines[at : at + 1]
        elif what == "duplicate":
            lines[at:at] = lines[at : at + 1]
        elif what == "truncate":
            lines = lines[:at]
        else:
            lines.insert(at, what)
    return _join(lines, draw(EOLS), draw(st.lists(st.sampled_from(["\r\n", "\n", "\r"]), min_size=1)),
                 draw(st.booleans()))


def _join(lines: list[str], eol: str, mixed: list[str], final: bool) -> bytes:
    if eol == "mixed":
        out = "".join(line + mixed[i % len(mixed)] for i, line in enumerate(lines))
    else:
        sep = {"crlf": "\r\n", "lf": "\n", "cr": "\r"}[eol]
        out = sep.join(lines) + (sep if final else "")
    return out.encode("latin-1", "replace")
