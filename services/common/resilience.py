"""Calling downstream services safely: deadlines, retries with a budget, and circuit breakers.

The patterns follow gRPC's own guidance (``doc/deadlines.md``, the retry throttling of gRFC A6) and the
breaker of Nygard's *Release It!*: a caller's deadline shrinks as it is passed down, retries happen only
for idempotent unary calls that failed with UNAVAILABLE, at most a fixed share of calls are retries, and a
stage that keeps failing is cut off (fail fast) until a probe call shows it is back.

Everything takes an injectable clock (``monotonic()`` in seconds) and random source, so tests run on a fake
clock without sleeping.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc
from prometheus_client import Counter, Gauge

from services.common.deadlines import Clock, Deadline, SystemClock
from services.common.errors import Unavailable

logger = logging.getLogger(__name__)

R = TypeVar("R")

BREAKER_STATE = Gauge(
    "parley_breaker_state",
    "Circuit breaker state per downstream stage: 0 closed, 1 half-open, 2 open.",
    ["stage"],
)
BREAKER_OPENED = Counter("parley_breaker_opened", "Times a circuit breaker opened, per stage.", ["stage"])
RETRIES = Counter("parley_retries", "Retried downstream calls, per stage.", ["stage"])
RETRIES_DENIED = Counter(
    "parley_retries_denied", "Retries refused by the retry budget or the deadline, per stage.", ["stage"]
)


class BreakerState(enum.IntEnum):
    """Circuit breaker states, with their gauge values."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class BreakerOpen(Unavailable):
    """A call refused at once because the stage's circuit breaker is open."""


class CircuitBreaker:
    """One downstream stage's circuit breaker.

    CLOSED: calls pass; ``failure_threshold`` consecutive failures open it. OPEN: calls fail at once with
    :class:`BreakerOpen` for ``reset_timeout_s``. HALF_OPEN: one probe call at a time passes; its success
    closes the breaker, its failure opens it again for another ``reset_timeout_s``.

    Args:
        name: The stage name, used as the gauge label.
        failure_threshold: Consecutive failures that open the breaker, at least 1.
        reset_timeout_s: Time the breaker stays open before letting a probe through, in seconds.
        clock: Monotonic clock.
    """

    def __init__(
        self, name: str, failure_threshold: int = 3, reset_timeout_s: float = 5.0, clock: Clock | None = None
    ):
        self.name = name
        self.failure_threshold = max(1, failure_threshold)
        self.reset_timeout_s = reset_timeout_s
        self.clock = clock or SystemClock()
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False
        self._state = BreakerState.CLOSED
        BREAKER_STATE.labels(name).set(self._state)

    @property
    def state(self) -> BreakerState:
        """Current state; an open breaker past its reset timeout reads HALF_OPEN."""
        if (
            self._state is BreakerState.OPEN
            and self.clock.monotonic() - self._opened_at >= self.reset_timeout_s
        ):
            self._set(BreakerState.HALF_OPEN)
        return self._state

    def _set(self, state: BreakerState) -> None:
        if state is not self._state:
            logger.info("breaker %s: %s -> %s", self.name, self._state.name, state.name)
        self._state = state
        BREAKER_STATE.labels(self.name).set(int(state))

    def acquire(self) -> None:
        """Admits one call, or refuses it.

        Raises:
            BreakerOpen: The breaker is open, or half-open with its probe already in flight.
        """
        state = self.state
        if state is BreakerState.CLOSED:
            return
        if state is BreakerState.HALF_OPEN and not self._probing:
            self._probing = True
            return
        wait_s = max(0.0, self.reset_timeout_s - (self.clock.monotonic() - self._opened_at))
        raise BreakerOpen(f"{self.name} is unavailable: circuit breaker open (next probe in {wait_s:.1f} s)")

    def record_success(self) -> None:
        """Reports a call that succeeded (or failed through the caller's own fault)."""
        self._failures = 0
        self._probing = False
        self._set(BreakerState.CLOSED)

    def record_failure(self) -> None:
        """Reports a call that failed through the stage's fault (unreachable, overloaded, timed out)."""
        self._failures += 1
        was_probe = self._probing
        self._probing = False
        if was_probe or self._state is BreakerState.HALF_OPEN or self._failures >= self.failure_threshold:
            if self._state is not BreakerState.OPEN:
                BREAKER_OPENED.labels(self.name).inc()
            self._opened_at = self.clock.monotonic()
            self._set(BreakerState.OPEN)

    def release(self) -> None:
        """Ends an admitted call that neither succeeded nor failed (cancelled): frees the probe slot."""
        self._probing = False


class RetryBudget:
    """Token bucket that caps retries at a share of calls (gRFC A6 retry throttling, Finagle's budget).

    Every call deposits ``ratio`` tokens (up to ``max_tokens``); every retry spends one. With ratio 0.1,
    at most about one call in ten is a retry once the initial tokens are spent.

    Args:
        ratio: Retries allowed per call, in [0, 1].
        max_tokens: Bucket size; also the initial balance, so a few early failures can retry.
    """

    def __init__(self, ratio: float = 0.1, max_tokens: float = 10.0):
        self.ratio = ratio
        self.max_tokens = max_tokens
        self.tokens = max_tokens

    def deposit(self) -> None:
        """Credits one call."""
        self.tokens = min(self.max_tokens, self.tokens + self.ratio)

    def try_spend(self) -> bool:
        """Takes a token for one retry; False when the budget is spent."""
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter (AWS architecture blog, "Exponential Backoff and Jitter").

    Attributes:
        max_attempts: Attempts in all, the first included; 1 disables retries.
        initial_backoff_s: Upper bound of the first wait, in seconds.
        max_backoff_s: Cap on any wait, in seconds.
        multiplier: Growth of the bound per retry.
    """

    max_attempts: int = 3
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 1.0
    multiplier: float = 2.0

    def backoff_s(self, retry: int, rng: random.Random) -> float:
        """Wait before retry ``retry`` (from 0): uniform in [0, min(max, initial * multiplier**retry)]."""
        bound = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier**retry)
        return rng.uniform(0.0, bound)


# Failures that say the stage itself is unwell; a caller's bad request or its own short deadline does not
# count against the stage.
BREAKER_FAILURE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DATA_LOSS,
    }
)


def error_code(exc: BaseException) -> grpc.StatusCode:
    """Status code of a failed downstream call (``grpc.aio.AioRpcError`` or a Parley error)."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code()
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code in grpc.StatusCode.__members__:
        return grpc.StatusCode[code]
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.UNKNOWN


class Guard:
    """Deadline, retries and breaker for one downstream stage.

    Args:
        breaker: The stage's breaker.
        budget: Retry budget shared by the stage's calls.
        policy: Backoff policy.
        stage_timeout_s: The stage's own per-call timeout, in seconds (``None`` for none).
        margin_s: Time kept back from the caller's deadline for the caller, in seconds.
        rng: Random source for jitter.
        sleep: Awaitable sleep, in seconds (a fake in tests).
    """

    def __init__(
        self,
        breaker: CircuitBreaker,
        budget: RetryBudget,
        policy: RetryPolicy,
        *,
        stage_timeout_s: float | None,
        margin_s: float,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        self.breaker = breaker
        self.budget = budget
        self.policy = policy
        self.stage_timeout_s = stage_timeout_s
        self.margin_s = margin_s
        self.rng = rng or random.Random()
        self.sleep = sleep

    @property
    def name(self) -> str:
        """The stage's name."""
        return self.breaker.name

    def record(
        self,
        exc: BaseException | None,
        timeout_s: float | None,
        started_s: float,
        stage_timeout_s: float | None = None,
    ) -> None:
        """Reports a call's outcome to the breaker.

        A DEADLINE_EXCEEDED counts against the stage only when the stage's timeout (not the caller's
        shorter deadline) was the limit that expired: the call's own ``stage_timeout_s`` when it had one,
        else the guard's.
        """
        if exc is None:
            self.breaker.record_success()
            return
        code = error_code(exc)
        limit_s = stage_timeout_s or self.stage_timeout_s
        stage_limited = (
            limit_s is not None
            and timeout_s is not None
            and timeout_s >= limit_s - 1e-6
            and self.breaker.clock.monotonic() - started_s >= limit_s * 0.99
        )
        if code in BREAKER_FAILURE_CODES or (code is grpc.StatusCode.DEADLINE_EXCEEDED and stage_limited):
            self.breaker.record_failure()
        elif code is grpc.StatusCode.CANCELLED:
            self.breaker.release()
        else:
            self.breaker.record_success()

    async def call(
        self,
        fn: Callable[[float | None], Awaitable[R]],
        deadline: Deadline,
        *,
        idempotent: bool,
        stage_timeout_s: float | None = None,
    ) -> R:
        """Calls ``fn(timeout_s)`` through the breaker, retrying idempotent calls on UNAVAILABLE.

        Args:
            fn: Makes one attempt with the given per-attempt timeout (seconds, or ``None``).
            deadline: The caller's deadline; no attempt starts, and no backoff ends, past it.
            idempotent: Whether the call may be repeated safely.
            stage_timeout_s: This call's per-attempt timeout instead of the guard's, in seconds (a batch
                job's longer calls); None keeps the guard's. The breaker judges a DEADLINE_EXCEEDED by it.

        Returns:
            The first successful attempt's result.

        Raises:
            BreakerOpen: The breaker refused the call.
            DeadlineExceeded: The caller's deadline leaves no time for an attempt.
            grpc.aio.AioRpcError: The last attempt's error.
        """
        self.budget.deposit()
        retry = 0
        while True:
            limit_s = stage_timeout_s or self.stage_timeout_s
            timeout_s = deadline.timeout_for(limit_s, self.margin_s)
            self.breaker.acquire()
            started_s = self.breaker.clock.monotonic()
            try:
                result = await fn(timeout_s)
            except asyncio.CancelledError:
                self.breaker.release()
                raise
            except Exception as exc:
                self.record(exc, timeout_s, started_s, limit_s)
                if not idempotent or error_code(exc) is not grpc.StatusCode.UNAVAILABLE:
                    raise
                if retry + 1 >= self.policy.max_attempts:
                    raise
                wait_s = self.policy.backoff_s(retry, self.rng)
                remaining = deadline.remaining_s()
                if remaining is not None and remaining - wait_s <= self.margin_s:
                    RETRIES_DENIED.labels(self.name).inc()
                    raise
                if not self.budget.try_spend():
                    RETRIES_DENIED.labels(self.name).inc()
                    raise
                RETRIES.labels(self.name).inc()
                retry += 1
                logger.debug(
                    "%s: retry %d after %.0f ms (%s)", self.name, retry, wait_s * 1000, error_code(exc).name
                )
                await self.sleep(wait_s)
                continue
            self.record(None, timeout_s, started_s, limit_s)
            return result
