"""The proxy end to end: real clients → pop3proxy (a real process) → a real Dovecot."""

from __future__ import annotations

import poplib
import re
import subprocess

import pytest
from helpers.common import (
    HOST,
    drop_connection,
    require_tool,
)
from helpers.proxy import cached, closed_port, retr_all, sample
from helpers.waiting import eventually, wait_for

from pop3proxy.store.paths import user_dir
from pop3proxy.store.state import UserState

pytestmark = pytest.mark.dovecot


@pytest.mark.parametrize("backend", ["maildir", "mbox"])
def test_login_syncs_and_serves_byte_exact(proxy, dovecot, backend):
    messages = [sample(i, 2000) for i in range(5)]
    for m in messages:
        dovecot.deliver(dovecot.user, m)
    proxy.sections["cache"] = {"backend": backend}
    proxy.start()
    client = proxy.client(dovecot.user, dovecot.password)
    assert retr_all(client) == messages
    sizes = [int(line.split()[1]) for line in client.list()[1]]
    assert sizes == [len(m) for m in messages]
    client.quit()
    assert cached(proxy, dovecot.user, backend) == messages
    # mirror policy and no DELE: the provider still has everything
    assert dovecot.messages(dovecot.user) == messages
    # a second login fetches nothing twice
    client = proxy.client(dovecot.user, dovecot.password)
    assert client.stat()[0] == 5
    client.quit()
    assert len(cached(proxy, dovecot.user, backend)) == 5


def test_new_mail_appears_at_next_login_and_uids_are_stable(proxy, dovecot):
    dovecot.deliver(dovecot.user, sample(1))
    proxy.start()
    client = proxy.client(dovecot.user, dovecot.password)
    first_uids = client.uidl()[1]
    client.quit()
    dovecot.deliver(dovecot.user, sample(2))
    client = proxy.client(dovecot.user, dovecot.password)
    uids = client.uidl()[1]
    assert uids[0] == first_uids[0] and len(uids) == 2
    assert retr_all(client) == [sample(1), sample(2)]
    client.quit()


def test_wrong_password_gives_auth_and_touches_nothing(proxy, dovecot):
    dovecot.deliver(dovecot.user, sample(1))
    proxy.start()
    client = poplib.POP3(HOST, proxy.process.port, timeout=10)
    client.user(dovecot.user)
    with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\]"):
        client.pass_("not-the-password")
    client.quit()
    assert not user_dir(proxy.root, dovecot.user).exists()


def test_second_session_is_in_use(proxy, dovecot):
    proxy.start()
    first = proxy.client(dovecot.user, dovecot.password)
    second = poplib.POP3(HOST, proxy.process.port, timeout=10)
    second.user(dovecot.user)
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        second.pass_(dovecot.password)
    second.quit()
    first.quit()
    proxy.client(dovecot.user, dovecot.password).quit()


def test_the_mailbox_is_free_when_the_client_hears_quit_answered(proxy, dovecot):
    # A client that logs in again at once after QUIT may reach another worker process (or node): the
    # account's lock must already be given back, not a moment after the +OK (that login waited for it).
    from pop3proxy.store.locks import lock_mailbox

    for i in range(3):
        dovecot.deliver(dovecot.user, sample(i))
    proxy.start()
    for deleting in (False, True, False):
        client = proxy.client(dovecot.user, dovecot.password)
        if deleting:
            client.dele(1)
        client.quit()
        lock_mailbox(proxy.root, dovecot.user).release()  # raises MailboxBusy while a session holds it


def test_mirror_policy_deletes_upstream_at_quit(proxy, dovecot):
    messages = [sample(i) for i in range(4)]
    for m in messages:
        dovecot.deliver(dovecot.user, m)
    proxy.start(upstream={"delete": "mirror"})
    client = proxy.client(dovecot.user, dovecot.password)
    client.dele(2)
    client.dele(4)
    client.quit()
    assert dovecot.messages(dovecot.user) == [messages[0], messages[2]]
    assert cached(proxy, dovecot.user) == [messages[0], messages[2]]
    client = proxy.client(dovecot.user, dovecot.password)
    assert retr_all(client) == [messages[0], messages[2]]
    client.quit()


def test_mirror_without_quit_deletes_nothing(proxy, dovecot):
    messages = [sample(i) for i in range(3)]
    for m in messages:
        dovecot.deliver(dovecot.user, m)
    proxy.start()
    client = proxy.client(dovecot.user, dovecot.password)
    client.dele(1)
    drop_connection(client)
    # The proxy has finished with the dropped session (and would have deleted upstream by now).
    wait_for(proxy, "session end user=", timeout=15)
    assert dovecot.messages(dovecot.user) == messages
    client = proxy.client(dovecot.user, dovecot.password)
    assert client.stat()[0] == 3
    client.quit()


def test_after_fetch_moves_mail_home(proxy, dovecot):
    messages = [sample(i) for i in range(3)]
    for m in messages:
        dovecot.deliver(dovecot.user, m)
    proxy.start(upstream={"delete": "after_fetch"})
    client = proxy.client(dovecot.user, dovecot.password)
    assert retr_all(client) == messages
    client.quit()
    assert dovecot.messages(dovecot.user) == []
    assert cached(proxy, dovecot.user) == messages
    client = proxy.client(dovecot.user, dovecot.password)
    client.dele(1)
    client.quit()
    assert cached(proxy, dovecot.user) == messages[1:]


def test_never_policy_keeps_upstream_and_never_refetches(proxy, dovecot):
    messages = [sample(i) for i in range(3)]
    for m in messages:
        dovecot.deliver(dovecot.user, m)
    proxy.start(upstream={"delete": "never"})
    client = proxy.client(dovecot.user, dovecot.password)
    client.dele(1)
    client.quit()
    assert dovecot.messages(dovecot.user) == messages
    client = proxy.client(dovecot.user, dovecot.password)
    assert retr_all(client) == messages[1:]
    client.quit()


def test_offline_login_serves_cache(proxy, dovecot):
    messages = [sample(i) for i in range(3)]
    for m in messages:
        dovecot.deliver(dovecot.user, m)
    never_user, never_password = dovecot.new_user()
    proxy.start()
    proxy.client(dovecot.user, dovecot.password).quit()
    # The provider goes away.
    proxy.start(upstream={"port": closed_port()})
    client = poplib.POP3(HOST, proxy.process.port, timeout=10)
    client.user(dovecot.user)
    reply = client.pass_(dovecot.password)
    assert b"offline" in reply
    assert retr_all(client) == messages
    client.dele(1)
    client.quit()
    for user, password, code in [
        (dovecot.user, "wrong", r"\[AUTH\]"),
        (never_user, never_password, r"\[SYS/TEMP\]"),
    ]:
        client = poplib.POP3(HOST, proxy.process.port, timeout=10)
        client.user(user)
        with pytest.raises(poplib.error_proto, match=code):
            client.pass_(password)
        client.quit()
    # Back online: the offline deletion reaches the provider (mirror policy).
    proxy.start()
    client = proxy.client(dovecot.user, dovecot.password)
    assert retr_all(client) == messages[1:]
    client.quit()
    assert dovecot.messages(dovecot.user) == messages[1:]


def test_rejected_password_drops_offline_hash(proxy, dovecot):
    """Only the password the hash matches, refused by the provider (changed upstream), drops the hash."""
    proxy.start()
    proxy.client(dovecot.user, dovecot.password).quit()
    state_db = user_dir(proxy.root, dovecot.user) / "state.db"
    with UserState(state_db) as state:
        assert state.get_meta("offline_hash")
    client = poplib.POP3(HOST, proxy.process.port, timeout=10)
    client.user(dovecot.user)
    with pytest.raises(poplib.error_proto):
        client.pass_("wrong")  # anyone's guess: the real user's offline copy stays usable
    client.quit()
    with UserState(state_db) as state:
        assert state.get_meta("offline_hash")
    dovecot.add_user(dovecot.user, "changed upstream")
    client = poplib.POP3(HOST, proxy.process.port, timeout=10)
    client.user(dovecot.user)
    with pytest.raises(poplib.error_proto):
        client.pass_(dovecot.password)  # the old password, which the hash matches
    client.quit()
    with UserState(state_db) as state:
        assert state.get_meta("offline_hash") is None


@pytest.mark.parametrize("tls", ["starttls", "none"])
def test_other_upstream_tls_modes(proxy, dovecot, tls):
    dovecot.deliver(dovecot.user, sample(7))
    proxy.start(upstream={"tls": tls, "port": dovecot.port})
    client = proxy.client(dovecot.user, dovecot.password)
    assert retr_all(client) == [sample(7)]
    client.quit()


def test_untrusted_provider_certificate_is_refused_not_downgraded(proxy, dovecot):
    proxy.start(upstream={"ca_file": ""})  # the system store does not trust the test CA
    client = poplib.POP3(HOST, proxy.process.port, timeout=10)
    client.user(dovecot.user)
    with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
        client.pass_(dovecot.password)
    client.quit()
    wait_for(proxy.output, re.compile("certificate", re.IGNORECASE))  # logged before the reply, read after


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
def test_a_certificate_failure_is_an_error_not_offline_mode(proxy, dovecot, tls):
    """An attacker in the middle must not be able to force offline mode with a bad certificate."""
    dovecot.deliver(dovecot.user, sample(1))
    proxy.start()
    proxy.client(dovecot.user, dovecot.password).quit()  # an offline copy and hash exist now
    port = dovecot.tls_port if tls == "implicit" else dovecot.port
    proxy.start(upstream={"ca_file": "", "tls": tls, "port": port})  # the system store does not trust it
    client = poplib.POP3(HOST, proxy.process.port, timeout=10)
    client.user(dovecot.user)
    with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
        client.pass_(dovecot.password)
    client.quit()
    # The line is logged before the reply; the thread that reads the proxy's output may see it later.
    log = wait_for(proxy.output, "cannot be trusted").string
    assert "serving cached mail" not in log
    assert "certificate verification failed" in log  # the reason, loudly: it may be an attack


def test_refused_connection_still_goes_offline(proxy, dovecot):
    dovecot.deliver(dovecot.user, sample(2))
    proxy.start()
    client = proxy.client(dovecot.user, dovecot.password)
    assert retr_all(client) == [sample(2)]
    client.quit()
    proxy.start(upstream={"port": closed_port()})
    client = poplib.POP3(HOST, proxy.process.port, timeout=10)
    client.user(dovecot.user)
    assert "offline" in client.pass_(dovecot.password).decode()
    assert retr_all(client) == [sample(2)]
    client.quit()


def test_name_variants_of_one_provider_account_share_one_throttle(proxy, dovecot):
    # The address threshold is out of the way: only the account (pair) can block here.
    proxy.start(throttle={"max_failures": 3, "address_failures": 100, "base_delay": 0, "max_delay": 0})
    port = dovecot.tls_port
    for name in (f"{dovecot.user}#127.0.0.1:{port}", f"{dovecot.user}#127.0.0.1:000{port}", dovecot.user.upper()):
        client = poplib.POP3(HOST, proxy.process.port, timeout=10)
        client.user(name)
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            client.pass_("wrong")
        client.quit()
    client = poplib.POP3(HOST, proxy.process.port, timeout=10)
    client.user(dovecot.user)
    with pytest.raises(poplib.error_proto, match=r"\[LOGIN-DELAY\]"):
        client.pass_(dovecot.password)
    client.quit()


def test_after_fetch_deletes_upstream_what_the_client_deleted_before_the_provider_did(proxy, dovecot):
    """A message cached while the provider kept it (its QUIT after the fetch never went through, or
    another policy) and deleted by the client must still go from the provider under after_fetch."""
    messages = [sample(1), sample(2)]
    for m in messages:
        dovecot.deliver(dovecot.user, m)
    proxy.start(upstream={"delete": "never"})  # the provider keeps both after the fetch
    client = proxy.client(dovecot.user, dovecot.password)
    client.dele(1)
    client.quit()
    assert dovecot.messages(dovecot.user) == messages
    proxy.start(upstream={"delete": "after_fetch"})
    client = proxy.client(dovecot.user, dovecot.password)
    assert retr_all(client) == messages[1:]
    client.quit()
    assert dovecot.messages(dovecot.user) == []


def test_routing_forms_and_allow_list(proxy, dovecot):
    dovecot.deliver(dovecot.user, sample(3))
    proxy.start(routes={"example.test": {"host": HOST, "port": dovecot.port, "tls": "starttls", "ca_file": str(dovecot.ca_file)}})
    # user#host:port naming the configured provider
    client = proxy.client(f"{dovecot.user}#{HOST}:{dovecot.tls_port}", dovecot.password)
    assert retr_all(client) == [sample(3)]
    client.quit()
    # a host that is not configured is never contacted
    for login in (f"{dovecot.user}#evil.example", f"{dovecot.user}#{HOST}:{closed_port()}"):
        client = poplib.POP3(HOST, proxy.process.port, timeout=10)
        client.user(login)
        with pytest.raises(poplib.error_proto, match="not configured"):
            client.pass_(dovecot.password)
        client.quit()
    # user@domain through [routes]: Dovecot knows this user by the full address
    address = f"{dovecot.user}x@example.test"
    dovecot.add_user(address, "routed-pw")
    dovecot.deliver(address, sample(9))
    client = proxy.client(address, "routed-pw")
    assert retr_all(client) == [sample(9)]
    client.quit()


def test_accounts_section_maps_remote_user(proxy, dovecot):
    dovecot.deliver(dovecot.user, sample(4))
    proxy.start(**{f'accounts."{"local-name"}"': {"remote_user": dovecot.user}})
    client = proxy.client("local-name", dovecot.password)
    assert retr_all(client) == [sample(4)]
    client.quit()


def test_login_budget_leaves_rest_for_next_login(proxy, dovecot):
    total = 150
    for i in range(total):
        dovecot.deliver(dovecot.user, sample(i, 20_000))
    proxy.start(sync={"login_budget": 0.05})
    client = proxy.client(dovecot.user, dovecot.password)
    first = client.stat()[0]
    client.quit()
    assert first < total
    eventually(lambda: len(cached(proxy, dovecot.user)) == total, timeout=60)
    wait_for(proxy, "synced", timeout=30)
    client = proxy.client(dovecot.user, dovecot.password)
    assert client.stat()[0] == total
    client.quit()


def test_curl_and_fetchmail_through_the_proxy(proxy, dovecot, tmp_path):
    messages = [sample(i, 500) for i in range(3)]
    for m in messages:
        dovecot.deliver(dovecot.user, m)
    proxy.start()
    curl = require_tool("curl", "curl")
    url = f"pop3://{dovecot.user}:{dovecot.password}@{HOST}:{proxy.process.port}/2"
    out = subprocess.run([curl, "-s", "-S", "--max-time", "20", url], capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout == messages[1]
    fetchmail = require_tool("fetchmail", "fetchmail")
    outdir = tmp_path / "fetched"
    outdir.mkdir()
    rc = tmp_path / "fetchmailrc"
    rc.write_text(
        f'poll {HOST} protocol pop3 port {proxy.process.port} user "{dovecot.user}" password "{dovecot.password}"'
        f' nokeep fetchall no rewrite no stripcr\n mda "sh -c \'cat > {outdir}/$$\'"\n'
    )
    rc.chmod(0o600)
    result = subprocess.run(
        [fetchmail, "-f", str(rc), "--invisible", "--nosyslog", "--sslproto", "", "-d0", "--pidfile", str(tmp_path / "fm.pid")],
        capture_output=True, timeout=60, env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, (result.stdout + result.stderr).decode(errors="replace")
    fetched = [p.read_bytes() for p in outdir.iterdir()]  # one file per delivery (the MDA's pid)
    assert sorted(fetched) == sorted(messages)
    # fetchmail deleted them through the proxy, and the mirror policy deleted them upstream
    assert dovecot.messages(dovecot.user) == []


@pytest.mark.parametrize("workers", [1, 2])
def test_fresh_prefetch_serves_login_without_asking_the_provider(proxy, dovecot, tmp_path, workers):
    """An account with a configured password, synced in the background moments ago, logs in from the
    cache: no provider round trip (the warm-login latency that users feel). With worker processes the
    supervisor prefetches and the workers serve."""
    messages = [sample(i) for i in range(3)]
    for m in messages:
        dovecot.deliver(dovecot.user, m)
    secret = tmp_path / "pw"
    secret.write_text(dovecot.password + "\n")
    secret.chmod(0o600)
    proxy.start(
        sync={"interval": 60},
        listen={"host": HOST, "port": 0, "workers": workers},
        **{f'accounts."{dovecot.user}"': {"password_file": str(secret)}},
    )
    eventually(lambda: "prefetch of" in proxy.output() and "complete" in proxy.output(), timeout=20)
    assert len(cached(proxy, dovecot.user)) == 3

    def provider_logins() -> int:
        return dovecot.log_text().count(f"Login: user=<{dovecot.user}>")

    before = provider_logins()
    client = proxy.client(dovecot.user, dovecot.password)
    assert retr_all(client) == messages
    client.dele(1)
    client.quit()
    # Served from the cache: the provider saw no login for it, until the mirror deletion at QUIT.
    assert provider_logins() == before + 1, proxy.output()
    assert dovecot.messages(dovecot.user) == messages[1:]
    # Any other password goes to the provider as always, and is refused there.
    client = poplib.POP3(HOST, proxy.process.port, timeout=10)
    client.user(dovecot.user)
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        client.pass_("not-it")
    client.quit()
