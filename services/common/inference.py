"""Runs blocking model calls off the asyncio event loop."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, cast

from services.common.batching import STAGE_CLOSE_TIMEOUT_S, BatchingConfig, DynamicBatcher

R = TypeVar("R")


class InferencePool:
    """A fixed set of threads that call a model, so the event loop never blocks on inference.

    ``workers`` is the number of calls the model may run at once: 1 for a model that is not
    thread-safe, ``num_workers`` for a CTranslate2 model (its calls release the GIL and share weights).

    Args:
        name: Thread name prefix, shown in stack dumps.
        workers: Threads, at least 1.
    """

    def __init__(self, name: str, workers: int = 1):
        self.workers = max(1, workers)
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix=name)

    async def run(self, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        """Calls ``fn(*args, **kwargs)`` on a pool thread and awaits its result."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        """Waits for running calls, then stops the threads."""
        self._executor.shutdown(wait=True)


class BatchedPool:
    """An instance group behind the dynamic batcher, with :class:`InferencePool`'s ``run`` interface.

    For models that cannot batch (a Piper voice, an espeak-ng process): every call is one item
    of a :class:`~services.common.batching.DynamicBatcher` with batches of one, computed by ``workers``
    instance threads fed from one queue. Over :class:`InferencePool` it adds priorities, a queue bound,
    deadlines that drop a request still queued, and the batcher's metrics (requests, queue and compute time).

    Args:
        name: Metrics label and thread name prefix.
        workers: Instance threads: calls that run at once, at least 1.
        priority_levels: Levels :meth:`submit` accepts, 0 first.
        max_queue_size: Calls that may wait; more fail RESOURCE_EXHAUSTED at once; 0 = unbounded.
    """

    def __init__(self, name: str, workers: int = 1, *, priority_levels: int = 1, max_queue_size: int = 0):
        self.workers = max(1, workers)
        config = BatchingConfig(
            max_batch_size=1,
            max_queue_delay_ms=0.0,
            max_queue_size=max_queue_size,
            priority_levels=priority_levels,
            instance_count=self.workers,
        )
        self.batcher: DynamicBatcher[Callable[[], Any], _Outcome] = DynamicBatcher(
            name, [_call_each] * self.workers, config
        )

    async def submit(
        self,
        fn: Callable[..., R],
        *args: Any,
        timeout_s: float | None = None,
        priority: int | None = None,
        **kwargs: Any,
    ) -> R:
        """Calls ``fn(*args, **kwargs)`` on an instance thread, in priority order, and awaits its result.

        Args:
            fn: The blocking model call.
            *args: Its positional arguments.
            timeout_s: Time the caller can still wait, in seconds (``context.time_remaining()``); a call
                still queued when it runs out fails DEADLINE_EXCEEDED and is never made.
            priority: Level in ``[0, priority_levels)``, 0 first; None for the lowest.
            **kwargs: Its keyword arguments.

        Raises:
            ResourceExhausted: The queue is full.
            DeadlineExceeded: ``timeout_s`` ran out while the call was queued.
            Exception: Whatever ``fn`` raised, unchanged (as with :class:`InferencePool`).
        """
        outcome = await self.batcher.submit(
            functools.partial(fn, *args, **kwargs), timeout_s=timeout_s, priority=priority
        )
        if outcome.error is not None:
            raise outcome.error
        return cast(R, outcome.value)  # the value ``fn`` returned

    async def run(self, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        """:meth:`submit` at the lowest priority without a deadline (:class:`InferencePool`'s interface)."""
        return await self.submit(fn, *args, **kwargs)

    def close(self) -> bool:
        """Drops the queued calls and stops the threads, waiting at most ``STAGE_CLOSE_TIMEOUT_S`` (blocking).

        It runs after the server stopped, so the queued calls' callers are gone.

        Returns:
            True when every thread stopped.
        """
        return self.batcher.close(drain=False, timeout_s=STAGE_CLOSE_TIMEOUT_S)


@dataclasses.dataclass(frozen=True)
class _Outcome:
    value: Any = None
    error: BaseException | None = None


def _call_each(calls: list[Callable[[], Any]]) -> list[_Outcome]:
    """Makes each call; an exception is returned, not raised, so it reaches its caller unchanged."""
    outcomes = []
    for call in calls:
        try:
            outcomes.append(_Outcome(call()))
        except Exception as exc:  # noqa: BLE001 - handed back to the caller, who re-raises it
            outcomes.append(_Outcome(error=exc))
    return outcomes
