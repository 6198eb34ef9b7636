"""A mailbox re-created at the provider (every UIDL new, the same messages) and mail that vanishes there."""

from __future__ import annotations

import poplib
import shutil

import pytest
from helpers.common import HOST
from helpers.proxy import cached, retr_all, sample

pytestmark = pytest.mark.dovecot


def uidls(client: poplib.POP3) -> set[bytes]:
    return {line.split()[1] for line in client.uidl()[1]}


def direct(dovecot) -> poplib.POP3:
    client = poplib.POP3(HOST, dovecot.port, timeout=10)
    client.user(dovecot.user)
    client.pass_(dovecot.password)
    return client


def recreate(dovecot, messages: list[bytes]) -> None:
    """Empty the user's Maildir at Dovecot, Dovecot's UID list with it, and deliver `messages` again.

    As many throw-away messages take the first UIDs, so the UIDLs differ from the old ones even when the
    new UIDVALIDITY happens to equal the old one (both are the current second)."""
    shutil.rmtree(dovecot.maildir(dovecot.user))
    for i in range(len(messages)):
        dovecot.deliver(dovecot.user, sample(100 + i))
    client = direct(dovecot)
    for number in range(1, client.stat()[0] + 1):
        client.dele(number)
    client.quit()
    for m in messages:
        dovecot.deliver(dovecot.user, m)


@pytest.mark.parametrize("backend", ["maildir", "mbox"])
def test_a_recreated_mailbox_does_not_double_the_cache(proxy, dovecot, backend):
    messages = [sample(i, 3000) for i in range(8)]
    for m in messages:
        dovecot.deliver(dovecot.user, m)
    proxy.sections["cache"] = {"backend": backend}
    proxy.sections["upstream"] = {"delete": "never"}
    proxy.start()
    client = proxy.client(dovecot.user, dovecot.password)
    assert client.stat()[0] == 8
    client.dele(2)  # the client deletes one; under "never" the provider keeps it
    client.quit()
    before = direct(dovecot)
    old_uidls = uidls(before)
    before.quit()

    recreate(dovecot, messages)
    after = direct(dovecot)
    assert not old_uidls & uidls(after), "the test needs every UIDL new"
    after.quit()

    client = proxy.client(dovecot.user, dovecot.password)
    assert client.stat()[0] == 7  # not 15: each message once, and the deleted one stays deleted
    assert retr_all(client) == [m for i, m in enumerate(messages) if i != 1]
    client.quit()
    assert sorted(cached(proxy, dovecot.user, backend)) == sorted(m for i, m in enumerate(messages) if i != 1)
    # Later logins agree, and the provider's copies were left alone (policy "never").
    client = proxy.client(dovecot.user, dovecot.password)
    assert client.stat()[0] == 7
    client.quit()
    assert len(dovecot.messages(dovecot.user)) == 8


@pytest.mark.parametrize("vanished", ["keep", "drop"])
def test_mail_that_vanishes_at_the_provider_is_kept_or_dropped(proxy, dovecot, vanished):
    messages = [sample(i, 1000) for i in range(3)]
    for m in messages:
        dovecot.deliver(dovecot.user, m)
    if vanished == "drop":
        proxy.sections["upstream"] = {"vanished": "drop"}
    proxy.start()
    client = proxy.client(dovecot.user, dovecot.password)
    assert client.stat()[0] == 3
    client.quit()
    other = direct(dovecot)  # another client (or the provider's expiry) removes the second message
    other.dele(2)
    other.quit()

    client = proxy.client(dovecot.user, dovecot.password)
    expected = messages if vanished == "keep" else [messages[0], messages[2]]
    assert retr_all(client) == expected
    client.quit()
    assert cached(proxy, dovecot.user) == expected
