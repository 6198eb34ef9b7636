"""A private redis for rspamd's Bayes statistics (rspamd 3.4 keeps them in redis only).

Started by the ``rspamd`` fixture (tests/helpers/daemons.py) before rspamd and stopped after it, like
the other daemons: its own process group, a free loopback port, a temporary directory.
"""

from __future__ import annotations

import socket

from helpers.daemons import HOST, Daemon


class Redis(Daemon):
    """A redis that keeps everything in memory (no snapshots, no append-only file), loopback only."""

    name = "redis"
    start_timeout = 30.0

    def __init__(self, binary: str) -> None:
        super().__init__()
        self.binary = binary

    def command(self) -> list[str]:
        return [
            self.binary, "--bind", HOST, "--port", str(self.port), "--save", "", "--appendonly", "no",
            "--dir", str(self.root), "--unixsocket", "", "--logfile", str(self.root / "redis.log"),
            "--daemonize", "no", "--databases", "1",
        ]

    def ready(self) -> bool:
        try:
            with socket.create_connection((HOST, self.port), timeout=2.0) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False
