"""The servers a benchmark run starts on loopback.

* `BenchDovecot`: the test suite's real Dovecot (``tests/helpers/dovecot.py``) with limits raised for a
  thousand concurrent sessions and ten thousand idle connections (login processes in Dovecot's
  "high-performance" mode: a few processes serve many connections).
* `Pop3proxy`: ``python -m pop3proxy serve --config FILE`` as a child process.
* `Perdition`: perdition's POP3 proxy in front of Dovecot (one forked process per connection).
* `NginxMail`: nginx's mail proxy in front of Dovecot, with an ``auth_http`` endpoint served by
  ``bench/bench_auth_http.py``.

Every process is a `Managed` one (bench_processes.py, where memory is read too); the names of that
module that the benchmark uses are re-exported here.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import trustme

# Re-exported (see __all__): the benchmark reads memory and stops processes through this module.
from bench.bench_processes import (
    HOST,
    Managed,
    ServerUnavailable,
    cpu_seconds,
    free_port,
    group_memory_kb,
    hwm_kb,
    pss_kb,
    reset_hwm,
    rss_kb,
    stop_all,
    wait_port,
)

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))

from helpers.dovecot import Dovecot, DovecotError, _process_group_members, find_dovecot  # noqa: E402

_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"])
NGINX_MAIL_MODULE = "/usr/lib/nginx/modules/ngx_mail_module.so"


# --- Dovecot -------------------------------------------------------------------------------------

_DOVECOT_EXTRA = """
# Benchmark limits: many concurrent sessions and idle connections.
default_process_limit = {process_limit}
default_client_limit = {client_limit}
default_vsz_limit = 2G
service pop3-login {{
  service_count = 0
  process_min_avail = 2
  client_limit = {login_clients}
}}
service pop3 {{
  process_limit = {process_limit}
}}
"""


class BenchDovecot(Dovecot):
    """The test suite's Dovecot with benchmark limits; ``pool_size`` users are ready at start."""

    name = "dovecot"

    def __init__(self, users: int, process_limit: int = 1300, client_limit: int = 11000) -> None:
        super().__init__(pool_size=users, start_timeout=30.0)
        self.process_limit = process_limit
        self.client_limit = client_limit

    def _write_config(self) -> None:
        super()._write_config()
        assert self.root is not None
        with open(self.root / "dovecot.conf", "a") as conf:
            conf.write(
                _DOVECOT_EXTRA.format(
                    process_limit=self.process_limit,
                    client_limit=self.client_limit,
                    login_clients=self.client_limit // 2 + 100,
                )
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def memory_kb(self) -> tuple[int, int, int]:
        return group_memory_kb(self.pid)

    def bulk_deliver(self, name: str, messages) -> int:
        """Write messages (an iterable of bytes) straight into the user's new/, without fsync: for
        filling big mailboxes fast. Returns the count. Names sort in delivery order."""
        assert self._mail_user is not None
        uid, gid = self._mail_user.pw_uid, self._mail_user.pw_gid
        new = self.maildir(name) / "new"
        base = time.time_ns() // 1000
        count = 0
        for count, data in enumerate(messages, 1):
            usec = base + count
            filename = f"{usec // 10**6}.M{usec % 10**6:06d}P{os.getpid()}Q{count:07d}.bench"
            fd = os.open(new / filename, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fchown(fd, uid, gid)
            finally:
                os.close(fd)
        return count


# --- TLS material --------------------------------------------------------------------------------


class Certs:
    """A throw-away CA and a server certificate for localhost / 127.0.0.1, as PEM files in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.ca = trustme.CA()
        cert = self.ca.issue_cert("localhost", HOST)
        self.certfile, self.keyfile = directory / "cert.pem", directory / "key.pem"
        cert.cert_chain_pems[0].write_to_path(str(self.certfile))
        for pem in cert.cert_chain_pems[1:]:
            pem.write_to_path(str(self.certfile), append=True)
        cert.private_key_pem.write_to_path(str(self.keyfile))
        self.keyfile.chmod(0o600)

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx


# --- pop3proxy -----------------------------------------------------------------------------------

_READY = re.compile(r"listening for (POP3S?) on \S+ port (\d+)")


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml(str(k))} = {_toml(v)}" for k, v in value.items()) + " }"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_toml(path: Path, sections: dict[str, dict], filters: list[dict] = ()) -> Path:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml(v)}" for k, v in values.items() if v is not None]
    for table in filters:
        lines.append("[[filters]]")
        lines += [f"{k} = {_toml(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class Pop3proxy(Managed):
    """``python -m pop3proxy serve`` with a generated configuration; logs go to ``<dir>/pop3proxy.log``.

    ``module`` runs another entry point with the same command line (the prototypes use it);
    ``python_args`` go between the interpreter and ``-m module`` (a profiler's ``-m pyinstrument ...``).
    """

    name = "pop3proxy"

    def __init__(
        self,
        directory: Path,
        *,
        upstream_port: int | None = None,
        users_file: Path | None = None,
        certs: Certs | None = None,
        filters: list[dict] = (),
        extra: dict[str, dict] | None = None,
        module: str = "pop3proxy",
        python_args: list[str] = (),
        env: dict[str, str] | None = None,
        workers: int = 0,
    ) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.cache_root = directory / "cache"
        self.log_path = directory / "pop3proxy.log"
        listen = {
            "host": HOST,
            "port": 0,
            "allow_plaintext_auth": "always",
            "max_sessions": 15000,
            "max_sessions_per_address": 15000,
            "idle_timeout": 900,
            "workers": workers,  # 0: one process per CPU, as installed; 1 where one process is profiled
        }
        if certs is not None:
            listen.update(tls_port=0, certfile=str(certs.certfile), keyfile=str(certs.keyfile))
        sections: dict[str, dict] = {"listen": listen, "cache": {"root": str(self.cache_root)}}
        if upstream_port is not None:
            sections["upstream"] = {"host": HOST, "port": upstream_port, "tls": "none", "delete": "never",
                                    "timeout": 300}
            sections["sync"] = {"login_budget": 3000}
        if users_file is not None:
            sections["local"] = {"users_file": str(users_file)}
        sections["log"] = {"level": "info"}
        for name, values in (extra or {}).items():
            sections.setdefault(name, {}).update(values)
        self.config = write_toml(directory / "pop3proxy.toml", sections, filters)
        self.tls = certs is not None
        self.module = module
        self.python_args = list(python_args)
        self.extra_env = dict(env or {})
        self.port = 0
        self.tls_port = 0

    def _env(self) -> dict[str, str]:
        return {**os.environ, **self.extra_env,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}

    def config_refused(self) -> str:
        """What ``check-config`` says against this configuration; "" when it accepts it (or could not run)."""
        argv = [sys.executable, "-m", self.module, "check-config", "--config", str(self.config)]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=self._env())
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return "" if done.returncode == 0 else (done.stderr or done.stdout).strip() or f"exit {done.returncode}"

    def start(self, timeout: float = 30.0) -> Pop3proxy:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        argv = [sys.executable, *self.python_args, "-m", self.module, "serve", "--config", str(self.config)]
        self._spawn(argv, self.log_path, self._env())
        deadline = time.monotonic() + timeout
        self.port = self.tls_port = 0
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")[offset:]
            for kind, port in _READY.findall(text):
                if kind == "POP3":
                    self.port = int(port)
                else:
                    self.tls_port = int(port)
            if self.port and (self.tls_port or not self.tls):
                return self
            assert self.proc is not None
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        tail = self.log_path.read_text(errors="replace")[offset:][-3000:]
        self.stop()
        raise ServerUnavailable(f"pop3proxy did not start:\n{tail}")

    def pids(self) -> list[int]:
        """The supervising process and its workers (``listen.workers``), or the one process."""
        return _process_group_members(self.pid) or [self.pid]

    def forget_cache(self, user: str) -> None:
        """Drop one user's cache (the next login fetches everything again: a cold start)."""
        from pop3proxy.store.paths import user_dir

        shutil.rmtree(user_dir(self.cache_root, user), ignore_errors=True)


# --- perdition -----------------------------------------------------------------------------------


def find(name: str) -> str | None:
    return shutil.which(name, path=_SEARCH_PATH)


class Perdition(Managed):
    """perdition's POP3 proxy (plain, or implicit TLS with ``certs``) in front of a plain backend port."""

    name = "perdition"

    def __init__(self, directory: Path, backend_port: int, certs: Certs | None = None) -> None:
        self.binary = find("perdition")
        if self.binary is None:
            raise ServerUnavailable("perdition is not installed (bash bench/install.sh)")
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.backend_port = backend_port
        self.certs = certs
        self.port = 0

    def start(self) -> Perdition:
        self.port = free_port()
        argv = [
            self.binary, "--no_daemon", "--bind_address", HOST, "--listen_port", str(self.port),
            "--outgoing_server", HOST, "--outgoing_port", str(self.backend_port), "--map_library", "",
            "--no_lookup", "--connection_limit", "0", "--pid_file", str(self.directory / f"perdition-{self.port}.pid"),
        ]
        if self.certs is None:
            argv += ["--protocol", "POP3", "--ssl_mode", "none"]
        else:
            argv += ["--protocol", "POP3S", "--ssl_mode", "ssl_listen",
                     "--ssl_cert_file", str(self.certs.certfile), "--ssl_key_file", str(self.certs.keyfile)]
        self._spawn(argv, self.directory / "perdition.log")
        try:
            wait_port(self.port, context=self.certs.client_context() if self.certs else None)
        except ServerUnavailable:
            self.stop()
            raise
        return self


# --- nginx mail ----------------------------------------------------------------------------------

_NGINX_CONF = """\
load_module {module};
worker_processes 2;
worker_rlimit_nofile 19000;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{
  worker_connections 12000;
}}
mail {{
  server_name localhost;
  auth_http {host}:{auth_port}/auth;
  proxy_pass_error_message on;
  pop3_auth plain;
  ssl_certificate {certfile};
  ssl_certificate_key {keyfile};
  server {{
    listen {host}:{port};
    protocol pop3;
  }}
  server {{
    listen {host}:{tls_port} ssl;
    protocol pop3;
  }}
}}
"""


class AuthHttp(Managed):
    """The auth_http endpoint nginx asks at each login: it always names the Dovecot backend (Dovecot
    checks the password)."""

    name = "auth_http"

    def __init__(self, directory: Path, backend_port: int) -> None:
        self.directory = directory
        self.backend_port = backend_port
        self.port = 0

    def start(self) -> AuthHttp:
        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self._spawn([sys.executable, "-m", "bench.bench_auth_http", str(self.port), str(self.backend_port)],
                    self.directory / "auth_http.log", env)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection((HOST, self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise ServerUnavailable("the auth_http endpoint did not start")


class NginxMail(Managed):
    name = "nginx-mail"

    def __init__(self, directory: Path, backend_port: int, certs: Certs) -> None:
        self.binary = find("nginx")
        if self.binary is None:
            raise ServerUnavailable("nginx is not installed (bash bench/install.sh)")
        if not Path(NGINX_MAIL_MODULE).exists():
            raise ServerUnavailable("nginx's mail module is not installed (libnginx-mod-mail)")
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.backend_port = backend_port
        self.certs = certs
        self.auth = AuthHttp(directory, backend_port)
        self.port = self.tls_port = 0

    def start(self) -> NginxMail:
        self.auth.start()
        self.port, self.tls_port = free_port(), free_port()
        conf = self.directory / "nginx.conf"
        conf.write_text(_NGINX_CONF.format(
            module=NGINX_MAIL_MODULE, root=self.directory, host=HOST, auth_port=self.auth.port,
            port=self.port, tls_port=self.tls_port, certfile=self.certs.certfile, keyfile=self.certs.keyfile,
        ))
        self._spawn([self.binary, "-p", str(self.directory), "-c", str(conf), "-g", "daemon off;"],
                    self.directory / "nginx.log")
        try:
            wait_port(self.port)
            wait_port(self.tls_port, context=self.certs.client_context())
        except ServerUnavailable:
            self.stop()
            raise
        return self

    def stop(self, sig: int = signal.SIGQUIT, timeout: float = 10.0) -> None:
        super().stop(sig, timeout)
        self.auth.stop()


def dovecot_available() -> str | None:
    """None when Dovecot can run here, else why not."""
    if find_dovecot() is None:
        return "Dovecot is not installed (bash bench/install.sh)"
    if os.geteuid() != 0:
        return "Dovecot needs root here (it drops privileges to a mail user itself)"
    return None


__all__ = [
    "BenchDovecot", "Certs", "DovecotError", "NginxMail", "Perdition", "Pop3proxy", "ServerUnavailable",
    "cpu_seconds", "dovecot_available", "free_port", "group_memory_kb", "hwm_kb", "pss_kb", "reset_hwm", "rss_kb", "stop_all",
]
