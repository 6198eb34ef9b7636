"""A provider sending endless answers cannot make the client's memory grow past the limits."""

from __future__ import annotations

import resource

import pytest
import trio
from helpers.common import HOST, memory_kib
from helpers.faulty_upstream import faulty_server
from helpers.waiting import wait_for_async

from pop3proxy.net.endpoint import Endpoint, UpstreamUnavailable
from pop3proxy.net.pop3_client import LISTING_OCTETS, connect

LIMIT = 8 * 1024 * 1024


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("where", ["CAPA", "RETR", "UIDL"])
async def test_endless_answer_fails_the_session_not_the_memory(where):
    async with faulty_server(endless_on=where, messages={"u1": b"Subject: x\r\n\r\nhi\r\n"}) as server:
        endpoint = Endpoint(HOST, server.port, "none", timeout=5, max_message_size=LIMIT, max_listing=1000)
        with pytest.raises(UpstreamUnavailable) as caught:
            with trio.fail_after(30):
                client = await connect(endpoint)
                await client.login("alice", "secret")
                if where == "RETR":
                    await client.retr_bytes(1)
                else:
                    await client.uidl()
    limit = {"CAPA": LISTING_OCTETS, "RETR": LIMIT, "UIDL": 1000 * 84}[where]
    assert f"exceeds {limit} octets" in str(caught.value)
    print(f"endless {where}: peak RSS of the test process {peak_rss_mib():.0f} MiB")




async def test_a_hostile_provider_does_not_hurt_the_proxy_nor_other_users(tmp_path, server_process, dovecot):
    """The proxy process in front of the real Dovecot; one account's provider sends an endless RETR.
    The proxy's memory stays bounded, the hostile sync fails alone, and another user logs in meanwhile."""
    import poplib
    import time

    from helpers.common import write_config

    dovecot.deliver(dovecot.user, b"Subject: for the other user\r\n\r\nhello\r\n")
    async with faulty_server(endless_on="RETR", messages={"u1": b"Subject: x\r\n\r\nhi\r\n"}) as hostile:
        config = write_config(tmp_path / "proxy.toml", {
            "listen": {"host": HOST, "port": 0},
            "upstream": {"host": HOST, "port": dovecot.tls_port, "tls": "implicit", "ca_file": str(dovecot.ca_file),
                         "max_message_size": LIMIT},
            'accounts."mallory"': {"host": HOST, "port": hostile.port, "tls": "none", "remote_user": "alice"},
            "cache": {"root": tmp_path / "cache"},
            "sync": {"login_budget": 5},
        })
        proxy = await trio.to_thread.run_sync(server_process(config).start)
        pid = proxy.proc.pid
        baseline = memory_kib(pid)

        def mallory() -> bytes:
            client = poplib.POP3(HOST, proxy.port, timeout=60)
            client.user("mallory")
            reply = client.pass_("secret")
            client.quit()
            return reply

        def other_user() -> float:
            started = time.monotonic()
            client = poplib.POP3(HOST, proxy.port, timeout=60)
            client.user(dovecot.user)
            assert client.pass_(dovecot.password).startswith(b"+OK")
            assert client.stat()[0] == 1
            client.quit()
            return time.monotonic() - started

        peak = baseline
        outcome: dict[str, object] = {}
        async with trio.open_nursery() as nursery:
            async def attack() -> None:
                outcome["mallory"] = await trio.to_thread.run_sync(mallory)

            nursery.start_soon(attack)
            outcome["login"] = await trio.to_thread.run_sync(other_user)
            while "mallory" not in outcome:  # sample the proxy's memory until the hostile login ends
                peak = max(peak, memory_kib(pid))
                await trio.sleep(0.02)
        peak = max(peak, memory_kib(pid))
        assert proxy.proc.poll() is None  # the service survived
        reply = outcome["mallory"]
        assert reply.startswith(b"+OK") and b"could not be fetched" in reply, reply
        print(f"hostile provider (endless RETR): proxy peak RSS {peak} KiB (baseline {baseline} KiB); "
              f"another user's login took {outcome['login'] * 1000:.0f} ms during the attack")
        assert peak - baseline < 3 * LIMIT // 1024 + 32 * 1024, (peak, baseline)
        await wait_for_async(proxy, "exceeds")
