"""A pop3proxy process in front of the test Dovecot, and what proxy tests check with it."""

from __future__ import annotations

import poplib
import socket
from pathlib import Path

from helpers.common import (
    HOST,
    ServerProcess,
    write_config,
)
from pop3proxy.store import open_store


def sample(i: int, size: int = 0) -> bytes:
    body = b"".join(b"line %d of message %d\r\n" % (n, i) for n in range(max(1, size // 24)))
    return (
        b"From: sender%d@example.org\r\nTo: someone@example.net\r\nSubject: message %d\r\n"
        b"Message-ID: <%d@example.org>\r\n\r\n.dot first\r\n" % (i, i, i)
    ) + body


def closed_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Proxy:
    """A proxy process in front of the test's Dovecot, with its cache root."""

    def __init__(self, factory, tmp_path: Path, dovecot, **sections) -> None:
        self.root = tmp_path / "cache"
        self.tmp_path = tmp_path
        self.dovecot = dovecot
        self.factory = factory
        self.process: ServerProcess | None = None
        self.sections = sections

    def config(self, **overrides) -> Path:
        upstream = {
            "host": HOST,
            "port": self.dovecot.tls_port,
            "tls": "implicit",
            "ca_file": str(self.dovecot.ca_file),
            "timeout": 5,
        }
        upstream.update(self.sections.get("upstream", {}))
        upstream.update(overrides.pop("upstream", {}))
        sections = {
            "listen": {"host": HOST, "port": 0},
            "upstream": upstream,
            "cache": {"root": self.root, **self.sections.get("cache", {})},
            "log": {"level": "debug"},
        }
        for name, values in {**self.sections, **overrides}.items():
            if name not in ("upstream", "cache"):
                sections[name] = values
        return write_config(self.tmp_path / "proxy.toml", sections)

    def start(self, **overrides) -> "Proxy":
        self.stop()
        self.process = self.factory(self.config(**overrides)).start()
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process = None

    def client(self, user: str, password: str) -> poplib.POP3:
        assert self.process is not None
        try:
            client = poplib.POP3(HOST, self.process.port, timeout=30)
        except ConnectionRefusedError:
            running = self.process.proc is not None and self.process.proc.poll() is None
            raise AssertionError(f"proxy not listening (running: {running}):\n{self.process.output()}") from None
        client.user(user)
        client.pass_(password)
        return client

    def output(self) -> str:
        return self.process.output() if self.process else ""


def retr_all(client: poplib.POP3) -> list[bytes]:
    count, _ = client.stat()
    return [b"\r\n".join(client.retr(i)[1]) + b"\r\n" for i in range(1, count + 1)]


def cached(proxy: Proxy, user: str, backend: str = "maildir") -> list[bytes]:
    with open_store(proxy.root, user, backend) as mailbox:
        out = []
        for info in mailbox.list():
            with mailbox.open(info.key) as f:
                out.append(f.read())
        return out
