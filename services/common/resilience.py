"""Calling downstream services safely: deadlines, circuit breakers, and the channel's own retries.

The patterns follow gRPC's own guidance (``doc/deadlines.md``, the retries and retry throttling of gRFC A6)
and the breaker of Nygard's *Release It!*: a caller's deadline shrinks as it is passed down; the channel
itself retries idempotent unary calls that failed with UNAVAILABLE, with backoff, within the deadline and
while its retry throttle allows (:func:`retry_service_config`); a stage that keeps failing is cut off (fail
fast) by its :class:`CircuitBreaker` until a probe call shows it is back. :class:`Guard` is the one way to
call a stage, unary (:meth:`Guard.call`) or streaming (:meth:`Guard.stream`).

Everything takes an injectable clock (``monotonic()`` in seconds), so tests run on a fake clock without
sleeping.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, Generic, TypeVar

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
RETRIES = Counter(
    "parley_retries",
    "Retry attempts of downstream calls (the channel's, as the stage reports them), per stage.",
    ["stage"],
)
RETRIES_DENIED = Counter(
    "parley_retries_denied",
    "Calls that ended UNAVAILABLE with attempts left: the channel's retry throttle or the deadline stopped "
    "them, per stage.",
    ["stage"],
)
# gRPC's retry layer stamps each retry attempt with this request header (gRFC A6); the stages echo it in
# their trailing metadata (services.common.server), since grpc-core does not hand it to the caller itself.
PREVIOUS_ATTEMPTS_KEY = "grpc-previous-rpc-attempts"
# gRPC caps a retry policy's maxAttempts at 5.
MAX_ATTEMPTS_CAP = 5


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


def previous_attempts(metadata: Sequence[tuple[str, str | bytes]] | None) -> int:
    """Earlier attempts of a call, from its trailing metadata (:data:`PREVIOUS_ATTEMPTS_KEY`; absent: 0)."""
    for key, value in metadata or ():
        if key == PREVIOUS_ATTEMPTS_KEY:
            try:
                return max(0, int(value))
            except ValueError:
                return 0
    return 0


def _duration(seconds: float) -> str:
    """A protobuf JSON Duration ("0.05s"), as the service config wants it."""
    return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"


def retry_service_config(
    methods: Iterable[tuple[str, str]],
    *,
    max_attempts: int,
    initial_backoff_s: float,
    max_backoff_s: float,
    backoff_multiplier: float = 2.0,
    max_tokens: int = 10,
    token_ratio: float = 0.1,
) -> dict[str, Any]:
    """The service-config entries (gRFC A6) that make a channel retry ``methods`` on UNAVAILABLE.

    The channel then retries by itself, within the call's own deadline: attempt n+1 starts after
    min(max_backoff_s, initial_backoff_s * backoff_multiplier**(n-1)) (grpc-core jitters it by 20 %; gRFC A6
    draws it in [0, that]), and only while the channel's retry throttle (per server) holds more than
    ``max_tokens / 2`` tokens: each failed attempt takes a token, each success gives back ``token_ratio``.
    A request is kept for its retries up to ``grpc.per_rpc_retry_buffer_size`` bytes (default 256 KiB; past
    it the call is not retried). The channel needs ``("grpc.enable_retries", 1)``.

    Args:
        methods: (full service name, method name) pairs to retry: idempotent unary methods only.
        max_attempts: Attempts in all, the first included; below 2: no retry entries (gRPC caps it at 5).
        initial_backoff_s: The first wait, in seconds (> 0).
        max_backoff_s: Cap on any wait, in seconds (> 0).
        backoff_multiplier: Growth of the wait per retry (> 0).
        max_tokens: Size of the retry throttle's bucket, a whole number in (0, 1000].
        token_ratio: Tokens a successful call gives back (> 0; gRPC keeps three decimals).

    Returns:
        ``{"methodConfig": [...], "retryThrottling": {...}}`` to merge into the channel's service config, or
        ``{}`` for no retries.
    """
    names = [{"service": service, "method": method} for service, method in methods]
    max_attempts = min(max_attempts, MAX_ATTEMPTS_CAP)
    if max_attempts < 2 or not names:
        return {}
    policy = {
        "maxAttempts": max_attempts,
        "initialBackoff": _duration(initial_backoff_s),
        "maxBackoff": _duration(max(max_backoff_s, initial_backoff_s)),
        "backoffMultiplier": backoff_multiplier,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    return {
        "methodConfig": [{"name": names, "retryPolicy": policy}],
        "retryThrottling": {"maxTokens": max_tokens, "tokenRatio": max(0.001, round(token_ratio, 3))},
    }


class Guard:
    """Deadline and circuit breaker for one downstream stage; the stage's channel does the retries.

    Unary calls go through :meth:`call`, streaming calls through :meth:`stream`; nothing else drives the
    breaker. Retries are the channel's (:func:`retry_service_config`): one :meth:`call` may be several
    attempts, which the stage reports back in the trailing metadata (:data:`PREVIOUS_ATTEMPTS_KEY`, echoed
    by :class:`services.common.server.StatusMappingInterceptor`). Each failed attempt counts against the
    breaker, and the retries are counted per stage (``parley_retries``, ``parley_retries_denied``).

    Args:
        breaker: The stage's breaker.
        stage_timeout_s: The stage's own per-call timeout, in seconds (``None`` for none).
        margin_s: Time kept back from the caller's deadline for the caller, in seconds.
        max_attempts: Attempts the channel makes per unary call (its retry policy's ``maxAttempts``; 1: no
            retries). A call that failed UNAVAILABLE without reaching the stage (nothing reported back: the
            stage is unreachable, so each attempt failed at once) counts as that many failures.
    """

    def __init__(
        self,
        breaker: CircuitBreaker,
        *,
        stage_timeout_s: float | None,
        margin_s: float,
        max_attempts: int = 1,
    ):
        self.breaker = breaker
        self.stage_timeout_s = stage_timeout_s
        self.margin_s = margin_s
        self.max_attempts = min(max(1, max_attempts), MAX_ATTEMPTS_CAP)

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
        *,
        attempts: int = 1,
    ) -> None:
        """Reports a call's outcome to the breaker.

        A DEADLINE_EXCEEDED counts against the stage only when the stage's timeout (not the caller's
        shorter deadline) was the limit that expired: the call's own ``stage_timeout_s`` when it had one,
        else the guard's. A failure that took ``attempts`` attempts counts ``attempts`` times.
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
            for _ in range(max(1, attempts)):
                self.breaker.record_failure()
        elif code is grpc.StatusCode.CANCELLED:
            self.breaker.release()
        else:
            self.breaker.record_success()

    def _failed_attempts(self, exc: BaseException) -> int:
        """Attempts a failed unary call made; counts its retries and the retries the channel did not make."""
        code = error_code(exc)
        metadata = exc.trailing_metadata() if isinstance(exc, grpc.aio.AioRpcError) else None
        if not any(key == PREVIOUS_ATTEMPTS_KEY for key, _ in metadata or ()):
            # The stage answered nothing (a stage that answers reports every attempt, its first as 0): it is
            # unreachable, so each of the channel's attempts failed at once.
            unreachable = isinstance(exc, grpc.aio.AioRpcError) and code is grpc.StatusCode.UNAVAILABLE
            return self.max_attempts if unreachable else 1
        retries = previous_attempts(metadata)
        RETRIES.labels(self.name).inc(retries)
        if code is grpc.StatusCode.UNAVAILABLE and retries + 1 < self.max_attempts:
            RETRIES_DENIED.labels(self.name).inc()  # the channel's retry throttle or the deadline stopped it
        return retries + 1

    async def call(
        self,
        fn: Callable[[float | None], Awaitable[R]],
        deadline: Deadline,
        *,
        stage_timeout_s: float | None = None,
    ) -> R:
        """Calls ``fn(timeout_s)`` once through the breaker; the channel retries UNAVAILABLE within it.

        Args:
            fn: Starts the call with the given timeout (seconds, or ``None``), e.g.
                ``lambda timeout_s: stub.Transcribe(request, timeout=timeout_s)``. When it returns the
                ``grpc.aio`` call itself (not a coroutine around it), retries that succeeded are counted too.
            deadline: The caller's deadline; the timeout is what it leaves, less the margin.
            stage_timeout_s: This call's timeout instead of the guard's, in seconds (a batch job's longer
                calls); None keeps the guard's. The breaker judges a DEADLINE_EXCEEDED by it.

        Returns:
            The call's result.

        Raises:
            BreakerOpen: The breaker refused the call.
            DeadlineExceeded: The caller's deadline leaves no time for the call.
            grpc.aio.AioRpcError: The call's error (its last attempt's).
        """
        limit_s = stage_timeout_s or self.stage_timeout_s
        timeout_s = deadline.timeout_for(limit_s, self.margin_s)
        self.breaker.acquire()
        started_s = self.breaker.clock.monotonic()
        try:
            pending = fn(timeout_s)
            result = await pending
        except asyncio.CancelledError:
            self.breaker.release()
            raise
        except Exception as exc:
            self.record(exc, timeout_s, started_s, limit_s, attempts=self._failed_attempts(exc))
            raise
        if isinstance(pending, grpc.aio.Call):
            RETRIES.labels(self.name).inc(previous_attempts(await pending.trailing_metadata()))
        self.record(None, timeout_s, started_s, limit_s)
        return result

    def stream(
        self,
        fn: Callable[[float | None], AsyncIterable[R]],
        deadline: Deadline,
        *,
        stage_timeout_s: float | None = None,
        requests: AsyncIterator[Any] | None = None,
    ) -> GuardedStream[R]:
        """A streaming call through the breaker, as an async context manager over its responses.

        Entering it takes the timeout from the caller's deadline, acquires the breaker and starts
        ``fn(timeout_s)``. The first response records a success: a long stream closes a half-open breaker
        at once instead of holding the probe slot to its end. The call's error records a failure (once,
        even after responses) and is raised. Leaving early, the caller's own error, or cancellation record
        nothing, free the probe slot and cancel the call. Streams are never retried.

        Server-streaming (TTS ``SynthesizeStream``)::

            async with guard.stream(
                lambda timeout_s: stub.SynthesizeStream(request, timeout=timeout_s), deadline
            ) as responses:
                async for response in responses:
                    ...

        Bidirectional (VAD ``StreamDetect``): the call is started without a request iterator and the stream
        writes ``requests`` to it::

            try:
                async with guard.stream(
                    lambda timeout_s: vad.StreamDetect(timeout=timeout_s), deadline, requests=requests()
                ) as responses:
                    async for response in responses:
                        ...  # the first response closed a half-open breaker already
            except BreakerOpen:
                ...  # refused at once: the stage is cut off
            except grpc.aio.AioRpcError as exc:
                ...  # the stream failed (counted against the stage unless it was the caller's fault)

        Args:
            fn: Starts the call with the given timeout (seconds, or ``None``) and returns it (a ``grpc.aio``
                streaming call, or any async iterable of responses).
            deadline: The caller's deadline.
            stage_timeout_s: This call's timeout instead of the guard's, in seconds; None keeps the guard's;
                0 sets none (a stream that lasts as long as the caller's: only the caller's deadline).
            requests: The requests of a bidirectional call that ``fn`` starts without a request iterator. A
                task of the stream writes them (``write()``, then ``done_writing()``); leaving the stream
                cancels that task and waits for it, so once the stream is left nothing more is read from
                ``requests``. A request iterator given to grpc.aio instead is read by grpc's own task,
                which reads one more request after the call failed: successive calls sharing one source
                of requests (a reconnecting stream) would lose that request to the dead call.

        Raises:
            BreakerOpen: On entering: the breaker refused the call.
            DeadlineExceeded: On entering: the caller's deadline leaves no time for the call.
            grpc.aio.AioRpcError: While iterating: the call's error.
        """
        limit_s = self.stage_timeout_s if stage_timeout_s is None else stage_timeout_s
        return GuardedStream(self, fn, deadline, limit_s, requests)


class GuardedStream(Generic[R]):
    """One streaming call under a :class:`Guard` (see :meth:`Guard.stream`); iterate it for the responses.

    Attributes:
        call: The started call (``None`` until entered): ``cancel()``, metadata, ``write()`` of a
            bidirectional call without a request iterator.
    """

    def __init__(
        self,
        guard: Guard,
        fn: Callable[[float | None], AsyncIterable[R]],
        deadline: Deadline,
        limit_s: float | None,
        requests: AsyncIterator[Any] | None = None,
    ):
        self._guard = guard
        self._fn = fn
        self._requests = requests
        self._writer: asyncio.Task[None] | None = None
        self._deadline = deadline
        self._limit_s = limit_s
        self._timeout_s: float | None = None
        self._started_s = 0.0
        self._judged = False
        self._responses: AsyncIterator[R] | None = None
        self.call: AsyncIterable[R] | None = None

    async def __aenter__(self) -> GuardedStream[R]:
        guard = self._guard
        self._timeout_s = self._deadline.timeout_for(self._limit_s, guard.margin_s)
        guard.breaker.acquire()
        self._started_s = guard.breaker.clock.monotonic()
        try:
            self.call = self._fn(self._timeout_s)
        except BaseException:
            guard.breaker.release()
            raise
        self._responses = aiter(self.call)
        if self._requests is not None:
            self._writer = asyncio.create_task(self._write(self._requests))
        return self

    async def _write(self, requests: AsyncIterator[Any]) -> None:
        """Writes the requests to the call, then half-closes it; stops when the call has ended.

        The call's end (its error) is for the reader of the responses to raise, not for the writer. A
        request iterator that raises cancels the call (as grpc.aio does), so its reader does not wait on.
        """
        call: Any = self.call
        try:
            async for request in requests:
                await call.write(request)
            await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            return
        except Exception:
            logger.exception(
                "the requests of a %s stream failed; the call is cancelled", self._guard.breaker.name
            )
            call.cancel()

    def __aiter__(self) -> GuardedStream[R]:
        return self

    async def __anext__(self) -> R:
        if self._responses is None:
            raise RuntimeError("enter the stream (async with) before iterating it")
        try:
            response = await anext(self._responses)
        except StopAsyncIteration:
            self._judge(None)
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._judge(exc)
            raise
        self._judge(None)
        return response

    def _judge(self, exc: BaseException | None) -> None:
        """Records the stream's first verdict: its first response or its end (success), or its error."""
        if exc is not None:
            self._guard.record(exc, self._timeout_s, self._started_s, self._limit_s)
        elif not self._judged:
            self._guard.record(None, self._timeout_s, self._started_s, self._limit_s)
        self._judged = True

    async def __aexit__(self, *exc_info: object) -> None:
        if not self._judged:
            self._guard.breaker.release()  # cancelled, or left before any response: no verdict on the stage
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
        cancel = getattr(self.call, "cancel", None)
        if cancel is not None:
            cancel()
