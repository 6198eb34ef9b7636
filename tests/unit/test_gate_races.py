"""The login throttle under concurrency: attempts in flight count against the address limit, and a
finished attempt is never counted twice (as a failure and still in flight), in one process or across
workers. The order of events is set explicitly; the parent's channel is slowed with trio's
autojump clock to stand for a loaded supervisor."""

from __future__ import annotations

import trio
import trio.testing

from pop3proxy.net.gate import Gate
from pop3proxy.net.shared import GateServer, RemoteGate
from pop3proxy.net.throttle import Throttle


class SlowStream(trio.abc.HalfCloseableStream):
    """The parent's end of one worker's channel: what the worker sends arrives a second late."""

    def __init__(self, inner: trio.abc.HalfCloseableStream) -> None:
        self.inner = inner

    async def send_all(self, data) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes=None) -> bytes:
        data = await self.inner.receive_some(max_bytes)
        await trio.sleep(1)  # the fault: a busy parent reads this worker's requests late
        return data

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


def worker(nursery: trio.Nursery, server: GateServer, slow: bool = False) -> RemoteGate:
    ours, theirs = trio.testing.memory_stream_pair()
    remote = RemoteGate(ours)
    nursery.start_soon(remote.run)
    nursery.start_soon(server.serve, SlowStream(theirs) if slow else theirs)
    return remote


async def test_concurrent_attempts_from_one_address_respect_the_address_limit():
    gate = Gate(Throttle(max_failures=5, address_failures=20, base_delay=0, max_delay=0), max_per_address=100)
    for i in range(18):  # 18 failures from the address, each on another account
        async with gate.login("10.0.0.1", f"acct{i}") as attempt:
            assert not attempt.blocked
            await attempt.failed()
    asked = trio.Event()  # the provider answers once every attempt has been let through or refused
    through, refused = [], []

    async def guess(i: int) -> None:
        async with gate.login("10.0.0.1", f"other{i}") as attempt:
            if attempt.blocked:
                refused.append(i)
                return
            through.append(i)
            await asked.wait()
            await attempt.failed()

    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(guess, i)
        await trio.testing.wait_all_tasks_blocked()
        asked.set()
    assert len(through) == 2 and len(refused) == 8  # 20 in all, not 28
    async with gate.login("10.0.0.1", "someone") as attempt:
        assert attempt.blocked
    # Another address is not affected, and many users of one address may log in at once up to the limit.
    async with gate.login("10.0.0.2", "acct0") as attempt:
        assert not attempt.blocked


async def test_many_users_behind_one_address_log_in_at_once():
    # An address with no recent failure (NAT, a gateway): its logins in flight are not held back.
    gate = Gate(Throttle(max_failures=5, address_failures=20, base_delay=0, max_delay=0), max_per_address=1000)
    asked = trio.Event()
    through = []

    async def login(i: int) -> None:
        async with gate.login("10.0.0.3", f"user{i}") as attempt:
            if not attempt.blocked:
                through.append(i)
                await asked.wait()
                attempt.succeeded()

    async with trio.open_nursery() as nursery:
        for i in range(100):
            nursery.start_soon(login, i)
        await trio.testing.wait_all_tasks_blocked()
        asked.set()
    assert len(through) == 100


async def test_a_failure_waiting_for_its_delay_is_counted_once():
    gate = Gate(Throttle(max_failures=3, base_delay=0, max_delay=0))
    async with gate.login("10.0.0.1", "acct") as attempt:
        await attempt.failed()
    async with gate.login("10.0.0.1", "acct") as second:
        await second.failed()
        # The second failure is counted; its session is still answering (sleeping its delay) when
        # the same client's next connection tries a third time: 2 failures, not 2 + 1 in flight.
        async with gate.login("10.0.0.1", "acct") as third:
            assert not third.blocked
            await third.failed()
    async with gate.login("10.0.0.1", "acct") as fourth:
        assert fourth.blocked  # and three failures do block


async def test_the_third_wrong_password_on_another_worker_is_auth_not_login_delay(autojump_clock):
    gate = Gate(Throttle(max_failures=3, base_delay=0, max_delay=0), max_per_address=5)
    server = GateServer(gate)
    async with trio.open_nursery() as nursery:
        one = worker(nursery, server, slow=True)
        two = worker(nursery, server)
        for _ in range(2):  # two wrong passwords on worker one, each answered before the next
            async with one.login("10.0.0.1", "acct") as attempt:
                assert not attempt.blocked
                await attempt.failed()
        # The client was answered: its third try, on worker two, is asked at once (not refused).
        async with two.login("10.0.0.1", "acct") as attempt:
            assert not attempt.blocked
            await attempt.failed()
        async with two.login("10.0.0.1", "acct") as attempt:
            assert attempt.blocked
        nursery.cancel_scope.cancel()


async def test_a_login_after_a_success_on_another_worker_is_not_refused(autojump_clock):
    gate = Gate(Throttle(max_failures=3, base_delay=0, max_delay=0), max_per_address=5)
    server = GateServer(gate)
    async with trio.open_nursery() as nursery:
        one = worker(nursery, server, slow=True)
        two = worker(nursery, server)
        for _ in range(2):
            async with one.login("10.0.0.1", "acct") as attempt:
                await attempt.failed()
        async with one.login("10.0.0.1", "acct") as attempt:
            assert not attempt.blocked
            attempt.succeeded()
        # The client got +OK, logged out, and logs in again on worker two.
        async with two.login("10.0.0.1", "acct") as attempt:
            assert not attempt.blocked
        nursery.cancel_scope.cancel()
