"""A real HAProxy in front of pop3proxy, as in cluster mode: TCP frontends on free loopback ports, each
passing its connections to one port of pop3proxy with a PROXY protocol header (``send-proxy-v2`` or
``send-proxy`` for version 1).

``HAProxy(tmp_path, [Route(target_port, "v2"), ...]).start()`` writes its configuration into a
directory of the test, runs ``haproxy -f CFG -db`` in the foreground (no daemon, no system files) and
waits until every frontend listens; ``route.port`` is then where clients connect. ``stop()`` ends the
process by its PID. A machine without haproxy fails the test naming it (.ci/install-deps.sh installs
it); it is never skipped.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers.common import HOST
from helpers.waiting import eventually

_SEARCH_PATH = "/usr/sbin:/usr/local/sbin:/sbin:/usr/bin:/bin"
# TLVs in every version 2 header (pop3proxy skips them): a checksum and a unique id per connection
V2_OPTIONS = "proxy-v2-options crc32c,unique-id"


def find_haproxy() -> str:
    path = shutil.which("haproxy") or shutil.which("haproxy", path=_SEARCH_PATH)
    if path is None:
        pytest.fail("haproxy is not installed: apt-get install haproxy (see .ci/install-deps.sh)", pytrace=False)
    return path


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Route:
    """One frontend: clients connect to ``port`` (on ``bind``); HAProxy connects to ``target``."""

    target: int
    proxy: str = "v2"  # "v2": send-proxy-v2 (with TLVs), "v1": send-proxy
    target_host: str = HOST
    bind: str = HOST
    port: int = field(default=0, init=False)
    more: tuple[int, ...] = ()  # further servers (cluster nodes), balanced round robin, health-checked

    def server_line(self) -> str:
        address = f"[{self.target_host}]" if ":" in self.target_host else self.target_host
        lines = []
        for i, target in enumerate((self.target, *self.more)):
            check = " check check-send-proxy inter 500ms fall 1 rise 1" if self.more else ""
            if self.proxy == "v1":
                lines.append(f"server s{i} {address}:{target} send-proxy{check}")
            else:
                lines.append(f"server s{i} {address}:{target} send-proxy-v2 {V2_OPTIONS}{check}")
        if self.more:  # a node that is down or draining: the client is sent to another one
            lines = ["balance roundrobin", "option redispatch", "retries 3", "option tcp-check",
                     "tcp-check expect string +OK", *lines]
        return "\n    ".join(lines)


def _listening(host: str, port: int) -> bool:
    """Whether something listens on host:port, read from /proc (a test connection would reach pop3proxy)."""
    v6 = ":" in host
    table = "/proc/net/tcp6" if v6 else "/proc/net/tcp"
    for line in Path(table).read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
            return True
    return False


class HAProxy:
    def __init__(self, root: Path, routes: list[Route]) -> None:
        self.root = root / "haproxy"
        self.root.mkdir(parents=True, exist_ok=True)
        self.routes = routes
        self.process: subprocess.Popen[bytes] | None = None
        self.config = self.root / "haproxy.cfg"
        self.log = self.root / "haproxy.out"

    def _write_config(self) -> None:
        lines = [
            "global",
            "    maxconn 200",
            "defaults",
            "    mode tcp",
            "    timeout connect 5s",
            "    timeout client 60s",
            "    timeout server 60s",
        ]
        for i, route in enumerate(self.routes):
            route.port = free_port(route.bind)
            bind = f"[{route.bind}]" if ":" in route.bind else route.bind
            lines += [
                f"frontend f{i}",
                f"    bind {bind}:{route.port}",
                "    unique-id-format %{+X}o%ci:%cp_%fi:%fp_%Ts_%pid",
                f"    default_backend b{i}",
                f"backend b{i}",
                f"    {route.server_line()}",
            ]
        self.config.write_text("\n".join(lines) + "\n")

    def start(self) -> HAProxy:
        binary = find_haproxy()
        self._write_config()
        check = subprocess.run([binary, "-c", "-f", str(self.config)], capture_output=True, text=True)
        assert check.returncode == 0, f"haproxy refused its configuration:\n{check.stdout}{check.stderr}"
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen([binary, "-f", str(self.config), "-db"], stdin=subprocess.DEVNULL,
                                            stdout=out, stderr=subprocess.STDOUT)
        try:
            eventually(lambda: self.process is not None and (self.process.poll() is not None or all(
                _listening(route.bind, route.port) for route in self.routes)), message="haproxy's frontends")
        except AssertionError:
            self.stop()
            raise
        if self.process.poll() is not None:
            output = self.output()
            self.stop()
            raise AssertionError(f"haproxy stopped at once:\n{output}")
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def __enter__(self) -> HAProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
