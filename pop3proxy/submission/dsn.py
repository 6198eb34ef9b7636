"""Delivery status notifications (RFC 3464) for mail that cannot be delivered, stored in the
sender's own cache so the next POP3 login shows the bounce.
"""

from __future__ import annotations

import email.utils
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

from pop3proxy.filtering.headers import header_end
from pop3proxy.pop3.dotstuff import to_crlf
from pop3proxy.submission.provider import _ENHANCED, EHLO_NAME

log = logging.getLogger("pop3proxy.smtp")


@dataclass(frozen=True)
class Failure:
    recipient: str
    code: int
    text: str

    @property
    def status(self) -> str:
        match = _ENHANCED.match(self.text)
        if match:
            return match.group(0)
        return "5.0.0" if self.code >= 500 else "4.0.0"


def _header_block(message: bytes, limit: int = 64 * 1024) -> bytes:
    """The message's header block (at most ``limit`` octets) in CRLF form, ending with CRLF."""
    head = to_crlf(message[: header_end(message)][:limit])
    return head if head.endswith(b"\r\n") else head + b"\r\n"


def _ascii(text: str) -> str:
    return "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text)


def build_dsn(
    *,
    sender: str,
    failures: Sequence[Failure],
    original: bytes,
    arrival: float,
    explanation: str,
    queue_id: str | None = None,
    now: float | None = None,
) -> bytes:
    """A delivery status notification (RFC 3464 multipart/report) for the sender's mailbox."""
    now = time.time() if now is None else now
    boundary = f"=_pop3proxy_{secrets.token_hex(12)}"
    to = f"<{_ascii(sender)}>" if sender else "undisclosed-recipients:;"
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{EHLO_NAME}>",
        f"To: {to}",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {email.utils.formatdate(now)}",
        f"Message-ID: {email.utils.make_msgid('pop3proxy-dsn', domain=EHLO_NAME)}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated delivery report.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "Content-Description: Notification",
        "",
        f"This is pop3proxy on {EHLO_NAME}.",
        "",
        _ascii(explanation),
        "",
        "Your message could not be delivered to:",
        "",
    ]
    for failure in failures:
        lines.append(f"  <{_ascii(failure.recipient)}>: {_ascii(f'{failure.code} {failure.text}')}")
    lines += [
        "",
        "The headers of your message are attached below.",
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "Content-Description: Delivery report",
        "",
        f"Reporting-MTA: dns; {EHLO_NAME}",
    ]
    if queue_id:
        lines.append(f"X-POP3Proxy-Queue-ID: {queue_id}")
    lines.append(f"Arrival-Date: {email.utils.formatdate(arrival)}")
    for failure in failures:
        lines += [
            "",
            f"Final-Recipient: rfc822; {_ascii(failure.recipient)}",
            "Action: failed",
            f"Status: {failure.status}",
            f"Diagnostic-Code: smtp; {_ascii(f'{failure.code} {failure.text}')}",
            f"Last-Attempt-Date: {email.utils.formatdate(now)}",
        ]
    lines += [
        "",
        f"--{boundary}",
        "Content-Type: text/rfc822-headers",
        "Content-Description: Undelivered message headers",
        "",
    ]
    head = "\r\n".join(lines).encode("ascii") + b"\r\n"
    return head + _header_block(original) + f"\r\n--{boundary}--\r\n".encode("ascii")


def store_bounce(settings, cache_id: str, dsn: bytes) -> str:
    """Put a report into the cached mailbox of ``cache_id`` (fsync'ed); returns its key."""
    from pop3proxy.store import open_store

    with open_store(settings.cache.root, cache_id, settings.cache.backend) as mailbox:
        return mailbox.add(dsn).key


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds:.3g} seconds"
