"""Shared by the upstream POP3 client's tests (tests/integration/test_upstream.py,
test_upstream_faults.py): sample messages, endpoints at the real Dovecot and at the scripted fake
server, and a check that a secret never shows in an error.
"""

from __future__ import annotations

import traceback

import pytest

from pop3proxy.net.endpoint import Endpoint


real = pytest.mark.dovecot
HOST = "127.0.0.1"


def message(subject: str, *body_lines: str) -> bytes:
    lines = [
        "From: Sender <sender@example.org>",
        "To: Receiver <receiver@example.org>",
        f"Subject: {subject}",
        f"Message-ID: <{subject.replace(' ', '.')}@example.org>",
        "",
        *body_lines,
    ]
    return "".join(line + "\r\n" for line in lines).encode()


DOTTED = message(
    "dots",
    ".a line that starts with a dot",
    "..two dots",
    ".",
    "a lone dot above, and a line ending in a dot.",
    "",
    "  trailing spaces  ",
    "\tand a tab",
)


def headers_of(data: bytes) -> bytes:
    return data[: data.index(b"\r\n\r\n") + 2]


def at_dovecot(server, tls: str, **options) -> Endpoint:
    port = server.tls_port if tls == "implicit" else server.port
    options.setdefault("ca_file", str(server.ca_file))
    options.setdefault("timeout", 10.0)
    return Endpoint(server.host, port, tls, **options)


def at_fake(server, tls: str = "none", **options) -> Endpoint:
    options.setdefault("timeout", 0.5)
    return Endpoint(HOST, server.port, tls, **options)


def assert_secret_hidden(error: BaseException, *secrets: str) -> None:
    shown = [str(error), repr(error), "".join(traceback.format_exception(error)), repr(error.args)]
    for secret in secrets:
        for text in shown:
            assert secret not in text, text
