"""BatchedPool: InferencePool's interface over the dynamic batcher (instance group, batches of one)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from services.common.errors import DeadlineExceeded, ResourceExhausted
from services.common.inference import BatchedPool

pytestmark = pytest.mark.timeout(30)


async def until(predicate, timeout_s: float = 5.0) -> None:
    """Polls ``predicate`` (queue depth is only observable by polling) until true or timeout."""
    for _ in range(int(timeout_s / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")


async def test_results_and_exceptions_come_back_unchanged_from_instance_threads():
    pool = BatchedPool("test-pool", 1)
    try:
        assert await pool.run(lambda a, b=0: (a + b, threading.current_thread().name), 2, b=3) == (
            5,
            "test-pool-instance-0",
        )

        def fail():
            raise KeyError("boom")

        with pytest.raises(KeyError, match="boom"):
            await pool.run(fail)
    finally:
        await asyncio.to_thread(pool.close)


async def test_workers_calls_run_at_once():
    pool = BatchedPool("test-pool-2", 2)
    barrier = threading.Barrier(2, timeout=5)
    try:
        results = await asyncio.gather(pool.run(barrier.wait), pool.run(barrier.wait))
    finally:
        await asyncio.to_thread(pool.close)
    assert sorted(results) == [0, 1], "both calls were inside the barrier together"


async def test_priority_passes_the_queue_and_a_deadline_drops_a_queued_call():
    pool = BatchedPool("test-pool-3", 1, priority_levels=2, max_queue_size=3)
    gate = threading.Event()
    started = threading.Event()
    order: list[str] = []

    def work(label: str) -> str:
        if label == "first":
            started.set()
            gate.wait(5)
        order.append(label)
        return label

    try:
        first = asyncio.ensure_future(pool.submit(work, "first", priority=1))
        assert await asyncio.to_thread(started.wait, 5)
        low = asyncio.ensure_future(pool.submit(work, "low", priority=1))
        late = asyncio.ensure_future(pool.submit(work, "late", priority=1, timeout_s=0.5))
        high = asyncio.ensure_future(pool.submit(work, "high", priority=0))
        await until(lambda: pool.batcher.queue_depth == 3)
        with pytest.raises(ResourceExhausted):
            await pool.submit(work, "over")
        with pytest.raises(DeadlineExceeded):
            await late
        gate.set()
        assert await asyncio.gather(first, high, low) == ["first", "high", "low"]
    finally:
        gate.set()
        await asyncio.to_thread(pool.close)
    assert order == ["first", "high", "low"], "late was dropped unrun; high passed low"
