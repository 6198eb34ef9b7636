"""What the nodes of a cluster count and renew together, in one real PostgreSQL: the failed-login
throttle (guesses spread over the nodes count together), and an OAuth2 account's token (one refresh per
expiry while two nodes serve it, counted at a real authorization server)."""

from __future__ import annotations

import poplib
import re
import subprocess
import sys

import pytest
from helpers.cluster import Cluster, url_of
from helpers.common import HOST
from helpers.oauth_server import authorise_by_device
from helpers.waiting import eventually

pytestmark = pytest.mark.dovecot


def attempt(port: int, user: str, password: str) -> bytes:
    """The answer to PASS (an -ERR as bytes too)."""
    client = poplib.POP3(HOST, port, timeout=30)
    try:
        client.user(user)
        try:
            return client.pass_(password)
        except poplib.error_proto as exc:
            return exc.args[0]
    finally:
        client.close()


def test_guesses_spread_over_the_nodes_count_together(server_process, tmp_path, dovecot, postgres_db):
    cluster = Cluster(server_process, tmp_path, dovecot, url_of(postgres_db),
                      throttle={"max_failures": 4, "base_delay": 0, "max_delay": 0})
    assert cluster.upgrade().returncode == 0
    alpha, beta = cluster.start("alpha"), cluster.start("beta")
    user = dovecot.user
    answers = [attempt(node.port, user, f"guess-{i}") for i, node in enumerate([alpha, beta] * 2)]
    assert all(b"[AUTH]" in answer for answer in answers), answers  # asked of the provider, refused
    for node in (alpha, beta):  # the fifth guess, on either node: refused without asking anyone
        assert b"[LOGIN-DELAY]" in attempt(node.port, user, "guess-5")
    # The provider was asked four times in all, not four times per node.
    logins = [line for line in alpha.output().splitlines() + beta.output().splitlines()
              if "provider refused the login" in line]
    assert len(logins) == 4, logins


def grants(log: list[str], kind: str) -> list[int]:
    return [int(m.group(1)) for line in log if (m := re.fullmatch(rf"grant {kind} (\d+)", line))]


def test_one_refresh_per_expiry_while_two_nodes_serve_the_account(server_process, tmp_path, short_oidc,
                                                                   postgres_db):
    oidc, account = short_oidc, "carol"
    assert oidc.dovecot is not None
    oidc.dovecot.maildir(account)
    # Tokens live 6 s and are renewed 3 s before they expire: one refresh every 3 s or so, by one node.
    cluster = Cluster(server_process, tmp_path, oidc.dovecot, url_of(postgres_db),
                      upstream={"port": oidc.dovecot.port, "tls": "starttls"},
                      **{f'accounts."{account}"': {},
                         f'accounts."{account}".oauth2': oidc.oauth2_config(refresh_margin=3)})
    assert cluster.upgrade().returncode == 0
    config = cluster.config("tool")
    authorise_by_device(oidc, config, account)
    assert not list(cluster.root.rglob("oauth2-token.json"))  # the token is in the database
    done = subprocess.run([sys.executable, "-m", "pop3proxy", "passwd", account, "-c", str(config),
                           "--password-stdin"], input="local-pw\n", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr

    alpha, beta = cluster.start("alpha"), cluster.start("beta")
    before = len(grants(oidc.log, "refresh_token"))
    eventually(lambda: len(grants(oidc.log, "refresh_token")) >= before + 4, timeout=90,
               message="four refreshes while both nodes run")
    times = grants(oidc.log, "refresh_token")[before:]
    gaps = [later - earlier for earlier, later in zip(times, times[1:])]
    # Two nodes refreshing on their own would refresh each expiry twice, milliseconds apart.
    assert min(gaps) >= 1500, gaps
    for node in (alpha, beta):  # and the account is served by either node with the shared token
        client = poplib.POP3(HOST, node.port, timeout=30)
        client.user(account)
        client.pass_("local-pw")
        client.quit()
    assert "invalid_grant" not in alpha.output() + beta.output()
