"""The login throttle across workers: a finished attempt is never counted twice (as a failure and still in
flight), nor still in flight once its client was answered, when the parent reads one worker's channel
late. The parent's channel is slowed with trio's autojump clock to stand for a loaded supervisor. The same
behaviour in one gate, on every engine, is in tests/integration/test_counters_contract.py (across nodes:
test_cluster_gate.py)."""

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


async def test_a_success_without_failures_near_it_is_not_held_up_by_a_slow_parent(autojump_clock):
    gate = Gate(Throttle(max_failures=2, base_delay=0, max_delay=0), max_per_address=5)
    server = GateServer(gate)
    async with trio.open_nursery() as nursery:
        one = worker(nursery, server, slow=True)
        two = worker(nursery, server)
        for _ in range(3):
            async with one.login("10.0.0.1", "acct") as attempt:
                assert not attempt.blocked
                attempt.succeeded()
                answered = trio.current_time()
            assert trio.current_time() - answered < 1  # the client's +OK does not wait for the parent
            async with two.login("10.0.0.1", "acct") as attempt:  # the next login, at once, elsewhere
                assert not attempt.blocked
                attempt.succeeded()
        await trio.sleep(5)  # the slow parent reads worker one's ends
        assert not gate.throttle.blocked("10.0.0.1", "acct")
        # Failures near it: a success is counted before its client is answered again.
        async with two.login("10.0.0.1", "acct") as attempt:
            await attempt.failed()
        async with one.login("10.0.0.1", "acct") as attempt:
            attempt.succeeded()
            answered = trio.current_time()
        assert trio.current_time() - answered >= 1
        async with two.login("10.0.0.1", "acct") as attempt:
            assert not attempt.blocked
        nursery.cancel_scope.cancel()
