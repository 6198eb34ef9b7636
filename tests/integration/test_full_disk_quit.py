"""A QUIT whose deletions cannot be applied (the mbox cannot be rewritten on a full disk) is answered
``-ERR … some deleted messages not removed`` — and that is what happens: nothing is applied, neither
in the cache nor at the provider, then or later. The messages stay.

The service runs in-process in front of the real Dovecot; the full disk is injected into the mbox
rewrite (a real disk cannot be filled on demand here).
"""

from __future__ import annotations

import errno
import poplib

import trio
from helpers.common import HOST

from pop3proxy.app import run_service
from pop3proxy.config import Settings
from pop3proxy.store import mbox as mbox_module


def session(port: int, user: str, password: str, dele: list[int]) -> tuple[int, bytes]:
    """Log in, DELE the given numbers, QUIT; (messages seen at login, the answer to QUIT)."""
    client = poplib.POP3(HOST, port, timeout=20)
    try:
        client.user(user)
        client.pass_(password)
        count = client.stat()[0]
        for number in dele:
            client.dele(number)
        try:
            reply = client.quit()
        except poplib.error_proto as exc:
            reply = exc.args[0]
        return count, reply
    finally:
        client.close()


async def test_a_quit_refused_for_a_full_disk_deletes_nothing_now_or_later(tmp_path, dovecot, monkeypatch):
    user, password = dovecot.new_user()
    for i in range(3):
        dovecot.deliver(user, b"Subject: m%d\r\n\r\nmessage %d\r\n" % (i, i))
    settings = Settings(
        listen={"host": HOST, "port": 0},
        upstream={"host": HOST, "port": dovecot.tls_port, "tls": "implicit", "ca_file": str(dovecot.ca_file),
                  "delete": "mirror"},
        cache={"root": tmp_path / "cache", "backend": "mbox"},
    )
    real_copy = mbox_module._copy_range

    def disk_full(*args) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    async with trio.open_nursery() as nursery:
        ports = await nursery.start(run_service, settings)
        monkeypatch.setattr(mbox_module, "_copy_range", disk_full)
        count, reply = await trio.to_thread.run_sync(session, ports.plain, user, password, [1, 2])
        assert count == 3
        assert reply.startswith(b"-ERR [SYS/TEMP]") and b"not removed" in reply, reply
        monkeypatch.setattr(mbox_module, "_copy_range", real_copy)  # the disk has room again
        # Later sessions (each syncs with the provider) still see every message, and so does the provider.
        for _ in range(2):
            count, reply = await trio.to_thread.run_sync(session, ports.plain, user, password, [])
            assert count == 3 and reply.startswith(b"+OK"), (count, reply)
        assert len(dovecot.messages(user)) == 3
        # What the client deletes with room on the disk goes, here and at the provider.
        count, reply = await trio.to_thread.run_sync(session, ports.plain, user, password, [1])
        assert reply.startswith(b"+OK"), reply
        count, reply = await trio.to_thread.run_sync(session, ports.plain, user, password, [])
        assert count == 2 and len(dovecot.messages(user)) == 2
        nursery.cancel_scope.cancel()
