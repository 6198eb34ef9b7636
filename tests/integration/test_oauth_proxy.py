"""OAuth2 end to end: a real authorization server (oidc-provider), an OAuth2-only Dovecot, the real
`pop3proxy oauth login` and `passwd` commands, a pop3proxy process, and real clients (poplib, curl).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import poplib
import re
import secrets
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from helpers.common import HOST, require_tool, write_config
from helpers.proxy import Proxy, cached, retr_all, sample
from helpers.waiting import eventually

from pop3proxy.store.paths import user_dir

_serial = itertools.count(1)


def new_user(server) -> str:
    name = f"o{next(_serial):03d}-{secrets.token_hex(2)}"
    server.maildir(name)
    return name


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}


def cli(*args: str, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pop3proxy", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=env())


def oauth_login_device(config: Path, account: str, oidc, user: str) -> str:
    """`pop3proxy oauth login ACCOUNT` (device flow) with the user approving on the server's page."""
    proc = subprocess.Popen([sys.executable, "-m", "pop3proxy", "oauth", "login", account, "-c", str(config),
                             "--flow", "device"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env())
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        match = re.search(r"\(or open (\S+)\)", line)
        if match:
            oidc.approve_device(match.group(1), user)
            break
    lines.append(proc.stdout.read())
    assert proc.wait(60) == 0, "".join(lines)
    return "".join(lines)


def oauth_config(proxy: Proxy, account: str, oidc, **oauth2) -> dict:
    return {f'accounts."{account}"': {}, f'accounts."{account}".oauth2': oidc.oauth2_config(**oauth2)}


def set_local_password(config: Path, account: str, password: str) -> None:
    done = cli("passwd", account, "-c", str(config), "--password-stdin", stdin=password + "\n")
    assert done.returncode == 0, done.stderr
    assert "local password set" in done.stdout


def token_file(proxy: Proxy, account: str) -> Path:
    return user_dir(proxy.root, account) / "oauth2-token.json"


@pytest.fixture
def oauth_proxy(server_process, tmp_path, oauth_dovecot, oidc_server):
    """A proxy in front of the OAuth2-only Dovecot, plus one authorised account with a local password."""
    account = new_user(oauth_dovecot)
    sections = {
        "upstream": {"port": oauth_dovecot.port, "tls": "starttls"},
        "filters": [{"use": "headers", "add": {"X-Filtered-By": "pop3proxy"}}],
        **oauth_config(None, account, oidc_server),
    }
    proxy = Proxy(server_process, tmp_path, oauth_dovecot, **sections)
    config = proxy.config()
    output = oauth_login_device(config, account, oidc_server, account)
    assert "Authorised" in output
    set_local_password(config, account, "local-pw")
    proxy.account = account
    proxy.start()
    yield proxy
    proxy.stop()


def test_token_file_is_private_and_holds_no_secret_in_status(oauth_proxy):
    path = token_file(oauth_proxy, oauth_proxy.account)
    assert path.stat().st_mode & 0o777 == 0o600
    assert (path.parent / "local-password").stat().st_mode & 0o777 == 0o600
    tokens = json.loads(path.read_text())
    done = cli("oauth", "status", "-c", str(oauth_proxy.config()))
    assert done.returncode == 0
    assert f"{oauth_proxy.account}: valid" in done.stdout and "local password set" in done.stdout
    assert tokens["access_token"] not in done.stdout + done.stderr
    assert tokens["refresh_token"] not in done.stdout + done.stderr


def test_legacy_poplib_client_reads_the_oauth2_mailbox_cached_and_filtered(oauth_proxy, oauth_dovecot):
    account = oauth_proxy.account
    for i in range(3):
        oauth_dovecot.deliver(account, sample(i))
    client = oauth_proxy.client(account, "local-pw")
    messages = retr_all(client)
    client.quit()
    assert len(messages) == 3
    assert all(m.startswith(b"X-Filtered-By: pop3proxy\r\n") for m in messages)
    assert sorted(cached(oauth_proxy, account)) == sorted(messages)
    assert f"user=<{account}>, method=XOAUTH2" in oauth_dovecot.log_text()
    tokens = json.loads(token_file(oauth_proxy, account).read_text())
    assert tokens["access_token"] not in oauth_proxy.output()


def test_legacy_curl_client_lists_and_reads(oauth_proxy, oauth_dovecot):
    account = oauth_proxy.account
    oauth_dovecot.deliver(account, sample(7))
    curl = require_tool("curl", "curl")
    url = f"pop3://{HOST}:{oauth_proxy.process.port}/1"
    done = subprocess.run([curl, "-sS", "--max-time", "20", "-u", f"{account}:local-pw", url],
                          capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert b"Subject: message 7" in done.stdout and b"X-Filtered-By: pop3proxy" in done.stdout


def test_wrong_local_password_is_refused_and_keeps_the_token(oauth_proxy):
    path = token_file(oauth_proxy, oauth_proxy.account)
    before = path.read_bytes()
    for _ in range(3):
        with pytest.raises(poplib.error_proto) as info:
            oauth_proxy.client(oauth_proxy.account, "wrong")
        assert b"[AUTH]" in info.value.args[0]
    assert path.read_bytes() == before
    client = oauth_proxy.client(oauth_proxy.account, "local-pw")  # the token still works
    client.quit()


def test_xoauth2_pass_through_with_curl(server_process, tmp_path, oauth_dovecot, oidc_server):
    user = new_user(oauth_dovecot)
    oauth_dovecot.deliver(user, sample(1))
    token = oidc_server.token_for(user)["access_token"]
    proxy = Proxy(server_process, tmp_path, oauth_dovecot,
                  upstream={"port": oauth_dovecot.port, "tls": "starttls"}).start()
    curl = require_tool("curl", "curl")
    url = f"pop3://{HOST}:{proxy.process.port}/1"
    done = subprocess.run([curl, "-sS", "--max-time", "20", "--sasl-ir", "--login-options", "AUTH=XOAUTH2",
                           "-u", f"{user}:", "--oauth2-bearer", token, url], capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert b"Subject: message 1" in done.stdout
    assert token not in proxy.output()
    proxy.stop()


@pytest.mark.parametrize("mechanism", ["XOAUTH2", "OAUTHBEARER"])
def test_bearer_pass_through_with_poplib(server_process, tmp_path, oauth_dovecot, oidc_server, mechanism):
    user = new_user(oauth_dovecot)
    oauth_dovecot.deliver(user, sample(2))
    token = oidc_server.token_for(user)["access_token"]
    proxy = Proxy(server_process, tmp_path, oauth_dovecot,
                  upstream={"port": oauth_dovecot.port, "tls": "starttls"}).start()
    client = poplib.POP3(HOST, proxy.process.port, timeout=30)
    assert mechanism in client.capa()["SASL"]
    if mechanism == "XOAUTH2":
        raw = f"user={user}\x01auth=Bearer {token}\x01\x01"
    else:
        raw = f"n,a={user},\x01host={HOST}\x01port={proxy.process.port}\x01auth=Bearer {token}\x01\x01"
    assert client._shortcmd(f"AUTH {mechanism}").startswith(b"+")
    assert client._shortcmd(base64.b64encode(raw.encode()).decode()).startswith(b"+OK")
    [message] = retr_all(client)
    client.quit()
    assert b"Subject: message 2" in message
    # A bad token: the provider's refusal reaches the client as an error challenge (RFC 7628), then
    # -ERR [AUTH] once the client has answered it.
    client = poplib.POP3(HOST, proxy.process.port, timeout=30)
    client._shortcmd(f"AUTH {mechanism}")
    challenge = client._shortcmd(base64.b64encode(raw.replace(token, "bogus-token").encode()).decode())
    assert challenge.startswith(b"+ ")
    with pytest.raises(poplib.error_proto) as info:
        client._shortcmd("AQ==" if mechanism == "OAUTHBEARER" else "")
    assert b"[AUTH]" in info.value.args[0]
    proxy.stop()


def test_client_credentials_service_principal(server_process, tmp_path, oauth_dovecot, oidc_server):
    account = oidc_server.service_user
    oauth_dovecot.maildir(account)
    oauth_dovecot.deliver(account, sample(3))
    proxy = Proxy(server_process, tmp_path, oauth_dovecot,
                  upstream={"port": oauth_dovecot.port, "tls": "starttls"},
                  **oauth_config(None, account, oidc_server, client_id="service", client_secret="service-secret",
                                 grant="client_credentials", scopes=["pop3"]))
    config = proxy.config()
    done = cli("oauth", "login", account, "-c", str(config))
    assert done.returncode == 0, done.stderr
    assert "without a refresh token" in done.stdout
    set_local_password(config, account, "svc-pw")
    token_file(proxy, account).unlink()  # the service gets a token by itself, too
    proxy.start()
    client = proxy.client(account, "svc-pw")
    assert any(b"Subject: message 3" in m for m in retr_all(client))
    client.quit()
    assert token_file(proxy, account).is_file()
    proxy.stop()


def test_cli_refuses_unknown_account_and_status_lists_accounts(tmp_path, oidc_server):
    config = write_config(tmp_path / "c.toml", {
        "upstream": {"host": HOST, "port": 1, "tls": "none"}, "cache": {"root": str(tmp_path / "cache")},
        'accounts."a"': {}, 'accounts."a".oauth2': oidc_server.oauth2_config()})
    done = cli("oauth", "login", "nobody", "-c", str(config))
    assert done.returncode == 2 and "not an [accounts] entry" in done.stderr and "Traceback" not in done.stderr
    done = cli("oauth", "status", "-c", str(config), "--json")
    assert json.loads(done.stdout)[0]["state"] == "not authorised"


def test_code_flow_with_pkce_and_loopback_redirect(tmp_path, oidc_server):
    config = write_config(tmp_path / "c.toml", {
        "upstream": {"host": HOST, "port": 1, "tls": "none"}, "cache": {"root": str(tmp_path / "cache")},
        'accounts."bob"': {}, 'accounts."bob".oauth2': oidc_server.oauth2_config()})
    proc = subprocess.Popen([sys.executable, "-m", "pop3proxy", "oauth", "login", "bob", "-c", str(config),
                             "--flow", "code"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env())
    assert proc.stdout is not None
    url = next(line.strip() for line in proc.stdout if line.startswith("http"))
    assert "code_challenge_method=S256" in url and "redirect_uri=http%3A%2F%2F127.0.0.1%3A" in url
    redirect = oidc_server.follow(url).headers["location"]
    # The browser delivers the redirect to the one-shot listener.
    with urllib.request.urlopen(redirect, timeout=10) as reply:
        assert b"authorised" in reply.read()
    rest = proc.stdout.read()
    assert proc.wait(30) == 0, rest
    tokens = json.loads((user_dir(tmp_path / "cache", "bob") / "oauth2-token.json").read_text())
    assert tokens["refresh_token"] and tokens["state"] == "ok"
    assert tokens["access_token"] not in rest


def test_login_throttle_applies_to_local_passwords(oauth_proxy):
    oauth_proxy.start(throttle={"max_failures": 2, "base_delay": 0, "max_delay": 0})
    for _ in range(2):
        with pytest.raises(poplib.error_proto) as info:
            oauth_proxy.client(oauth_proxy.account, "guess")
        assert b"[AUTH]" in info.value.args[0]
    with pytest.raises(poplib.error_proto) as info:
        oauth_proxy.client(oauth_proxy.account, "local-pw")  # even the right one, for now
    assert b"[LOGIN-DELAY]" in info.value.args[0]
    assert token_file(oauth_proxy, oauth_proxy.account).is_file()


def test_sync_command_fetches_an_oauth2_account_with_its_token(oauth_proxy, oauth_dovecot):
    account = oauth_proxy.account
    oauth_proxy.stop()
    oauth_dovecot.deliver(account, sample(11))
    done = cli("sync", "--account", account, "-c", str(oauth_proxy.config()))
    assert done.returncode == 0, done.stderr
    assert f"{account}: 1 new messages" in done.stdout
    assert any(b"Subject: message 11" in m for m in cached(oauth_proxy, account))


def test_service_prefetches_an_oauth2_account_without_any_login(oauth_proxy, oauth_dovecot):
    account = oauth_proxy.account
    oauth_dovecot.deliver(account, sample(12))
    oauth_proxy.start()  # the prefetch loop's first pass runs at start
    eventually(lambda: any(b"Subject: message 12" in m for m in cached(oauth_proxy, account)), timeout=20)


def test_legacy_fetchmail_moves_the_mail_home_and_the_provider_deletes_it(oauth_proxy, oauth_dovecot, tmp_path):
    """fetchmail (its default `auth any`, with XOAUTH2/OAUTHBEARER on offer) logs in with the local
    password, fetches and deletes; the deletion reaches the OAuth2-only Dovecot with the token."""
    fetchmail = require_tool("fetchmail", "fetchmail")
    account = oauth_proxy.account
    for i in (21, 22):
        oauth_dovecot.deliver(account, sample(i))
    outdir = tmp_path / "fetched"
    outdir.mkdir()
    deliver = tmp_path / "deliver.py"
    deliver.write_text("import os, sys\nd = sys.argv[1]\n"
                       "open(os.path.join(d, '%05d' % len(os.listdir(d))), 'wb').write(sys.stdin.buffer.read())\n")
    rc = tmp_path / "fetchmailrc"
    rc.write_text(f'poll {HOST} protocol pop3 port {oauth_proxy.process.port} user "{account}" password "local-pw"'
                  f' nokeep fetchall no rewrite no stripcr\n mda "{sys.executable} {deliver} {outdir}"\n')
    rc.chmod(0o600)
    done = subprocess.run([fetchmail, "-f", str(rc), "--invisible", "--nosyslog", "--sslproto", "", "-d0", "-v",
                           "--pidfile", str(tmp_path / "fm.pid")], capture_output=True, timeout=60,
                          env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, (done.stdout + done.stderr).decode(errors="replace")
    fetched = [path.read_bytes() for path in sorted(outdir.iterdir())]
    assert len(fetched) == 2 and all(b"X-Filtered-By: pop3proxy" in m for m in fetched)
    eventually(lambda: oauth_dovecot.messages(account) == [], timeout=20)
