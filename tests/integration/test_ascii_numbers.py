"""Numbers in what clients and providers send are ASCII digits: '²' or fullwidth digits are refused
clearly, never an internal error (str.isdigit() and int() take them)."""

from __future__ import annotations

import logging
import poplib

import pytest
import trio
from helpers.common import HOST
from helpers.faulty_upstream import faulty_server

from pop3proxy.app import run_service
from pop3proxy.config import Settings
from pop3proxy.net.endpoint import Endpoint, UpstreamUnavailable
from pop3proxy.net.pop3_client import connect


def login_reply(port: int, user: str, password: str) -> bytes:
    client = poplib.POP3(HOST, port, timeout=20)
    try:
        client.user(user)
        try:
            return client.pass_(password)
        except poplib.error_proto as exc:
            return exc.args[0]
    finally:
        client.close()


async def test_a_login_name_with_a_non_ascii_port_gets_a_clear_err(tmp_path, dovecot, caplog):
    caplog.set_level(logging.INFO)
    settings = Settings(
        listen={"host": HOST, "port": 0},
        upstream={"host": HOST, "port": dovecot.tls_port, "tls": "implicit", "ca_file": str(dovecot.ca_file)},
        cache={"root": tmp_path / "cache"},
    )
    async with trio.open_nursery() as nursery:
        ports = await nursery.start(run_service, settings)
        for port in ("²", "\uff19\uff19\uff15"):
            reply = await trio.to_thread.run_sync(login_reply, ports.plain, f"{dovecot.user}#{HOST}:{port}",
                                                  dovecot.password)
            assert reply.startswith(b"-ERR [AUTH]"), reply
            assert b"user#host" in reply  # says which forms a login name has
        assert ports.state.stats["errors"] == 0
        nursery.cancel_scope.cancel()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("garbage", ["+OK \u00b2 10", "+OK 1 \uff11\uff10"])
async def test_a_provider_stat_with_non_ascii_digits_is_invalid(garbage):
    async with faulty_server(garbage_on="STAT", garbage=garbage) as server:
        with pytest.raises(UpstreamUnavailable) as caught:
            async with await connect(Endpoint(HOST, server.port, "none", timeout=5)) as client:
                await client.login("alice", "secret")
                await client.stat()
    assert "invalid STAT reply" in caught.value.reason
