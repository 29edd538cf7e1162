"""Breaker, guarded unary and streaming calls, retry service config and deadline math on a fake clock (no
sockets, no sleeping). The channel's retries themselves run against real servers in
tests/integration/test_gateway_retries.py."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from prometheus_client import REGISTRY

from services.common.deadlines import Deadline
from services.common.errors import DeadlineExceeded
from services.common.resilience import (
    BREAKER_STATE,
    BreakerOpen,
    BreakerState,
    CircuitBreaker,
    Guard,
    retry_service_config,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class RpcError(grpc.aio.AioRpcError):
    def __init__(self, code: grpc.StatusCode):
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=code.name)


def make_guard(clock, *, attempts=3, threshold=3, stage_timeout_s=5.0, margin_s=0.05):
    return Guard(
        CircuitBreaker("fake", threshold, 2.0, clock),
        stage_timeout_s=stage_timeout_s,
        margin_s=margin_s,
        max_attempts=attempts,
    )


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
    guard = make_guard(clock, attempts=1, threshold=2)
    for _ in range(2):
        attempt, _calls = scripted(grpc.StatusCode.UNAVAILABLE)
        with pytest.raises(grpc.aio.AioRpcError):
            await guard.call(attempt, Deadline(None, clock))
    attempt, calls = scripted("ok")
    with pytest.raises(BreakerOpen):
        await guard.call(attempt, Deadline(None, clock))
    assert calls == []
    clock.now += 2.0
    assert await guard.call(attempt, Deadline(None, clock)) == "ok"
    assert guard.breaker.state is BreakerState.CLOSED


async def test_callers_short_deadline_does_not_count_against_the_stage():
    clock = FakeClock()
    guard = make_guard(clock, attempts=1, threshold=1, stage_timeout_s=5.0)
    attempt, _ = scripted(grpc.StatusCode.DEADLINE_EXCEEDED)
    with pytest.raises(grpc.aio.AioRpcError):
        await guard.call(attempt, Deadline.after(1.0, clock))
    assert guard.breaker.state is BreakerState.CLOSED


async def test_a_call_may_cap_its_attempts_at_its_own_timeout_instead_of_the_stages():
    clock = FakeClock()
    guard = make_guard(clock, stage_timeout_s=5.0, margin_s=0.05)
    attempt, calls = scripted("live", "batch job", "batch job near its deadline")
    await guard.call(attempt, Deadline(None, clock))
    await guard.call(attempt, Deadline(None, clock), stage_timeout_s=600.0)
    await guard.call(attempt, Deadline.after(30.0, clock), stage_timeout_s=600.0)
    assert calls == [5.0, 600.0, pytest.approx(29.95)]  # the caller's deadline still bounds it


async def test_a_callers_deadline_under_a_longer_call_timeout_does_not_count_against_the_stage():
    clock = FakeClock()
    guard = make_guard(clock, attempts=1, threshold=1, stage_timeout_s=5.0)

    async def attempt(timeout_s):
        clock.now += timeout_s  # runs until its timeout: the caller's 100 s, not the call's 600 s
        raise RpcError(grpc.StatusCode.DEADLINE_EXCEEDED)

    with pytest.raises(grpc.aio.AioRpcError):
        await guard.call(attempt, Deadline.after(100.0, clock), stage_timeout_s=600.0)
    assert guard.breaker.state is BreakerState.CLOSED


def rpc_error(code: grpc.StatusCode, previous_attempts: int | None = None) -> grpc.aio.AioRpcError:
    """A call's error; ``previous_attempts`` set: as a stage reports it (its trailing metadata)."""
    trailing = grpc.aio.Metadata()
    if previous_attempts is not None:
        trailing = grpc.aio.Metadata(("grpc-previous-rpc-attempts", str(previous_attempts)))
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details=code.name)


def counter(name: str, stage: str) -> float:
    return REGISTRY.get_sample_value(f"parley_{name}_total", {"stage": stage}) or 0.0


async def test_each_failed_attempt_the_stage_reports_counts_against_the_breaker_and_retries_are_counted():
    clock = FakeClock()
    breaker = CircuitBreaker("t4", failure_threshold=3, clock=clock)
    guard = Guard(breaker, stage_timeout_s=5.0, margin_s=0.05, max_attempts=3)
    retries, denied = counter("retries", "t4"), counter("retries_denied", "t4")

    async def fails(error):
        raise error

    with pytest.raises(grpc.aio.AioRpcError):
        await guard.call(lambda _: fails(rpc_error(grpc.StatusCode.UNAVAILABLE, 1)), Deadline(None, clock))
    # Two attempts failed, the channel stopped one short of its 3 (its throttle or the deadline).
    assert breaker.state is BreakerState.CLOSED
    assert counter("retries", "t4") == retries + 1 and counter("retries_denied", "t4") == denied + 1
    with pytest.raises(grpc.aio.AioRpcError):
        await guard.call(lambda _: fails(rpc_error(grpc.StatusCode.UNAVAILABLE, 0)), Deadline(None, clock))
    assert breaker.state is BreakerState.OPEN  # 2 + 1 consecutive failed attempts


async def test_a_stage_that_answers_nothing_failed_every_attempt_of_the_channel():
    clock = FakeClock()
    guard = make_guard(clock, attempts=2, threshold=2)

    async def refused(_timeout_s):
        raise rpc_error(grpc.StatusCode.UNAVAILABLE)  # no attempt number: no stage answered

    with pytest.raises(grpc.aio.AioRpcError):
        await guard.call(refused, Deadline(None, clock))
    assert guard.breaker.state is BreakerState.OPEN


def test_retry_service_config_is_grpcs_retry_policy_and_throttling():
    policy = dict(initial_backoff_s=0.05, max_backoff_s=0.5, max_tokens=10, token_ratio=0.2)
    config = retry_service_config([("parley.stt.v1.SpeechToText", "Transcribe")], max_attempts=9, **policy)
    assert config == {
        "methodConfig": [
            {
                "name": [{"service": "parley.stt.v1.SpeechToText", "method": "Transcribe"}],
                "retryPolicy": {
                    "maxAttempts": 5,  # gRPC's cap
                    "initialBackoff": "0.05s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 2.0,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
        "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.2},
    }
    assert retry_service_config([("s", "m")], max_attempts=1, **policy) == {}


# -- Guard.stream ---------------------------------------------------------------------------------------


class FakeStream:
    """A streaming call: yields the script's responses, raises its codes, waits on an Event; keeps writes."""

    def __init__(self, *script):
        self.script = script
        self.sent: list[object] = []  # what was written
        self.cancelled = False

    def __aiter__(self):
        return self._responses()

    async def _responses(self):
        for item in self.script:
            if isinstance(item, grpc.StatusCode):
                raise rpc_error(item)
            if isinstance(item, asyncio.Event):
                await item.wait()
                continue
            yield item

    def cancel(self) -> bool:
        self.cancelled = True
        return True

    async def write(self, request) -> None:
        self.sent.append(request)

    async def done_writing(self) -> None:
        self.sent.append("done writing")


def half_open(clock, name: str) -> Guard:
    guard = Guard(CircuitBreaker(name, 1, 2.0, clock), stage_timeout_s=None, margin_s=0.05)
    guard.breaker.record_failure()
    clock.now += 2.0
    assert guard.breaker.state is BreakerState.HALF_OPEN
    return guard


async def test_stream_closes_a_half_open_breaker_at_its_first_response_not_its_end():
    clock = FakeClock()
    guard = half_open(clock, "s1")
    more = asyncio.Event()
    call = FakeStream("first", more, "second")
    async with guard.stream(lambda _: call, Deadline(None, clock)) as responses:
        received = [await anext(responses)]
        assert guard.breaker.state is BreakerState.CLOSED  # while the stream goes on
        guard.breaker.acquire()  # other calls pass again
        more.set()
        received += [r async for r in responses]
    assert received == ["first", "second"]


async def test_stream_errors_are_recorded_before_and_after_the_first_response():
    clock = FakeClock()
    for script in ((grpc.StatusCode.UNAVAILABLE,), ("audio", grpc.StatusCode.INTERNAL)):
        guard = make_guard(clock, threshold=1)
        with pytest.raises(grpc.aio.AioRpcError):
            async with guard.stream(lambda _, s=script: FakeStream(*s), Deadline(None, clock)) as responses:
                async for _ in responses:
                    pass
        assert guard.breaker.state is BreakerState.OPEN, script
        with pytest.raises(BreakerOpen):
            async with guard.stream(lambda _: FakeStream("never"), Deadline(None, clock)):
                pass


async def test_a_cancelled_stream_frees_the_probe_and_cancels_the_call():
    clock = FakeClock()
    guard = half_open(clock, "s2")
    call = FakeStream(asyncio.Event(), "never")
    entered = asyncio.Event()

    async def consume():
        async with guard.stream(lambda _: call, Deadline(None, clock)) as responses:
            entered.set()
            async for _ in responses:
                pass

    task = asyncio.create_task(consume())
    await entered.wait()
    with pytest.raises(BreakerOpen):
        guard.breaker.acquire()  # the probe is in flight
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert call.cancelled and guard.breaker.state is BreakerState.HALF_OPEN
    guard.breaker.acquire()  # no verdict on the stage: the next probe may go


async def test_stream_timeout_is_the_callers_deadline_less_the_margin():
    clock = FakeClock()
    guard = make_guard(clock, stage_timeout_s=60.0, margin_s=0.05)
    timeouts: list[float | None] = []

    def start(timeout_s):
        timeouts.append(timeout_s)
        return FakeStream("ok")

    for deadline in (Deadline(None, clock), Deadline.after(10.0, clock)):
        async with guard.stream(start, deadline) as responses:
            assert [r async for r in responses] == ["ok"]
    async with guard.stream(start, Deadline(None, clock), stage_timeout_s=600.0) as responses:
        assert [r async for r in responses] == ["ok"]
    assert timeouts == [60.0, pytest.approx(9.95), 600.0]
    with pytest.raises(DeadlineExceeded):
        async with guard.stream(start, Deadline.after(0.01, clock)):
            pass
    assert len(timeouts) == 3 and guard.breaker.state is BreakerState.CLOSED


async def test_a_bidirectional_stream_writes_its_requests_and_half_closes_and_an_early_exit():
    clock = FakeClock()
    guard = make_guard(clock)

    async def requests():
        yield "config"
        yield "audio"

    call = FakeStream("started", asyncio.Event(), "ended")
    async with guard.stream(lambda _: call, Deadline(None, clock), requests=requests()) as responses:
        async for response in responses:
            if response == "started":
                await asyncio.sleep(0.01)  # the writer writes meanwhile
                break  # the caller leaves: the call is cancelled, the stage was fine
    assert call.sent == ["config", "audio", "done writing"] and call.cancelled
    assert guard.breaker.state is BreakerState.CLOSED


async def test_a_failed_bidirectional_stream_reads_no_request_after_it_is_left():
    clock = FakeClock()
    guard = make_guard(clock)
    source: asyncio.Queue[str] = asyncio.Queue()
    source.put_nowait("config")

    async def requests():
        while True:
            yield await source.get()

    written = asyncio.Event()
    call = FakeStream(written, grpc.StatusCode.UNAVAILABLE)  # fails once the writer has written
    with pytest.raises(grpc.aio.AioRpcError):
        async with guard.stream(lambda _: call, Deadline(None, clock), requests=requests()) as responses:
            await asyncio.sleep(0.01)  # the writer writes the config, then waits for the next request
            written.set()
            async for _ in responses:
                pass
    source.put_nowait("the next call's audio")
    await asyncio.sleep(0.01)
    assert call.sent == ["config"] and source.get_nowait() == "the next call's audio"
