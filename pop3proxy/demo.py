"""``pop3proxy demo``: a throw-away mailbox with realistic sample mail, served with no setup."""

from __future__ import annotations

import base64
from pathlib import Path

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"

DEMO_USER = "demo"


def DEMO_FILTERS(workdir: Path) -> list[dict]:
    """Spam tagging (built-in classifier: GTUBE until trained) and attachment stripping."""
    return [
        {"use": "spam", "backend": "builtin", "database": str(workdir / "bayes.sqlite")},
        {"use": "attachments"},
    ]

DEMO_PASSWORD = "demo"


def _crlf(text: str) -> bytes:
    from pop3proxy.pop3.dotstuff import to_crlf

    return to_crlf(text.encode("utf-8"))


def sample_messages() -> list[bytes]:
    """Plain text, a multipart with a harmless attachment, spam (the GTUBE string), and a message whose
    "PDF" attachment is really a Windows program."""
    welcome = _crlf(
        """Return-Path: <team@pop3proxy.example>
From: pop3proxy team <team@pop3proxy.example>
To: Demo User <demo@pop3proxy.example>
Subject: Welcome to pop3proxy
Date: Fri, 27 Nov 2026 09:00:00 +0000
Message-ID: <welcome@pop3proxy.example>
MIME-Version: 1.0
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: 8bit

Hello!

This mailbox is served by pop3proxy's demo. Any POP3 client can read it:
log in as "demo" with the password "demo".

.A line that starts with a dot is dot-stuffed on the wire and arrives intact.
Grüße from the demo.
"""
    )
    attachment = base64.encodebytes(b"name,amount\r\nwidgets,42\r\ngadgets,7\r\n").decode("ascii")
    invoice = _crlf(
        f"""From: Billing <billing@shop.example>
To: Demo User <demo@pop3proxy.example>
Subject: Your invoice
Date: Fri, 27 Nov 2026 10:30:00 +0000
Message-ID: <invoice-1@shop.example>
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="=-boundary-42"

This is a multi-part message in MIME format.

--=-boundary-42
Content-Type: text/plain; charset=us-ascii

Please find your invoice attached.

--=-boundary-42
Content-Type: text/csv; name="invoice.csv"
Content-Disposition: attachment; filename="invoice.csv"
Content-Transfer-Encoding: base64

{attachment}
--=-boundary-42--
"""
    )
    spam = _crlf(
        f"""From: "Prize Office" <winner@lottery.example>
To: demo@pop3proxy.example
Subject: You have WON!!!
Date: Fri, 27 Nov 2026 11:00:00 +0000
Message-ID: <spam-1@lottery.example>
MIME-Version: 1.0
Content-Type: text/plain; charset=us-ascii

Claim your prize now.

{GTUBE}
"""
    )
    stub = b"MZ\x90\x00" + b"\x00" * 60 + b"This program cannot be run in DOS mode."
    payload = base64.encodebytes(stub).decode("ascii")
    parcel = _crlf(
        f"""From: "Parcel Service" <noreply@parcels.example>
To: demo@pop3proxy.example
Subject: Your parcel could not be delivered
Date: Fri, 27 Nov 2026 12:15:00 +0000
Message-ID: <parcel-7@parcels.example>
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="parcel-boundary"

--parcel-boundary
Content-Type: text/plain; charset=us-ascii

Print the attached label to collect your parcel.

--parcel-boundary
Content-Type: application/pdf; name="label.pdf.exe"
Content-Disposition: attachment; filename="label.pdf.exe"
Content-Transfer-Encoding: base64

{payload}
--parcel-boundary--
"""
    )
    return [welcome, invoice, spam, parcel]


def try_it_lines(host: str, port: int, web_port: int | None = None) -> str:
    web = []
    if web_port is not None:
        shown = f"[{host}]" if ":" in host else host
        web = [f"Web console: http://{shown}:{web_port}/  (sign in as {DEMO_USER} / {DEMO_PASSWORD})"]
    return "\n".join(
        [
            f"pop3proxy demo: the proxy listens on {host} port {port}, in front of a built-in provider",
            "  holding sample mail; spam is tagged and a dangerous attachment is replaced on the way.",
            f"  user: {DEMO_USER}   password: {DEMO_PASSWORD}",
            "Try it:",
            f"  curl -s pop3://{DEMO_USER}:{DEMO_PASSWORD}@{host}:{port}/        # list messages",
            f"  curl -s pop3://{DEMO_USER}:{DEMO_PASSWORD}@{host}:{port}/1       # read message 1",
            f"  curl -s pop3://{DEMO_USER}:{DEMO_PASSWORD}@{host}:{port}/3       # spam, tagged X-Spam-Flag: YES",
            f"  curl -s pop3://{DEMO_USER}:{DEMO_PASSWORD}@{host}:{port}/4       "
            "# its .exe attachment replaced by a note",
            f"  python3 -c \"import poplib; p = poplib.POP3('{host}', {port}); p.user('{DEMO_USER}'); "
            f"p.pass_('{DEMO_PASSWORD}'); print(p.stat()); print(b'\\n'.join(p.retr(1)[1]).decode()); p.quit()\"",
            *web,
            "Press Ctrl-C to stop.",
        ]
    )


def prepare(workdir: Path) -> Path:
    """Create the users file and mailbox under ``workdir``; returns the users file."""
    from pop3proxy.proxy.credentials import set_password
    from pop3proxy.store import open_store

    users_file = workdir / "users"
    set_password(users_file, DEMO_USER, DEMO_PASSWORD)
    mailbox = open_store(workdir / "provider", DEMO_USER, "maildir")
    try:
        for message in sample_messages():
            mailbox.add(message)
    finally:
        mailbox.close()
    return users_file


async def run_demo(workdir: Path, host: str, port: int, on_ready) -> None:
    """The whole pipeline on one machine: a built-in provider, and the proxy in front of it.

    The provider is pop3proxy's standalone server on a free loopback port, holding the sample mail;
    the proxy logs in to it with the client's credentials, syncs the mail into its own cache and serves
    it, exactly as it would in front of a real provider. Stops on SIGINT or SIGTERM.
    """
    import signal

    import trio

    from pop3proxy.app import run_service
    from pop3proxy.config import Settings

    users_file = prepare(workdir)
    from pop3proxy.filtering.loader import filter_class

    filter_class("spam").create_database(workdir / "bayes.sqlite")  # an empty store: GTUBE only
    provider = Settings(
        listen={"host": "127.0.0.1", "port": 0},
        local={"users_file": users_file},
        cache={"root": workdir / "provider"},
    )
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            provider_ports = await nursery.start(run_service, provider)
            proxy = Settings(
                listen={"host": host, "port": port},
                upstream={"host": "127.0.0.1", "port": provider_ports.plain, "tls": "none"},
                cache={"root": workdir / "cache"},
                filters=DEMO_FILTERS(workdir),
                web={"host": host, "port": 0, "admins": [DEMO_USER]},
            )
            ports = await nursery.start(run_service, proxy)
            on_ready(ports)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break
