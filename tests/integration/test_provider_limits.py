"""A provider sending endless answers cannot make the client's memory grow past the limits."""

from __future__ import annotations

import resource

import pytest
import trio
from helpers.common import HOST
from helpers.faulty_upstream import faulty_server

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
