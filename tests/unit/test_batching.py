"""The dynamic batcher: its policy property-tested in a discrete-event simulation (fake clock, fake
model), and the threaded runtime with real threads, real time and bounded waits."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from services.common.batching import (
    BatchError,
    BatchingConfig,
    BatchQueue,
    DynamicBatcher,
    Entry,
    call_batch_fn,
    check_batching_config,
    is_out_of_memory,
    split_on_oom,
)
from services.common.config import ServerConfig, load_config, option
from services.common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ParleyError,
    ResourceExhausted,
    Unavailable,
)

EPS_S = 1e-9


# --------------------------------------------------------------------------------------------------
# Discrete-event simulation: the pure BatchQueue driven by a fake clock, a fake model and N instances.


@dataclasses.dataclass(frozen=True)
class Req:
    id: int
    arrive_s: float
    timeout_s: float | None
    priority: int | None
    key: int
    cost_s: float
    cancel_after_s: float | None
    fault: (
        str  # "", "short" (model returns one output too few), "boom" (RuntimeError), "reject" (ParleyError)
    )


@dataclasses.dataclass
class Batch:
    instance: int
    dispatch_s: float
    instance_free_s: float
    entries: list[Entry[Req]]
    snapshot: list[Entry[Req]]  # live queued entries just before the decision, in service order
    outcome: list[tuple[str, object]]


@dataclasses.dataclass
class Sim:
    config: BatchingConfig
    reqs: list[Req]
    keyed: bool
    outcomes: dict[int, tuple[str, object, float]]
    entries: dict[int, Entry[Req]]
    batches: list[Batch]
    model_calls: list[list[Req]]


def fake_model(calls: list[list[Req]]) -> Callable[[list[Req]], list[tuple[str, int]]]:
    def run(items: list[Req]) -> list[tuple[str, int]]:
        calls.append(list(items))
        faults = {r.fault for r in items}
        if "reject" in faults:
            raise InvalidArgument("rejected by the model")
        if "boom" in faults:
            raise RuntimeError("model crashed")
        outputs = [("out", r.id) for r in items]
        return outputs[:-1] if "short" in faults else outputs

    return run


def simulate(config: BatchingConfig, reqs: list[Req], keyed: bool) -> Sim:
    queue: BatchQueue[Req] = BatchQueue(config, (lambda r: r.key) if keyed else None)
    model_calls: list[list[Req]] = []
    model = fake_model(model_calls)
    n = config.instance_count
    busy: list[tuple[float, Batch] | None] = [None] * n
    free_s = [0.0] * n
    arrivals = sorted(reqs, key=lambda r: (r.arrive_s, r.id))
    cancels = sorted(
        ((r.arrive_s + r.cancel_after_s, r.id) for r in reqs if r.cancel_after_s is not None),
    )
    entries: dict[int, Entry[Req]] = {}
    outcomes: dict[int, tuple[str, object, float]] = {}
    batches: list[Batch] = []
    wake_at: float | None = None
    now = 0.0

    def settle(req_id: int, kind: str, value: object) -> None:
        assert req_id not in outcomes, f"request {req_id} got a second outcome {kind}"
        outcomes[req_id] = (kind, value, now)

    def reap() -> None:
        for entry in queue.expire(now):
            assert entry.deadline is not None and entry.deadline <= now
            settle(entry.item.id, "expired", None)

    for _ in range(10_000):
        times = [b[0] for b in busy if b is not None]
        times += [arrivals[0].arrive_s] if arrivals else []
        times += [cancels[0][0]] if cancels else []
        times += [wake_at] if wake_at is not None else []
        if not times:
            break
        assert min(times) >= now
        now = min(times)
        # Completions first, then cancellations, then arrivals, then scheduling, all at `now`.
        for i, running in enumerate(busy):
            if running is not None and running[0] == now:
                for entry, (kind, value) in zip(running[1].entries, running[1].outcome, strict=True):
                    settle(entry.item.id, kind, value)
                busy[i] = None
                free_s[i] = now
        while cancels and cancels[0][0] == now:
            req_id = cancels.pop(0)[1]
            if req_id in entries and queue.remove(entries[req_id]):
                settle(req_id, "cancelled", None)
        while arrivals and arrivals[0].arrive_s == now:
            req = arrivals.pop(0)
            reap()
            waiting = len(queue)
            try:
                entry = queue.push(req, now, timeout_s=req.timeout_s, priority=req.priority)
            except ResourceExhausted as exc:
                # Rejected at once, and only when the queue really is full.
                assert config.max_queue_size and waiting >= config.max_queue_size
                settle(req.id, "rejected", exc)
            except DeadlineExceeded as exc:
                assert req.timeout_s is not None and req.timeout_s <= 0
                settle(req.id, "expired", exc)
            else:
                assert not config.max_queue_size or waiting < config.max_queue_size
                entries[req.id] = entry
                expected = [
                    now + t
                    for t in (req.timeout_s, config.default_queue_timeout_ms / 1000 or None)
                    if t is not None
                ]
                assert entry.deadline == (min(expected) if expected else None)
        reap()
        wake_at = None
        for i in range(n):
            if busy[i] is not None:
                continue
            snapshot = [e for e in queue.entries() if not e.expired(now)]
            decision = queue.next_batch(now)
            if not decision.batch:
                wake_at = decision.wake_at
                assert wake_at is None or wake_at > now
                if snapshot:
                    # An idle instance only waits when neither max_batch_size nor a preferred size
                    # can be formed from the head's key.
                    same_key = sum(1 for e in snapshot if e.key == snapshot[0].key)
                    assert same_key < min((*config.preferred_batch_sizes, config.max_batch_size))
                else:
                    assert wake_at is None
                break
            items = [e.item for e in decision.batch]
            try:
                outputs = call_batch_fn(model, items)
                outcome = [("ok", out) for out in outputs]
            except ParleyError as exc:
                outcome = [("error", exc)] * len(items)
            batch = Batch(i, now, free_s[i], decision.batch, snapshot, outcome)
            batches.append(batch)
            busy[i] = (now + 0.001 + sum(r.cost_s for r in items), batch)
    else:
        raise AssertionError("simulation did not finish")
    assert len(queue) == 0 and all(b is None for b in busy)
    return Sim(config, reqs, keyed, outcomes, entries, batches, model_calls)


@st.composite
def configs(draw: st.DrawFn) -> BatchingConfig:
    max_batch_size = draw(st.integers(1, 6))
    return BatchingConfig(
        max_batch_size=max_batch_size,
        max_queue_delay_ms=draw(st.sampled_from([0.0, 1.0, 5.0, 20.0])),
        preferred_batch_sizes=tuple(draw(st.lists(st.integers(1, max_batch_size), max_size=2, unique=True))),
        max_queue_size=draw(st.integers(0, 8)),
        default_queue_timeout_ms=draw(st.sampled_from([0.0, 3.0, 10.0, 50.0])),
        priority_levels=draw(st.integers(1, 3)),
        instance_count=draw(st.integers(1, 3)),
    )


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[BatchingConfig, list[Req], bool]:
    config = draw(configs())
    count = draw(st.integers(0, 30))
    reqs = []
    arrive_ms = 0
    for i in range(count):
        arrive_ms += draw(st.integers(0, 6))
        timeout_ms = draw(st.none() | st.integers(-1, 60))
        cancel_ms = draw(st.none() | st.none() | st.integers(0, 40))
        reqs.append(
            Req(
                id=i,
                arrive_s=arrive_ms / 1000,
                timeout_s=None if timeout_ms is None else timeout_ms / 1000,
                priority=draw(st.none() | st.integers(0, config.priority_levels - 1)),
                key=draw(st.integers(0, 2)),
                cost_s=draw(st.integers(0, 25)) / 1000,
                cancel_after_s=None if cancel_ms is None else cancel_ms / 1000,
                fault=draw(st.sampled_from(["", "", "", "", "", "", "short", "boom", "reject"])),
            )
        )
    return config, reqs, draw(st.booleans())


def check_every_request_gets_exactly_one_outcome(sim: Sim) -> None:
    # simulate() fails on a second outcome; here: none is missing, and computed ones match the model.
    assert set(sim.outcomes) == {r.id for r in sim.reqs}
    computed = [e.item.id for b in sim.batches for e in b.entries]
    assert len(computed) == len(set(computed))
    assert sorted(computed) == sorted(r.id for call in sim.model_calls for r in call)
    for req_id, (kind, _, _) in sim.outcomes.items():
        assert (kind in ("ok", "error")) == (req_id in computed)


def check_batches_respect_max_size_and_keys(sim: Sim) -> None:
    for batch in sim.batches:
        assert 1 <= len(batch.entries) <= sim.config.max_batch_size
        if sim.keyed:
            assert len({e.item.key for e in batch.entries}) == 1


def check_expired_items_never_reach_the_model(sim: Sim) -> None:
    for batch in sim.batches:
        for entry in batch.entries:
            assert entry.deadline is None or entry.deadline > batch.dispatch_s
    expired = {i for i, (kind, _, _) in sim.outcomes.items() if kind == "expired"}
    assert not expired & {r.id for call in sim.model_calls for r in call}
    for req_id in expired:
        entry = sim.entries.get(req_id)
        if entry is not None:  # queued, then dropped: never before its deadline
            assert entry.deadline is not None and sim.outcomes[req_id][2] >= entry.deadline


def check_first_item_never_waits_past_the_queue_delay_while_an_instance_is_idle(sim: Sim) -> None:
    config = sim.config
    delay_s = config.max_queue_delay_ms / 1000
    for batch in sim.batches:
        first = batch.entries[0]
        if first.priority != 0:
            continue  # lower levels may be held back by higher ones
        # Either it left within the delay, or it waited for this instance to finish its previous batch.
        assert batch.dispatch_s <= max(first.enqueued_at + delay_s, batch.instance_free_s) + EPS_S
        oldest = min(e.enqueued_at for e in batch.entries)
        if batch.dispatch_s < oldest + delay_s and len(batch.entries) < config.max_batch_size:
            assert len(batch.entries) in config.preferred_batch_sizes  # left early only for a preferred size


def check_priorities_and_fifo_are_respected(sim: Sim) -> None:
    for batch in sim.batches:
        order = {id(e): n for n, e in enumerate(batch.snapshot)}
        assert batch.entries[0] is batch.snapshot[0]  # the head: highest level, then oldest
        assert all(
            (a.priority, a.seq) < (b.priority, b.seq)
            for a, b in zip(batch.snapshot, batch.snapshot[1:], strict=False)
        )
        # Filled in service order: no same-key item is passed over by a later one.
        last = max(order[id(e)] for e in batch.entries)
        same_key = [e for e in batch.snapshot[: last + 1] if e.key == batch.entries[0].key]
        assert [id(e) for e in same_key] == [id(e) for e in batch.entries]


def check_batch_failures_fail_only_their_own_batch(sim: Sim) -> None:
    for batch in sim.batches:
        faults = {e.item.fault for e in batch.entries}
        results = [sim.outcomes[e.item.id] for e in batch.entries]
        if "reject" in faults:
            assert all(kind == "error" and type(v) is InvalidArgument for kind, v, _ in results)
        elif "boom" in faults:
            assert all(kind == "error" and isinstance(v.__cause__, RuntimeError) for kind, v, _ in results)
            assert all(type(v) is BatchError and v.code == "INTERNAL" for _, v, _ in results)
        elif "short" in faults:
            n = len(batch.entries)
            message = f"returned {n - 1} outputs for {n} inputs"
            assert all(
                kind == "error" and type(v) is BatchError and message in str(v) for kind, v, _ in results
            )
        else:
            assert results == [
                ("ok", ("out", e.item.id), r[2]) for e, r in zip(batch.entries, results, strict=True)
            ]


@settings(max_examples=400, deadline=None, derandomize=True)
@given(scenarios())
def test_policy_guarantees_hold_in_simulation(scenario):
    """One simulation per example, every guarantee checked on it (each check_* names its guarantee)."""
    sim = simulate(*scenario)
    check_every_request_gets_exactly_one_outcome(sim)
    check_batches_respect_max_size_and_keys(sim)
    check_expired_items_never_reach_the_model(sim)
    check_first_item_never_waits_past_the_queue_delay_while_an_instance_is_idle(sim)
    check_priorities_and_fifo_are_respected(sim)
    check_batch_failures_fail_only_their_own_batch(sim)


# --------------------------------------------------------------------------------------------------
# The policy, directly.


def test_preferred_size_dispatches_at_once_and_largest_fitting_wins():
    config = BatchingConfig(max_batch_size=8, max_queue_delay_ms=1000, preferred_batch_sizes=(2, 4))
    queue: BatchQueue[int] = BatchQueue(config)
    queue.push(0, 0.0)
    assert queue.next_batch(0.0).batch == [] and queue.next_batch(0.0).wake_at == pytest.approx(1.0)
    for i in range(1, 5):
        queue.push(i, 0.001 * i)
    assert [e.item for e in queue.next_batch(0.004).batch] == [0, 1, 2, 3]  # 5 queued: preferred 4
    assert queue.next_batch(0.004).batch == []  # one left, waits for its delay
    assert [e.item for e in queue.next_batch(1.004).batch] == [4]


def test_max_batch_size_dispatches_at_once():
    queue: BatchQueue[int] = BatchQueue(BatchingConfig(max_batch_size=3, max_queue_delay_ms=1000))
    for i in range(4):
        queue.push(i, 0.0)
    assert [e.item for e in queue.next_batch(0.0).batch] == [0, 1, 2]


def test_zero_delay_dispatches_whatever_is_queued():
    queue: BatchQueue[int] = BatchQueue(BatchingConfig(max_batch_size=8, max_queue_delay_ms=0))
    queue.push(7, 5.0)
    assert [e.item for e in queue.next_batch(5.0).batch] == [7]


def test_higher_priority_passes_queued_bulk_work():
    queue: BatchQueue[str] = BatchQueue(
        BatchingConfig(max_batch_size=1, max_queue_delay_ms=0, priority_levels=2)
    )
    queue.push("bulk-1", 0.0)  # None: lowest level
    queue.push("bulk-2", 0.0, priority=1)
    queue.push("interactive", 0.1, priority=0)
    assert [queue.next_batch(0.1).batch[0].item for _ in range(3)] == ["interactive", "bulk-1", "bulk-2"]
    with pytest.raises(InvalidArgument):
        queue.push("x", 0.2, priority=2)


def test_first_queued_key_decides_the_batch():
    config = BatchingConfig(max_batch_size=4, max_queue_delay_ms=10)
    queue: BatchQueue[tuple[int, str]] = BatchQueue(config, batch_key=lambda item: item[0])
    for item in [(10, "a"), (30, "b"), (10, "c"), (30, "d")]:
        queue.push(item, 0.0)
    assert [e.item[1] for e in queue.next_batch(0.01).batch] == ["a", "c"]
    assert [e.item[1] for e in queue.next_batch(0.01).batch] == ["b", "d"]


def test_request_timeout_can_shorten_but_not_lengthen_the_default():
    queue: BatchQueue[int] = BatchQueue(BatchingConfig(default_queue_timeout_ms=100))
    assert queue.push(1, 10.0, timeout_s=0.05).deadline == pytest.approx(10.05)
    assert queue.push(2, 10.0, timeout_s=30.0).deadline == pytest.approx(10.1)
    assert queue.push(3, 10.0).deadline == pytest.approx(10.1)
    unbounded: BatchQueue[int] = BatchQueue(BatchingConfig())
    assert unbounded.push(4, 10.0).deadline is None
    with pytest.raises(DeadlineExceeded):
        unbounded.push(5, 10.0, timeout_s=0.0)
    assert [e.item for e in queue.expire(10.05)] == [1]
    assert [e.item for e in queue.expire(10.1)] == [2, 3]


def test_expired_item_is_skipped_and_wake_at_covers_its_deadline():
    queue: BatchQueue[int] = BatchQueue(BatchingConfig(max_batch_size=4, max_queue_delay_ms=1000))
    queue.push(1, 0.0, timeout_s=0.2)
    assert queue.next_batch(0.0).wake_at == pytest.approx(0.2)
    queue.push(2, 0.1)
    assert [e.item for e in queue.next_batch(1.5, flush=True).batch] == [2]  # 1 expired: never dispatched
    assert [e.item for e in queue.expire(1.5)] == [1]


def test_queue_full_rejects_at_once():
    queue: BatchQueue[int] = BatchQueue(BatchingConfig(max_queue_size=2))
    queue.push(1, 0.0)
    queue.push(2, 0.0)
    with pytest.raises(ResourceExhausted):
        queue.push(3, 0.0)
    assert len(queue) == 2


def test_call_batch_fn_checks_outputs():
    assert call_batch_fn(lambda xs: [x * 2 for x in xs], [1, 2]) == [2, 4]
    with pytest.raises(BatchError, match="returned 3 outputs for 2 inputs"):
        call_batch_fn(lambda xs: [0, 0, 0], [1, 2])
    with pytest.raises(BatchError, match="NoneType"):
        call_batch_fn(lambda xs: None, [1])
    error = Unavailable("gpu gone")

    def fail(xs):
        raise error

    with pytest.raises(Unavailable) as raised:
        call_batch_fn(fail, [1])
    assert raised.value is error


@pytest.mark.parametrize(
    "bad",
    [
        {"max_batch_size": 0},
        {"max_queue_delay_ms": -1.0},
        {"max_batch_size": 4, "preferred_batch_sizes": (8,)},
        {"preferred_batch_sizes": (0,)},
        {"max_queue_size": -1},
        {"default_queue_timeout_ms": -5.0},
        {"priority_levels": 0},
        {"instance_count": 0},
    ],
)
def test_invalid_settings_are_refused(bad):
    with pytest.raises(ValueError):
        check_batching_config(BatchingConfig(**bad))


@dataclasses.dataclass(frozen=True)
class FakeStageConfig(BatchingConfig, ServerConfig):
    """A stage config with batching."""

    model: str = option("tiny", "Model name.")


def test_stage_config_inherits_batching_flags_and_env(capsys):
    config = load_config(
        FakeStageConfig,
        ["--max-batch-size", "16", "--preferred-batch-sizes", "4,8", "--port", "9", "--model", "base"],
        env={"PARLEY_MAX_QUEUE_DELAY_MS": "2.5", "PARLEY_INSTANCE_COUNT": "2", "PARLEY_PRIORITY_LEVELS": "3"},
    )
    assert (config.max_batch_size, config.preferred_batch_sizes, config.max_queue_delay_ms) == (
        16,
        (4, 8),
        2.5,
    )
    assert (config.instance_count, config.priority_levels, config.port, config.model) == (2, 3, 9, "base")
    check_batching_config(config)
    assert load_config(FakeStageConfig, [], env={}) == FakeStageConfig()
    with pytest.raises(SystemExit):
        load_config(FakeStageConfig, ["--help"], env={})
    help_text = capsys.readouterr().out
    for flag in (
        "--max-batch-size",
        "--max-queue-delay-ms",
        "--preferred-batch-sizes",
        "--max-queue-size",
        "--default-queue-timeout-ms",
        "--priority-levels",
        "--instance-count",
        "--grace-s",
    ):
        assert flag in help_text


# --------------------------------------------------------------------------------------------------
# The threaded runtime: real threads, real time, every wait bounded.

_names = iter(range(1_000_000))


def unique_name() -> str:
    return f"test-batcher-{next(_names)}"


class Blocking:
    """Batch functions for N instances: items named "long*" block until released."""

    def __init__(self, instances: int):
        self.release = threading.Event()
        self.calls: list[tuple[int, list[str]]] = []
        self.lock = threading.Lock()
        self.fns = [self._fn(i) for i in range(instances)]

    def _fn(self, instance: int) -> Callable[[list[str]], list[str]]:
        def run(items: list[str]) -> list[str]:
            with self.lock:
                self.calls.append((instance, list(items)))
            if any(x.startswith("long") for x in items) and not self.release.wait(10):
                raise TimeoutError("test never released the model")
            return [f"{x}@{instance}" for x in items]

        return run

    def seen(self) -> list[str]:
        with self.lock:
            return [x for _, items in self.calls for x in items]

    async def until_seen(self, *items: str) -> None:
        await eventually(lambda: set(items) <= set(self.seen()))


async def eventually(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Polls state that model threads change (no loop-side event to await), for at most timeout_s."""
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110 - the state changes on other threads
            await asyncio.sleep(0.005)


BOUNDED = pytest.mark.timeout(30)


@BOUNDED
async def test_short_item_is_served_by_the_idle_instance_while_a_long_batch_computes():
    model = Blocking(2)
    batcher = DynamicBatcher(unique_name(), model.fns, BatchingConfig(max_queue_delay_ms=1, instance_count=2))
    long_task = asyncio.create_task(batcher.submit("long"))
    await model.until_seen("long")
    long_instance = model.calls[0][0]
    short = await asyncio.wait_for(batcher.submit("short"), 5)
    assert short == f"short@{1 - long_instance}"
    assert not long_task.done()
    model.release.set()
    assert await asyncio.wait_for(long_task, 5) == f"long@{long_instance}"
    await asyncio.to_thread(batcher.close)


@BOUNDED
async def test_concurrent_requests_are_batched_and_split_back_in_order():
    name = unique_name()
    model = Blocking(2)
    config = BatchingConfig(max_batch_size=4, max_queue_delay_ms=2000, instance_count=2)
    batcher = DynamicBatcher(name, model.fns, config)
    items = [f"x{i}" for i in range(8)]
    results = await asyncio.wait_for(asyncio.gather(*(batcher.submit(x) for x in items)), 5)
    assert [r.split("@")[0] for r in results] == items
    stats = batcher.stats
    assert (stats.requests, stats.executions, stats.batch_sizes, stats.mean_batch_size) == (8, 2, {4: 2}, 4.0)
    assert REGISTRY.get_sample_value("parley_batch_requests_total", {"name": name}) == 8
    assert REGISTRY.get_sample_value("parley_batch_executions_total", {"name": name}) == 2
    assert REGISTRY.get_sample_value("parley_batch_queue_duration_seconds_count", {"name": name}) == 8
    assert REGISTRY.get_sample_value("parley_batch_compute_duration_seconds_count", {"name": name}) == 2
    assert REGISTRY.get_sample_value("parley_batch_queue_depth", {"name": name}) == 0
    await asyncio.to_thread(batcher.close)


async def _busy_batcher(**settings) -> tuple[Blocking, DynamicBatcher, list[asyncio.Task]]:
    """Two instances, each computing a "long" item until released."""
    model = Blocking(2)
    config = BatchingConfig(max_batch_size=1, max_queue_delay_ms=0, instance_count=2, **settings)
    batcher = DynamicBatcher(unique_name(), model.fns, config)
    blockers = []
    for i in range(2):  # one at a time, so that a queue of one never holds both
        blockers.append(asyncio.create_task(batcher.submit(f"long{i}")))
        await model.until_seen(f"long{i}")
    return model, batcher, blockers


@BOUNDED
async def test_cancelled_caller_removes_its_queued_item():
    model, batcher, blockers = await _busy_batcher()
    task = asyncio.create_task(batcher.submit("gone"))
    await eventually(lambda: batcher.queue_depth == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert batcher.queue_depth == 0 and batcher.stats.cancelled == 1
    model.release.set()
    await asyncio.wait_for(asyncio.gather(*blockers), 5)
    assert await asyncio.wait_for(batcher.submit("after"), 5) in ("after@0", "after@1")
    await asyncio.to_thread(batcher.close)
    assert "gone" not in model.seen()


@BOUNDED
async def test_deadline_while_queued_fails_promptly_and_is_never_computed():
    model, batcher, blockers = await _busy_batcher(default_queue_timeout_ms=100)
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(batcher.submit("late", timeout_s=0.05), 5)
    with pytest.raises(DeadlineExceeded):  # the default queue timeout caps a longer caller deadline
        await asyncio.wait_for(batcher.submit("capped", timeout_s=30), 5)
    assert time.monotonic() - start < 2.0
    assert batcher.stats.expired == 2 and batcher.queue_depth == 0
    model.release.set()
    await asyncio.wait_for(asyncio.gather(*blockers), 5)
    await asyncio.to_thread(batcher.close)
    assert "late" not in model.seen() and "capped" not in model.seen()


@BOUNDED
async def test_full_queue_rejects_at_once():
    model, batcher, blockers = await _busy_batcher(max_queue_size=1)
    queued = asyncio.create_task(batcher.submit("queued"))
    await eventually(lambda: batcher.queue_depth == 1)
    start = time.monotonic()
    with pytest.raises(ResourceExhausted):
        await batcher.submit("rejected")
    assert time.monotonic() - start < 0.5 and batcher.stats.rejected == 1
    model.release.set()
    assert (await asyncio.wait_for(queued, 5)).startswith("queued@")
    await asyncio.gather(*blockers)
    await asyncio.to_thread(batcher.close)


@BOUNDED
async def test_batch_errors_reach_every_caller_of_that_batch_only():
    def fn(items: list[str]) -> list[str]:
        if "bad-input" in items:
            raise InvalidArgument("bad input in batch")
        if "short" in items:
            return items[:-1]
        return [x.upper() for x in items]

    config = BatchingConfig(max_batch_size=2, preferred_batch_sizes=(2,), max_queue_delay_ms=2000)
    batcher = DynamicBatcher(unique_name(), [fn], config)
    results = await asyncio.wait_for(
        asyncio.gather(batcher.submit("a"), batcher.submit("short"), return_exceptions=True), 5
    )
    assert all(isinstance(r, BatchError) and "returned 1 outputs for 2 inputs" in str(r) for r in results)
    results = await asyncio.wait_for(
        asyncio.gather(batcher.submit("b"), batcher.submit("bad-input"), return_exceptions=True), 5
    )
    assert all(type(r) is InvalidArgument for r in results)
    assert await asyncio.wait_for(asyncio.gather(batcher.submit("c"), batcher.submit("d")), 5) == ["C", "D"]
    assert batcher.stats.failed == 4
    await asyncio.to_thread(batcher.close)


@BOUNDED
async def test_close_drains_queued_items_and_refuses_new_ones():
    model, batcher, blockers = await _busy_batcher()
    queued = [asyncio.create_task(batcher.submit(x)) for x in ("a", "b")]
    await eventually(lambda: batcher.queue_depth == 2)
    closing = asyncio.create_task(asyncio.to_thread(batcher.close))
    await eventually(lambda: batcher.closed)
    with pytest.raises(Unavailable):
        await batcher.submit("c")
    model.release.set()
    assert [r[0] for r in await asyncio.wait_for(asyncio.gather(*queued), 5)] == ["a", "b"]
    await asyncio.wait_for(asyncio.gather(*blockers, closing), 5)
    assert not any(t.is_alive() for t in batcher._threads)


@BOUNDED
async def test_close_without_drain_fails_queued_items():
    model, batcher, blockers = await _busy_batcher()
    queued = asyncio.create_task(batcher.submit("a"))
    await eventually(lambda: batcher.queue_depth == 1)
    closing = asyncio.create_task(asyncio.to_thread(batcher.close, drain=False))
    with pytest.raises(Unavailable):
        await asyncio.wait_for(queued, 5)
    model.release.set()
    await asyncio.wait_for(asyncio.gather(*blockers, closing), 5)  # computing batches still finish
    assert batcher.stats.closed == 1 and "a" not in model.seen()
    assert not any(t.is_alive() for t in batcher._threads)


def test_batch_fn_count_must_match_instance_count():
    with pytest.raises(ValueError, match="instance_count=2"):
        DynamicBatcher(unique_name(), [lambda xs: xs], BatchingConfig(instance_count=2))


# --------------------------------------------------------------------------------------------------
# Out of GPU memory: split and retry.


class OomAbove:
    """A batch function that runs out of memory on batches larger than ``limit`` items (0: always)."""

    def __init__(self, limit: int, message: str = "CUDA failed with error out of memory"):
        self.limit = limit
        self.message = message
        self.calls: list[list[int]] = []

    def __call__(self, items: list[int]) -> list[int]:
        self.calls.append(list(items))
        if len(items) > self.limit:
            raise RuntimeError(self.message)
        return [x * 10 for x in items]


def halving_chain(n: int) -> list[int]:
    """Sizes tried down the first halves of a batch of n: n, n // 2, ..., 1."""
    sizes = [n]
    while sizes[-1] > 1:
        sizes.append(sizes[-1] // 2)
    return sizes


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.integers(1, 64), st.integers(0, 64))
def test_split_on_oom_computes_every_item_once_in_order_within_the_limit(n, limit):
    items = list(range(n))
    model = OomAbove(limit)
    fn = split_on_oom(model)
    if limit == 0:
        with pytest.raises(ResourceExhausted) as err:
            fn(items)
        sizes = ", ".join(map(str, halving_chain(n)))
        assert str(err.value).startswith(f"out of GPU memory at batch sizes {sizes}: CUDA failed")
        assert isinstance(err.value.__cause__, RuntimeError)
        return
    assert fn(items) == [x * 10 for x in items]
    succeeded = [call for call in model.calls if len(call) <= limit]
    # The calls that fit partition the batch, in order: every item computed exactly once.
    assert [x for call in succeeded for x in call] == items
    # Only batches over the limit were split, and each was split into two halves.
    assert all(len(call) > limit for call in model.calls if call not in succeeded)
    assert len(model.calls) - len(succeeded) == len(succeeded) - 1
    if n <= limit:
        assert model.calls == [items], "a batch that fits is never split"


def test_split_on_oom_halves_recursively():
    model = OomAbove(2)
    assert split_on_oom(model)(list(range(8))) == [0, 10, 20, 30, 40, 50, 60, 70]
    assert [len(call) for call in model.calls] == [8, 4, 2, 2, 4, 2, 2]
    model = OomAbove(2)
    assert split_on_oom(model)(list(range(5))) == [0, 10, 20, 30, 40]
    assert model.calls == [[0, 1, 2, 3, 4], [0, 1], [2, 3, 4], [2], [3, 4]]


def test_split_on_oom_reports_the_sizes_tried():
    with pytest.raises(ResourceExhausted, match=r"^out of GPU memory at batch sizes 8, 4, 2, 1: CUDA failed"):
        split_on_oom(OomAbove(0))(list(range(8)))


@pytest.mark.parametrize(
    ("error", "oom"),
    [
        (RuntimeError("CUDA failed with error out of memory"), True),  # CTranslate2
        (
            RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"),
            True,
        ),  # torch.cuda.OutOfMemoryError
        (RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"), False),
        (ValueError("out of memory"), False),
        (MemoryError(), False),
    ],
)
def test_only_out_of_memory_runtime_errors_split(error, oom):
    calls = []

    def fn(items: list[int]) -> list[int]:
        calls.append(items)
        raise error

    assert is_out_of_memory(error) is oom
    with pytest.raises(ResourceExhausted if oom else type(error)):
        split_on_oom(fn)([1, 2, 3, 4])
    # Out of memory: 4, 2, then 1 item fails and ends it; anything else is raised at once, unsplit.
    assert [len(c) for c in calls] == ([4, 2, 1] if oom else [4])


@BOUNDED
async def test_batcher_serves_a_batch_that_ran_out_of_memory_and_reports_an_item_too_big():
    model = OomAbove(2)
    config = BatchingConfig(max_batch_size=8, max_queue_delay_ms=2000)
    batcher = DynamicBatcher(unique_name(), [split_on_oom(model)], config)
    results = await asyncio.wait_for(asyncio.gather(*(batcher.submit(i) for i in range(8))), 5)
    assert results == [i * 10 for i in range(8)]
    assert batcher.stats.batch_sizes == {8: 1}, "the batcher sees one batch; the wrapper split it"
    model.limit = 0
    with pytest.raises(ResourceExhausted, match="batch sizes 1: CUDA failed"):
        await asyncio.wait_for(batcher.submit(99), 5)
    await asyncio.to_thread(batcher.close)


@BOUNDED
async def test_in_flight_batching_lets_queued_items_join_the_running_batch():
    """A step-by-step model: items queued while a batch runs join it (same key only), outputs in order."""
    joined: list[list[str]] = []
    started, queued = threading.Event(), threading.Event()

    def run(
        items: list[str], join: Callable[[int], list[str]], done: Callable[[int, str], None]
    ) -> list[str]:
        started.set()
        assert queued.wait(10), "test never queued the late items"
        more = join(2) + join(2)  # between two steps: up to 2 more, twice
        joined.append(more)
        if more:
            done(1, "a2 early")  # finished before the others: answered at once, its final output ignored
        return [f"{x}!" for x in items + more]

    config = BatchingConfig(max_batch_size=4, max_queue_delay_ms=0)
    batcher = DynamicBatcher(unique_name(), [run], config, batch_key=lambda x: x[0], joining=True)
    first = asyncio.create_task(batcher.submit("a1"))
    await eventually(started.is_set)
    late = [asyncio.create_task(batcher.submit(x)) for x in ("a2", "b1", "a3", "a4")]
    await eventually(lambda: batcher.queue_depth == 4)
    queued.set()
    assert await asyncio.wait_for(first, 5) == "a1!"
    assert joined[0] == ["a2", "a3", "a4"]  # the "b" key never joins an "a" batch
    assert [await asyncio.wait_for(t, 5) for t in late] == ["a2 early", "b1!", "a3!", "a4!"]
    assert batcher.stats.batch_sizes == {4: 1, 1: 1}
    await asyncio.to_thread(batcher.close)
