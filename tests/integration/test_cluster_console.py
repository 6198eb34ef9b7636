"""What the metrics and the web console show of a cluster: two real `pop3proxy serve` nodes on one real
PostgreSQL (helpers/postgres.py) in front of the test's Dovecot, scraped over HTTP, the console driven by
a real headless Chromium. And one machine, where none of it appears."""

from __future__ import annotations

import re
import time

import httpx
import pytest
from helpers.cluster import Cluster, url_of
from helpers.common import HOST, require_tool
from helpers.proxy import Proxy, sample
from helpers.waiting import eventually, wait_for
from test_metrics import sample as metric
from test_metrics import scrape
from test_web_browser import shot

pytestmark = pytest.mark.dovecot

METRICS_READY = re.compile(r"listening for metrics on \S+ port (\d+)")
WEB_READY = re.compile(r"listening for the web console on \S+ port (\d+)")


def sign_in(browser, url: str, user: str, password: str):
    """A page of a browser context of its own (its own cookies), signed in as ``user``."""
    page = browser.new_context().new_page()
    page.goto(url + "/")
    page.fill("input[name=user]", user)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_url(url + "/")
    return page


def node_row(page, url: str, node: str) -> str:
    """The console's row of ``node`` on a fresh load of the overview ("" when not shown)."""
    page.goto(url + "/")
    row = page.locator(f"#nodes tr[data-node='{node}']")
    return row.inner_text() if row.count() else ""


def test_metrics_and_console_show_the_nodes_and_who_serves_which_account(
        server_process, tmp_path, dovecot, postgres_db, browser):
    require_tool("chromium", "chromium")
    cluster = Cluster(server_process, tmp_path, dovecot, url_of(postgres_db))
    assert cluster.upgrade().returncode == 0
    user, password = dovecot.user, dovecot.password
    admin, admin_password = dovecot.new_user()
    dovecot.deliver(user, sample(1))
    # alpha with two worker processes: its metrics add up theirs, the supervisor reads the cluster
    alpha = cluster.start("alpha", listen={"workers": 2}, metrics={"host": HOST, "port": 0},
                          web={"host": HOST, "port": 0, "admins": [admin]})
    cluster.start("beta")
    port = int(wait_for(alpha, METRICS_READY).group(1))
    url = f"http://{HOST}:{wait_for(alpha, WEB_READY).group(1)}"
    # Signing in is a POP3 login: both before the user's mail client holds the account on beta.
    console = sign_in(browser, url, admin, admin_password)
    own = sign_in(browser, url, user, password)

    client = cluster.client("beta", user, password)
    assert client.stat()[0] == 1

    def served(node: str, count: int):
        text = scrape(port)[2]
        return text if metric(text, "pop3proxy_cluster_accounts_served", node=node) == count else None

    text = eventually(lambda: served("beta", 1))
    assert metric(text, "pop3proxy_cluster_database_up") == 1
    assert metric(text, "pop3proxy_cluster_accounts_served", node="alpha") == 0
    for node in ("alpha", "beta"):
        assert metric(text, "pop3proxy_cluster_node_up", node=node) == 1, text
        assert metric(text, "pop3proxy_cluster_node_draining", node=node) == 0, text
        assert 0 <= metric(text, "pop3proxy_cluster_node_heartbeat_age_seconds", node=node) < 3, text

    row = eventually(lambda: user in (found := node_row(console, url, "beta")) and found)
    assert "serving" in row
    assert user not in node_row(console, url, "alpha") and "serving" in node_row(console, url, "alpha")
    assert user in console.locator("#accounts").inner_text()  # its state, read from the cluster's database
    shot(console, tmp_path, "cluster-serving")
    own.goto(url + "/")
    assert "served now by node beta" in own.locator("#served").inner_text()
    assert own.locator("#cluster").count() == 0  # nothing cluster-wide for a user
    assert httpx.get(url + "/api/cluster", cookies=cookies_of(own)).json() == {"user": user, "served_by": "beta"}
    nodes = httpx.get(url + "/api/cluster", cookies=cookies_of(console)).json()["nodes"]
    assert {n["node"]: n["accounts"] for n in nodes} == {"alpha": [], "beta": [user]}

    client.quit()
    eventually(lambda: served("beta", 0))
    eventually(lambda: "serving" in (found := node_row(console, url, "beta")) and user not in found)

    cluster.nodes["beta"].kill()  # no heartbeat any more: gone three beats (of a second here) later
    eventually(lambda: "gone" in node_row(console, url, "beta"))
    text = scrape(port)[2]
    assert metric(text, "pop3proxy_cluster_node_up", node="beta") == 0, text
    assert metric(text, "pop3proxy_cluster_node_up", node="alpha") == 1, text
    shot(console, tmp_path, "cluster-gone")
    output = alpha.output()
    assert password not in output and admin_password not in output and "Traceback" not in output


def cookies_of(page) -> dict[str, str]:
    return {c["name"]: c["value"] for c in page.context.cookies()}


def test_a_database_away_still_answers_the_scrape_with_database_up_0(server_process, tmp_path, dovecot,
                                                                    own_postgres):
    cluster = Cluster(server_process, tmp_path, dovecot, own_postgres.url())
    assert cluster.upgrade().returncode == 0
    node = cluster.start("alpha", metrics={"host": HOST, "port": 0})
    port = int(wait_for(node, METRICS_READY).group(1))
    eventually(lambda: metric(scrape(port)[2], "pop3proxy_cluster_node_up", node="alpha") == 1)
    own_postgres.stop()
    took: list[float] = []

    def database_down() -> str | None:  # the reading of a moment ago may be shown for 2 s
        started = time.monotonic()
        status, _, text = scrape(port)
        took.append(time.monotonic() - started)
        assert status == 200, text
        return text if metric(text, "pop3proxy_cluster_database_up") == 0 else None

    try:
        text = eventually(database_down)
        assert metric(text, "pop3proxy_sessions_active") is not None and "pop3proxy_cluster_node_up" not in text
        assert max(took) < 3 + 5, took  # the database's timeout (3 s here), and slack for a loaded machine
    finally:
        own_postgres.start_again()
    eventually(lambda: metric(scrape(port)[2], "pop3proxy_cluster_database_up") == 1, timeout=60)
    assert "Traceback" not in node.output()


def test_one_machine_shows_no_cluster(server_process, tmp_path, dovecot):
    made = Proxy(server_process, tmp_path, dovecot)
    made.start(metrics={"host": HOST, "port": 0}, web={"host": HOST, "port": 0, "admins": [dovecot.user]})
    try:
        port = int(wait_for(made.process, METRICS_READY).group(1))
        url = f"http://{HOST}:{wait_for(made.process, WEB_READY).group(1)}"
        text = scrape(port)[2]
        assert metric(text, "pop3proxy_sessions_active") is not None and "pop3proxy_cluster" not in text
        with httpx.Client(base_url=url) as web:
            token = re.search(r'name="csrf" value="([^"]+)"', web.get("/login").text).group(1)
            reply = web.post("/login", data={"user": dovecot.user, "password": dovecot.password, "csrf": token})
            assert reply.status_code == 303
            page = web.get("/").text
            assert 'id="accounts"' in page and 'id="cluster"' not in page and "served now" not in page
            assert web.get("/api/cluster").status_code == 404
    finally:
        made.stop()
