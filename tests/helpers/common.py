"""Shared test helpers: configuration files, a pop3proxy server process, waiting for events."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

HOST = "127.0.0.1"


def require_tool(name: str, package: str) -> str:
    """The tool's path; a missing tool fails the test and names it (it never skips)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: apt-get install {package} (see .ci/install-deps.sh)")
    return path


def toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else toml_value(key)


def toml_value(value) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def write_config(path: Path, sections: dict[str, dict]) -> Path:
    """Write a TOML file from {"section": {key: value}} (dotted section names allowed). A server runs
    as one process (``listen.workers = 1``) unless the test asks for workers."""
    if "listen" in sections and "workers" not in sections["listen"]:
        sections = {**sections, "listen": {**sections["listen"], "workers": 1}}
    lines = []
    for section, values in sections.items():
        if section == "filters":
            for table in values:
                lines.append("[[filters]]")
                lines.extend(f"{toml_key(k)} = {toml_value(v)}" for k, v in table.items())
            continue
        lines.append(f"[{section}]")
        lines.extend(f"{toml_key(k)} = {toml_value(v)}" for k, v in values.items() if v is not None)
    path.write_text("\n".join(lines) + "\n")
    return path


def children_of(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (a server's worker processes)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
    return sorted(found)


START_BOUND = 120.0  # seconds a server may take to start before a test gives up on it
_READY = re.compile(r"listening for (POP3S?) on \S+ port (\d+)")


class ServerProcess:
    """``python -m pop3proxy serve --config FILE`` as a real child process."""

    def __init__(self, config: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.tls_port: int | None = None
        self.log: list[str] = []
        self._reader: threading.Thread | None = None

    def start(self, timeout: float = START_BOUND, plain: bool = True, tls: bool = False) -> "ServerProcess":
        """Start and wait for the "listening" lines of the listeners expected (plain, tls). They come
        once every listener of the service (worker processes, SMTP, metrics, web) accepts connections;
        ``timeout`` only bounds a start that never comes (a loaded machine may take many seconds)."""
        self.log.clear()
        self.port = self.tls_port = None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pop3proxy", "serve", "--config", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self.env,
            text=True,
        )
        ready = threading.Event()
        want_plain, want_tls = plain, tls

        def pump() -> None:
            assert self.proc and self.proc.stdout
            for line in self.proc.stdout:
                self.log.append(line.rstrip("\n"))
                match = _READY.search(line)
                if match:
                    if match.group(1) == "POP3":
                        self.port = int(match.group(2))
                    else:
                        self.tls_port = int(match.group(2))
                if (self.port or not want_plain) and (self.tls_port or not want_tls):
                    ready.set()
            ready.set()

        self._reader = threading.Thread(target=pump, daemon=True)
        self._reader.start()
        if not ready.wait(timeout) or self.proc.poll() is not None or (want_plain and not self.port):
            output = "\n".join(self.log)
            self.stop()
            raise AssertionError(f"pop3proxy did not start:\n{output}")
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._reader is not None:
            self._reader.join(2)
        code = self.proc.returncode
        self.proc = None
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def output(self) -> str:
        return "\n".join(self.log)


def drop_connection(client) -> None:
    """Vanish without QUIT: close the poplib client's socket and its file (which shares the socket)."""
    import socket as _socket

    client.sock.shutdown(_socket.SHUT_RDWR)
    client.file.close()
    client.sock.close()


def memory_kib(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of a running process from /proc, in KiB: ``VmRSS`` (resident now) or ``VmHWM``
    (the peak resident size so far)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for process {pid}")
