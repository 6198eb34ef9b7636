"""Cluster nodes for the tests: `pop3proxy serve` processes sharing one PostgreSQL database (the
session's server, see helpers/postgres.py) and one cache root, in front of the test's Dovecot."""

from __future__ import annotations

import poplib
import subprocess
import sys
from pathlib import Path

from helpers.common import HOST, ServerProcess, write_config


def url_of(conninfo: str) -> str:
    """The ``postgresql://`` URL of a conninfo (host, port, user, dbname)."""
    from psycopg.conninfo import conninfo_to_dict

    parts = conninfo_to_dict(conninfo)
    return f"postgresql://{parts['user']}@{parts['host']}:{parts['port']}/{parts['dbname']}"


class Cluster:
    """The configuration shared by the nodes: one database, one cache root, one provider."""

    def __init__(self, factory, tmp_path: Path, dovecot, database: str, **sections) -> None:
        self.factory = factory
        self.tmp_path = tmp_path
        self.root = tmp_path / "cache"
        self.dovecot = dovecot
        self.database = database  # a postgresql:// URL
        self.sections = sections
        self.nodes: dict[str, ServerProcess] = {}

    def config(self, node: str, **overrides) -> Path:
        sections: dict[str, dict] = {
            "listen": {"host": HOST, "port": 0, "workers": 1},
            "upstream": {"host": HOST, "port": self.dovecot.tls_port, "tls": "implicit",
                         "ca_file": str(self.dovecot.ca_file), "timeout": 5},
            "cache": {"root": self.root},
            "log": {"level": "debug"},
            "cluster": {"database": self.database, "node": node, "heartbeat": 1, "database_timeout": 3},
        }
        for name, values in {**self.sections, **overrides}.items():
            sections[name] = {**sections.get(name, {}), **values}
        return write_config(self.tmp_path / f"{node}.toml", sections)

    def upgrade(self) -> subprocess.CompletedProcess[str]:
        return self.run("db", "upgrade")

    def run(self, *argv: str, node: str = "tool") -> subprocess.CompletedProcess[str]:
        """A `pop3proxy` command with this cluster's configuration."""
        return subprocess.run([sys.executable, "-m", "pop3proxy", *argv, "--config", str(self.config(node))],
                              capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)

    def start(self, node: str, **overrides) -> ServerProcess:
        process = self.factory(self.config(node, **overrides)).start()
        self.nodes[node] = process
        return process

    def client(self, node: str, user: str, password: str) -> poplib.POP3:
        client = poplib.POP3(HOST, self.nodes[node].port, timeout=30)
        client.user(user)
        client.pass_(password)
        return client
