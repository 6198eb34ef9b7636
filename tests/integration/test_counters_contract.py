"""The contract of the gate's counters (`Counters`, pop3proxy/store/api.py), run against every engine of
helpers/counter_engines.py: ``memory`` (`Gate` over `Throttle`, one machine) and ``postgres`` (`ClusterGate`
over `PostgresCounters`, a real PostgreSQL). What the session code relies on, asked as it asks: the
failed-login throttle (these tests were tests/unit/test_throttle.py, on the `Throttle` alone), the throttle
under concurrency (the tests of one gate from tests/unit/test_gate_races.py) and the session limits.
The order of events is set explicitly; a fake clock moves the window.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AsyncExitStack

import pytest
import trio
from helpers.counter_engines import GATE_ENGINES, Clock, CounterEngine, counter_engine_for

from pop3proxy.net.gate import Gate


@pytest.fixture(params=GATE_ENGINES)
def counter_engine(request: pytest.FixtureRequest) -> Iterator[CounterEngine]:
    yield from counter_engine_for(request)


async def fail(gate: Gate, address: str, account: str) -> float:
    """A login let through that fails; the delay of its answer."""
    async with gate.login(address, account) as attempt:
        assert not attempt.blocked
        return await attempt.failed()


async def asked(gate: Gate, address: str, account: str) -> tuple[bool, float]:
    """(blocked, delay) of a login that, let through, ends without an answer (neither failure nor success)."""
    async with gate.login(address, account) as attempt:
        return attempt.blocked, attempt.delay


# -- the throttle --------------------------------------------------------------------------------------


async def test_a_pair_is_blocked_not_the_address_nor_the_account_elsewhere(counter_engine):
    clock = Clock()
    gate = counter_engine.gate(max_failures=5, window=900, clock=clock)
    for _ in range(5):
        await fail(gate, "10.0.0.1", "host:995/alice")
    assert (await asked(gate, "10.0.0.1", "host:995/alice"))[0]
    assert not (await asked(gate, "10.0.0.1", "host:995/bob"))[0]  # the same household, another user
    assert await asked(gate, "10.0.0.9", "host:995/alice") == (False, 8.0)  # the real user elsewhere: slowed
    clock.now += 901
    assert await asked(gate, "10.0.0.1", "host:995/alice") == (False, 0.0)


async def test_ten_strangers_never_lock_the_real_user_out(counter_engine):
    gate = counter_engine.gate(max_failures=5, clock=Clock())
    for i in range(10):
        await fail(gate, f"10.0.0.{i}", "alice")
    assert not (await asked(gate, "192.0.2.1", "alice"))[0]


async def test_an_address_across_accounts_has_a_higher_threshold(counter_engine):
    gate = counter_engine.gate(max_failures=5, address_failures=20, clock=Clock())
    for i in range(19):
        await fail(gate, "10.0.0.1", f"user{i}")
    assert not (await asked(gate, "10.0.0.1", "someone-else"))[0]
    await fail(gate, "10.0.0.1", "user19")
    assert (await asked(gate, "10.0.0.1", "someone-else"))[0]


async def test_attempts_in_flight_count_and_case_variants_are_one_account(counter_engine):
    gate = counter_engine.gate(max_failures=5, clock=Clock())
    async with AsyncExitStack() as in_flight:
        admitted = 0
        for i in range(20):
            attempt = await in_flight.enter_async_context(gate.login("10.0.0.1", "Alice" if i % 2 else "ALICE"))
            admitted += not attempt.blocked
        assert admitted == 5
    assert not (await asked(gate, "10.0.0.1", "alice"))[0]


async def test_success_clears_the_pair(counter_engine):
    gate = counter_engine.gate(max_failures=2, clock=Clock())
    await fail(gate, "10.0.0.1", "alice")
    async with gate.login("10.0.0.1", "alice") as attempt:
        attempt.succeeded()
    await fail(gate, "10.0.0.1", "alice")
    assert not (await asked(gate, "10.0.0.1", "alice"))[0]


async def test_the_answer_to_a_failure_waits_longer_each_time_up_to_max_delay(counter_engine):
    gate = counter_engine.gate(max_failures=10, base_delay=0.5, max_delay=3.0, clock=Clock())
    assert [await fail(gate, "10.0.0.1", "alice") for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert await fail(gate, "10.0.0.2", "alice") == 0.5  # the pair's failures, not the account's


# -- the throttle under concurrency -------------------------------------------------------------------


async def test_concurrent_attempts_from_one_address_respect_the_address_limit(counter_engine):
    gate = counter_engine.gate(max_failures=5, address_failures=20, base_delay=0, max_delay=0, max_per_address=100)
    for i in range(18):  # 18 failures from the address, each on another account
        await fail(gate, "10.0.0.1", f"acct{i}")
    answered, asked_provider = trio.Event(), trio.Event()  # the provider answers once all were decided
    through: list[int] = []
    refused: list[int] = []

    async def guess(i: int) -> None:
        async with gate.login("10.0.0.1", f"other{i}") as attempt:
            (refused if attempt.blocked else through).append(i)
            if len(through) + len(refused) == 10:
                answered.set()
            if attempt.blocked:
                return
            await asked_provider.wait()
            await attempt.failed()

    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(guess, i)
        await answered.wait()
        asked_provider.set()
    assert len(through) == 2 and len(refused) == 8  # 20 in all, not 28
    assert (await asked(gate, "10.0.0.1", "someone"))[0]
    # Another address is not affected.
    assert not (await asked(gate, "10.0.0.2", "acct0"))[0]


async def test_many_users_behind_one_address_log_in_at_once(counter_engine):
    # An address with no recent failure (NAT, a gateway): its logins in flight are not held back.
    gate = counter_engine.gate(max_failures=5, address_failures=20, base_delay=0, max_delay=0, max_per_address=1000)
    answered, asked_provider = trio.Event(), trio.Event()
    decided: list[bool] = []

    async def login(i: int) -> None:
        async with gate.login("10.0.0.3", f"user{i}") as attempt:
            decided.append(attempt.blocked)
            if len(decided) == 100:
                answered.set()
            if not attempt.blocked:
                await asked_provider.wait()
                attempt.succeeded()

    async with trio.open_nursery() as nursery:
        for i in range(100):
            nursery.start_soon(login, i)
        await answered.wait()
        asked_provider.set()
    assert decided == [False] * 100


async def test_a_failure_waiting_for_its_delay_is_counted_once(counter_engine):
    gate = counter_engine.gate(max_failures=3, base_delay=0, max_delay=0)
    await fail(gate, "10.0.0.1", "acct")
    async with gate.login("10.0.0.1", "acct") as second:
        await second.failed()
        # The second failure is counted; its session is still answering (sleeping its delay) when
        # the same client's next connection tries a third time: 2 failures, not 2 + 1 in flight.
        async with gate.login("10.0.0.1", "acct") as third:
            assert not third.blocked
            await third.failed()
    assert (await asked(gate, "10.0.0.1", "acct"))[0]  # and three failures do block


# -- sessions ------------------------------------------------------------------------------------------


async def test_sessions_per_address_and_in_all_are_limited_and_given_back(counter_engine):
    gate = counter_engine.gate(max_per_address=2, max_sessions=3)
    assert [await gate.admit("10.0.0.1") for _ in range(3)] == ["ok", "ok", "address"]
    assert await gate.admit("10.0.0.2") == "ok"
    assert await gate.admit("10.0.0.3") == "full"
    assert await gate.admit("10.0.0.3", force=True) == "ok"  # room being made
    gate.leave("10.0.0.1")
    assert await gate.admit("10.0.0.1", force=True) == "ok"  # the session that left made room
    assert await gate.admit("10.0.0.1", force=True) == "address"
    for address in ("10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.3"):
        gate.leave(address)
    assert [await gate.admit("10.0.0.4") for _ in range(3)] == ["ok", "ok", "address"]
