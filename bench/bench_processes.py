"""The benchmark's child processes and how their memory and CPU time are read: `Managed` starts each in
its own session and stops it by its PID (its process group for servers that fork), `stop_all` stops
whatever is still running; ``/proc`` gives resident, peak (``VmHWM``) and proportional sizes.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))

from helpers.dovecot_setup import _process_group_members  # noqa: E402

HOST = "127.0.0.1"
_running: list["Managed"] = []


class ServerUnavailable(Exception):
    """The server is not installed or cannot run here; the text says why (for the table)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 15.0, context: ssl.SSLContext | None = None) -> None:
    """Wait until ``port`` greets with +OK (over TLS with ``context``)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=2) as raw:
                sock = context.wrap_socket(raw, server_hostname="localhost") if context else raw
                if sock.recv(512).startswith(b"+OK"):
                    return
        except OSError as exc:
            last = str(exc)
        time.sleep(0.05)
    raise ServerUnavailable(f"port {port} did not greet within {timeout:g} s ({last})")


# --- memory ------------------------------------------------------------------------------------------


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def rss_kb(pid: int) -> int:
    return _status_kb(pid, "VmRSS")


def hwm_kb(pid: int) -> int:
    return _status_kb(pid, "VmHWM")


def reset_hwm(pid: int) -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS; False where the kernel refuses."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (a measure the machine's noise disturbs less than
    wall-clock time)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def group_memory_kb(pgid: int) -> tuple[int, int, int]:
    """(sum of RSS, sum of PSS, process count) over the live processes of process group ``pgid``."""
    members = _process_group_members(pgid)
    return sum(rss_kb(p) for p in members), sum(pss_kb(p) for p in members), len(members)


# --- processes -----------------------------------------------------------------------------------


class Managed:
    """A child process started in its own session; `stop` ends its process group by the leader's PID."""

    name = "server"
    proc: subprocess.Popen | None = None

    def _spawn(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,
            )
        _running.append(self)
        return self.proc

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def memory_kb(self) -> tuple[int, int, int]:
        return group_memory_kb(self.pid)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if self in _running:
            _running.remove(self)
        pgid = proc.pid
        for sig_now, patience in ((sig, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig_now)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + patience
            while time.monotonic() < deadline:
                proc.poll()
                if proc.returncode is not None and not _process_group_members(pgid):
                    return
                time.sleep(0.02)
        proc.wait(5)


def stop_all() -> None:
    for server in list(reversed(_running)):
        try:
            server.stop()
        except Exception as exc:  # keep stopping the others
            print(f"bench: could not stop {server.name}: {exc}", file=sys.stderr)
