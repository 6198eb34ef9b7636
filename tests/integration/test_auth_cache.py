"""sync.auth_cache_ttl: a password the provider accepted lately is served from the cache at once."""

from __future__ import annotations

import poplib

import pytest
from helpers.common import HOST
from helpers.proxy import cached, retr_all, sample
from helpers.waiting import eventually, wait_for

from pop3proxy.config import Settings
from pop3proxy.proxy import auth_cache as auth_cache_module
from pop3proxy.proxy.backend import ProxyBackend
from pop3proxy.proxy.routing import resolve

pytestmark = pytest.mark.dovecot


def test_a_login_within_the_ttl_is_served_at_once_and_checked_behind(proxy, dovecot):
    dovecot.deliver(dovecot.user, sample(1))
    proxy.start(sync={"auth_cache_ttl": 300})
    client = proxy.client(dovecot.user, dovecot.password)  # asks the provider: the entry is made
    assert client.stat()[0] == 1
    client.quit()
    dovecot.deliver(dovecot.user, sample(2))
    client = proxy.client(dovecot.user, dovecot.password)
    assert retr_all(client) == [sample(1)]  # served from the cache, before any provider answer
    client.quit()
    eventually(lambda: len(cached(proxy, dovecot.user)) == 2, timeout=10)  # fetched in the background
    client = proxy.client(dovecot.user, dovecot.password)
    assert retr_all(client) == [sample(1), sample(2)]
    client.quit()
    # A wrong password never uses the entry.
    wrong = poplib.POP3(HOST, proxy.process.port, timeout=10)
    wrong.user(dovecot.user)
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        wrong.pass_(dovecot.password + "x")
    wrong.quit()


def test_a_password_changed_at_the_provider_works_until_the_check_drops_it(proxy, dovecot):
    proxy.start(sync={"auth_cache_ttl": 300}, throttle={"max_failures": 100})
    proxy.client(dovecot.user, dovecot.password).quit()
    dovecot.add_user(dovecot.user, dovecot.password + "-new")  # changed upstream
    old = proxy.client(dovecot.user, dovecot.password)  # the documented trade-off: still served once
    old.quit()
    wait_for(proxy, "no longer accepts the cached password", timeout=10)
    client = poplib.POP3(HOST, proxy.process.port, timeout=10)
    client.user(dovecot.user)
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        client.pass_(dovecot.password)
    client.quit()
    proxy.client(dovecot.user, dovecot.password + "-new").quit()


def test_an_entry_is_used_up_to_the_ttl_and_not_after(tmp_path, monkeypatch):
    settings = Settings.model_validate({"upstream": {"host": "pop.example.com"}, "cache": {"root": str(tmp_path)},
                                        "sync": {"auth_cache_ttl": 60}})
    backend = ProxyBackend(settings)
    route = resolve("alice", settings)
    now = [1000.0]
    monkeypatch.setattr(auth_cache_module.time, "time", lambda: now[0])
    backend.auth_cache.remember(route.cache_id, "pw")
    assert not backend.auth_cache.matches(route.cache_id, "other")
    now[0] = 1060.0  # exactly the TTL
    assert backend.auth_cache.matches(route.cache_id, "pw")
    now[0] = 1060.001
    assert not backend.auth_cache.matches(route.cache_id, "pw") and not backend.auth_cache.path(route.cache_id).exists()


def test_an_entry_serves_logins_on_every_worker(proxy, dovecot):
    # Two worker processes: a login on either is served from the entry made by a provider login on one
    # of them (new connections land on both; each login finds one new message not yet cached).
    dovecot.deliver(dovecot.user, sample(1))
    proxy.start(sync={"auth_cache_ttl": 300}, listen={"host": HOST, "port": 0, "workers": 2})
    proxy.client(dovecot.user, dovecot.password).quit()  # asks the provider: the entry is made
    for i in range(2, 10):
        dovecot.deliver(dovecot.user, sample(i))
        client = proxy.client(dovecot.user, dovecot.password)
        assert client.stat()[0] == i - 1, f"login {i} was not served from the auth cache"
        client.quit()
        eventually(lambda: len(cached(proxy, dovecot.user)) == i, timeout=10)  # fetched in the background


async def test_a_check_that_finds_the_mailbox_locked_elsewhere_is_skipped_not_fatal(dovecot, tmp_path, caplog):
    # Another process (another worker, `pop3proxy sync`) holds the account's lock when the background
    # check after an auth-cached login wants to fetch: the check skips its fetch instead of failing the
    # task group it runs in (that took a whole worker process down, with every session on it).
    import logging

    import trio

    from pop3proxy.store.locks import lock_mailbox

    settings = Settings.model_validate({"upstream": {"host": HOST, "port": dovecot.port, "tls": "none"},
                                        "cache": {"root": str(tmp_path)}, "sync": {"auth_cache_ttl": 300}})
    backend = ProxyBackend(settings)
    route = resolve(dovecot.user, settings)
    dovecot.deliver(dovecot.user, sample(1))  # new mail: the check must fetch
    caplog.set_level(logging.INFO, logger="pop3proxy")
    with lock_mailbox(tmp_path, route.cache_id):  # as another process would
        async with trio.open_nursery() as nursery:
            backend.attach(nursery, background=False)
            await backend._check_in_background(route, dovecot.password, None)
    assert "fetch skipped" in caplog.text


async def test_a_check_that_finds_nothing_new_does_not_take_the_mailbox(dovecot, tmp_path, caplog):
    # The usual check after a login served from the auth cache finds no new mail: it must not hold the
    # account's lock (the next login, on another worker, waited for it), yet it records a complete sync.
    import logging

    import trio

    from pop3proxy.proxy.prefetch import LAST_SYNC, ended_within
    from pop3proxy.store.locks import lock_mailbox

    settings = Settings.model_validate({"upstream": {"host": HOST, "port": dovecot.port, "tls": "none"},
                                        "cache": {"root": str(tmp_path)}, "sync": {"auth_cache_ttl": 300}})
    backend = ProxyBackend(settings)
    route = resolve(dovecot.user, settings)
    dovecot.deliver(dovecot.user, sample(1))
    async with trio.open_nursery() as nursery:
        backend.attach(nursery, background=False)
        first = await backend.login(dovecot.user, dovecot.password, HOST)  # fetches it
        await first.close()
    caplog.set_level(logging.INFO, logger="pop3proxy")
    with lock_mailbox(tmp_path, route.cache_id):  # a session on another worker holds the account
        async with trio.open_nursery() as nursery:
            backend.attach(nursery, background=False)
            await backend._check_in_background(route, dovecot.password, None)
        assert "nothing new" in caplog.text and "fetch skipped" not in caplog.text
        state = backend.stores.states.open(route.cache_id)
        try:
            assert ended_within(state.get_meta(LAST_SYNC), 60, complete=True)
        finally:
            state.close()


async def _two_logins(dovecot, tmp_path, sync: dict) -> int:
    """A provider login, new mail at the provider, a login the auth cache verifies: the messages cached
    once every task the logins started has ended."""
    import trio

    from pop3proxy.store.paths import user_dir

    settings = Settings.model_validate({"upstream": {"host": HOST, "port": dovecot.port, "tls": "none"},
                                        "cache": {"root": str(tmp_path)}, "sync": sync})
    backend = ProxyBackend(settings)
    route = resolve(dovecot.user, settings)
    dovecot.deliver(dovecot.user, sample(1))
    async with trio.open_nursery() as nursery:  # ends when the background checks have ended
        backend.attach(nursery, background=False)
        first = await backend.login(dovecot.user, dovecot.password, HOST)
        await first.close()
        dovecot.deliver(dovecot.user, sample(2))
        second = await backend.login(dovecot.user, dovecot.password, HOST)
        assert len(second.messages) == 1  # served from the cache at once either way
        await second.close()
    maildir = user_dir(tmp_path, route.cache_id) / "Maildir"
    return len(list((maildir / "cur").iterdir())) + len(list((maildir / "new").iterdir()))


async def test_min_check_interval_spares_the_provider_after_a_complete_sync(dovecot, tmp_path):
    assert await _two_logins(dovecot, tmp_path, {"auth_cache_ttl": 300, "min_check_interval": 300}) == 1


async def test_without_min_check_interval_the_provider_is_asked_behind_every_cached_login(dovecot, tmp_path):
    assert await _two_logins(dovecot, tmp_path, {"auth_cache_ttl": 300}) == 2


async def test_min_check_interval_asks_again_once_the_last_sync_is_older(dovecot, tmp_path):
    # A nanosecond: the sync of the first login has certainly ended longer ago than that.
    assert await _two_logins(dovecot, tmp_path, {"auth_cache_ttl": 300, "min_check_interval": 1e-9}) == 2
