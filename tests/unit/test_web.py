"""The web console with Starlette's test client (no sockets): sign-in, access control, CSRF, throttle."""

from __future__ import annotations

import re
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from pop3proxy.config import Settings
from pop3proxy.errors import LoginError
from pop3proxy.filtering.api import FilterResult
from pop3proxy.net.gate import Gate
from pop3proxy.net.throttle import Throttle
from pop3proxy.proxy.credentials import hash_password, set_password
from pop3proxy.proxy.local import LocalBackend
from pop3proxy.store import open_store
from pop3proxy.store.held import HeldStore
from pop3proxy.web.app import build_app
from pop3proxy.web.sessions import Sessions

MESSAGE = b"From: a@example.org\r\nSubject: lunch\r\n\r\nSee you at noon.\r\n"
PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw", "root": "root-pw"}


@pytest.fixture
def console(tmp_path: Path):
    users = tmp_path / "users"
    users.write_text("".join(f"{u}:{hash_password(p, n=2)}\n" for u, p in PASSWORDS.items()))
    root = tmp_path / "cache"
    settings = Settings(
        listen={"host": "127.0.0.1", "port": 0},
        local={"users_file": users},
        cache={"root": root},
        web={"port": 0, "admins": ["root"]},
        filters=[{"use": "spam", "database": str(tmp_path / "bayes.sqlite")}],
    )
    for user in PASSWORDS:
        open_store(root, user).close()
    keys = {
        user: HeldStore(root, user).add(MESSAGE.replace(b"lunch", user.encode()), f"uid-{user}",
                                        FilterResult(MESSAGE, action="hold", verdicts=["spam: score 9"]))
        for user in ("alice", "bob")
    }
    throttle = Throttle(max_failures=3, window=900, base_delay=0, max_delay=0)
    clock = [0.0]
    sessions = Sessions(lifetime=60, limit=10, clock=lambda: clock[0])
    app = build_app(settings, LocalBackend(users, root), Gate(throttle), secure=False, sessions=sessions)
    return app, keys, clock, root


def client(app) -> TestClient:
    return TestClient(app, backend="trio", follow_redirects=False)


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def sign_in(c: TestClient, user: str, password: str | None = None):
    form = c.get("/login")
    return c.post("/login", data={"user": user, "password": password or PASSWORDS[user], "csrf": csrf_of(form.text)})


ROUTES = [
    ("GET", "/"), ("GET", "/held"), ("GET", "/held/alice/k"), ("GET", "/held/alice/k/raw"),
    ("POST", "/held/alice/k/release"), ("GET", "/mail/alice"), ("GET", "/plot/alice/daily.svg"),
    ("POST", "/train/alice/held/k"), ("GET", "/config"), ("POST", "/logout"),
]
API = ["/api/status", "/api/held", "/api/plots/alice", "/api/mail/alice", "/api/config", "/api/cluster"]


def test_every_route_requires_sign_in(console):
    app = console[0]
    routes = {(tuple(r.methods - {"HEAD"}) if r.methods else (), r.path) for r in app.routes}
    covered = {p for _, p in ROUTES} | set(API)
    patterns = [r.path_regex for r in app.routes if r.path not in ("/login", "/style.css")]
    assert all(any(p.match(path) for path in covered) for p in patterns), routes  # no route left out
    with client(app) as c:
        for method, path in ROUTES:
            reply = c.request(method, path)
            assert reply.status_code == 303 and reply.headers["location"] == "/login", (method, path)
        for path in API:
            assert c.get(path).status_code == 401, path


def test_sign_in_sets_a_strict_httponly_cookie_and_sign_out_ends_it(console):
    with client(console[0]) as c:
        reply = sign_in(c, "alice")
        assert reply.status_code == 303
        cookie = reply.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "secure" not in cookie
        page = c.get("/")
        assert page.status_code == 200 and "alice" in page.text and "bob" not in page.text
        assert c.post("/logout", data={"csrf": csrf_of(page.text)}).status_code == 303
        assert c.get("/").status_code == 303
        assert c.get("/api/status").status_code == 401


def test_cookie_is_secure_with_tls(console, tmp_path):
    settings_app = build_app(Settings(listen={"port": 0}, local={"users_file": tmp_path / "users"},
                                      cache={"root": tmp_path / "cache"}),
                             LocalBackend(tmp_path / "users", tmp_path / "cache"), Gate(Throttle()), secure=True)
    with TestClient(settings_app, backend="trio", follow_redirects=False, base_url="https://testserver") as c:
        assert "secure" in sign_in(c, "alice").headers["set-cookie"].lower()


def test_session_expires(console):
    app, _, clock, _ = console
    with client(app) as c:
        sign_in(c, "alice")
        clock[0] = 59.0
        assert c.get("/").status_code == 200
        clock[0] = 60.0
        assert c.get("/").status_code == 303


def test_one_user_cannot_see_or_act_on_anothers_mail(console):
    app, keys, _, root = console
    bob = keys["bob"]
    with client(app) as c:
        sign_in(c, "alice")
        token = csrf_of(c.get("/").text)
        assert "bob" not in c.get("/held").text
        assert [m["account"] for m in c.get("/api/held").json()] == ["alice"]
        assert c.get(f"/held/bob/{bob}").status_code == 403
        assert c.get(f"/held/bob/{bob}/raw").status_code == 403
        assert c.post(f"/held/bob/{bob}/release", data={"csrf": token}).status_code == 403
        assert c.post(f"/held/bob/{bob}/delete", data={"csrf": token}).status_code == 403
        assert c.post(f"/train/bob/held/{bob}", data={"csrf": token, "label": "spam"}).status_code == 403
        assert c.get("/mail/bob").status_code == 403
        assert c.get("/plot/bob/daily.svg").status_code == 403
        assert c.get("/api/plots/bob").status_code == 403
        assert c.get("/config").status_code == 403  # admins only
        assert c.get("/api/config").status_code == 403
        # alice's own message opens
        assert "alice" in c.get(f"/held/alice/{keys['alice']}").text
    assert [i.key for i in HeldStore(root, "bob").list()] == [bob]  # nothing happened to it


def test_admin_sees_every_account(console):
    app, keys, _, _ = console
    with client(app) as c:
        sign_in(c, "root")
        assert sorted(m["account"] for m in c.get("/api/held").json()) == ["alice", "bob"]
        assert c.get(f"/held/bob/{keys['bob']}").status_code == 200
        config = c.get("/api/config").json()
        assert config["web"]["admins"] == ["root"]


@pytest.mark.parametrize("token", [None, "", "wrong"])
def test_csrf_missing_or_wrong_is_refused(console, token):
    app, keys, _, root = console
    key = keys["alice"]
    form = {} if token is None else {"csrf": token}
    with client(app) as c:
        sign_in(c, "alice")
        assert c.post(f"/held/alice/{key}/release", data=form).status_code == 403
        assert c.post(f"/held/alice/{key}/delete", data=form).status_code == 403
        assert c.post(f"/train/alice/held/{key}", data={**form, "label": "spam"}).status_code == 403
        assert c.post("/logout", data=form).status_code == 403
        assert c.get("/").status_code == 200  # still signed in
        page = c.get("/login")  # the sign-in form has its own token
        assert c.post("/login", data={**form, "user": "alice", "password": "alice-pw"}).status_code == 403
        del page
    assert [i.key for i in HeldStore(root, "alice").list()] == [key]


def test_release_and_train_with_the_token(console):
    app, keys, _, root = console
    with client(app) as c:
        sign_in(c, "alice")
        token = csrf_of(c.get("/").text)
        reply = c.post(f"/train/alice/held/{keys['alice']}", data={"csrf": token, "label": "spam"})
        assert reply.status_code == 200 and "learnt 1 spam and 0 ham" in reply.text
        assert c.get("/api/status").json()["trained"] == {"backend": "builtin", "spam": 1, "ham": 0}
        reply = c.post(f"/held/alice/{keys['alice']}/release", data={"csrf": token})
        assert "released" in reply.text
    assert HeldStore(root, "alice").list() == []
    with open_store(root, "alice") as box:
        assert len(box.list()) == 1


def test_the_throttle_applies_to_sign_in(console):
    app, *_ = console
    with client(app) as c:
        for _ in range(3):
            reply = sign_in(c, "alice", "wrong")
            assert reply.status_code == 401 and "invalid user name or password" in reply.text
        reply = sign_in(c, "alice")  # the right password, but refused without checking it
        assert reply.status_code == 429 and "too many failed logins" in reply.text
        assert c.get("/").status_code == 303


class UnavailableGate(Gate):
    """A gate whose counters cannot be reached (a cluster's database is down): every login is refused."""

    def login(self, address: str, account: str):
        @asynccontextmanager
        async def refused():
            raise LoginError("the login limits cannot be checked now, try again later", "SYS/TEMP")
            yield

        return refused()


def test_a_gate_that_cannot_count_refuses_sign_in_as_temporary(console, tmp_path):
    # the users and caches `console` made, behind a gate that refuses every login
    refusing = build_app(Settings(listen={"port": 0}, local={"users_file": tmp_path / "users"},
                                  cache={"root": tmp_path / "cache"}, web={"port": 0}),
                         LocalBackend(tmp_path / "users", tmp_path / "cache"), UnavailableGate(), secure=False)
    with client(refusing) as c:
        reply = sign_in(c, "alice")
        assert reply.status_code == 503 and "the login limits cannot be checked now" in reply.text
        assert c.get("/").status_code == 303  # not signed in


def test_a_hostile_message_is_escaped(console):
    app, _, _, root = console
    hostile = (b"From: <script>alert(1)</script> <x@example.org>\r\nSubject: <img src=x onerror=alert(2)>\r\n"
               b"Content-Type: text/html\r\n\r\n<script>alert(3)</script><a href=\"javascript:alert(4)\">x</a>\r\n")
    key = HeldStore(root, "alice").add(hostile, "uid-h", FilterResult(hostile, action="hold", verdicts=["x"]))
    with client(app) as c:
        sign_in(c, "alice")
        for page in (c.get("/held").text, c.get(f"/held/alice/{key}").text):
            assert "<script>alert" not in page and "<img src=x" not in page
            assert "&lt;img src=x onerror=alert(2)&gt;" in page  # shown as text
        assert "javascript:alert(4)" not in c.get(f"/held/alice/{key}").text  # HTML body not shown


def test_sessions_are_bounded_oldest_signed_out_first():
    clock = [0.0]
    sessions = Sessions(lifetime=60, limit=3, clock=lambda: clock[0])
    tokens = [sessions.create(f"u{i}", False) for i in range(3)]
    assert all(sessions.get(t) for t in tokens)  # at the limit: all kept
    newest = sessions.create("u3", False)
    assert sessions.get(tokens[0]) is None and sessions.get(tokens[1]) and sessions.get(newest)


def test_form_body_limit(console):
    from pop3proxy.web.app import MAX_FORM

    app, keys, _, _ = console
    with client(app) as c:
        sign_in(c, "alice")
        token = csrf_of(c.get("/").text)
        base = f"csrf={token}&label=ham&pad="
        at_limit = base + "x" * (MAX_FORM - len(base))
        headers = {"content-type": "application/x-www-form-urlencoded"}
        reply = c.post(f"/train/alice/held/{keys['alice']}", content=at_limit, headers=headers)
        assert reply.status_code == 200 and "learnt 0 spam and 1 ham" in reply.text
        reply = c.post(f"/train/alice/held/{keys['alice']}", content=at_limit + "x", headers=headers)
        assert reply.status_code == 413
        assert c.get("/api/status").json()["trained"] == {"backend": "builtin", "spam": 0, "ham": 1}


def test_pages_forbid_scripts(console):
    with client(console[0]) as c:
        policy = c.get("/login").headers["content-security-policy"]
        assert "default-src 'none'" in policy and "script-src" not in policy


def test_plots_and_mail_list_read_at_most_the_newest_messages(console, monkeypatch):
    from pop3proxy.web import data

    app, _, _, root = console
    with open_store(root, "alice") as box:
        for i in range(4):
            box.add(b"From: x@example.org\r\nSubject: m%d\r\nX-Spam-Score: %d.0\r\n\r\nbody\r\n" % (i, i))
    monkeypatch.setattr(data, "MAX_SCANNED", 3)
    with client(app) as c:
        sign_in(c, "alice")
        assert sum(c.get("/api/plots/alice").json()["received"]) == 3
        assert len(c.get("/api/mail/alice").json()) == 3
    monkeypatch.setattr(data, "MAX_SCANNED", 4)
    with client(app) as c:
        sign_in(c, "alice")
        assert sum(c.get("/api/plots/alice").json()["received"]) == 4
        assert sorted(c.get("/api/plots/alice").json()["scores"]["counts"])[-4:] == [1, 1, 1, 1]


def test_message_text_is_cut_at_the_limit(monkeypatch):
    from pop3proxy.web import data

    monkeypatch.setattr(data, "MAX_TEXT", 10)
    raw = b"Subject: s\r\nContent-Type: text/plain\r\n\r\n" + b"0123456789ABC\r\n"
    assert data.message_view(raw)["text"] == "0123456789"


def test_overview_shows_the_token_state_of_oauth2_accounts(tmp_path):
    import time

    from pop3proxy.proxy.oauth.tokens import TokenSet, save_tokens

    users = tmp_path / "users"
    set_password(users, "root", "rootpw")
    root = tmp_path / "cache"
    settings = Settings(
        listen={"host": "127.0.0.1", "port": 0},
        local={"users_file": users},
        cache={"root": root},
        web={"port": 0, "admins": ["root"]},
        accounts={"carol": {"oauth2": {"token_url": "https://auth.example/token", "client_id": "pop3proxy"}},
                  "dave": {"oauth2": {"token_url": "https://auth.example/token", "client_id": "pop3proxy"}}},
    )
    save_tokens(root, "carol", TokenSet(access_token="secret-access", refresh_token="secret-refresh",
                                        expires_at=time.time() + 3600))
    app = build_app(settings, LocalBackend(users, root), Gate(Throttle()), secure=False)
    with client(app) as c:
        form = c.get("/login")
        c.post("/login", data={"user": "root", "password": "rootpw", "csrf": csrf_of(form.text)})
        page = c.get("/").text
        api = {a["name"]: a for a in c.get("/api/status").json()["accounts"]}
    assert "OAuth2: token valid until" in page and "OAuth2: not authorised yet" in page
    assert api["carol"]["oauth2"].startswith("token valid until")
    assert "secret-access" not in page and "secret-refresh" not in page
