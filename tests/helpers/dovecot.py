"""A real Dovecot POP3 server for tests.

`Dovecot` runs ``dovecot -F`` as a child process with a standalone configuration under a short
temporary directory: plain POP3 (with STLS) and implicit-TLS POP3S on free loopback ports, a
certificate signed by a throw-away `trustme.CA`, a passwd-file of test users and one Maildir per
user, owned by a dedicated system user (Dovecot refuses to deliver mail as root).

Fixtures:

* ``dovecot_server`` (session scope): the running `Dovecot`.
* ``dovecot`` (function scope): a `DovecotAccount` bound to that server, holding a fresh user
  (``.user``/``.password``) for the test; ``.new_user()`` hands out more. User names are unique per
  server, so tests never see each other's mail. Everything else (host, port, tls_port, ca, ca_file,
  client_context(), add_user(), maildir(), deliver(), messages(), log_text()) is the server's.

``Dovecot(oauth2={...})`` makes an OAuth2-only server instead (passdb oauth2 with those settings,
SASL XOAUTH2 and OAUTHBEARER); helpers.oauth_server starts one next to a real authorization server.

Dovecot is installed with ``.ci/install-dovecot.sh``; when the binary is missing the fixtures fail
with a message saying so. The server must be started as root: it creates the mail user and lets
Dovecot drop privileges to it.

The configuration templates, finding the binary, free ports and the mail user are in
helpers/dovecot_setup.py.
"""

from __future__ import annotations

import itertools
import os
import pwd
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
import trustme
from helpers.dovecot_setup import (
    DovecotError,
    HOST,
    MAIL_USER,  # noqa: F401  (re-exported: the tests import it from here)
    NOT_INSTALLED,
    _CONFIG,
    _OAUTH2_PASSDB,
    _PASSWD_PASSDB,
    _process_group_members,
    _write_all,
    ensure_mail_user,
    find_dovecot,
    free_port,
)


class Dovecot:
    """One Dovecot POP3 server, run in the foreground as a child process.

    `port` speaks plain POP3 and offers STLS; `tls_port` is implicit TLS (POP3S). The server
    certificate is valid for "localhost" and "127.0.0.1" and signed by `ca` (PEM at `ca_file`).
    Passwords are stored in clear (scheme PLAIN); plaintext logins are allowed on `port`.
    """

    host = HOST

    def __init__(
        self,
        *,
        auth_failure_delay: float = 0,
        pick_port: Callable[[], int] = free_port,
        start_timeout: float = 10.0,
        attempts: int = 5,
        pool_size: int = 40,
        stop_timeout: float = 2.0,
        oauth2: dict[str, str] | None = None,
        trusted_networks: str = "",
    ) -> None:
        # `trusted_networks` (Dovecot's login_trusted_networks): clients there may send XCLIENT.
        self.trusted_networks = trusted_networks
        # With `oauth2` (settings of Dovecot's oauth2 passdb, e.g. introspection_url), logins are
        # OAuth2-only: SASL XOAUTH2 and OAUTHBEARER checked by the authorization server.
        self.oauth2 = oauth2
        self.auth_failure_delay = auth_failure_delay
        self.pick_port = pick_port
        self.start_timeout = start_timeout
        self.attempts = attempts
        self.stop_timeout = stop_timeout
        self.port = 0
        self.tls_port = 0
        self.ca = trustme.CA()
        self.root: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.pool_size = pool_size
        self._users: dict[str, str] = {}
        self._pool: list[tuple[str, str]] = []
        self._serial = itertools.count(1)
        self._passwd_mtime = 0
        self._written_at = 0.0
        self._mail_user: pwd.struct_passwd | None = None
        self._deliveries = itertools.count()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start Dovecot (in a fresh directory unless it was started before and not stopped)."""
        if self.process is not None:
            raise DovecotError("Dovecot is already running")
        binary = find_dovecot()
        if binary is None:
            raise DovecotError(NOT_INSTALLED)
        if os.geteuid() != 0:
            raise DovecotError(
                "the Dovecot test server must be started as root "
                "(Dovecot drops privileges to the mail user itself)"
            )
        self._mail_user = ensure_mail_user()
        if self.root is None:
            self._prepare_root()
        for _ in range(self.attempts):
            self.port, self.tls_port = self._pick_two_ports()
            self._write_config()
            if self._launch(binary):
                return
            if "Address already in use" not in self._startup_output():
                break
        raise DovecotError(
            f"Dovecot did not start (ports {self.port}, {self.tls_port}):\n"
            + self._startup_output()
        )

    def stop(self) -> None:
        """Stop Dovecot and every process it started; remove its directory."""
        try:
            self._stop_process()
        finally:
            if self.root is not None:
                shutil.rmtree(self.root, ignore_errors=True)
                self.root = None

    def __enter__(self) -> Dovecot:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _prepare_root(self) -> None:
        # Short, because Dovecot's unix sockets live under it (sun_path holds 108 bytes); every
        # directory on the way to the mail must be searchable by the mail user.
        root = Path(tempfile.mkdtemp(prefix="dv", dir="/tmp"))
        root.chmod(0o711)
        self.root = root
        for sub in ("run", "state"):
            (root / sub).mkdir(mode=0o755)
        mail = root / "mail"
        mail.mkdir()
        mail.chmod(0o711)
        cert = self.ca.issue_cert("localhost", HOST)
        cert.private_key_pem.write_to_path(str(root / "key.pem"))
        (root / "key.pem").chmod(0o600)
        cert.cert_chain_pems[0].write_to_path(str(root / "cert.pem"))
        for pem in cert.cert_chain_pems[1:]:
            pem.write_to_path(str(root / "cert.pem"), append=True)
        self.ca.cert_pem.write_to_path(str(root / "ca.pem"))
        # A first batch of users, read by Dovecot at start-up (see take_user).
        self._pool = [self._new_credentials() for _ in range(self.pool_size)]
        self._users = dict(self._pool)
        self._write_passwd()

    def _pick_two_ports(self) -> tuple[int, int]:
        first = self.pick_port()
        second = self.pick_port()
        while second == first:
            second = self.pick_port()
        return first, second

    def _write_config(self) -> None:
        assert self.root is not None and self._mail_user is not None
        if self.oauth2 is None:
            mechanisms = "plain login apop cram-md5"  # APOP and CRAM-MD5: passwords are stored in clear
            passdb = _PASSWD_PASSDB.format(root=self.root)
        else:
            mechanisms = "xoauth2 oauthbearer"
            conf = self.root / "oauth2.conf.ext"
            conf.write_text("".join(f"{key} = {value}\n" for key, value in self.oauth2.items()))
            conf.chmod(0o644)
            passdb = _OAUTH2_PASSDB.format(conf=conf)
        text = _CONFIG.format(
            mechanisms=mechanisms,
            trusted_networks=self.trusted_networks,
            passdb=passdb,
            root=self.root,
            instance=self.root.name,
            host=HOST,
            port=self.port,
            tls_port=self.tls_port,
            uid=self._mail_user.pw_uid,
            gid=self._mail_user.pw_gid,
            auth_failure_delay=f"{self.auth_failure_delay:g} secs",
        )
        (self.root / "dovecot.conf").write_text(text)

    def _launch(self, binary: str) -> bool:
        """Start the master; True once both ports greet, False when Dovecot exited."""
        assert self.root is not None
        for name in ("dovecot.log", "stderr.log"):
            (self.root / name).write_bytes(b"")
        with open(self.root / "stderr.log", "wb") as err:
            self.process = subprocess.Popen(
                [binary, "-F", "-c", str(self.root / "dovecot.conf")],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._stop_process()
                return False
            if self._greets(self.port, None) and self._greets(self.tls_port, self.client_context()):
                return True
            time.sleep(0.02)
        output = self._startup_output()
        self._stop_process()
        raise DovecotError(
            f"Dovecot did not greet on {HOST}:{self.port} within {self.start_timeout:g} s:\n{output}"
        )

    @staticmethod
    def _greets(port: int, context: ssl.SSLContext | None) -> bool:
        """Whether `port` answers with a POP3 greeting (over TLS when `context` is given).

        The whole greeting is awaited on both ports, so no login process is left half-way
        through its start when the server is stopped right away.
        """
        try:
            with socket.create_connection((HOST, port), timeout=1) as raw:
                if context is None:
                    return raw.makefile("rb").readline().startswith(b"+OK")
                with context.wrap_socket(raw, server_hostname="localhost") as tls:
                    return tls.makefile("rb").readline().startswith(b"+OK")
        except OSError:
            return False

    def _startup_output(self) -> str:
        assert self.root is not None
        err = (self.root / "stderr.log").read_text(errors="replace")
        return f"--- dovecot.log\n{self.log_text()}--- stderr\n{err}"

    def _stop_process(self) -> None:
        """Terminate the master's process group; kill what is left after `stop_timeout`."""
        process, self.process = self.process, None
        if process is None:
            return
        pgid = process.pid  # start_new_session made the master a group leader
        signals = iter([(signal.SIGTERM, self.stop_timeout), (signal.SIGKILL, 5.0)])
        deadline = time.monotonic()
        while True:
            members = _process_group_members(pgid)
            if process.poll() is None:
                members.append(process.pid)
            if not members:
                break
            if time.monotonic() >= deadline:
                step = next(signals, None)
                if step is None:
                    raise DovecotError(f"Dovecot processes {sorted(set(members))} did not stop")
                sig, patience = step
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    pass
                deadline = time.monotonic() + patience
            time.sleep(0.01)
        process.wait()

    # -- users and mail --------------------------------------------------------------------

    @property
    def ca_file(self) -> Path:
        """The CA certificate (PEM) that signs the server certificate."""
        assert self.root is not None, "Dovecot is not started"
        return self.root / "ca.pem"

    def client_context(self) -> ssl.SSLContext:
        """A verifying client SSL context that trusts `ca`."""
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context

    def add_user(self, name: str, password: str) -> None:
        """Add (or change) a POP3 login; it works for the next login, without a restart.

        Dovecot's auth process rereads the passwd-file when its mtime or size changed, but looks
        at the file at most once per second of its clock. So the file is replaced atomically with
        an mtime that always differs from the previous one, and, when the server is running, this
        returns only once the second of the write has passed (at most a second; `take_user`
        avoids the wait by handing out users that were written in advance).
        """
        for label, value in (("user name", name), ("password", password)):
            if not value or any(c in value for c in ":\r\n\0"):
                raise ValueError(f"{label} {value!r} cannot go into a passwd-file")
        if "/" in name or name.startswith(".") or name != name.strip():
            raise ValueError(f"user name {name!r} cannot be a mail directory name")
        self._users[name] = password
        self.maildir(name)
        self._publish_users()

    def take_user(self) -> tuple[str, str]:
        """A (name, password) no one has used before, usually without waiting.

        Users are written into the passwd-file in batches ahead of use; only when a batch is used
        up does the next one cost `add_user`'s wait.
        """
        if not self._pool:
            self._pool.extend(self._new_credentials() for _ in range(self.pool_size))
            for name, password in self._pool:
                self._users[name] = password
            self._publish_users()
        name, password = self._pool.pop(0)
        self.maildir(name)
        return name, password

    def _new_credentials(self) -> tuple[str, str]:
        name = f"t{next(self._serial):04d}-{secrets.token_hex(2)}"
        return name, secrets.token_urlsafe(12)

    def _publish_users(self) -> None:
        self._write_passwd()
        if self.process is not None:
            # The auth process notices the new file on its first lookup in a later second.
            time.sleep(max(0.0, int(self._written_at) + 1.01 - time.time()))

    def _write_passwd(self) -> None:
        assert self.root is not None
        text = "".join(f"{name}:{{PLAIN}}{pw}::::::\n" for name, pw in self._users.items())
        tmp = self.root / "passwd.tmp"
        tmp.write_text(text)
        # Read by the auth process, which runs as Dovecot's internal user.
        tmp.chmod(0o640)
        try:
            os.chown(tmp, 0, pwd.getpwnam("dovecot").pw_gid)
        except KeyError:
            tmp.chmod(0o644)
        # Dovecot compares whole-second mtimes (and sizes): make every version's mtime distinct.
        self._written_at = time.time()
        self._passwd_mtime = max(int(self._written_at), self._passwd_mtime + 1)
        os.utime(tmp, (self._passwd_mtime, self._passwd_mtime))
        os.replace(tmp, self.root / "passwd")

    def maildir(self, name: str) -> Path:
        """The user's Maildir (with cur/, new/, tmp/), owned by the mail user."""
        assert self.root is not None and self._mail_user is not None, "Dovecot is not started"
        uid, gid = self._mail_user.pw_uid, self._mail_user.pw_gid
        home = self.root / "mail" / name
        maildir = home / "Maildir"
        for d in (home, maildir, maildir / "cur", maildir / "new", maildir / "tmp"):
            if not d.is_dir():
                d.mkdir(mode=0o700)
                os.chown(d, uid, gid)
        return maildir

    def deliver(self, name: str, data: bytes) -> str:
        """Drop `data` (byte-exact, CRLF as given) into the user's new/; return the file name.

        Names sort in delivery order, both as strings and in Dovecot's own ordering.
        """
        assert self._mail_user is not None
        maildir = self.maildir(name)
        now = time.time_ns()
        filename = (
            f"{now // 10**9}.M{now // 1000 % 10**6:06d}P{os.getpid()}"
            f"Q{next(self._deliveries):06d}.pop3test"
        )
        tmp = maildir / "tmp" / filename
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_all(fd, data)
            os.fchown(fd, self._mail_user.pw_uid, self._mail_user.pw_gid)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, maildir / "new" / filename)
        return filename

    def messages(self, name: str) -> list[bytes]:
        """What the user's Maildir holds now (new/ and cur/), sorted by file name."""
        maildir = self.maildir(name)
        files = [p for sub in ("new", "cur") for p in (maildir / sub).iterdir() if p.is_file()]
        return [p.read_bytes() for p in sorted(files, key=lambda p: p.name)]

    def log_text(self) -> str:
        """Dovecot's log so far."""
        if self.root is None:
            return ""
        try:
            return (self.root / "dovecot.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""


class DovecotAccount:
    """The per-test view of the shared server: a fresh user, plus the server's helpers."""

    def __init__(self, server: Dovecot) -> None:
        self.server = server
        self.user, self.password = self.new_user()

    def new_user(self) -> tuple[str, str]:
        """Another user no other test has seen; returns (name, password)."""
        return self.server.take_user()

    def __getattr__(self, attr: str):
        # host, port, tls_port, ca, ca_file, client_context, add_user, maildir, deliver,
        # messages, log_text: straight from the server.
        return getattr(self.server, attr)


def running_dovecot(**options) -> Iterator[Dovecot]:
    """For a fixture: a started `Dovecot(**options)`, stopped afterwards; a clear failure if it cannot run."""
    if find_dovecot() is None:
        pytest.fail(NOT_INSTALLED, pytrace=False)
    server = Dovecot(**options)
    try:
        server.start()
    except DovecotError as exc:
        server.stop()
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def dovecot_server() -> Iterator[Dovecot]:
    yield from running_dovecot()


@pytest.fixture
def dovecot(dovecot_server: Dovecot) -> DovecotAccount:
    return DovecotAccount(dovecot_server)
