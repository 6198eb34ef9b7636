"""The web console end to end: pop3proxy in front of the test Dovecot, driven by a real headless
Chromium (Debian's `chromium`, through Playwright). Screenshots go to the test's tmp dir."""

from __future__ import annotations

import poplib
import re
from pathlib import Path

import pytest
from helpers.common import require_tool
from helpers.daemons import GTUBE
from helpers.proxy import Proxy, retr_all, sample
from helpers.waiting import eventually

pytestmark = pytest.mark.dovecot

SPAM = (
    b"From: Prize Desk <prizes@example.com>\r\nTo: you@example.net\r\nSubject: You have won\r\n"
    b"Message-ID: <won@example.com>\r\n\r\nClaim your prize now.\r\n" + GTUBE + b"\r\n"
)
HOSTILE = (
    b"From: \"<script>document.title='pwned'</script>\" <evil@example.com>\r\nTo: you@example.net\r\n"
    b"Subject: <script>alert('subject')</script> <a href=\"javascript:alert(1)\">click</a>\r\n"
    b"Message-ID: <evil@example.com>\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: multipart/alternative; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n"
    b"Plain part <script>alert('plain')</script> " + GTUBE + b"\r\n--b\r\nContent-Type: text/html\r\n\r\n"
    b"<html><body><script>alert('html')</script><img src=x onerror=\"alert('img')\">"
    b"<a id=evil href=\"javascript:alert('link')\">win</a></body></html>\r\n--b--\r\n"
)


@pytest.fixture
def console(server_process, tmp_path, dovecot):
    require_tool("chromium", "chromium")
    made = Proxy(server_process, tmp_path, dovecot)
    made.start(
        web={"host": "127.0.0.1", "port": 0},
        filters=[{"use": "spam", "backend": "builtin", "database": str(tmp_path / "bayes.sqlite"),
                  "action": "quarantine"}],
    )
    line = eventually(lambda: next((l for l in made.process.log if "listening for the web console" in l), None))
    assert line, made.output()
    port = int(re.search(r"port (\d+)", line).group(1))
    made.web_url = f"http://127.0.0.1:{port}"
    yield made
    log = made.output()
    made.stop()
    assert dovecot.password not in log  # the sign-in password never reaches the log


def shot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / "screenshots" / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def sign_in(page, console, dovecot) -> None:
    page.goto(console.web_url + "/")
    assert page.url.endswith("/login")
    page.fill("input[name=user]", dovecot.user)
    page.fill("input[name=password]", dovecot.password)
    page.click("button[type=submit]")
    page.wait_for_url(console.web_url + "/")


def test_sign_in_overview_plot_release_and_train(console, dovecot, browser, tmp_path):
    for i in (1, 2):
        dovecot.deliver(dovecot.user, sample(i))
    dovecot.deliver(dovecot.user, SPAM)
    page = browser.new_page()
    sign_in(page, console, dovecot)  # the sign-in is a POP3 login upstream: it syncs, the spam is held
    accounts = page.locator("#accounts").inner_text()
    assert dovecot.user in accounts and "2 messages" in accounts, accounts
    plot = page.locator("section.plots img").first
    plot.wait_for()
    assert page.evaluate("img => img.complete && img.naturalWidth > 0", plot.element_handle())
    shot(page, tmp_path, "overview")

    page.goto(console.web_url + f"/mail/{dovecot.user}")
    for img in page.locator("section.plots img").element_handles():
        assert page.evaluate("img => img.complete && img.naturalWidth > 0", img)
    shot(page, tmp_path, "mail-and-plots")

    page.click("a[href='/held']")
    assert "You have won" in page.locator("#held").inner_text()
    shot(page, tmp_path, "held")
    page.click("#held a.open")
    assert page.locator("#subject").inner_text() == "You have won"
    assert "Claim your prize now." in page.locator("#text").inner_text()
    assert "learnt 0 spam and 0 ham" in page.locator("#trained").inner_text()
    shot(page, tmp_path, "held-message")
    detail = page.url
    page.click("button:has-text('This is spam')")
    assert "learnt 1 spam and 0 ham" in page.locator("#trained").inner_text()
    shot(page, tmp_path, "trained")

    page.goto(detail)
    page.click("#release")
    assert "released" in page.locator("#done").inner_text()
    client = console.client(dovecot.user, dovecot.password)
    try:
        messages = retr_all(client)
    finally:
        client.quit()
    assert len(messages) == 3 and any(b"Subject: You have won" in m for m in messages)

    page.goto(console.web_url + "/held")
    assert "You have won" not in page.locator("#held").inner_text()
    page.click("header button:has-text('Sign out')")
    page.wait_for_url(console.web_url + "/login")
    page.goto(console.web_url + "/held")
    assert page.url.endswith("/login")


def test_hostile_message_shows_as_text_and_runs_no_script(console, dovecot, browser, tmp_path):
    dovecot.deliver(dovecot.user, HOSTILE)
    page = browser.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    sign_in(page, console, dovecot)
    page.goto(console.web_url + "/held")
    listing = page.locator("#held").inner_text()
    assert "<script>alert('subject')</script>" in listing  # the Subject, as text
    assert "<script>document.title='pwned'</script>" in listing  # the From, as text
    shot(page, tmp_path, "hostile-list")
    page.click("#held a.open")
    page.wait_for_load_state("load")
    shot(page, tmp_path, "hostile-message")
    assert "<script>alert('subject')</script>" in page.locator("#subject").inner_text()
    assert "<script>alert('plain')</script>" in page.locator("#text").inner_text()
    # nothing of the message became markup: no script, image or javascript: link in the document
    assert page.evaluate("document.querySelectorAll('script').length") == 0
    assert page.evaluate("document.querySelectorAll('img[src=x], #evil, a[href^=javascript]').length") == 0
    assert page.title() != "pwned"
    assert "win</a>" not in page.content() and "onerror" not in page.locator("main").inner_html().replace("&", "")
    assert dialogs == []


def test_failed_console_sign_ins_count_for_pop3_too(server_process, tmp_path, dovecot):
    """One throttle for both doors: after max_failures wrong passwords on the console, POP3 refuses
    the right password with [LOGIN-DELAY] without asking the provider."""
    import httpx

    made = Proxy(server_process, tmp_path, dovecot)
    made.start(web={"host": "127.0.0.1", "port": 0}, throttle={"max_failures": 3, "base_delay": 0, "max_delay": 0})
    try:
        line = eventually(lambda: next((l for l in made.process.log if "listening for the web console" in l), None))
        port = int(re.search(r"port (\d+)", line).group(1))
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url) as web:
            for _ in range(3):
                token = re.search(r'name="csrf" value="([^"]+)"', web.get("/login").text).group(1)
                reply = web.post("/login", data={"user": dovecot.user, "password": "wrong", "csrf": token})
                assert reply.status_code == 401
        with pytest.raises(poplib.error_proto, match="LOGIN-DELAY"):
            made.client(dovecot.user, dovecot.password)
    finally:
        made.stop()


def test_console_speaks_https_with_the_listen_certificate(server_process, tmp_path, dovecot, server_cert):
    """With a [listen] certificate the console is HTTPS only, and its session cookie is Secure."""
    import ssl

    import httpx

    certfile, keyfile, ca_file = server_cert
    made = Proxy(server_process, tmp_path, dovecot)
    made.start(listen={"host": "127.0.0.1", "port": 0, "certfile": str(certfile), "keyfile": str(keyfile)},
               web={"host": "127.0.0.1", "port": 0})
    try:
        line = eventually(lambda: next((l for l in made.process.log if "listening for the web console" in l), None))
        port = int(re.search(r"port (\d+)", line).group(1))
        context = ssl.create_default_context(cafile=str(ca_file))
        with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=context) as web:
            token = re.search(r'name="csrf" value="([^"]+)"', web.get("/login").text).group(1)
            reply = web.post("/login", data={"user": dovecot.user, "password": dovecot.password, "csrf": token})
            assert reply.status_code == 303
            cookie = reply.headers["set-cookie"].lower()
            assert "secure" in cookie and "httponly" in cookie and "samesite=strict" in cookie
            assert web.get("/api/status").json()["user"] == dovecot.user
        with pytest.raises(httpx.HTTPError):  # no plain HTTP on the same port
            httpx.get(f"http://127.0.0.1:{port}/login", timeout=5)
    finally:
        made.stop()
