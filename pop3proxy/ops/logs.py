"""Logging: human-readable lines by default, JSON lines with ``log.format = "json"``.

``setup_logging(settings.log)`` configures the root logger once for the process (calling it again
replaces the previous set-up). Both formats go to standard error.

JSON: one object per line with ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message`` and every
structured field the call site passed with ``extra=``::

    log.info("session end", extra={"user": "alice", "peer": "127.0.0.1", "messages": 3, "bytes": 5120,
                                   "duration": 0.42})
    → {"time": "...", "level": "info", "logger": "pop3proxy", "message": "session end", "user": "alice", ...}

What never reaches a log line:

- credentials: a filter on the handler masks the argument of ``PASS``, ``AUTH <mechanism> <blob>``,
  ``APOP <name> <digest>`` and base64 SASL blobs wherever they appear, and any string registered with
  `add_secrets` (the passwords of configured accounts) that is at least `MIN_MASKED` characters long.
  A shorter secret is never masked in free text: it occurs by chance inside ordinary words ("fail" in
  "Authentication failed"), and "Authentication ***ed" would show what it is; any other reaction to it
  (withholding the line) would still tell, over many lines, which text contains it. Where a short
  password can really appear — the provider's answer to a login — the text is not logged at all
  (`net.pop3_client`). Call sites must not log passwords in the first place; this is the safety net.
- tracebacks: an exception is logged as one line, ``Type: message``, whatever the level.
- message bodies: aiosmtpd logs every DATA line at debug level under ``mail.log``; that logger (and
  ``asyncio``'s) is kept at warning or above.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from collections.abc import Iterable
from typing import IO

__all__ = ["MIN_MASKED", "JsonFormatter", "RedactingFilter", "TextFormatter", "add_secrets", "redact",
           "setup_logging"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUIET_LOGGERS = ("mail.log", "asyncio")  # third-party loggers that log client data at low levels
MASK = "***"
MIN_MASKED = 8  # secrets shorter than this are never looked for in free text (see above)

# LogRecord attributes that are not structured fields.
_STANDARD = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
) | {"message", "asctime", "taskName"}

_PATTERNS = [
    # POP3 PASS: the rest of the line (a password may contain spaces)
    (re.compile(r"(\b(?:PASS|[Pp]ass)\s+)[^\r\n'\"]+"), r"\1" + MASK),
    # AUTH PLAIN <blob>, AUTH LOGIN <blob>, AUTH XOAUTH2 <blob> …
    (re.compile(r"(?i)(\bAUTH\s+[A-Z0-9_-]+\s+)[A-Za-z0-9+/=]+"), r"\1" + MASK),
    # APOP name digest
    (re.compile(r"(?i)(\bAPOP\s+\S+\s+)[0-9a-f]{32}"), r"\1" + MASK),
    # password=..., "password": "..."
    (re.compile(r"(?i)(\bpassw(?:or)?d['\"]?\s*[:=]\s*['\"]?)[^'\"\s,}]+"), r"\1" + MASK),
]

# Each pattern above needs one of these words (PASS/Pass/pass and passw(or)d: "pass"), case aside: text
# without any of them is left as it is without running the patterns (most log lines, most fields).
_KEYWORDS = re.compile(r"(?i)pass|auth|apop")

_secrets: set[str] = set()
_secrets_lock = threading.Lock()
_longest_first: tuple[str, ...] = ()  # _secrets, longest first: what redact() looks for, in that order


def add_secrets(values: Iterable[str | None]) -> None:
    """Strings to mask wherever they appear in a log line (for example configured passwords); those
    shorter than `MIN_MASKED` are left out: masking them in ordinary words would show what they are."""
    global _longest_first
    with _secrets_lock:
        for value in values:
            if value and len(value) >= MIN_MASKED:
                _secrets.add(value)
        _longest_first = tuple(sorted(_secrets, key=len, reverse=True))


def _may_hold_credential(text: str) -> bool:
    """False when none of the patterns can match ``text``. ASCII text (nearly all) is checked with plain
    substring tests; other text with the same case-insensitive matching as the patterns' (where "ſ" is an
    "s", for instance)."""
    if text.isascii():
        lowered = text.lower()
        return "pass" in lowered or "auth" in lowered or "apop" in lowered
    return _KEYWORDS.search(text) is not None


def redact(text: str) -> str:
    """``text`` with anything that looks like a credential replaced by ``***``."""
    if _may_hold_credential(text):
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
    known = _longest_first  # replaced whole by add_secrets: no lock needed to read it
    if known and len(text) >= len(known[-1]):  # a shorter text cannot hold any of them
        for secret in known:
            if secret in text:
                text = text.replace(secret, MASK)
    return text


def _fields(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class RedactingFilter(logging.Filter):
    """Masks credentials in the message and in string-valued structured fields. Never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: keep what there is, without the arguments
            message = str(record.msg)
        cleaned = redact(message)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        for key, value in _fields(record).items():
            if isinstance(value, str):
                setattr(record, key, redact(value))
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            record.exc_text = redact(f"{type(exc).__name__}: {exc}")
            record.exc_info = None
        record.stack_info = None
        return True


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message``, an exception as `` (Type: message)`` on the same line."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        line = self.formatMessage(self._prepare(record))
        if record.exc_text:
            line += f" ({record.exc_text})"
        elif record.exc_info and record.exc_info[1] is not None:
            line += f" ({type(record.exc_info[1]).__name__}: {record.exc_info[1]})"
        return line.replace("\r", "\\r").replace("\n", "\\n")

    def _prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record.asctime = self.formatTime(record, self.datefmt)
        return record

    def formatException(self, ei) -> str:  # noqa: N802 (logging's name)
        return f"{ei[0].__name__}: {ei[1]}" if ei and ei[0] else ""


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the record's structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in _fields(record).items():
            if key in data:
                key = f"field_{key}"
            data[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        if record.exc_text:
            data["error"] = record.exc_text
        elif record.exc_info and record.exc_info[1] is not None:
            data["error"] = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
        return json.dumps(data, ensure_ascii=False, default=str)


def setup_logging(log_settings, stream: IO[str] | None = None, *,
                  secrets: Iterable[str | None] = ()) -> logging.Handler:
    """Configure the root logger from a ``[log]`` section (``level``, ``format``); returns the handler."""
    level = getattr(logging, str(getattr(log_settings, "level", "info")).upper(), logging.INFO)
    fmt = getattr(log_settings, "format", "text")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RedactingFilter())
    add_secrets(secrets)
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    logging.captureWarnings(True)
    return handler
