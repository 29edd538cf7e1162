"""Breaker, retry budget, backoff and deadline math on a fake clock (no sockets, no sleeping)."""

from __future__ import annotations

import random

import grpc
import pytest

from services.common.deadlines import Deadline
from services.common.errors import DeadlineExceeded
from services.common.resilience import (
    BREAKER_STATE,
    BreakerOpen,
    BreakerState,
    CircuitBreaker,
    Guard,
    RetryBudget,
    RetryPolicy,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class RpcError(grpc.aio.AioRpcError):
    def __init__(self, code: grpc.StatusCode):
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=code.name)


def make_guard(clock, *, attempts=3, ratio=0.5, tokens=10.0, threshold=3, stage_timeout_s=5.0, margin_s=0.05):
    sleeps: list[float] = []

    async def sleep(s: float) -> None:
        sleeps.append(s)
        clock.now += s

    guard = Guard(
        CircuitBreaker("fake", threshold, 2.0, clock),
        RetryBudget(ratio, tokens),
        RetryPolicy(max_attempts=attempts, initial_backoff_s=0.1, max_backoff_s=1.0),
        stage_timeout_s=stage_timeout_s,
        margin_s=margin_s,
        rng=random.Random(0),
        sleep=sleep,
    )
    return guard, sleeps


def scripted(*outcomes):
    """An attempt function that fails or succeeds per the script and records the timeouts it got."""
    calls: list[float | None] = []

    async def attempt(timeout_s):
        calls.append(timeout_s)
        outcome = outcomes[len(calls) - 1]
        if isinstance(outcome, grpc.StatusCode):
            raise RpcError(outcome)
        return outcome

    return attempt, calls


def gauge(stage: str) -> float:
    return BREAKER_STATE.labels(stage)._value.get()


def test_breaker_transitions_closed_open_half_open_closed():
    clock = FakeClock()
    breaker = CircuitBreaker("t1", failure_threshold=2, reset_timeout_s=5.0, clock=clock)
    assert breaker.state is BreakerState.CLOSED and gauge("t1") == 0
    breaker.acquire()
    breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED
    breaker.acquire()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN and gauge("t1") == 2
    with pytest.raises(BreakerOpen):
        breaker.acquire()
    clock.now += 4.9
    with pytest.raises(BreakerOpen):
        breaker.acquire()
    clock.now += 0.2
    assert breaker.state is BreakerState.HALF_OPEN and gauge("t1") == 1
    breaker.acquire()  # the probe
    with pytest.raises(BreakerOpen):
        breaker.acquire()  # only one probe at a time
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED and gauge("t1") == 0
    breaker.acquire()


def test_failed_probe_reopens_for_a_full_reset_timeout():
    clock = FakeClock()
    breaker = CircuitBreaker("t2", failure_threshold=1, reset_timeout_s=5.0, clock=clock)
    breaker.record_failure()
    clock.now += 5.0
    breaker.acquire()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    clock.now += 4.0
    with pytest.raises(BreakerOpen):
        breaker.acquire()
    clock.now += 1.0
    assert breaker.state is BreakerState.HALF_OPEN


def test_success_resets_the_consecutive_failure_count():
    breaker = CircuitBreaker("t3", failure_threshold=2, clock=FakeClock())
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED


async def test_retries_idempotent_call_on_unavailable_with_growing_jittered_backoff():
    clock = FakeClock()
    guard, sleeps = make_guard(clock)
    attempt, calls = scripted(grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE, "ok")
    assert await guard.call(attempt, Deadline(None, clock), idempotent=True) == "ok"
    assert len(calls) == 3 and len(sleeps) == 2
    assert 0 <= sleeps[0] <= 0.1 and 0 <= sleeps[1] <= 0.2
    assert guard.breaker.state is BreakerState.CLOSED


@pytest.mark.parametrize(
    "code",
    [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL],
)
async def test_never_retries_other_codes(code):
    guard, sleeps = make_guard(FakeClock())
    attempt, calls = scripted(code, "ok")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await guard.call(attempt, Deadline(None, guard.breaker.clock), idempotent=True)
    assert err.value.code() == code and len(calls) == 1 and not sleeps


async def test_never_retries_non_idempotent_calls():
    guard, sleeps = make_guard(FakeClock())
    attempt, calls = scripted(grpc.StatusCode.UNAVAILABLE, "ok")
    with pytest.raises(grpc.aio.AioRpcError):
        await guard.call(attempt, Deadline(None, guard.breaker.clock), idempotent=False)
    assert len(calls) == 1 and not sleeps


async def test_gives_up_after_max_attempts():
    guard, _ = make_guard(FakeClock(), attempts=2, threshold=10)
    attempt, calls = scripted(*[grpc.StatusCode.UNAVAILABLE] * 5)
    with pytest.raises(grpc.aio.AioRpcError):
        await guard.call(attempt, Deadline(None, guard.breaker.clock), idempotent=True)
    assert len(calls) == 2


async def test_retry_budget_caps_retries_at_its_ratio():
    clock = FakeClock()
    guard, _ = make_guard(clock, attempts=2, ratio=0.1, tokens=1.0, threshold=10_000)
    total_calls = 0
    for _ in range(100):
        attempt, calls = scripted(grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE)
        with pytest.raises(grpc.aio.AioRpcError):
            await guard.call(attempt, Deadline(None, clock), idempotent=True)
        total_calls += len(calls)
    retries = total_calls - 100
    # 1 initial token plus 0.1 per call: about 10 retries for 100 calls, never more than 11.
    assert 9 <= retries <= 11


async def test_never_retries_past_the_callers_deadline():
    clock = FakeClock()
    guard, sleeps = make_guard(clock, attempts=10, threshold=100, margin_s=0.05)
    deadline = Deadline.after(0.25, clock)

    async def attempt(timeout_s):
        assert timeout_s is not None and timeout_s <= 0.2 + 1e-9
        clock.now += 0.06
        raise RpcError(grpc.StatusCode.UNAVAILABLE)

    with pytest.raises(grpc.aio.AioRpcError):
        await guard.call(attempt, deadline, idempotent=True)
    assert clock.now <= deadline.at_s
    assert sum(sleeps) < 0.25


def test_deadline_timeout_is_remaining_minus_margin_capped_by_stage_timeout():
    clock = FakeClock()
    assert Deadline(None, clock).timeout_for(None, 0.05) is None
    assert Deadline(None, clock).timeout_for(3.0, 0.05) == 3.0
    deadline = Deadline.after(10.0, clock)
    assert deadline.timeout_for(3.0, 0.05) == 3.0
    clock.now += 8.0
    assert deadline.timeout_for(3.0, 0.05) == pytest.approx(1.95)
    clock.now += 1.96
    with pytest.raises(DeadlineExceeded):
        deadline.timeout_for(3.0, 0.05)
    assert deadline.expired() is False
    clock.now += 0.05
    assert deadline.expired() is True


async def test_breaker_opens_after_threshold_then_fails_fast_without_calling():
    clock = FakeClock()
    guard, _ = make_guard(clock, attempts=1, threshold=2)
    for _ in range(2):
        attempt, _calls = scripted(grpc.StatusCode.UNAVAILABLE)
        with pytest.raises(grpc.aio.AioRpcError):
            await guard.call(attempt, Deadline(None, clock), idempotent=True)
    attempt, calls = scripted("ok")
    with pytest.raises(BreakerOpen):
        await guard.call(attempt, Deadline(None, clock), idempotent=True)
    assert calls == []
    clock.now += 2.0
    assert await guard.call(attempt, Deadline(None, clock), idempotent=True) == "ok"
    assert guard.breaker.state is BreakerState.CLOSED


async def test_callers_short_deadline_does_not_count_against_the_stage():
    clock = FakeClock()
    guard, _ = make_guard(clock, attempts=1, threshold=1, stage_timeout_s=5.0)
    attempt, _ = scripted(grpc.StatusCode.DEADLINE_EXCEEDED)
    with pytest.raises(grpc.aio.AioRpcError):
        await guard.call(attempt, Deadline.after(1.0, clock), idempotent=True)
    assert guard.breaker.state is BreakerState.CLOSED


async def test_a_call_may_cap_its_attempts_at_its_own_timeout_instead_of_the_stages():
    clock = FakeClock()
    guard, _ = make_guard(clock, stage_timeout_s=5.0, margin_s=0.05)
    attempt, calls = scripted("live", "batch job", "batch job near its deadline")
    await guard.call(attempt, Deadline(None, clock), idempotent=True)
    await guard.call(attempt, Deadline(None, clock), idempotent=True, stage_timeout_s=600.0)
    await guard.call(attempt, Deadline.after(30.0, clock), idempotent=True, stage_timeout_s=600.0)
    assert calls == [5.0, 600.0, pytest.approx(29.95)]  # the caller's deadline still bounds it


async def test_a_callers_deadline_under_a_longer_call_timeout_does_not_count_against_the_stage():
    clock = FakeClock()
    guard, _ = make_guard(clock, attempts=1, threshold=1, stage_timeout_s=5.0)

    async def attempt(timeout_s):
        clock.now += timeout_s  # runs until its timeout: the caller's 100 s, not the call's 600 s
        raise RpcError(grpc.StatusCode.DEADLINE_EXCEEDED)

    with pytest.raises(grpc.aio.AioRpcError):
        await guard.call(attempt, Deadline.after(100.0, clock), idempotent=True, stage_timeout_s=600.0)
    assert guard.breaker.state is BreakerState.CLOSED
