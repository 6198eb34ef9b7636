"""The sans-IO XOAUTH2 / OAUTHBEARER messages."""

from __future__ import annotations

import base64

import pytest

from pop3proxy.pop3 import sasl


def decoded(text: str) -> bytes:
    return base64.b64decode(text)


def test_xoauth2_format_is_the_documented_one():
    assert decoded(sasl.xoauth2("u@example.com", "T0k")) == b"user=u@example.com\x01auth=Bearer T0k\x01\x01"


def test_oauthbearer_format_is_rfc7628():
    text = decoded(sasl.oauthbearer("a,b=c", "T", "mail.example", 995))
    assert text == b"n,a=a=2Cb=3Dc,\x01host=mail.example\x01port=995\x01auth=Bearer T\x01\x01"


@pytest.mark.parametrize("mechanism,make", [
    ("XOAUTH2", lambda u, t: sasl.xoauth2(u, t)),
    ("OAUTHBEARER", lambda u, t: sasl.oauthbearer(u, t, "h", 110)),
])
def test_round_trip(mechanism, make):
    login = sasl.parse(mechanism, make("user,=x@example.com", "a.b-c_d~e+f/g=" * 200))
    assert login.user == "user,=x@example.com"
    assert login.token == "a.b-c_d~e+f/g=" * 200
    assert "a.b-c" not in repr(login)


@pytest.mark.parametrize("raw", [
    b"user=u\x01auth=Bearer t\x01",  # one ^A at the end
    b"user=u\x01auth=Basic t\x01\x01",
    b"user=\x01auth=Bearer t\x01\x01",
    b"auth=Bearer t\x01\x01",
    b"user=u\x01auth=Bearer \x01\x01",
    b"user=u\x01garbage\x01\x01",
])
def test_bad_xoauth2_is_refused(raw):
    with pytest.raises(sasl.SaslError):
        sasl.parse_xoauth2(base64.b64encode(raw))


@pytest.mark.parametrize("raw", [
    b"x,a=u,\x01auth=Bearer t\x01\x01",
    b"n,a=u\x01auth=Bearer t\x01\x01",
    b"n,,\x01auth=Bearer t\x01\x01",  # no user name
    b"n,a=u,\x01auth=Bearer t\x01",
])
def test_bad_oauthbearer_is_refused(raw):
    with pytest.raises(sasl.SaslError):
        sasl.parse_oauthbearer(base64.b64encode(raw))


def test_not_base64_and_control_characters():
    with pytest.raises(sasl.SaslError):
        sasl.parse_xoauth2("!!!")
    with pytest.raises(sasl.SaslError):
        sasl.xoauth2("u\r\n", "t")
    with pytest.raises(sasl.SaslError):
        sasl.parse_xoauth2(base64.b64encode(b"user=u\x00\x01auth=Bearer t\x01\x01"))


def test_error_challenge_and_token_repr():
    challenge = base64.b64encode(b'{"status":"invalid_token"}').decode()
    assert sasl.error_challenge(challenge) == {"status": "invalid_token"}
    assert sasl.error_challenge("+OK") is None
    assert repr(sasl.BearerToken("secret")) == "BearerToken(***)"
