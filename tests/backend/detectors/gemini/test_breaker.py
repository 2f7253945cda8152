"""The circuit breaker: opens after N failed tasks, one half-open trial, shared through Redis."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from backend.detectors.gemini.breaker import CircuitBreaker

DOWN_URL = "redis://127.0.0.1:1/15"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now




@pytest.fixture(params=["memory", "redis"])
def make(request, rdb):
    """A factory of breakers sharing one state: one Redis prefix, or one in-memory instance."""
    client, prefix = rdb
    clock = Clock()
    shared: dict[str, CircuitBreaker] = {}

    def factory(failures: int = 3, cooldown: float = 10.0, lease: float = 30.0) -> CircuitBreaker:
        if request.param == "redis":
            return CircuitBreaker(failures, cooldown, client, prefix=prefix, trial_lease=lease, clock=clock)
        return shared.setdefault("one", CircuitBreaker(failures, cooldown, None, trial_lease=lease, clock=clock))

    factory.clock = clock  # type: ignore[attr-defined]
    return factory


def test_opens_after_consecutive_failures_only(make):
    breaker = make(failures=3)
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()  # the streak is broken
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.allow() and breaker.state == "closed"
    breaker.record_failure()
    assert breaker.state == "open" and not breaker.allow()


def test_half_open_allows_one_trial_and_success_closes(make):
    breaker = make(failures=1, cooldown=10)
    breaker.record_failure()
    assert not breaker.allow()
    make.clock.now += 10.5
    assert breaker.state == "half_open"
    assert breaker.allow()          # the trial
    assert not breaker.allow()      # everyone else waits for it
    breaker.record_success()
    assert breaker.state == "closed" and breaker.allow() and breaker.allow()


def test_failed_trial_reopens_for_another_cooldown(make):
    breaker = make(failures=1, cooldown=10)
    breaker.record_failure()
    make.clock.now += 11
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state == "open" and not breaker.allow()
    make.clock.now += 9
    assert not breaker.allow()
    make.clock.now += 2
    assert breaker.allow()


def test_failures_while_open_do_not_extend_the_cooldown(make):
    breaker = make(failures=1, cooldown=10)
    breaker.record_failure()
    make.clock.now += 5
    breaker.record_failure()  # a call that was already in flight
    make.clock.now += 5.5
    assert breaker.allow()


def test_a_lost_trial_expires_with_its_lease(make):
    breaker = make(failures=1, cooldown=1, lease=0.2)
    breaker.record_failure()
    make.clock.now += 2
    assert breaker.allow() and not breaker.allow()
    make.clock.now += 0.5  # the memory lease follows the injected clock
    time.sleep(0.3)        # the Redis lease is a real key expiry
    assert breaker.allow()


def test_state_is_shared_between_processes(rdb):
    client, prefix = rdb
    clock = Clock()
    a = CircuitBreaker(2, 10, client, prefix=prefix, clock=clock)
    b = CircuitBreaker(2, 10, client, prefix=prefix, clock=clock)
    a.record_failure()
    b.record_failure()
    assert a.state == b.state == "open"
    assert not a.allow() and not b.allow()
    clock.now += 11
    trials = [a.allow(), b.allow()]
    assert trials.count(True) == 1
    b.record_success()
    assert a.state == "closed"


def test_exactly_one_trial_among_many_threads(make):
    breaker = make(failures=1, cooldown=1)
    breaker.record_failure()
    make.clock.now += 2
    results: list[bool] = []
    lock = threading.Lock()
    barrier = threading.Barrier(16)

    def worker() -> None:
        barrier.wait()
        granted = breaker.allow()
        with lock:
            results.append(granted)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1


def test_redis_outage_falls_back_to_memory():
    breaker = CircuitBreaker(1, 10, redis.Redis.from_url(DOWN_URL, socket_connect_timeout=0.2), prefix="test:breaker:down")
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state == "open" and not breaker.allow()
