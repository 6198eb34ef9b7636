"""Logging in to a real OAuth2-only Dovecot with tokens from a real authorization server:
SASL XOAUTH2 (two-line form) and OAUTHBEARER (RFC 7628, with its error challenge)."""

from __future__ import annotations

import pytest

from pop3proxy.net.bearer_login import login_bearer
from pop3proxy.net.endpoint import Endpoint, UpstreamAuthError
from pop3proxy.net.pop3_client import connect
from pop3proxy.pop3.sasl import BearerToken

HOST = "127.0.0.1"


def endpoint(server, tls: str = "starttls") -> Endpoint:
    port = server.tls_port if tls == "implicit" else server.port
    return Endpoint(HOST, port, tls, ca_file=str(server.ca_file), timeout=10)


@pytest.fixture(scope="module")
def alice_token(oidc_server, oauth_dovecot) -> dict:
    oauth_dovecot.maildir("alice")
    return oidc_server.token_for("alice")


@pytest.mark.parametrize("mechanism", ["XOAUTH2", "OAUTHBEARER"])
async def test_bearer_login_reads_mail(oauth_dovecot, alice_token, mechanism):
    oauth_dovecot.deliver("alice", b"Subject: oauth\r\n\r\nhello\r\n")
    async with await connect(endpoint(oauth_dovecot)) as client:
        assert {"XOAUTH2", "OAUTHBEARER"} <= set(client.capabilities["SASL"])
        method = await login_bearer(client, "alice", alice_token["access_token"], (mechanism,))
        assert method == mechanism.lower()
        count, _ = await client.stat()
        assert count >= 1
        await client.quit()
    assert f"user=<alice>, method={mechanism}" in oauth_dovecot.log_text()


async def test_login_with_a_bearer_token_password_picks_sasl(oauth_dovecot, alice_token):
    async with await connect(endpoint(oauth_dovecot, "implicit")) as client:
        assert await client.login("alice", BearerToken(alice_token["access_token"])) == "xoauth2"
        await client.noop()


@pytest.mark.parametrize("mechanism", ["XOAUTH2", "OAUTHBEARER"])
async def test_refused_token_answers_the_challenge_and_keeps_the_session(oauth_dovecot, mechanism):
    bad = "not-a-valid-token-" + mechanism
    async with await connect(endpoint(oauth_dovecot)) as client:
        with pytest.raises(UpstreamAuthError) as info:
            await login_bearer(client, "alice", bad, (mechanism,))
        assert info.value.code == "AUTH"
        assert bad not in str(info.value)
        # The challenge was answered: the session is still in step and can try again.
        with pytest.raises(UpstreamAuthError):
            await login_bearer(client, "alice", bad, (mechanism,))


async def test_token_of_another_user_is_refused(oauth_dovecot, alice_token):
    oauth_dovecot.maildir("bob")
    async with await connect(endpoint(oauth_dovecot)) as client:
        with pytest.raises(UpstreamAuthError):
            await login_bearer(client, "bob", alice_token["access_token"])


async def test_provider_without_oauth_mechanisms_is_a_clear_error(dovecot):
    async with await connect(endpoint(dovecot.server)) as client:
        with pytest.raises(UpstreamAuthError) as info:
            await login_bearer(client, dovecot.user, "token")
        assert info.value.code == "SYS/PERM"
        assert "XOAUTH2" in str(info.value)
