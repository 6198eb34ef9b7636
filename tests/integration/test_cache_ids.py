"""Spellings of one provider account (case, user#host:port) share one cache and one session lock."""

from __future__ import annotations

import os
import poplib

import pytest
from helpers.common import HOST
from helpers.proxy import retr_all, sample

from pop3proxy.store.paths import user_dir

pytestmark = pytest.mark.dovecot


def test_case_variants_share_the_cache_and_the_one_session_lock(proxy, dovecot):
    dovecot.deliver(dovecot.user, sample(1))
    proxy.start()
    first = proxy.client(dovecot.user, dovecot.password)
    for spelling in (dovecot.user.upper(), f"{dovecot.user}#127.0.0.1:{dovecot.tls_port}"):
        second = poplib.POP3(HOST, proxy.process.port, timeout=10)
        second.user(spelling)
        with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
            second.pass_(dovecot.password)
        second.quit()
    first.dele(1)
    first.quit()
    dovecot.deliver(dovecot.user, sample(2))
    # Another spelling sees what the first one left: the deletion, and the new mail once.
    client = proxy.client(dovecot.user.upper(), dovecot.password)
    assert retr_all(client) == [sample(2)]
    client.quit()
    assert [p.name for p in proxy.root.iterdir()] == [user_dir(proxy.root, dovecot.user).name]


def test_a_cache_named_by_another_spelling_becomes_the_accounts_cache(proxy, dovecot):
    dovecot.deliver(dovecot.user, sample(1))
    proxy.start(upstream={"case_sensitive_users": True, "delete": "never"})  # as caches were named before
    client = proxy.client(dovecot.user.upper(), dovecot.password)
    assert client.stat()[0] == 1
    client.dele(1)
    client.quit()
    old = user_dir(proxy.root, dovecot.user.upper())
    assert old.is_dir() and not user_dir(proxy.root, dovecot.user).exists()
    inode = os.stat(old).st_ino

    proxy.start(upstream={"delete": "never"})
    new = user_dir(proxy.root, dovecot.user)
    assert not old.exists() and os.stat(new).st_ino == inode  # renamed, not copied
    client = proxy.client(dovecot.user, dovecot.password)
    assert client.stat()[0] == 0  # the deletion made under the old spelling holds: not fetched again
    client.quit()
    assert "is now the cache of" in proxy.output()
