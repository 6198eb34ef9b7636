"""The tokens that stand for a message in the built-in spam classifier, and the GTUBE look.

Tokens come from the headers that tell spam from ham (Subject, From, Reply-To, Content-Type, the
mailer, ...) and from the decoded text of every text part (quoted-printable and base64 decoded,
charsets applied, HTML tags dropped, link targets kept as ``url:`` tokens), lower-cased; each token
counts once per message.

What a token is was defined over ``email.message_from_bytes(data, policy=compat32)``, and a trained
store's counts keep that meaning: the parts are now found in the message's own bytes by
`pop3proxy.filters._parts` (the same parts, header fields and bodies, without splitting every body
into lines), and a part's text is still decoded by ``email.message.Message`` itself.
"""

from __future__ import annotations

import email.header
import email.message
import html
import re
from collections.abc import Iterator
from pathlib import Path

from pop3proxy.filters._parts import Part, Reading, parse

__all__ = ["GTUBE", "Reading", "has_gtube", "parse", "tokens"]

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"

MIN_WORD, MAX_WORD = 3, 24
_MAX_TEXT = 512 * 1024  # decoded text examined per part

_HEADERS = ("subject", "from", "reply-to", "to", "cc", "return-path", "x-mailer", "user-agent",
            "content-type", "list-id", "precedence", "organization")
_WORD = re.compile(r"[^\W_][\w'$€£%.-]*[^\W_$]|[^\W_]", re.UNICODE)
_URL = re.compile(r"(?:https?|ftp)://([^\s/\"'<>:?#]+)", re.I)
_EMAIL = re.compile(r"[\w.+-]+@([\w-]+(?:\.[\w-]+)+)")
_TAG = re.compile(r"<[^>]*>")


def _words(text: str, prefix: str = "") -> Iterator[str]:
    for word in _WORD.findall(text.lower()):
        word = word.strip("'.-")
        if len(word) < MIN_WORD:
            continue
        if len(word) > MAX_WORD:
            yield f"{prefix}skip:{word[0]} {len(word) // 10 * 10}"
        else:
            yield prefix + word


def _links(text: str) -> Iterator[str]:
    for host in _URL.findall(text):
        host = host.lower().rstrip(".")
        yield f"url:{host}"
        parts = host.split(".")
        if len(parts) > 2:
            yield "url:" + ".".join(parts[-2:])


def _part_text(part: email.message.Message) -> str:
    try:
        payload = part.get_payload(decode=True)
    except Exception:
        payload = None
    if not isinstance(payload, bytes):
        return ""
    payload = payload[:_MAX_TEXT]
    charset = part.get_content_charset() or "us-ascii"
    try:
        return payload.decode(charset, "replace")
    except LookupError:
        return payload.decode("latin-1")


def _text(part: Part) -> str:
    """The part's decoded text (decoded once, for the GTUBE look and the tokens alike)."""
    if part.text is None:
        part.text = _part_text(part.content())
    return part.text


def _header_text(value: object) -> str:
    """A header's text with RFC 2047 encoded words decoded (best effort)."""
    try:
        return str(email.header.make_header(email.header.decode_header(str(value))))
    except Exception:
        return str(value)


def tokens(message: bytes, msg: Reading | None = None) -> set[str]:
    """The set of tokens that stand for a message (``msg``: the message already read by `parse`)."""
    reading = msg if msg is not None else parse(message)
    found: set[str] = set()
    for name in _HEADERS:
        for value in reading.headers.get_all(name, []) or []:
            text = _header_text(value)
            found.update(_words(text, f"{name}:"))
            found.update(f"{name}:@{domain.lower()}" for domain in _EMAIL.findall(text))
    found.add(f"mime:{'multipart' if reading.multipart else 'single'}")
    for part in reading.parts:
        headers = part.message
        ctype = headers.get_content_type()
        found.add(f"ctype:{ctype}")
        cte = str(headers.get("content-transfer-encoding", "7bit")).strip().lower()
        found.add(f"cte:{cte}")
        filename = _header_text(headers.get_filename() or "")
        if filename:
            suffix = Path(str(filename)).suffix.lower()
            found.add(f"filename:{suffix or 'none'}")
        if headers.get_content_maintype() != "text" or (filename and ctype != "text/plain"):
            continue
        text = _text(part)
        found.update(_links(text))
        if ctype == "text/html":
            text = html.unescape(_TAG.sub(" ", text))
        found.update(_words(text))
    return found


def has_gtube(message: bytes, msg: Reading | None = None) -> bool:
    """Whether the message carries the GTUBE test string, raw or in a decoded text part (``msg``: the
    message already read by `parse`)."""
    if GTUBE in message:
        return True
    gtube = GTUBE.decode("ascii")
    try:
        for part in (msg if msg is not None else parse(message)).parts:
            if part.message.get_content_maintype() == "text" and gtube in _text(part):
                return True
    except Exception:
        return False
    return False
