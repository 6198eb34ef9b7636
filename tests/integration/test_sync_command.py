"""`pop3proxy sync` and background prefetch: mail reaches the cache with no client, from the real Dovecot."""

from __future__ import annotations

import poplib
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.common import HOST, write_config
from helpers.waiting import eventually

from pop3proxy.store import open_store
from pop3proxy.store.paths import user_dir

pytestmark = pytest.mark.dovecot

ACCOUNT = "home-box"  # the local name; Dovecot knows the user by its own name (remote_user)


def sample(i: int) -> bytes:
    body = b"".join(b"line %d of message %d\r\n" % (n, i) for n in range(40 + i))
    return b"From: a@example.org\r\nSubject: prefetch %d\r\nMessage-ID: <p%d@example.org>\r\n\r\n" % (i, i) + body


def cached(root: Path, name: str) -> list[bytes]:
    with open_store(root, name) as mailbox:
        out = []
        for info in mailbox.list():
            with mailbox.open(info.key) as f:
                out.append(f.read())
        return out


@pytest.fixture
def setup(tmp_path, dovecot):
    """(config path, cache root, password file) for [accounts."home-box"] → the test's Dovecot user."""
    password_file = tmp_path / "home-box.pass"
    password_file.write_text(dovecot.password + "\n")
    password_file.chmod(0o600)
    root = tmp_path / "cache"

    def config(**sync) -> Path:
        return write_config(tmp_path / "proxy.toml", {
            "listen": {"host": HOST, "port": 0},
            "upstream": {
                "host": HOST,
                "port": dovecot.tls_port,
                "tls": "implicit",
                "ca_file": str(dovecot.ca_file),
                "timeout": 5,
            },
            "cache": {"root": root},
            "sync": sync,
            f'accounts."{ACCOUNT}"': {"remote_user": dovecot.user, "password_file": password_file},
            "log": {"level": "debug"},
        })

    return config, root, password_file


def run_sync(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pop3proxy", "sync", "--config", str(config), *args],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )


def test_sync_fetches_into_the_cache_without_a_client(setup, dovecot):
    config, root, _ = setup
    messages = [sample(i) for i in range(3)]
    for m in messages:
        dovecot.deliver(dovecot.user, m)
    done = run_sync(config(), "--account", ACCOUNT)
    assert done.returncode == 0, done.stderr
    size = sum(len(m) for m in messages)
    assert done.stdout.strip() == f"{ACCOUNT}: 3 new messages ({size} bytes), 0 deleted upstream"
    assert cached(root, ACCOUNT) == dovecot.messages(dovecot.user) == messages
    assert not user_dir(root, dovecot.user).exists()  # the cache is the account's, not the remote name's
    # Again, for every account (no --account): nothing new, nothing fetched twice.
    dovecot.deliver(dovecot.user, sample(3))
    again = run_sync(config())
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == f"{ACCOUNT}: 1 new messages ({len(sample(3))} bytes), 0 deleted upstream"
    assert cached(root, ACCOUNT) == messages + [sample(3)]
    for out in (done, again):
        assert dovecot.password not in out.stdout + out.stderr


def test_world_readable_password_file_is_refused(setup, dovecot):
    config, root, password_file = setup
    dovecot.deliver(dovecot.user, sample(0))
    password_file.chmod(0o644)
    done = run_sync(config(), "--account", ACCOUNT)
    assert done.returncode != 0
    assert str(password_file) in done.stderr and "chmod 600" in done.stderr
    assert "Traceback" not in done.stderr
    assert dovecot.password not in done.stdout + done.stderr
    assert not root.exists()


def test_unknown_account_is_a_usage_error(setup):
    config, root, _ = setup
    done = run_sync(config(), "--account", "nobody")
    assert done.returncode == 2
    assert "nobody" in done.stderr and "Traceback" not in done.stderr
    assert not root.exists()


def test_sync_refuses_a_mailbox_in_use_by_a_session(setup, dovecot, server_process):
    config, root, _ = setup
    dovecot.deliver(dovecot.user, sample(0))
    proxy = server_process(config(interval=3600)).start()
    client = poplib.POP3(HOST, proxy.port, timeout=30)
    client.user(ACCOUNT)
    client.pass_(dovecot.password)
    busy = run_sync(proxy.config, "--account", ACCOUNT)
    assert busy.returncode == 1 and "in use" in busy.stderr, busy.stderr
    client.quit()
    dovecot.deliver(dovecot.user, sample(1))
    done = run_sync(proxy.config, "--account", ACCOUNT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{ACCOUNT}: 1 new messages")
    assert cached(root, ACCOUNT) == [sample(0), sample(1)]
    proxy.stop()
    assert dovecot.password not in proxy.output()


def test_serve_prefetches_in_the_background(setup, dovecot, server_process):
    config, root, _ = setup
    messages = [sample(i) for i in range(2)]
    for m in messages:
        dovecot.deliver(dovecot.user, m)
    proxy = server_process(config(interval=1)).start()
    # No client logs in: the prefetch loop fills the cache by itself, and keeps doing so.
    eventually(lambda: user_dir(root, ACCOUNT).exists() and cached(root, ACCOUNT) == messages, timeout=10)
    dovecot.deliver(dovecot.user, sample(2))
    eventually(lambda: cached(root, ACCOUNT) == messages + [sample(2)], timeout=10)
    assert dovecot.messages(dovecot.user) == messages + [sample(2)]  # mirror: nothing deleted
    proxy.stop()
    assert dovecot.password not in proxy.output()
