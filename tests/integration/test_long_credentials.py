"""Long credentials work wherever the provider takes them: a 300-character password with USER/PASS,
and an AUTH PLAIN initial response of several kilobytes (OAuth2 tokens exceed 2,500 octets). Every
other command keeps RFC 2449's 255-octet limit; a credential line is bounded (16 KiB)."""

from __future__ import annotations

import base64
import poplib
import secrets
import socket

from helpers.common import HOST
from helpers.proxy import sample

from pop3proxy.pop3.commands import MAX_AUTH_LINE


def long_user(dovecot, length: int) -> tuple[str, str]:
    name, _ = dovecot.new_user()
    password = secrets.token_urlsafe(length)[:length]
    dovecot.add_user(name, password)
    return name, password


def test_a_300_character_password_through_the_proxy(proxy, dovecot):
    name, password = long_user(dovecot, 300)
    dovecot.deliver(name, sample(1))
    proxy.start()
    client = poplib.POP3(HOST, proxy.process.port, timeout=20)
    client.user(name)
    assert client.pass_(password).startswith(b"+OK")
    assert client.stat()[0] == 1
    client.quit()


def test_an_auth_plain_initial_response_of_several_kilobytes(proxy, dovecot):
    name, password = long_user(dovecot, 3000)
    dovecot.deliver(name, sample(2))
    proxy.start()
    response = base64.b64encode(f"\0{name}\0{password}".encode()).decode()
    assert len(response) > 4000
    client = poplib.POP3(HOST, proxy.process.port, timeout=20)
    assert client._shortcmd(f"AUTH PLAIN {response}").startswith(b"+OK")
    assert client.stat()[0] == 1
    client.quit()


def test_other_commands_keep_255_octets_and_credentials_are_bounded(proxy, dovecot):
    proxy.start()
    with socket.create_connection((HOST, proxy.process.port), timeout=20) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"+OK")
        sock.sendall(b"CAPA " + b"x" * 300 + b"\r\n")
        assert reader.readline() == b"-ERR command line too long\r\n"
        sock.sendall(b"USER someone\r\n")
        assert reader.readline().startswith(b"+OK")
        sock.sendall(b"PASS " + b"p" * (MAX_AUTH_LINE - 7) + b"\r\n")  # exactly at the limit: tried upstream
        reply = reader.readline()
        assert reply.startswith(b"-ERR [") and b"too long" not in reply, reply
        sock.sendall(b"USER someone\r\nPASS " + b"p" * (MAX_AUTH_LINE - 6) + b"\r\n")  # one over
        assert reader.readline().startswith(b"+OK")
        assert reader.readline() == b"-ERR command line too long\r\n"


