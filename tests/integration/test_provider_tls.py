"""A provider whose TLS cannot be trusted is an error, never a reason to go offline."""

from __future__ import annotations

import poplib

import pytest
from helpers.common import HOST
from helpers.proxy import closed_port, retr_all, sample


def test_failed_certificate_verification_is_an_error_not_offline(proxy, dovecot):
    dovecot.deliver(dovecot.user, sample(1))
    proxy.start()
    client = proxy.client(dovecot.user, dovecot.password)
    assert retr_all(client) == [sample(1)]
    client.quit()
    # Now someone in the middle shows a certificate the proxy does not trust: the cached copy and
    # the offline hash exist, yet the login must fail instead of being served offline.
    proxy.start(upstream={"ca_file": ""})  # the system store does not trust the test CA
    client = poplib.POP3(HOST, proxy.process.port, timeout=10)
    client.user(dovecot.user)
    with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]") as refused:
        client.pass_(dovecot.password)
    assert b"offline" not in str(refused.value).encode()
    client.quit()
    log = proxy.output()
    assert "certificate verification failed" in log
    assert "ERROR" in log or "error" in log.lower()


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
