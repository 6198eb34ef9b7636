"""Real content scanners for tests: SpamAssassin's spamd, rspamd and ClamAV's clamd.

Each runs in the foreground as a child process (its own process group, stopped as a group at the end
of the session) with a private configuration under a short temporary directory, listening on a free
loopback TCP port and on a unix socket in that directory. Nothing is read from or written to the
system's own instances, and nothing touches the network: spamd runs with local tests only, rspamd
with DNS pinned to a loopback port where nothing answers and every module that looks things up
elsewhere disabled, clamd with a one-signature database (EICAR) written by the fixture.

Fixtures (session scope, one daemon per test session):

* ``spamd`` -> `Spamd`: ``.address`` ("127.0.0.1:PORT"), ``.socket_path``, ``.log_text()``;
  it accepts TELL (``--allow-tell``) and learns into a private Bayes database, ``.bayes_path``.
* ``spamd_without_tell`` -> `Spamd` started without ``--allow-tell``.
* ``rspamd`` -> `Rspamd`: ``.url`` ("http://127.0.0.1:PORT"), ``.socket_path``, ``.log_text()``;
  its Bayes classifier keeps its statistics in a private redis (`helpers.redis_server`) started and
  stopped with it; its controller listens on ``.controller`` ("127.0.0.1:PORT") with the password
  ``.controller_password``.
* ``clamd`` -> `Clamd`: ``.address``, ``.socket_path``, ``.signature`` (the name clamd reports
  for EICAR), ``.stream_max_length``, ``.log_text()``.

A missing daemon fails the test, naming the Debian package (installed by ``.ci/install-filters.sh``).
As root the daemons drop privileges to the users their Debian packages create (redis, which only
ever holds test statistics in memory, runs as the test's user).
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

HOST = "127.0.0.1"
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"])
INSTALL_HINT = "see .ci/install-filters.sh"

EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
EICAR_SIGNATURE = "POP3Proxy.Test.EICAR"
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


class DaemonError(RuntimeError):
    """A daemon could not be started; the message carries its output."""


def find_binary(name: str, package: str) -> str:
    """The daemon's path; a missing one fails the test naming the Debian package."""
    path = shutil.which(name, path=_SEARCH_PATH)
    if path is None:
        pytest.fail(f"{name} is not installed: apt-get install {package} ({INSTALL_HINT})", pytrace=False)
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _system_user(name: str) -> pwd.struct_passwd | None:
    """The user to drop privileges to when running as root (None when not root)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise DaemonError(f"system user {name!r} is missing (its Debian package creates it)") from None


class Daemon:
    """One daemon process and its private directory."""

    name = "daemon"
    start_timeout = 60.0

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix=f"p3p-{self.name}-", dir="/tmp"))
        self.root.chmod(0o755)
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> str:
        return str(self.root / f"{self.name}.sock")

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def prepare(self) -> None:
        """Write the configuration for ``self.port``."""

    def ready(self) -> bool:
        raise NotImplementedError

    def log_text(self) -> str:
        try:
            return (self.root / f"{self.name}.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def output(self) -> str:
        try:
            out = (self.root / "stdout.log").read_text(errors="replace")
        except FileNotFoundError:
            out = ""
        return f"--- {self.name} log\n{self.log_text()[-4000:]}\n--- output\n{out[-4000:]}"

    def start(self, attempts: int = 3) -> None:
        """Start on a free port; retried when another process took the port meanwhile."""
        for _ in range(attempts):
            self.port = free_port()
            for stale in (Path(self.socket_path), self.root / f"{self.name}.log"):
                stale.unlink(missing_ok=True)
            self.prepare()
            with open(self.root / "stdout.log", "wb") as out:
                self.process = subprocess.Popen(
                    self.command(),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=self.root,
                    start_new_session=True,
                )
            deadline = time.monotonic() + self.start_timeout
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    break
                if self.ready():
                    return
                time.sleep(0.05)
            code = self.process.poll()
            output = self.output()
            self.stop_process()
            if "in use" not in output:
                why = f"exited with status {code}" if code is not None else f"not ready after {self.start_timeout:g} s"
                raise DaemonError(f"{self.name} did not start ({why}): {' '.join(self.command())}\n{output}")
        raise DaemonError(f"{self.name} did not start: its ports were taken {attempts} times")

    def stop_process(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        for sig, patience in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + patience
            while time.monotonic() < deadline and _group_alive(process.pid):
                process.poll()
                time.sleep(0.02)
            if not _group_alive(process.pid):
                break
        process.wait(5)

    def stop(self) -> None:
        try:
            self.stop_process()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def give_to(self, user: pwd.struct_passwd | None, *paths: Path) -> None:
        if user is None:
            return
        for path in paths:
            os.chown(path, user.pw_uid, user.pw_gid)


def _group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is left in the process group."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def _exchange(address: tuple[str, int] | str, request: bytes, timeout: float = 2.0) -> bytes:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(address)
        s.sendall(request)
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                return data
            data += chunk
            if data.endswith(b"\0"):
                return data


# -- spamd --------------------------------------------------------------------------------------

SPAMD_LOCAL_CF = """\
# Test configuration: Bayes learns only what it is told (TELL), into the daemon's own directory; too
# few messages are ever taught for it to score (bayes_min_spam_num, 200 by default).
use_bayes 1
bayes_auto_learn 0
bayes_path {bayes_path}
ifplugin Mail::SpamAssassin::Plugin::AWL
use_auto_whitelist 0
endif
"""


class Spamd(Daemon):
    """spamd with SpamAssassin's shipped rules, local tests only (-L), no per-user files (-x);
    ``allow_tell``: it learns messages it is told about (TELL, ``--allow-tell``)."""

    name = "spamd"
    rules = "/usr/share/spamassassin"

    def __init__(self, binary: str, allow_tell: bool = True) -> None:
        super().__init__()
        self.binary = binary
        self.allow_tell = allow_tell
        self.user = _system_user("debian-spamd")

    @property
    def site(self) -> Path:
        return self.root / "site"

    @property
    def bayes_path(self) -> str:
        """SpamAssassin's ``bayes_path``: a prefix, the database files are ``bayes_toks`` etc."""
        return str(self.root / "bayes" / "bayes")

    def prepare(self) -> None:
        self.site.mkdir(exist_ok=True)
        (self.root / "bayes").mkdir(exist_ok=True)
        for pre in glob.glob("/etc/spamassassin/*.pre"):
            shutil.copy(pre, self.site)
        (self.site / "local.cf").write_text(SPAMD_LOCAL_CF.format(bayes_path=self.bayes_path))
        self.give_to(self.user, self.root, self.root / "bayes")

    def command(self) -> list[str]:
        cmd = [
            self.binary, "-L", "-x", "-C", self.rules, f"--siteconfigpath={self.root / 'site'}",
            f"--listen={HOST}:{self.port}", f"--listen={self.socket_path}", "--socketmode=0666",
            "-A", HOST, f"--pidfile={self.root / 'spamd.pid'}", f"--syslog={self.root / 'spamd.log'}",
            "--max-children=2", "--min-children=1", "--min-spare=1", "--max-spare=1",
        ]
        if self.allow_tell:
            cmd.append("--allow-tell")
        if self.user is not None:
            cmd += ["-u", self.user.pw_name]
        return cmd

    def ready(self) -> bool:
        try:
            tcp = _exchange((HOST, self.port), b"PING SPAMC/1.5\r\n\r\n")
            unix = _exchange(self.socket_path, b"PING SPAMC/1.5\r\n\r\n")
        except OSError:
            return False
        return b"PONG" in tcp and b"PONG" in unix


# -- rspamd -------------------------------------------------------------------------------------

RSPAMD_CONF = """\
# Test configuration: the shipped rules, one normal worker on loopback, no network lookups.
.include "$CONFDIR/common.conf"
options {{
    pidfile = "$RUNDIR/rspamd.pid";
    url_tld = "{root}/tld.dat";
    disable_hyperscan = true;
    dns {{ nameserver = ["127.0.0.1:{dns_port}"]; timeout = 0.2s; retransmits = 0; }}
    .include "$CONFDIR/options.inc"
}}
logging {{
    type = "file";
    filename = "$LOGDIR/rspamd.log";
    level = "info";
}}
worker "normal" {{
    bind_socket = "{host}:{port}";
    bind_socket = "{socket} mode=0666";
    .include "$CONFDIR/worker-normal.inc"
    count = 1;
}}
# The controller (learning, /stat) with a password and no trusted addresses: loopback must sign in too.
worker "controller" {{
    bind_socket = "{host}:{controller_port}";
    count = 1;
    password = "{password}";
}}
"""
# Bayes statistics in the private redis; nothing else is given a redis server. Learning is only on
# request (no autolearn); rspamd's default min_learns (200 of each class) keeps the few messages the
# tests teach from changing any score.
RSPAMD_BAYES = """\
backend = "redis";
servers = "{redis}";
autolearn = false;
"""
# Modules that fetch maps over HTTP or look things up in DNS, or need redis: all off.
RSPAMD_DISABLED = (
    "rbl", "fuzzy_check", "spf", "dkim", "dmarc", "surbl", "asn", "dcc", "mx_check", "phishing", "neural",
    "reputation", "ratelimit", "greylist", "history_redis", "url_redirector", "rspamd_update",
    "clickhouse", "elastic", "metadata_exporter", "whitelist", "multimap", "mime_types", "mid",
    "dkim_signing", "arc", "emails", "replies", "external_services", "antivirus", "bimi", "p0f",
)
# A few public suffixes instead of the full list, whose matcher takes rspamd ~20 s to build.
RSPAMD_TLDS = "com\norg\nnet\nexample\ntest\ninvalid\nde\nuk\nco.uk\ninfo\nio\nbiz\n"


class Rspamd(Daemon):
    name = "rspamd"

    def __init__(self, binary: str, redis: str) -> None:
        super().__init__()
        self.binary = binary
        self.redis = redis  # "host:port" of the redis holding the Bayes statistics
        self.user = _system_user("_rspamd")
        self.controller_port = 0
        self.controller_password = secrets.token_urlsafe(12)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def controller(self) -> str:
        return f"{HOST}:{self.controller_port}"

    def prepare(self) -> None:
        local = self.root / "local"
        override = local / "override.d"
        dirs = [self.root / "db", self.root / "run", override, local / "local.d"]
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
        for module in RSPAMD_DISABLED:
            (override / f"{module}.conf").write_text("enabled = false;\n")
        (self.root / "tld.dat").write_text(RSPAMD_TLDS)
        (local / "local.d" / "classifier-bayes.conf").write_text(RSPAMD_BAYES.format(redis=self.redis))
        self.controller_port = free_port()
        (self.root / "rspamd.conf").write_text(
            RSPAMD_CONF.format(
                root=self.root, host=HOST, port=self.port, socket=self.socket_path, dns_port=free_port(),
                controller_port=self.controller_port, password=self.controller_password,
            )
        )
        self.give_to(self.user, self.root, self.root / "db", self.root / "run")

    def command(self) -> list[str]:
        cmd = [
            self.binary, "-f", "-c", str(self.root / "rspamd.conf"),
            f"--var=LOCAL_CONFDIR={self.root / 'local'}", f"--var=DBDIR={self.root / 'db'}",
            f"--var=RUNDIR={self.root / 'run'}", f"--var=LOGDIR={self.root}",
        ]
        if self.user is not None:
            cmd += ["-u", self.user.pw_name, "-g", self.user.pw_name]
        return cmd

    def ready(self) -> bool:
        try:
            tcp = _exchange((HOST, self.port), b"GET /ping HTTP/1.0\r\n\r\n")
            unix = _exchange(self.socket_path, b"GET /ping HTTP/1.0\r\n\r\n")
            controller = _exchange((HOST, self.controller_port), b"GET /ping HTTP/1.0\r\n\r\n")
        except OSError:
            return False
        return b"pong" in tcp and b"pong" in unix and b"pong" in controller


# -- clamd --------------------------------------------------------------------------------------

CLAMD_CONF = """\
Foreground yes
DatabaseDirectory {root}/db
TCPSocket {port}
TCPAddr {host}
LocalSocket {socket}
LocalSocketMode 666
LogFile {root}/clamd.log
LogTime yes
PidFile {root}/clamd.pid
StreamMaxLength {stream_max}
SelfCheck 0
"""


class Clamd(Daemon):
    """clamd with a database of one signature: the EICAR test file."""

    name = "clamd"
    start_timeout = 30.0
    stream_max_length = 1024 * 1024
    # clamd marks signatures from databases that are not digitally signed as unofficial.
    signature = f"{EICAR_SIGNATURE}.UNOFFICIAL"

    def __init__(self, binary: str) -> None:
        super().__init__()
        self.binary = binary
        self.user = _system_user("clamav")

    def prepare(self) -> None:
        db = self.root / "db"
        db.mkdir(exist_ok=True)
        (db / "pop3proxy-test.ndb").write_text(f"{EICAR_SIGNATURE}:0:*:{EICAR.hex()}\n")
        conf = CLAMD_CONF.format(
            root=self.root, port=self.port, host=HOST, socket=self.socket_path,
            stream_max=self.stream_max_length,
        )
        if self.user is not None:
            conf += f"User {self.user.pw_name}\n"
        (self.root / "clamd.conf").write_text(conf)
        self.give_to(self.user, self.root, db)

    def command(self) -> list[str]:
        return [self.binary, "-c", str(self.root / "clamd.conf")]

    def ready(self) -> bool:
        try:
            tcp = _exchange((HOST, self.port), b"zPING\0")
            unix = _exchange(self.socket_path, b"zPING\0")
        except OSError:
            return False
        return tcp == b"PONG\0" and unix == b"PONG\0"


# -- fixtures -----------------------------------------------------------------------------------


def _serve(make: Callable[[], Daemon]) -> Iterator[Daemon]:
    try:
        daemon = make()
    except DaemonError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        daemon.start()
    except DaemonError as exc:
        daemon.stop()
        pytest.fail(str(exc), pytrace=False)
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="session")
def spamd() -> Iterator[Spamd]:
    binary = find_binary("spamd", "spamd")
    if not os.path.isdir(Spamd.rules):
        pytest.fail(f"SpamAssassin's rules ({Spamd.rules}) are missing: apt-get install spamassassin "
                    f"({INSTALL_HINT})", pytrace=False)
    yield from _serve(lambda: Spamd(binary))  # type: ignore[misc]


@pytest.fixture(scope="session")
def spamd_without_tell() -> Iterator[Spamd]:
    """A spamd started without --allow-tell: it checks mail but refuses to learn."""
    binary = find_binary("spamd", "spamd")
    yield from _serve(lambda: Spamd(binary, allow_tell=False))  # type: ignore[misc]


@pytest.fixture(scope="session")
def rspamd() -> Iterator[Rspamd]:
    from helpers.redis_server import Redis  # it builds on Daemon, defined here

    binary = find_binary("rspamd", "rspamd")
    redis_binary = find_binary("redis-server", "redis-server")
    redis_daemon = _serve(lambda: Redis(redis_binary))
    redis = next(redis_daemon)
    try:
        yield from _serve(lambda: Rspamd(binary, redis.address))  # type: ignore[misc]
    finally:
        redis_daemon.close()  # stops redis (by its process group) after rspamd


@pytest.fixture(scope="session")
def clamd() -> Iterator[Clamd]:
    binary = find_binary("clamd", "clamav-daemon")
    yield from _serve(lambda: Clamd(binary))  # type: ignore[misc]
