"""The console shows a running sync's progress, live (the page refreshes itself while one runs).

The service runs in-process in front of the real Dovecot with the web console on; a filter that holds
each message until the test opens its gate keeps the sync running for as long as the test looks.
"""

from __future__ import annotations

import poplib
import re

import httpx
import trio
from helpers.common import HOST
from helpers.proxy import sample
from helpers.waiting import eventually_async
from plugins import pipeline_filters

from pop3proxy.app import run_service
from pop3proxy.config import Settings


def signed_in(port: int, user: str, password: str) -> httpx.Client:
    web = httpx.Client(base_url=f"http://{HOST}:{port}", timeout=30)
    form = web.get("/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
    assert web.post("/login", data={"user": user, "password": password, "csrf": csrf}).status_code == 303
    return web


def syncing_of(web: httpx.Client, user: str):
    accounts = {a["name"]: a for a in web.get("/api/status").json()["accounts"]}
    return accounts.get(user, {}).get("syncing")


async def test_a_running_sync_shows_its_progress(tmp_path, dovecot):
    admin, admin_password = dovecot.new_user()
    for i in range(3):
        dovecot.deliver(dovecot.user, sample(i))
    settings = Settings(
        listen={"host": HOST, "port": 0},
        upstream={"host": HOST, "port": dovecot.tls_port, "tls": "implicit", "ca_file": str(dovecot.ca_file)},
        cache={"root": tmp_path / "cache"},
        sync={"login_budget": 0.5},
        web={"host": HOST, "port": 0, "admins": [admin]},
        filters=[{"use": "plugins.pipeline_filters:Gate"}],
    )
    pipeline_filters.gate.clear()
    try:
        async with trio.open_nursery() as nursery:
            ports = await nursery.start(run_service, settings)

            def login() -> bytes:
                client = poplib.POP3(HOST, ports.plain, timeout=30)
                client.user(dovecot.user)
                reply = client.pass_(dovecot.password)
                client.quit()
                return reply

            assert b"still downloading" in await trio.to_thread.run_sync(login)
            web = await trio.to_thread.run_sync(signed_in, ports.web, admin, admin_password)
            try:
                assert await trio.to_thread.run_sync(syncing_of, web, dovecot.user) == [0, 3]
                page = (await trio.to_thread.run_sync(web.get, "/")).text
                assert "syncing now: 0 of 3 new messages stored" in page
                assert 'http-equiv="refresh"' in page  # the page follows the sync by itself
                pipeline_filters.gate.set()
                # bound: three small messages once the gate is open; the console's own answer is the event
                async def sync_done() -> bool:
                    return await trio.to_thread.run_sync(syncing_of, web, dovecot.user) is None

                await eventually_async(sync_done, timeout=30, message="the console to show no sync running")
                page = (await trio.to_thread.run_sync(web.get, "/")).text
                assert "syncing now" not in page and 'http-equiv="refresh"' not in page
                assert "3 messages" in page
            finally:
                web.close()
            nursery.cancel_scope.cancel()
    finally:
        pipeline_filters.gate.set()
