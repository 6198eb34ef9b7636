"""One user's failure never stops the service: background work is supervised, locks are released.

The service runs in-process in front of the real Dovecot. The faults are bugs, injected by replacing
one internal function for one user (a real server cannot produce a bug in our code on demand).
"""

from __future__ import annotations

import functools
import poplib

import trio
from helpers.common import HOST

from pop3proxy.app import run_service
from pop3proxy.config import Settings
from pop3proxy.ops import metrics
from pop3proxy.proxy import backend as backend_module
from pop3proxy.proxy import passes as passes_module


def settings_for(tmp_path, dovecot, **sections) -> Settings:
    return Settings(
        listen={"host": HOST, "port": 0},
        upstream={"host": HOST, "port": dovecot.tls_port, "tls": "implicit", "ca_file": str(dovecot.ca_file)},
        cache={"root": tmp_path / "cache"},
        **sections,
    )


def pop3_login(port: int, user: str, password: str) -> bytes:
    client = poplib.POP3(HOST, port, timeout=20)
    try:
        client.user(user)
        reply = client.pass_(password)
        client.stat()
        client.quit()
        return reply
    finally:
        client.close()


def background_errors(task: str) -> float:
    return metrics.REGISTRY.get_sample_value("pop3proxy_background_errors_total", {"task": task}) or 0.0


async def test_a_bug_in_one_users_sync_stops_neither_the_listeners_nor_other_users(
    tmp_path, dovecot, monkeypatch
):
    victim, victim_password = dovecot.new_user()
    dovecot.deliver(victim, b"Subject: a\r\n\r\nfor the victim\r\n")
    dovecot.deliver(dovecot.user, b"Subject: b\r\n\r\nfor the other user\r\n")
    real_sync = passes_module.sync_mailbox

    async def buggy_sync(client, mailbox, state, *, user, **kwargs):
        if user == victim:
            raise RuntimeError("a bug in one user's sync")
        return await real_sync(client, mailbox, state, user=user, **kwargs)

    monkeypatch.setattr(passes_module, "sync_mailbox", buggy_sync)
    before = background_errors("sync")
    async with trio.open_nursery() as nursery:
        ports = await nursery.start(run_service, settings_for(tmp_path, dovecot))
        login = functools.partial(trio.to_thread.run_sync)
        victim_reply = await login(pop3_login, ports.plain, victim, victim_password)
        assert b"could not be fetched" in victim_reply  # the victim is served what there is
        # The service still listens, and the other user's mail arrives.
        reply = await login(pop3_login, ports.plain, dovecot.user, dovecot.password)
        assert reply.startswith(b"+OK 1 messages"), reply
        # The victim is not left "in use": a second login works too.
        assert (await login(pop3_login, ports.plain, victim, victim_password)).startswith(b"+OK")
        nursery.cancel_scope.cancel()
    assert background_errors("sync") >= before + 2


async def test_an_error_after_taking_the_lock_releases_it(tmp_path, dovecot, monkeypatch):
    real_maildrop = backend_module.ProxyBackend._maildrop
    calls = []

    def maildrop_failing_once(self, *args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug between the lock and the session")
        return real_maildrop(self, *args)

    monkeypatch.setattr(backend_module.ProxyBackend, "_maildrop", maildrop_failing_once)
    async with trio.open_nursery() as nursery:
        ports = await nursery.start(run_service, settings_for(tmp_path, dovecot))
        try:
            await trio.to_thread.run_sync(pop3_login, ports.plain, dovecot.user, dovecot.password)
        except poplib.error_proto as exc:
            assert b"[SYS/TEMP]" in exc.args[0], exc
        else:
            raise AssertionError("the injected error did not reach the client")
        # Before the fix this answered -ERR [IN-USE] until a restart.
        reply = await trio.to_thread.run_sync(pop3_login, ports.plain, dovecot.user, dovecot.password)
        assert reply.startswith(b"+OK")
        nursery.cancel_scope.cancel()


async def test_an_error_after_the_sync_handed_its_files_over_closes_them(tmp_path, dovecot, monkeypatch):
    from pop3proxy.errors import LoginError
    from pop3proxy.proxy.backend import ProxyBackend

    opened, closed = [], []
    real_open, real_close = passes_module.Passes.open, passes_module.Opened.close

    def recording_open(self, *args, **kwargs):
        files = real_open(self, *args, **kwargs)
        opened.append(id(files))
        return files

    def recording_close(self):
        closed.append(id(self))
        real_close(self)

    def failing_maildrop(self, *args):
        raise RuntimeError("a bug between the hand-over and the session")

    monkeypatch.setattr(passes_module.Passes, "open", recording_open)
    monkeypatch.setattr(passes_module.Opened, "close", recording_close)
    monkeypatch.setattr(backend_module.ProxyBackend, "_maildrop", failing_maildrop)
    backend = ProxyBackend(settings_for(tmp_path, dovecot))
    async with trio.open_nursery() as nursery:
        backend.attach(nursery, background=False)
        try:
            await backend.login(dovecot.user, dovecot.password, HOST)
        except LoginError as exc:
            assert exc.code == "SYS/TEMP"
        else:
            raise AssertionError("the injected error did not reach the login")
    assert opened and sorted(opened) == sorted(closed)  # every file opened for the login is closed
