"""APOP and CRAM-MD5 in the sans-IO session: the provider's timestamp and challenge, relayed."""

from __future__ import annotations

import base64

from pop3proxy.pop3 import session as s
from pop3proxy.pop3.actions import Authenticate, Challenge, Send

TIMESTAMP = "<1896.697170952@provider.example>"
DIGEST = "c4c9334bac560ecc979e58001b3e22fb"


def run(session: s.Session, data: bytes) -> list[s.Action]:
    session.receive_data(data)
    return session.next_actions() or []


def sent(actions: list[s.Action]) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, Send))


def test_apop_with_the_providers_timestamp_is_checked_by_the_backend():
    session = s.Session(apop_timestamp=TIMESTAMP, plaintext_auth=False)  # no TLS needed: no password is sent
    assert session.greeting() == f"+OK pop3proxy ready {TIMESTAMP}\r\n".encode()
    actions = run(session, f"APOP mrose {DIGEST.upper()}\r\n".encode())
    assert actions == [Authenticate(user="mrose", password=DIGEST, mechanism="APOP")]
    out = sent(session.login_succeeded("mrose", []))
    assert out.startswith(b"+OK") and session.state is s.State.TRANSACTION


def test_apop_without_a_timestamp_or_with_a_bad_digest_is_refused():
    plain = s.Session()
    assert TIMESTAMP not in plain.greeting().decode()
    assert sent(run(plain, f"APOP mrose {DIGEST}\r\n".encode())).startswith(b"-ERR [AUTH] APOP is not available")
    session = s.Session(apop_timestamp=TIMESTAMP)
    assert sent(run(session, b"APOP mrose not-a-digest\r\n")).startswith(b"-ERR [AUTH] APOP digest must be 32 hex")
    assert session.state is s.State.AUTHORIZATION


def test_cram_md5_relays_the_providers_challenge_and_the_clients_answer():
    session = s.Session(cram_md5=True, plaintext_auth=False)
    caps = sent(run(session, b"CAPA\r\n"))
    assert b"SASL CRAM-MD5" in caps  # offered without TLS: it is challenge-response
    assert run(session, b"AUTH CRAM-MD5\r\n") == [Challenge("CRAM-MD5")]
    challenge = base64.b64encode(b"<1896.697170952@postoffice.example.net>").decode()
    assert sent(session.challenge_given(challenge)) == f"+ {challenge}\r\n".encode()
    answer = base64.b64encode(f"tim {DIGEST}".encode())
    actions = run(session, answer + b"\r\n")
    assert actions == [Authenticate(user="tim", password=answer.decode(), mechanism="CRAM-MD5")]
    assert sent(session.login_failed()).startswith(b"-ERR [AUTH]")
    assert session.state is s.State.AUTHORIZATION


def test_cram_md5_refusals():
    assert b"CRAM-MD5" not in sent(run(s.Session(), b"CAPA\r\n"))
    assert sent(run(s.Session(), b"AUTH CRAM-MD5\r\n")).startswith(b"-ERR unsupported authentication mechanism")
    session = s.Session(cram_md5=True)
    assert sent(run(session, b"AUTH CRAM-MD5 dGlt\r\n")).startswith(b"-ERR [AUTH] CRAM-MD5 takes no initial")
    assert run(session, b"AUTH CRAM-MD5\r\n") == [Challenge("CRAM-MD5")]
    assert sent(session.challenge_failed("the provider is not reachable")).startswith(b"-ERR [SYS/TEMP]")
    assert run(session, b"AUTH CRAM-MD5\r\n") == [Challenge("CRAM-MD5")]
    session.challenge_given("PDE+")
    assert sent(run(session, b"bm90IGEgcmVzcG9uc2U=\r\n")).startswith(b"-ERR [AUTH] malformed CRAM-MD5")
    assert run(session, b"AUTH CRAM-MD5\r\n") == [Challenge("CRAM-MD5")]
    session.challenge_given("PDE+")
    assert sent(run(session, b"*\r\n")).startswith(b"-ERR [AUTH] authentication cancelled")
