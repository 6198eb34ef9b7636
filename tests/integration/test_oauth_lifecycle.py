"""OAuth2 tokens over time, against a real authorization server whose access tokens are JWTs living
a few seconds and an OAuth2-only Dovecot that validates them locally: renewal in the background and
during a session, the authorization server down, and a revoked grant (invalid_grant).
"""

from __future__ import annotations

import json
import logging
import os
import poplib
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers.common import HOST
from helpers.oauth_server import authorise_by_device
from helpers.proxy import Proxy, retr_all, sample
from helpers.waiting import eventually, wait_for

from pop3proxy.store.paths import user_dir

_METRICS_READY = re.compile(r"listening for metrics on \S+ port (\d+)")


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pop3proxy", *args], input=stdin, capture_output=True,
                          text=True, timeout=60, env=env())


def tokens(proxy: Proxy, account: str) -> dict:
    return json.loads((user_dir(proxy.root, account) / "oauth2-token.json").read_text())


def login(proxy: Proxy, account: str) -> tuple[poplib.POP3, bytes]:
    client = poplib.POP3(HOST, proxy.process.port, timeout=30)
    client.user(account)
    return client, client.pass_("local-pw")


def make_proxy(server_process, tmp_path, oidc, account: str, **extra) -> Proxy:
    """A proxy with `account` authorised (by the device flow of the real CLI) and a local password."""
    dovecot = oidc.dovecot
    dovecot.maildir(account)
    proxy = Proxy(server_process, tmp_path, dovecot,
                  upstream={"port": dovecot.port, "tls": "starttls", "delete": "mirror"},
                  **{f'accounts."{account}"': {}, f'accounts."{account}".oauth2': oidc.oauth2_config()},
                  **extra)
    config = proxy.config()
    authorise_by_device(oidc, config, account, env())
    done = cli("passwd", account, "-c", str(config), "--password-stdin", stdin="local-pw\n")
    assert done.returncode == 0, done.stderr
    return proxy


def test_token_expiring_during_a_session_is_renewed_for_the_mirror_deletion(server_process, tmp_path, short_oidc):
    account = "erin"
    proxy = make_proxy(server_process, tmp_path, short_oidc, account)
    short_oidc.dovecot.deliver(account, sample(1))
    proxy.start()
    client = proxy.client(account, "local-pw")
    used = tokens(proxy, account)
    assert len(retr_all(client)) == 1
    client.dele(1)
    # The access token of the login expires while the session is open (a few seconds).
    eventually(lambda: time.time() > used["expires_at"] + 1, timeout=30)
    client.quit()
    # The deletion reached Dovecot with a renewed token.
    eventually(lambda: short_oidc.dovecot.messages(account) == [], timeout=20)
    assert tokens(proxy, account)["access_token"] != used["access_token"]
    assert tokens(proxy, account)["state"] == "ok"
    # Renewed in the background too: the token file changes again without any login.
    current = tokens(proxy, account)["access_token"]
    eventually(lambda: tokens(proxy, account)["access_token"] != current, timeout=30)
    for secret in (used["access_token"], used["refresh_token"], current):
        assert secret not in proxy.output()
    proxy.stop()


def test_authorization_server_down_keeps_the_token_and_serves_the_cache(server_process, tmp_path, short_oidc):
    account = "dave"
    proxy = make_proxy(server_process, tmp_path, short_oidc, account)
    short_oidc.dovecot.deliver(account, sample(2))
    proxy.start()
    client = proxy.client(account, "local-pw")  # online: caches the message
    assert len(retr_all(client)) == 1
    client.quit()
    short_oidc.stop()  # the authorization server goes away; Dovecot still validates tokens itself
    before = tokens(proxy, account)
    if before["expires_at"] - time.time() > 1.5:
        # The cached token keeps working until it expires.
        client, reply = login(proxy, account)
        assert b"offline" not in reply and len(retr_all(client)) == 1
        client.quit()
    eventually(lambda: time.time() > before["expires_at"] + 1, timeout=30)
    client, reply = login(proxy, account)  # no valid token: the cache is served, nothing is lost
    assert b"offline" in reply
    assert len(retr_all(client)) == 1
    client.quit()
    wait_for(proxy, f"OAuth2 account '{account}' cannot reach the provider now")
    after = tokens(proxy, account)
    assert after["state"] == "ok" and after["refresh_token"] == before["refresh_token"]
    assert after["error"]  # the failure is recorded for `oauth status`
    wait_for(proxy, "retrying in", timeout=20)
    status = cli("oauth", "status", "-c", str(proxy.config()))
    assert f"{account}: expired" in status.stdout
    proxy.stop()


def test_revoked_grant_marks_the_account_needs_authorisation(server_process, tmp_path, short_oidc):
    account = "frank"
    proxy = make_proxy(server_process, tmp_path, short_oidc, account, metrics={"host": HOST, "port": 0})
    short_oidc.dovecot.deliver(account, sample(3))
    proxy.start()
    metrics_port = int(wait_for(proxy, _METRICS_READY).group(1))
    short_oidc.revoke(tokens(proxy, account)["refresh_token"])
    # The next renewal gets invalid_grant: the account is marked, the token file is kept.
    eventually(lambda: tokens(proxy, account)["state"] == "needs_authorisation", timeout=30)
    # The right local password with a token that needs authorisation is no failed guess: however often
    # the client retries (past throttle.max_failures), it keeps being told why, never LOGIN-DELAY.
    for _ in range(7):
        with pytest.raises(poplib.error_proto) as info:
            proxy.client(account, "local-pw")
        assert b"[AUTH]" in info.value.args[0] and b"authorisation" in info.value.args[0], info.value
    with urllib.request.urlopen(f"http://{HOST}:{metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    assert f'pop3proxy_oauth2_needs_authorisation{{account="{account}"}} 1.0' in text
    assert 'pop3proxy_oauth2_refreshes_total{result="invalid_grant"}' in text
    status = cli("status", "-c", str(proxy.config()))
    assert "NEEDS AUTHORISATION" in status.stdout and "oauth login frank" in status.stdout
    # Authorising again brings the account back, without restarting the service.
    config = proxy.config()
    proc = subprocess.Popen([sys.executable, "-m", "pop3proxy", "oauth", "login", account, "-c", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env())
    for line in proc.stdout:
        match = re.search(r"\(or open (\S+)\)", line)
        if match:
            short_oidc.approve_device(match.group(1), account)
            break
    proc.stdout.read()
    assert proc.wait(60) == 0
    client = proxy.client(account, "local-pw")
    assert len(retr_all(client)) == 1
    client.quit()
    proxy.stop()


async def test_failed_renewals_back_off_up_to_retry_max(tmp_path, autojump_clock):
    """The authorization server refuses connections: retries after 5, 10, 20 s, then every retry_max."""
    import trio
    from helpers.dovecot import free_port

    from pop3proxy.config import OAuth2Settings
    from pop3proxy.proxy.oauth import TokenManager

    settings = OAuth2Settings(client_id="service", client_secret="s", grant="client_credentials",
                              token_url=f"http://{HOST}:{free_port()}/token", retry_max=30, timeout=5)
    manager = TokenManager(tmp_path, {"svc": settings})
    delays: list[float] = []
    enough = trio.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            found = re.search(r"retrying in (\S+) s", record.getMessage())
            if found:
                delays.append(float(found.group(1)))
                if len(delays) == 6:
                    enough.set()

    logger = logging.getLogger("pop3proxy.oauth2")
    watch = Watch()
    logger.addHandler(watch)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(manager.run)
            await enough.wait()
            nursery.cancel_scope.cancel()
    finally:
        logger.removeHandler(watch)
    assert delays == [5, 10, 20, 30, 30, 30]
    assert not (user_dir(tmp_path, "svc") / "oauth2-token.json").exists()
