"""The login throttle's bookkeeping, with a fake clock."""

from __future__ import annotations

from pop3proxy.net.throttle import Throttle


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_pair_is_blocked_not_the_address_nor_the_account_elsewhere():
    clock = Clock()
    throttle = Throttle(max_failures=5, window=900, clock=clock)
    for _ in range(5):
        throttle.failed("10.0.0.1", "host:995/alice")
    assert throttle.blocked("10.0.0.1", "host:995/alice")
    assert not throttle.blocked("10.0.0.1", "host:995/bob")  # the same household, another user
    assert not throttle.blocked("10.0.0.9", "host:995/alice")  # the real user elsewhere
    assert throttle.account_delay("host:995/alice") == throttle.max_delay  # slowed, not refused
    clock.now += 901
    assert not throttle.blocked("10.0.0.1", "host:995/alice")


def test_ten_strangers_never_lock_the_real_user_out():
    throttle = Throttle(max_failures=5, clock=Clock())
    for i in range(10):
        throttle.failed(f"10.0.0.{i}", "alice")
    assert not throttle.blocked("192.0.2.1", "alice")


def test_an_address_across_accounts_has_a_higher_threshold():
    throttle = Throttle(max_failures=5, address_failures=20, clock=Clock())
    for i in range(19):
        throttle.failed("10.0.0.1", f"user{i}")
    assert not throttle.blocked("10.0.0.1", "someone-else")
    throttle.failed("10.0.0.1", "user19")
    assert throttle.blocked("10.0.0.1", "someone-else")


def test_attempts_in_flight_count_and_case_variants_are_one_account():
    throttle = Throttle(max_failures=5, clock=Clock())
    admitted = []
    for i in range(20):
        name = "Alice" if i % 2 else "ALICE"
        if not throttle.blocked("10.0.0.1", name):
            context = throttle.attempt("10.0.0.1", name)
            context.__enter__()
            admitted.append(context)
    assert len(admitted) == 5
    for context in admitted:
        context.__exit__(None, None, None)
    assert not throttle.blocked("10.0.0.1", "alice")


def test_success_clears_the_pair():
    throttle = Throttle(max_failures=2, clock=Clock())
    throttle.failed("10.0.0.1", "alice")
    throttle.succeeded("10.0.0.1", "alice")
    throttle.failed("10.0.0.1", "alice")
    assert not throttle.blocked("10.0.0.1", "alice")
