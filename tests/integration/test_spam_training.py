"""Training the spam filter's backend (the web console's "This is spam" / "This is not spam"): spamd's
Bayes through TELL, rspamd's Bayes through its controller, against the real daemons of
tests/helpers/daemons.py. Each test checks that the daemon itself learnt (spamd: ``sa-learn --dump
magic`` on its database; rspamd: the learn counts in its redis and its controller's ``/stat``), not
only what pop3proxy counts.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from helpers.common import require_tool
from helpers.daemons import Rspamd, Spamd, rspamd, spamd, spamd_without_tell  # noqa: F401  (fixtures)
from helpers.waiting import eventually
from starlette.testclient import TestClient

from pop3proxy.config import Settings, masked
from pop3proxy.filtering.api import FilterConfigError, FilterResult
from pop3proxy.filtering.loader import load_filter
from pop3proxy.filters._rspamd import RspamdError, parse_stat
from pop3proxy.filters._spamd import SpamdError, build_tell, parse_tell_reply
from pop3proxy.filters.spam import LearnError, SpamFilter
from pop3proxy.net.gate import Gate
from pop3proxy.net.throttle import Throttle
from pop3proxy.proxy.credentials import hash_password
from pop3proxy.proxy.local import LocalBackend
from pop3proxy.store import open_store
from pop3proxy.store.held import HeldStore
from pop3proxy.web.app import build_app

# rspamd renews the counts its controller shows from redis every 30 to 60 s.
STAT_REFRESH = 90.0


def spam_message() -> bytes:
    """A spam-like message never seen before (both daemons remember what they learnt by Message-ID)."""
    tag = secrets.token_hex(8)
    return (
        f"From: Prize Office <claims@lotto-intl-claims.example>\r\n"
        f"To: ben.costa@example.net\r\n"
        f"Subject: You have won the international lottery prize {tag}\r\n"
        f"Date: Mon, 3 Jun 2024 09:11:58 +0000\r\n"
        f"Message-ID: <{tag}@lotto-intl-claims.example>\r\n"
        f"\r\n"
        f"Dear winner, your address has won one million dollars in the international lottery draw {tag}.\r\n"
        f"To claim your prize send your bank account details and a processing fee to our agent today.\r\n"
        f"Act now, this offer expires soon. Congratulations from the prize office team.\r\n"
    ).encode()


def make(**options) -> SpamFilter:
    flt, _ = load_filter({"use": "spam", **options})
    assert isinstance(flt, SpamFilter)
    return flt


# -- spamd: TELL --------------------------------------------------------------------------------


def spamd_bayes(daemon: Spamd) -> tuple[int, int]:
    """(nspam, nham) of the daemon's own Bayes database, as sa-learn reads it."""
    tool = require_tool("sa-learn", "spamassassin")
    if not Path(f"{daemon.bayes_path}_toks").exists():  # nothing learnt yet (sa-learn fails on no database)
        return 0, 0
    out = subprocess.run(
        [tool, "-C", daemon.rules, f"--siteconfigpath={daemon.site}", "--dump", "magic"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    counts = {name: int(n) for n, name in re.findall(r"^\S+\s+\S+\s+(\d+)\s+\S+\s+non-token data: (nspam|nham)$",
                                                       out, re.M)}
    assert set(counts) == {"nspam", "nham"}, out
    return counts["nspam"], counts["nham"]


def test_spamd_learns_spam_and_ham_through_tell(spamd: Spamd, tmp_path: Path) -> None:
    counts = tmp_path / "state" / "spamd-taught.json"
    flt = make(backend="spamd", address=spamd.address, taught_counts=str(counts))
    assert flt.trained() == (0, 0)
    message = spam_message()
    nspam, nham = spamd_bayes(spamd)

    assert flt.learn(message, "spam", "alice") is True
    assert spamd_bayes(spamd) == (nspam + 1, nham)  # spamd's own Bayes learnt it
    assert flt.trained() == (1, 0)
    assert counts.stat().st_mode & 0o777 == 0o600

    assert flt.learn(message, "spam", "alice") is False  # already learnt: spamd says so, nothing counted
    assert spamd_bayes(spamd) == (nspam + 1, nham)
    assert flt.trained() == (1, 0)

    assert flt.learn(message, "ham", "alice") is True  # spamd moves it to the other class
    assert spamd_bayes(spamd) == (nspam, nham + 1)
    assert flt.trained() == (1, 1)  # taught through pop3proxy: both times


def test_spamd_over_unix_socket_learns(spamd: Spamd, tmp_path: Path) -> None:
    flt = make(backend="spamd", address=spamd.socket_path, taught_counts=str(tmp_path / "taught.json"))
    nspam, nham = spamd_bayes(spamd)
    assert flt.learn(spam_message(), "spam") is True
    assert spamd_bayes(spamd) == (nspam + 1, nham)


def test_spamd_without_allow_tell_refuses_clearly(spamd_without_tell: Spamd, tmp_path: Path) -> None:
    counts = tmp_path / "taught.json"
    flt = make(backend="spamd", address=spamd_without_tell.address, taught_counts=str(counts))
    with pytest.raises(LearnError, match="--allow-tell") as caught:
        flt.learn(spam_message(), "spam", "alice")
    assert "refused to learn" in str(caught.value)
    assert not counts.exists() and flt.trained() == (0, 0)


def test_spamd_unreachable_is_a_learn_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    flt = make(backend="spamd", address=address, taught_counts=str(tmp_path / "taught.json"))
    with pytest.raises(LearnError, match="cannot connect to spamd"):
        flt.learn(spam_message(), "ham")


def test_tell_request_and_replies() -> None:
    request = build_tell(b"Subject: x\r\n\r\nbody\r\n", "ham", "alice")
    head, _, body = request.partition(b"\r\n\r\n")
    assert head.split(b"\r\n") == [
        b"TELL SPAMC/1.5", b"Message-class: ham", b"Set: local", b"Content-length: 20", b"User: alice",
    ]
    assert body == b"Subject: x\r\n\r\nbody\r\n"
    with pytest.raises(ValueError):
        build_tell(b"x", "junk")
    with pytest.raises(SpamdError):
        build_tell(b"x", "spam", "bob\r\nSet: remote")
    # Recorded from spamd 4.0: learnt, already known, refused.
    assert parse_tell_reply(b"SPAMD/1.1 0 EX_OK\r\nDidSet: local\r\n\r\n\r\n") is True
    assert parse_tell_reply(b"SPAMD/1.1 0 EX_OK\r\n\r\n\r\n") is False
    refused = b"SPAMD/1.0 69 Service Unavailable: TELL commands are not enabled, set the --allow-tell switch.\r\n"
    with pytest.raises(SpamdError, match="refused to learn"):
        parse_tell_reply(refused)


# -- rspamd: the controller ---------------------------------------------------------------------


def redis_learns(daemon: Rspamd) -> dict[str, int]:
    """rspamd's own learn counts, straight from its redis (hash RS: learns_spam, learns_ham)."""
    host, port = daemon.redis.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"HGET RS learns_spam\r\nHGET RS learns_ham\r\nQUIT\r\n")
        data = b""
        while chunk := s.recv(4096):  # redis closes after QUIT
            data += chunk
    # Two bulk strings ("$1\r\n3\r\n", or "$-1\r\n" when nothing was learnt yet), then "+OK".
    values = re.findall(rb"\$(?:-1|\d+\r\n(\d+))\r\n", data)
    assert len(values) == 2 and data.endswith(b"+OK\r\n"), data
    return {"spam": int(values[0] or 0), "ham": int(values[1] or 0)}


def rspamd_filter(daemon: Rspamd, **options) -> SpamFilter:
    options = {"controller": daemon.controller, "controller_password": daemon.controller_password, **options}
    return make(backend="rspamd", address=daemon.url, **options)


def trained_or_none(flt: SpamFilter) -> tuple[int, int] | None:
    try:
        return flt.trained()
    except LearnError:  # the controller is restarting
        return None


def test_rspamd_learns_spam_through_the_controller(rspamd: Rspamd) -> None:
    flt = rspamd_filter(rspamd)
    before = redis_learns(rspamd)
    message = spam_message()

    assert flt.learn(message, "spam", "alice") is True
    assert redis_learns(rspamd) == {"spam": before["spam"] + 1, "ham": before["ham"]}  # rspamd learnt it
    assert flt.learn(message, "spam", "alice") is False  # rspamd's 208: already learnt, not an error
    assert redis_learns(rspamd)["spam"] == before["spam"] + 1
    # The controller's /stat shows one more learnt spam once it renews its counts from redis: every 30
    # to 60 s, and right after it starts, which a reload (SIGHUP: new workers) makes happen now.
    assert rspamd.process is not None
    os.kill(rspamd.process.pid, signal.SIGHUP)
    assert eventually(lambda: trained_or_none(flt) == (before["spam"] + 1, before["ham"]), timeout=STAT_REFRESH)
    eventually(rspamd.ready)  # its normal worker is back too, for the tests after this one


def test_rspamd_controller_password_is_required(rspamd: Rspamd, tmp_path: Path) -> None:
    wrong = rspamd_filter(rspamd, controller_password="not-the-password")
    with pytest.raises(LearnError, match="refused the password") as caught:
        wrong.learn(spam_message(), "spam")
    assert "not-the-password" not in str(caught.value) and "not-the-password" not in repr(wrong.config)
    with pytest.raises(LearnError, match="refused the password"):
        wrong.trained()
    with pytest.raises(LearnError, match="wants a password"):
        rspamd_filter(rspamd, controller_password="").learn(spam_message(), "spam")

    secret = tmp_path / "controller.pass"
    secret.write_text(rspamd.controller_password + "\n")
    secret.chmod(0o644)
    with pytest.raises(FilterConfigError, match="controller_password_file: .* chmod 600"):
        rspamd_filter(rspamd, controller_password="", controller_password_file=str(secret))
    secret.chmod(0o600)
    from_file = rspamd_filter(rspamd, controller_password="", controller_password_file=str(secret))
    before = redis_learns(rspamd)["ham"]
    assert from_file.learn(spam_message(), "ham") is True
    assert redis_learns(rspamd)["ham"] == before + 1


def test_rspamd_says_why_it_did_not_learn(rspamd: Rspamd) -> None:
    with pytest.raises(LearnError, match="did not learn the message: .*tokens"):
        rspamd_filter(rspamd).learn(b"Subject: hi\r\n\r\nhello\r\n", "spam")


def test_rspamd_controller_unreachable(rspamd: Rspamd) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    flt = rspamd_filter(rspamd, controller=closed)
    with pytest.raises(LearnError, match="cannot reach the rspamd controller"):
        flt.learn(spam_message(), "spam")
    with pytest.raises(LearnError, match="cannot reach the rspamd controller"):
        flt.trained()


def test_rspamd_stat_parser() -> None:
    # Shape recorded from rspamd 3.4 with its Bayes in redis (other fields left out).
    body = (b'{"version":"3.4","learned":2,"total_learns":3,"statfiles":['
            b'{"revision":2,"used":0,"total":0,"size":0,"symbol":"BAYES_SPAM","type":"redis","users":1},'
            b'{"revision":1,"used":0,"total":0,"size":0,"symbol":"BAYES_HAM","type":"redis","users":1}]}')
    assert parse_stat(body) == (2, 1)
    assert parse_stat(b'{"statfiles":[]}') == (0, 0)
    for bad in (b"nope", b"[]", b'{"statfiles":{}}', b'{"statfiles":[{"symbol":"BAYES_SPAM","revision":-1}]}',
                b'{"statfiles":[{"symbol":"BAYES_HAM","revision":"3"}]}', b'{"statfiles":[1]}'):
        with pytest.raises(RspamdError):
            parse_stat(bad)


# -- options ------------------------------------------------------------------------------------


@pytest.mark.parametrize("table", [
    {"backend": "spamd", "controller": "127.0.0.1:11334"},
    {"backend": "builtin", "controller_password": "x"},
    {"backend": "rspamd", "taught_counts": "/tmp/x.json"},
    {"backend": "rspamd", "controller_password": "x", "controller_password_file": "/tmp/pw"},
    {"backend": "rspamd", "controller": "ftp://127.0.0.1:11334"},
    {"backend": "rspamd", "controller": "127.0.0.1:notaport"},
])
def test_bad_training_options_fail_at_load(table: dict) -> None:
    with pytest.raises(FilterConfigError):
        load_filter({"use": "spam", **table})


def test_check_config_masks_the_controller_password() -> None:
    settings = Settings(filters=[{"use": "spam", "backend": "rspamd", "controller_password": "s3cret-pw"},
                                 {"use": "spam", "backend": "rspamd", "controller_password_file": "/etc/pw"}])
    shown = masked(settings)["filters"]
    assert shown[0]["controller_password"] == "***" and "s3cret-pw" not in repr(masked(settings))
    assert shown[1]["controller_password_file"] == "/etc/pw"


# -- the web console ----------------------------------------------------------------------------


def console(tmp_path: Path, spam: dict) -> tuple[TestClient, str]:
    """A console with one local user, alice, who has one held message; signed in. (client, key)"""
    users, root = tmp_path / "users", tmp_path / "cache"
    users.write_text(f"alice:{hash_password('alice-pw', n=2)}\n")
    settings = Settings(listen={"host": "127.0.0.1", "port": 0}, local={"users_file": users},
                        cache={"root": root}, web={"port": 0}, filters=[{"use": "spam", **spam}])
    open_store(root, "alice").close()
    message = spam_message()
    key = HeldStore(root, "alice").add(message, "uid-1", FilterResult(message, action="hold", verdicts=["spam"]))
    app = build_app(settings, LocalBackend(users, root), Gate(Throttle()), secure=False)
    client = TestClient(app, backend="trio", follow_redirects=False)
    form = client.get("/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
    assert client.post("/login", data={"user": "alice", "password": "alice-pw", "csrf": csrf}).status_code == 303
    return client, key


def csrf_of(client: TestClient) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', client.get("/").text).group(1)


def test_console_teaches_spamd_and_shows_what_it_taught(spamd: Spamd, tmp_path: Path) -> None:
    client, key = console(tmp_path, {"backend": "spamd", "address": spamd.address,
                                     "taught_counts": str(tmp_path / "taught.json")})
    nspam, _ = spamd_bayes(spamd)
    with client:
        reply = client.post(f"/train/alice/held/{key}", data={"csrf": csrf_of(client), "label": "spam"})
        assert reply.status_code == 200 and "learnt as spam" in reply.text
        assert "Taught through pop3proxy: 1 spam and 0 ham" in reply.text
        assert client.get("/api/status").json()["trained"] == {"backend": "spamd", "spam": 1, "ham": 0}
    assert spamd_bayes(spamd)[0] == nspam + 1


def test_console_says_why_spamd_refused(spamd_without_tell: Spamd, tmp_path: Path) -> None:
    client, key = console(tmp_path, {"backend": "spamd", "address": spamd_without_tell.address,
                                     "taught_counts": str(tmp_path / "taught.json")})
    with client:
        reply = client.post(f"/train/alice/held/{key}", data={"csrf": csrf_of(client), "label": "spam"})
        assert reply.status_code == 409
        assert "cannot train: spamd refused to learn" in reply.text and "--allow-tell" in reply.text
        assert "Traceback" not in reply.text
        assert "Taught through pop3proxy: 0 spam and 0 ham" in client.get("/").text


def test_console_teaches_rspamd(rspamd: Rspamd, tmp_path: Path) -> None:
    client, key = console(tmp_path, {"backend": "rspamd", "address": rspamd.url, "controller": rspamd.controller,
                                     "controller_password": rspamd.controller_password})
    before = redis_learns(rspamd)["ham"]
    with client:
        reply = client.post(f"/train/alice/held/{key}", data={"csrf": csrf_of(client), "label": "ham"})
        assert reply.status_code == 200 and "learnt as not spam" in reply.text
        assert re.search(r"rspamd has learnt \d+ spam and \d+ ham messages", reply.text)
    assert redis_learns(rspamd)["ham"] == before + 1


def test_console_pages_work_when_the_controller_is_down(rspamd: Rspamd, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    client, key = console(tmp_path, {"backend": "rspamd", "address": rspamd.url, "controller": closed})
    with client:
        page = client.get("/")
        assert page.status_code == 200 and "counts cannot be read: cannot reach the rspamd controller" in page.text
        reply = client.post(f"/train/alice/held/{key}", data={"csrf": csrf_of(client), "label": "spam"})
        assert reply.status_code == 409 and "cannot reach the rspamd controller" in reply.text


def test_spamd_learns_even_when_its_count_cannot_be_kept(spamd: Spamd, tmp_path: Path, caplog) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    flt = make(backend="spamd", address=spamd.address, taught_counts=str(blocker / "taught.json"))
    nspam, nham = spamd_bayes(spamd)
    assert flt.learn(spam_message(), "spam") is True  # spamd learnt: that is not undone by our count
    assert spamd_bayes(spamd) == (nspam + 1, nham)
    assert "the count is not kept" in caplog.text
    with pytest.raises(LearnError, match="cannot read the counts"):
        flt.trained()
