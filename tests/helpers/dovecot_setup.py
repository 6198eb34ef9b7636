"""What a test Dovecot is made of (used by helpers/dovecot.py): the standalone configuration
templates, finding the ``dovecot`` binary, free loopback ports, the system user that owns the mail,
and the members of a process group.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
from pathlib import Path


MAIL_USER = "pop3test"
HOST = "127.0.0.1"
NOT_INSTALLED = "Dovecot is not installed: apt-get install dovecot-core dovecot-pop3d (see .ci/run)"
# Where Debian puts the binary; a non-root PATH often lacks the sbin directories.
_SEARCH_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"]
)


class DovecotError(RuntimeError):
    """Dovecot could not be set up or started; the message carries its log."""


def find_dovecot() -> str | None:
    """Path of the ``dovecot`` binary, or None when it is not installed.

    ``TEST_DOVECOT_BINARY`` names a specific binary instead of searching PATH and the sbin
    directories.
    """
    explicit = os.environ.get("TEST_DOVECOT_BINARY")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    return shutil.which("dovecot", path=_SEARCH_PATH)


def free_port() -> int:
    """A TCP port on the loopback address that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def ensure_mail_user(name: str = MAIL_USER) -> pwd.struct_passwd:
    """The system user that owns the test mail; created (idempotently) when missing."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    if os.geteuid() != 0:
        raise DovecotError(
            f"system user {name!r} is missing and only root can create it "
            f"(useradd --system --user-group --no-create-home --shell /usr/sbin/nologin {name})"
        )
    useradd = shutil.which("useradd", path=_SEARCH_PATH)
    if useradd is None:
        raise DovecotError("useradd (package passwd) is needed to create the mail user")
    proc = subprocess.run(
        [useradd, "--system", "--user-group", "--no-create-home",
         "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name],
        capture_output=True,
        text=True,
    )
    try:
        # A concurrent test run may have created it first; that is as good.
        return pwd.getpwnam(name)
    except KeyError:
        raise DovecotError(f"useradd {name} failed: {proc.stderr.strip()}") from None


def _process_group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group `pgid`."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may contain spaces; fields follow the last ')'.
        fields = stat[stat.rindex(")") + 2:].split()
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state not in ("Z", "X"):
            members.append(int(entry))
    return members


_CONFIG = """\
# Standalone Dovecot configuration for tests; nothing is read from the system configuration.
base_dir = {root}/run
state_dir = {root}/state
instance_name = {instance}
log_path = {root}/dovecot.log
info_log_path = {root}/dovecot.log
debug_log_path = {root}/dovecot.log

protocols = pop3
listen = {host}

ssl = yes
ssl_cert = <{root}/cert.pem
ssl_key = <{root}/key.pem
ssl_min_protocol = TLSv1.2

auth_mechanisms = {mechanisms}
disable_plaintext_auth = no
auth_verbose = yes
auth_failure_delay = {auth_failure_delay}
login_trusted_networks = {trusted_networks}

first_valid_uid = {uid}
first_valid_gid = {gid}
mail_location = maildir:{root}/mail/%u/Maildir
pop3_uidl_format = %08Xu%08Xv

# No statistics: a process starting during shutdown would wait seconds for the stats service.
stats_writer_socket_path =

# Room for load tests: hundreds of concurrent sessions from one address.
default_process_limit = 2000
default_client_limit = 8000
mail_max_userip_connections = 100

{passdb}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={root}/mail/%u
}}

# No growing delays for a client address after failed logins (tests fail logins on purpose).
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}

service pop3-login {{
  inet_listener pop3 {{
    address = {host}
    port = {port}
  }}
  inet_listener pop3s {{
    address = {host}
    port = {tls_port}
    ssl = yes
  }}
}}
"""

_PASSWD_PASSDB = """\
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {root}/passwd
}}"""

_OAUTH2_PASSDB = """\
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {conf}
}}"""


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
