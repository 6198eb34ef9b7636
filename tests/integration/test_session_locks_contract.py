"""The contract of `SessionLocks` (pop3proxy/store/api.py), run against every engine: ``sqlite``
(`LocalSessionLocks`, an flock per account) and ``postgres`` (`PostgresSessionLocks`, an advisory lock on
a connection of its own; a real PostgreSQL). One session per account, in this process, in another
process and on another node; released by `release`; and a holder that dies holds nothing.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers.state_engines import ENGINES, Engine, engine_for

from pop3proxy.store.api import MailboxBusy, SessionLock

ROOT = Path(__file__).resolve().parents[2]
WAIT = 30.0  # seconds: the bound of every wait for another process, and of the wait for a dead one's lock
POLL = 0.01


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    yield from engine_for(request, tmp_path)


@pytest.fixture
def held() -> Iterator[list[SessionLock]]:
    """Locks a test takes; every one is released after it."""
    taken: list[SessionLock] = []
    yield taken
    for lock in taken:
        lock.release()


def eventually(attempt: Callable[[], SessionLock], within: float = WAIT) -> SessionLock:
    """``attempt()`` until it stops raising `MailboxBusy`; fails after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            return attempt()
        except MailboxBusy:
            if time.monotonic() > deadline:
                raise
        time.sleep(POLL)


# -- in this process ---------------------------------------------------------------------------------


def test_a_held_account_is_busy_until_released(engine, held):
    locks = engine.locks()
    first = locks.try_lock("alice")
    held.append(first)
    with pytest.raises(MailboxBusy):
        locks.try_lock("alice")
    with pytest.raises(MailboxBusy):
        engine.locks().try_lock("alice")  # another node's view: the same
    first.release()
    first.release()  # idempotent
    again = locks.try_lock("alice")
    held.append(again)
    with pytest.raises(MailboxBusy):
        locks.try_lock("alice")


def test_a_lock_confirms_it_is_held_until_released(engine, held):
    lock = engine.locks().try_lock("alice")
    held.append(lock)
    assert lock.confirm()
    lock.release()
    assert not lock.confirm()


def test_accounts_are_locked_independently(engine, held):
    locks = engine.locks()
    held.append(locks.try_lock("alice"))
    bob = locks.try_lock("bob")
    held.append(bob)
    held.append(engine.locks().try_lock("alice@example.org"))
    bob.release()
    with pytest.raises(MailboxBusy):
        locks.try_lock("alice")
    held.append(locks.try_lock("bob"))


def test_the_empty_account_name_is_refused(engine):
    with pytest.raises(ValueError):
        engine.locks().try_lock("")


def test_one_of_many_threads_gets_the_account(engine, held):
    locks = engine.locks()
    start = threading.Barrier(8)
    outcomes: queue.Queue[SessionLock | BaseException] = queue.Queue()

    def contend() -> None:
        start.wait(WAIT)
        try:
            outcomes.put(locks.try_lock("alice"))
        except BaseException as exc:
            outcomes.put(exc)

    threads = [threading.Thread(target=contend, daemon=True) for _ in range(8)]
    for thread in threads:
        thread.start()
    results = [outcomes.get(timeout=WAIT) for _ in threads]
    for thread in threads:
        thread.join(WAIT)
    got = [result for result in results if not isinstance(result, BaseException)]
    held.extend(got)
    assert len(got) == 1, results
    assert all(isinstance(result, MailboxBusy) for result in results if isinstance(result, BaseException)), results


# -- another process ---------------------------------------------------------------------------------

# The other process: tries the account's lock and says "holding" or "busy"; holding, it waits for a line
# on stdin, releases the lock and says "released".
HOLDER = """
import sys
from helpers.state_engines import Engine
from pop3proxy.store.api import MailboxBusy
locks = Engine(sys.argv[1], sys.argv[2]).locks()
try:
    lock = locks.try_lock(sys.argv[3])
except MailboxBusy:
    print("busy", flush=True)
    sys.exit(0)
print("holding", flush=True)
sys.stdin.readline()
lock.release()
print("released", flush=True)
"""


class Other:
    """Another process (another node) asking for an account's lock."""

    def __init__(self, engine: Engine, account: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, engine.name, engine.where, account],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"})
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put("<ended>")

    def said(self) -> str:
        """Its next line (waits for it)."""
        return self.lines.get(timeout=WAIT)

    def tell(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("release\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(WAIT)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def other(engine: Engine) -> Iterator[Callable[[str], Other]]:
    started: list[Other] = []

    def start(account: str) -> Other:
        started.append(Other(engine, account))
        return started[-1]

    yield start
    for proc in started:
        proc.stop()


def test_an_account_held_by_another_process_is_busy_here_until_it_lets_go(engine, other, held):
    holder = other("alice")
    assert holder.said() == "holding"
    locks = engine.locks()
    with pytest.raises(MailboxBusy):
        locks.try_lock("alice")
    held.append(locks.try_lock("bob"))
    holder.tell()
    assert holder.said() == "released"
    held.append(locks.try_lock("alice"))
    assert holder.proc.wait(WAIT) == 0


def test_an_account_held_here_is_busy_for_another_process(engine, other, held):
    held.append(engine.locks().try_lock("alice"))
    assert other("alice").said() == "busy"
    bob = other("bob")
    assert bob.said() == "holding"
    bob.tell()
    assert bob.said() == "released"


def test_a_holder_that_is_killed_holds_nothing(engine, other, held):
    holder = other("alice")
    assert holder.said() == "holding"
    locks = engine.locks()
    with pytest.raises(MailboxBusy):
        locks.try_lock("alice")
    holder.proc.kill()  # SIGKILL: no release, no clean exit
    assert holder.proc.wait(WAIT) == -9
    held.append(eventually(lambda: locks.try_lock("alice")))
