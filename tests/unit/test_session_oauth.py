"""AUTH XOAUTH2 / OAUTHBEARER from modern clients: the session hands the token on as a BearerToken."""

from __future__ import annotations

import pytest

from pop3proxy.pop3 import sasl
from pop3proxy.pop3 import session as s


def run(session: s.Session, data: bytes) -> tuple[bytes, list[s.Action]]:
    session.receive_data(data)
    sent, other = [], []
    while (actions := session.next_actions()) is not None:
        for action in actions:
            (sent.append(action.data) if isinstance(action, s.Send) else other.append(action))
        if other:
            break
    return b"".join(sent), other


def test_capa_and_auth_list_offer_bearer_mechanisms_only_when_enabled():
    plain_only = s.Session()
    assert "SASL PLAIN" in plain_only.capabilities()
    out, _ = run(plain_only, b"AUTH XOAUTH2\r\n")
    assert out.startswith(b"-ERR unsupported authentication mechanism")
    modern = s.Session(bearer_auth=True)
    assert "SASL PLAIN XOAUTH2 OAUTHBEARER" in modern.capabilities()
    out, _ = run(modern, b"AUTH\r\n")
    assert b"XOAUTH2\r\nOAUTHBEARER\r\n.\r\n" in out


@pytest.mark.parametrize("mechanism,response", [
    ("XOAUTH2", sasl.xoauth2("alice@example.com", "tok-en")),
    ("OAUTHBEARER", sasl.oauthbearer("alice@example.com", "tok-en", "proxy", 110)),
])
@pytest.mark.parametrize("initial", [True, False])
def test_bearer_login_becomes_authenticate_with_a_token(mechanism, response, initial):
    session = s.Session(bearer_auth=True)
    if initial:
        out, actions = run(session, f"AUTH {mechanism} {response}\r\n".encode())
    else:
        out, actions = run(session, f"AUTH {mechanism}\r\n".encode())
        assert out == b"+ \r\n"
        out, actions = run(session, response.encode() + b"\r\n")
    [auth] = actions
    assert isinstance(auth, s.Authenticate)
    assert (auth.user, auth.mechanism) == ("alice@example.com", mechanism)
    assert isinstance(auth.password, sasl.BearerToken) and auth.password == "tok-en"
    assert "tok-en" not in repr(auth)


def test_malformed_bearer_response_is_a_clear_err_and_the_session_goes_on():
    session = s.Session(bearer_auth=True)
    run(session, b"AUTH XOAUTH2\r\n")
    out, actions = run(session, b"dXNlcj1hbGljZQ==\r\n")  # "user=alice": no token
    assert out.startswith(b"-ERR [AUTH] XOAUTH2:") and not actions
    out, _ = run(session, b"CAPA\r\n")
    assert out.startswith(b"+OK")


def test_bearer_auth_needs_tls_like_plain():
    session = s.Session(bearer_auth=True, plaintext_auth=False, stls_available=True)
    out, actions = run(session, b"AUTH XOAUTH2 " + sasl.xoauth2("a", "t").encode() + b"\r\n")
    assert out.startswith(b"-ERR [AUTH] plaintext authentication disallowed") and not actions


@pytest.mark.parametrize("mechanism,answer", [("OAUTHBEARER", b"AQ=="), ("XOAUTH2", b"")])
def test_refused_token_gets_an_error_challenge_then_err(mechanism, answer):
    session = s.Session(bearer_auth=True)
    response = sasl.xoauth2("a", "bad") if mechanism == "XOAUTH2" else sasl.oauthbearer("a", "bad", "h", 110)
    _, [auth] = run(session, f"AUTH {mechanism} {response}\r\n".encode())
    [challenge] = session.login_failed("invalid token", "AUTH")
    assert challenge.data.startswith(b"+ ")
    assert sasl.error_challenge(challenge.data[2:].decode())["status"] == "invalid_token"
    out, actions = run(session, answer + b"\r\n")
    assert out == b"-ERR [AUTH] invalid token\r\n" and not actions
    assert session.bad_commands == 1
    # The session goes on; a later USER/PASS failure is a plain -ERR again.
    run(session, b"USER a\r\n")
    _, [auth] = run(session, b"PASS b\r\n")
    [reply] = session.login_failed()
    assert reply.data.startswith(b"-ERR")
