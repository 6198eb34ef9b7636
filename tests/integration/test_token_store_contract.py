"""The contract of `TokenStore` (store/tokens_api.py), run against every engine of
helpers/state_engines.py: ``sqlite`` (the one machine's token files, `FileTokenStore`, below the cache
root) and ``postgres`` (`PostgresTokenStore`, a real PostgreSQL, a new database for each test). Another
process, or another store object (another node), opens the same storage by the engine's name and its
string. Records and local passwords, account names, damaged records, and one renewal at a time: in this
process, in another, and after a holder was killed.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from helpers.state_engines import ENGINES, Engine, engine_for

from pop3proxy.store.token_files import token_path
from pop3proxy.store.tokens_api import TokenStore

ROOT = Path(__file__).resolve().parents[2]

# Every wait for something that must happen is bounded by WAIT; NOT_YET is how long a test looks for
# something that must not happen (a second holder getting in) before it lets the first one go.
WAIT = 30.0
NOT_YET = 0.5

RECORD = {"access_token": "A1", "refresh_token": None, "expires_at": 1060.5, "token_type": "Bearer",
          "state": "ok", "updated": 1000.0}
HASH = "$scrypt$n=16384,r=8,p=1$c2FsdHNhbHRzYWx0c2FsdA==$ZGlnZXN0ZGlnZXN0ZGlnZXN0ZGlnZXN0ZGlnZXN0ZGk="


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    yield from engine_for(request, tmp_path)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """Everything the store may write on this machine goes below home/cache (the engine's cache root)."""
    return tmp_path


@pytest.fixture
def token_store(engine: Engine) -> TokenStore:
    return engine.tokens()


def everything_below(path: Path) -> list[Path]:
    return sorted(path.rglob("*"))


# -- records -----------------------------------------------------------------------------------------


def test_an_account_never_saved_has_no_record(token_store):
    assert token_store.load("nobody") is None
    assert token_store.local_password_hash("nobody") is None


def test_a_saved_record_is_loaded_back_and_replaced_by_the_next(token_store):
    token_store.save("alice", RECORD)
    assert token_store.load("alice") == RECORD
    second = {**RECORD, "access_token": "A2", "refresh_token": "R2", "error": "token refresh: timeout"}
    token_store.save("alice", second)
    assert token_store.load("alice") == second
    assert token_store.load("bob") is None


def test_another_handle_on_the_same_store_sees_what_was_saved(engine, token_store):
    token_store.save("alice", RECORD)
    token_store.set_local_password_hash("alice", HASH)
    other = engine.tokens()
    assert other.load("alice") == RECORD and other.local_password_hash("alice") == HASH


def test_the_local_password_hash_round_trip(token_store):
    token_store.set_local_password_hash("carol", HASH)
    assert token_store.local_password_hash("carol") == HASH
    token_store.set_local_password_hash("carol", HASH[::-1])
    assert token_store.local_password_hash("carol") == HASH[::-1]
    assert token_store.load("carol") is None  # a local password is not a token record
    for bad in ("", "two\nlines", "nul\0"):
        with pytest.raises(ValueError):
            token_store.set_local_password_hash("carol", bad)
    assert token_store.local_password_hash("carol") == HASH[::-1]


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_nothing_is_readable_by_others_whatever_the_umask(token_store, home, umask):
    old = os.umask(umask)
    try:
        token_store.save("alice", RECORD)
        token_store.set_local_password_hash("alice", HASH)
        with token_store.renewing("alice"):
            token_store.save("alice", {**RECORD, "access_token": "A2"})
    finally:
        os.umask(old)
    for path in [home / "cache", *everything_below(home / "cache")]:
        if not path.exists():
            continue  # a store that keeps nothing on this machine
        mode = stat.S_IMODE(path.stat().st_mode)
        if path.is_file():
            assert mode == 0o600, (path, oct(mode))
        else:
            assert mode & 0o077 == 0, (path, oct(mode))


# -- account names -----------------------------------------------------------------------------------

ESCAPING = ["../escape", "..", ".", "/etc/passwd", "a/../../b", "..\\..\\c", "nul\0name", "~", "x" * 1000,
            "Alice", "alice", "al/ice", "al%2Fice", "al%252Fice", "ünï@example.org", "lone \udcff surrogate"]


def test_account_names_never_leave_the_store_and_never_collide(token_store, home):
    (home / "outside").mkdir()
    for number, name in enumerate(ESCAPING):
        try:
            token_store.save(name, {"number": number})
            token_store.set_local_password_hash(name, f"hash-{number}")
            with token_store.renewing(name):
                pass
        except ValueError:
            continue  # refused: fine
        else:
            assert token_store.load(name) == {"number": number}
            assert token_store.local_password_hash(name) == f"hash-{number}"
    for number, name in enumerate(ESCAPING):
        assert token_store.load(name) in (None, {"number": number}), name
    assert [p.name for p in home.iterdir() if p.name != "cache"] == ["outside"]
    assert everything_below(home / "outside") == []


def test_the_empty_account_name_is_refused(token_store):
    with pytest.raises(ValueError):
        token_store.save("", RECORD)
    with pytest.raises(ValueError):
        token_store.load("")


# -- damaged records ---------------------------------------------------------------------------------


def damage(engine: Engine, account: str, text: str) -> Callable[[], str]:
    """Put `text` in the place of the account's stored record (as a bug or a hand would); returns what
    reads the stored record as it is now."""
    if engine.name == "sqlite":
        path = token_path(engine.where, account)
        path.write_text(text)
        return path.read_text
    with psycopg.connect(engine.where) as conn:
        conn.execute("UPDATE oauth_tokens SET record = %s WHERE account = %s", (text, account))

    def stored() -> str:
        with psycopg.connect(engine.where) as conn:
            found = conn.execute("SELECT record FROM oauth_tokens WHERE account = %s", (account,)).fetchone()
        assert found is not None
        return found[0]

    return stored


@pytest.mark.parametrize("text", ['{"access_token": "A1", "refresh', "[1, 2]", '"a string"', ""])
def test_a_damaged_record_raises_value_error_and_is_left_as_it_is(engine, token_store, text):
    token_store.save("alice", RECORD)
    token_store.set_local_password_hash("alice", HASH)
    stored = damage(engine, "alice", text)
    with pytest.raises(ValueError):
        token_store.load("alice")
    with token_store.renewing("alice"), pytest.raises(ValueError):
        token_store.load("alice")
    with pytest.raises(ValueError):
        engine.tokens().load("alice")
    assert stored() == text  # nothing rewrote or deleted it
    assert token_store.local_password_hash("alice") == HASH  # the local password is apart
    token_store.save("alice", RECORD)  # authorising again replaces it
    assert token_store.load("alice") == RECORD


def test_a_database_that_cannot_be_reached_raises_os_error(tmp_path):
    from pop3proxy.store.postgres import PostgresTokenStore, open_pool

    with socket.socket() as unused:  # bound, never listening: connections are refused
        unused.bind(("127.0.0.1", 0))
        conninfo = f"host=127.0.0.1 port={unused.getsockname()[1]} user=postgres dbname=none connect_timeout=2"
        pool = open_pool(conninfo, min_size=0, max_size=1, timeout=2.0)
        try:
            store = PostgresTokenStore(pool, check=False)
            for call in (lambda: store.load("alice"), lambda: store.save("alice", RECORD),
                         lambda: store.local_password_hash("alice"),
                         lambda: store.set_local_password_hash("alice", HASH)):
                with pytest.raises(OSError, match="token database"):
                    call()
            with pytest.raises(OSError, match="token database"), store.renewing("alice"):
                pass
        finally:
            pool.close()


# -- renewing: one holder at a time ------------------------------------------------------------------


class Contender:
    """A thread that asks for `account`'s renewal; once it holds it, it loads the record it finds."""

    def __init__(self, store: TokenStore, account: str) -> None:
        self.asking, self.entered = threading.Event(), threading.Event()
        self.found: dict | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(store, account), daemon=True)
        self.thread.start()

    def _run(self, store: TokenStore, account: str) -> None:
        try:
            self.asking.set()
            with store.renewing(account):
                self.found = store.load(account)
                self.entered.set()
        except BaseException as exc:  # reported by the test
            self.error = exc
            self.entered.set()

    def joined(self) -> Contender:
        assert self.entered.wait(WAIT), "the renewal was never given to the second holder"
        self.thread.join(WAIT)
        assert self.error is None, self.error
        return self


def test_renewing_excludes_a_holder_in_another_thread(engine, token_store):
    held, release = threading.Event(), threading.Event()

    def first() -> None:
        with token_store.renewing("alice"):
            held.set()
            release.wait(WAIT)
            token_store.save("alice", {"by": "first"})  # saved while holding it

    thread = threading.Thread(target=first, daemon=True)
    thread.start()
    assert held.wait(WAIT)
    second = Contender(engine.tokens(), "alice")  # another handle: another node's
    assert second.asking.wait(WAIT)
    assert not second.entered.wait(NOT_YET), "a second thread got the renewal while the first held it"
    release.set()
    assert second.joined().found == {"by": "first"}
    thread.join(WAIT)


def test_renewing_one_account_does_not_hold_another(token_store):
    with token_store.renewing("alice"):
        assert Contender(token_store, "bob").joined().found is None


def test_renewing_is_given_back_when_the_block_raises(token_store):
    with pytest.raises(RuntimeError):
        with token_store.renewing("alice"):
            raise RuntimeError("the refresh failed")
    assert Contender(token_store, "alice").joined().found is None


# The other process: opens the same store, says it asks for the renewal, holds it and says so with the
# record it finds, then waits for a line on stdin ("save": save a record while still holding it) and
# lets go.
HOLDER = """
import json, sys
from helpers.state_engines import Engine
name, where, account = sys.argv[1:]
store = Engine(name, where).tokens()
print("asking", flush=True)
with store.renewing(account):
    print("holding", json.dumps(store.load(account)), flush=True)
    if sys.stdin.readline().strip() == "save":
        store.save(account, {"by": "the other process"})
print("released", flush=True)
"""


class Holder:
    """Another process holding (or asking for) an account's renewal of the same store."""

    def __init__(self, engine: Engine, account: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, engine.name, engine.where, account],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"})
        self.asking, self.holding = threading.Event(), threading.Event()
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if line == "asking\n":
                self.asking.set()
            elif line.startswith("holding "):
                self.holding.set()
        self.asking.set()  # it ended: whoever waits looks at lines
        self.holding.set()

    def wait_asking(self) -> None:
        assert self.asking.wait(WAIT) and self.lines[:1] == ["asking\n"], self.lines

    def wait_holding(self) -> dict | None:
        """The record the other process found once it held the renewal."""
        assert self.holding.wait(WAIT) and self.lines[1:2] and self.lines[1].startswith("holding "), self.lines
        return json.loads(self.lines[1].split(" ", 1)[1])

    def let_go(self, command: str = "") -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.proc.wait(WAIT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(WAIT)
        if self.proc.stdin is not None:
            self.proc.stdin.close()


@pytest.fixture
def other_process(engine) -> Iterator:
    """Start a process that asks for an account's renewal; every one started is stopped after the test."""
    started: list[Holder] = []

    def start(account: str) -> Holder:
        started.append(Holder(engine, account))
        return started[-1]

    yield start
    for holder in started:
        holder.stop()


def test_renewing_excludes_a_holder_in_another_process(token_store, other_process):
    holder = other_process("alice")
    assert holder.wait_holding() is None
    second = Contender(token_store, "alice")
    assert second.asking.wait(WAIT)
    assert not second.entered.wait(NOT_YET), "this process got the renewal while another process held it"
    assert holder.let_go("save") == 0
    assert second.joined().found == {"by": "the other process"}
    assert holder.lines[2:] == ["released\n"]


def test_a_holder_that_dies_holds_nothing(token_store, other_process):
    holder = other_process("alice")
    holder.wait_holding()
    second = Contender(token_store, "alice")
    assert second.asking.wait(WAIT)
    assert not second.entered.wait(NOT_YET), "this process got the renewal while another process held it"
    holder.proc.kill()
    assert holder.proc.wait(WAIT) != 0
    assert second.joined().found is None


def test_another_process_waits_for_this_one(token_store, other_process):
    with token_store.renewing("alice"):
        holder = other_process("alice")
        holder.wait_asking()
        assert not holder.holding.wait(NOT_YET), "another process got the renewal while this one held it"
        token_store.save("alice", {"by": "this process"})
    assert holder.wait_holding() == {"by": "this process"}
    assert holder.let_go() == 0
    assert token_store.load("alice") == {"by": "this process"}
