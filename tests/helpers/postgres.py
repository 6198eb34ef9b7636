"""A real PostgreSQL server for the tests: started once per test session, in a temporary directory, on
a free loopback port, and stopped (``pg_ctl -m fast``) and removed at the end.

- The server binaries (``initdb``, ``pg_ctl``) are looked for in ``/usr/lib/postgresql/<version>/bin``
  (Debian keeps them off ``PATH``), the newest first; ``POP3PROXY_PG_BINDIR`` names another folder.
  None found fails the test naming the package to install; nothing is skipped.
- ``initdb`` refuses to run as root: as root the server runs as the ``postgres`` system user (the Debian
  package creates it) on a directory that user owns; otherwise as the user running the tests.
- The Unix socket goes to the temporary directory, never the system's; it listens on 127.0.0.1 only,
  with ``trust`` authentication (a throw-away server no one else can reach).

Fixtures: ``postgres_server`` (the session's server) and ``postgres_db`` (a fresh database for each
test, dropped after it: tests never see each other's rows or advisory locks).
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

HOST = "127.0.0.1"
START_TIMEOUT = 120  # seconds pg_ctl waits for the server to accept connections (a loaded machine)
INSTALL_HINT = "install it with `apt-get install postgresql` (or run .ci/install-deps.sh as root)"


def server_bindir() -> Path:
    """The folder holding ``initdb`` and ``pg_ctl``; fails the test when there is none."""
    named = os.environ.get("POP3PROXY_PG_BINDIR")
    candidates = [named] if named else sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name) if
        Path(p).parent.name.isdigit() else 0, reverse=True)
    for folder in candidates:
        if os.access(Path(folder) / "initdb", os.X_OK) and os.access(Path(folder) / "pg_ctl", os.X_OK):
            return Path(folder)
    where = named or "/usr/lib/postgresql/*/bin"
    pytest.fail(f"the PostgreSQL server (initdb, pg_ctl) is not installed in {where}: {INSTALL_HINT}",
                pytrace=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class PostgresServer:
    """A running server: connect as ``user`` to ``host``:``port`` (any database it has)."""

    bindir: Path
    root: Path  # the temporary directory: data/, the socket, the log
    port: int = 0
    user: str = "postgres"
    host: str = HOST
    started_in: float = 0.0  # seconds from initdb to accepting connections
    settings: tuple[str, ...] = ()  # more server settings, "name=value" (the benchmark's pg_stat_statements)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "postgres.log"

    def conninfo(self, dbname: str = "postgres") -> str:
        return f"host={self.host} port={self.port} user={self.user} dbname={dbname} connect_timeout=10"

    def _run(self, *argv: str, timeout: float = START_TIMEOUT + 30) -> subprocess.CompletedProcess[str]:
        """Run a server binary as the user that owns the data (runuser when we are root)."""
        command = [str(self.bindir / argv[0]), *argv[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False,
                              stdin=subprocess.DEVNULL, cwd=self.root)

    def _options(self) -> str:
        return " ".join([f"-p {self.port} -k {self.root} -c listen_addresses={HOST}",
                         *(f"-c {setting}" for setting in self.settings)])

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def start(self) -> None:
        started = time.monotonic()
        done = self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", self.user, "-E", "UTF8",
                         "--locale=C", "--no-sync")
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}): {done.stdout}{done.stderr}")
        for attempt in itertools.count(1):  # the free port may be taken by someone else meanwhile
            self.port = free_port()
            options = self._options()
            done = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", str(START_TIMEOUT),
                             "-o", options, "start")
            if done.returncode == 0:
                break
            self.stop()
            if attempt == 3 or "already in use" not in self._log_tail():
                raise RuntimeError(f"pg_ctl start failed ({done.returncode}): {done.stdout}{done.stderr}\n"
                                   f"{self._log_tail()}")
        self.started_in = time.monotonic() - started

    def start_again(self) -> None:
        """Start the server stopped by `stop` again, on the same port (clients reconnect to it)."""
        options = self._options()
        done = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", str(START_TIMEOUT),
                         "-o", options, "start")
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed ({done.returncode}): {done.stdout}{done.stderr}\n"
                               f"{self._log_tail()}")

    def url(self, dbname: str = "postgres") -> str:
        """The database as a ``postgresql://`` URL (what ``cluster.database`` takes)."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            done = self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
            if done.returncode != 0:
                raise RuntimeError(f"pg_ctl stop failed ({done.returncode}): {done.stdout}{done.stderr}")


def _private_root() -> Path:
    """A new directory the server's user owns (mode 0700): below /tmp, since pytest's own temporary
    directories are private to the user running the tests."""
    root = Path(tempfile.mkdtemp(prefix="pop3proxy-pg-"))
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root)
            pytest.fail(f"there is no `postgres` system user to run the server as: {INSTALL_HINT}", pytrace=False)
        os.chown(root, owner.pw_uid, owner.pw_gid)
    return root


@contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """A started server of its own, stopped and removed on leaving."""
    server = PostgresServer(bindir=server_bindir(), root=_private_root())
    try:
        server.start()
        yield server
    finally:
        try:
            server.stop()
        finally:
            shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server of this test session; stopped and removed after the last test."""
    with running_postgres() as server:
        yield server


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server of this test's own (the test may stop and start it)."""
    with running_postgres() as server:
        yield server


_numbers = itertools.count(1)


@pytest.fixture
def postgres_db(postgres_server: PostgresServer) -> Iterator[str]:
    """The conninfo of a database of this test's own, created empty and dropped after the test (with the
    connections still open to it, such as those of a process the test killed)."""
    try:
        import psycopg
    except ImportError:
        pytest.fail("psycopg is not installed: pip install -e '.[test]' (or '.[cluster]')", pytrace=False)
    name = f"test_{os.getpid()}_{next(_numbers)}"
    with psycopg.connect(postgres_server.conninfo(), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield postgres_server.conninfo(name)
    finally:
        with psycopg.connect(postgres_server.conninfo(), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
