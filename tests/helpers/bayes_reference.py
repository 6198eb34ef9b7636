"""Today's tokenizer and GTUBE look, kept as the reference the built-in spam filter's must agree with.

This is the code of ``pop3proxy.filters._bayes`` before the tokens were read from the message's own
bytes: every message parsed with ``email.message_from_bytes(data, policy=compat32)``. A trained
store's tokens mean what this code gives; tests/unit/test_tokens_reference.py checks that the filter's
`tokens` and `has_gtube` give the same for generated and sample messages. Not to be changed.
"""

from __future__ import annotations

import email
import email.header
import email.message
import email.policy
import html
import re
from collections.abc import Iterator
from pathlib import Path

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


def _header_text(value: object) -> str:
    """A header's text with RFC 2047 encoded words decoded (best effort)."""
    try:
        return str(email.header.make_header(email.header.decode_header(str(value))))
    except Exception:
        return str(value)


def parse(message: bytes) -> email.message.Message:
    # compat32 parses lazily and fast; the few headers read are decoded by _header_text.
    return email.message_from_bytes(message, policy=email.policy.compat32)


def tokens(message: bytes, msg: email.message.Message | None = None) -> set[str]:
    """The set of tokens that stand for a message (``msg``: the message already parsed by `parse`)."""
    msg = msg if msg is not None else parse(message)
    found: set[str] = set()
    for name in _HEADERS:
        for value in msg.get_all(name, []) or []:
            text = _header_text(value)
            found.update(_words(text, f"{name}:"))
            found.update(f"{name}:@{domain.lower()}" for domain in _EMAIL.findall(text))
    found.add(f"mime:{'multipart' if msg.is_multipart() else 'single'}")
    for part in msg.walk():
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        found.add(f"ctype:{ctype}")
        cte = str(part.get("content-transfer-encoding", "7bit")).strip().lower()
        found.add(f"cte:{cte}")
        filename = _header_text(part.get_filename() or "")
        if filename:
            suffix = Path(str(filename)).suffix.lower()
            found.add(f"filename:{suffix or 'none'}")
        if part.get_content_maintype() != "text" or (filename and ctype != "text/plain"):
            continue
        text = _part_text(part)
        found.update(_links(text))
        if ctype == "text/html":
            text = html.unescape(_TAG.sub(" ", text))
        found.update(_words(text))
    return found


def has_gtube(message: bytes, msg: email.message.Message | None = None) -> bool:
    """Whether the message carries the GTUBE test string, raw or in a decoded text part (``msg``: the
    message already parsed by `parse`)."""
    if GTUBE in message:
        return True
    gtube = GTUBE.decode("ascii")
    try:
        for part in (msg if msg is not None else parse(message)).walk():
            if part.get_content_maintype() == "text" and gtube in _part_text(part):
                return True
    except Exception:
        return False
    return False
