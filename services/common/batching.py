"""Dynamic batching for stage servers, with Triton's semantics.

Each stage process holds one model per *instance* and serves many callers. Calling one model from
several threads is unsafe or slow, and a lock only makes callers queue behind whatever runs. The
:class:`DynamicBatcher` instead queues requests and hands them to the model in batches, as Triton's
dynamic batcher does (``docs/user_guide/batcher.md``, ``ModelDynamicBatching``, ``ModelQueuePolicy``):

* **max batch size** - a batch never holds more than ``max_batch_size`` items.
* **max queue delay** - the oldest item of the batch being formed waits at most ``max_queue_delay_ms``
  for company while a model instance is idle; then whatever is queued goes (up to ``max_batch_size``).
  Time spent waiting for a busy instance to finish is not bounded by it (Triton: same).
* **preferred batch sizes** - when the queue can form a preferred size (or ``max_batch_size``), the
  largest such batch is dispatched at once, without waiting out the delay.
* **bounded queue** - with ``max_queue_size`` items queued, a new request is rejected at once with
  :class:`~services.common.errors.ResourceExhausted` (Triton's ``max_queue_size``, here shared by all levels).
* **queue timeout** - an item's deadline is ``min(caller deadline, enqueue time + default_queue_timeout_ms)``:
  a request may shorten the default, never lengthen it (Triton's ``allow_timeout_override``, with the
  gRPC deadline as the request's timeout). An item whose deadline passes while queued is failed with
  :class:`~services.common.errors.DeadlineExceeded` and is never computed (Triton's ``REJECT`` action).
  Once an item is computing it is not interrupted.
* **priorities** - ``priority_levels`` FIFO queues; level 0 is served first (lower number = higher
  priority, like Triton). A batch is filled in priority order, then arrival order.
* **instance group** - ``instance_count`` model instances, each with its own batch function on its own
  thread, all fed from the one queue: a short request queued while instance 0 computes a long batch is
  taken by an idle instance 1.
* **batch key** - optional ``batch_key(item)``: items with different keys never share a batch (for example
  STT buckets utterances by audio window length). The key of the first item in line decides the batch.
* **outputs split back one per request** (pytriton's ``@batch``): a batch function must return exactly one
  output per input, in order; otherwise every item of that batch fails with :class:`BatchError` naming
  the mismatch. A batch function that raises fails only its own batch: a
  :class:`~services.common.errors.ParleyError` reaches each caller as it is (keeping its status code),
  anything else is wrapped in :class:`BatchError` (INTERNAL) with the original as ``__cause__``.
* **in-flight batching** (``joining``; TensorRT-LLM's in-flight batching, Orca's iteration-level
  scheduling) - for a model that decodes step by step, the batch function gets a ``join(n)`` callable and
  calls it between steps: it takes up to ``n`` more queued items of the batch's key, which join the running
  batch instead of waiting for all of it to end; and a ``done(i, output)`` callable that answers item ``i``
  as soon as it is finished, so no caller waits for the rest of a batch that keeps taking new items.
  Outputs cover the batch's items, then the joined ones, in order.
* **out of GPU memory** - a batch function wrapped by :func:`split_on_oom` retries a batch that runs out
  of memory in halves, recursively, down to single items; when one item alone does not fit, its whole
  batch fails with :class:`~services.common.errors.ResourceExhausted` naming the sizes tried.

Where each guarantee is enforced:

* :class:`BatchQueue` is the pure policy: no threads, no clock of its own; every method takes ``now``.
  ``push`` enforces the queue bound, the deadline rule and priority validation; ``next_batch`` enforces
  max size, batch keys, priorities, preferred sizes and the queue delay, and never returns an expired item;
  ``expire`` removes expired items. It is property-tested with a fake clock (``tests/unit/test_batching.py``).
* :func:`call_batch_fn` runs one batch function and checks its outputs (the error rules above).
* :class:`DynamicBatcher` adds the threads and asyncio: one lock guards the queue, so an item leaves it
  exactly once (dispatched, expired, cancelled or failed at close), and whoever removes it resolves its
  future, so every request gets exactly one result or one error.

Units: configuration in milliseconds (``_ms``, flags); ``timeout_s`` and every ``now``/clock value in
seconds of a monotonic clock (``time.monotonic`` by default).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any, Generic, TypeVar

from prometheus_client import Counter, Gauge, Histogram

from services.common.config import option
from services.common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ParleyError,
    ResourceExhausted,
    Unavailable,
)

logger = logging.getLogger(__name__)

I = TypeVar("I")  # noqa: E741 - the usual name for a batch's input item type
O = TypeVar("O")  # noqa: E741 - the usual name for a batch's output type

BatchFn = Callable[[list[I]], Sequence[O]]
# In-flight batching: (items, join, done) -> one output per item, then per joined item; join(n) takes up to
# n more items, done(i, output) answers item i (items then joined ones) before the batch ends.
JoiningBatchFn = Callable[[list[I], Callable[[int], list[I]], Callable[[int, O], None]], Sequence[O]]

_TIME_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

REQUESTS = Counter(
    "parley_batch_requests", "Items passed to the model (Triton's inference count), by batcher.", ["name"]
)
EXECUTIONS = Counter(
    "parley_batch_executions",
    "Batches executed (Triton's execution count); mean batch size = requests / executions.",
    ["name"],
)
DROPPED = Counter(
    "parley_batch_dropped",
    "Items that never reached the model, by reason: queue_full, deadline, cancelled, closed.",
    ["name", "reason"],
)
FAILED = Counter("parley_batch_failed", "Items whose batch function failed.", ["name"])
QUEUE_TIME = Histogram(
    "parley_batch_queue_duration_seconds",
    "Time an item waited in the queue before its batch started, in seconds.",
    ["name"],
    buckets=_TIME_BUCKETS_S,
)
COMPUTE_TIME = Histogram(
    "parley_batch_compute_duration_seconds",
    "Time one batch function call took, in seconds.",
    ["name"],
    buckets=_TIME_BUCKETS_S,
)
QUEUE_DEPTH = Gauge("parley_batch_queue_depth", "Items waiting in the queue now.", ["name"])


# How long a stopping stage server waits for a batch already computing before it exits anyway, in s.
STAGE_CLOSE_TIMEOUT_S = 2.0


class BatchError(ParleyError):
    """A batch function failed or returned the wrong number of outputs; maps to INTERNAL."""

    code = "INTERNAL"


@dataclasses.dataclass(frozen=True)
class BatchingConfig:
    """Dynamic batcher settings: a mixin for stage configs.

    Use as ``class SttConfig(BatchingConfig, ServerConfig)``; the fields become ``--max-batch-size``,
    ``--max-queue-delay-ms`` ... and ``PARLEY_MAX_BATCH_SIZE`` ... A stage may redeclare a field to change
    its default. :func:`check_batching_config` validates the values (``DynamicBatcher`` calls it).
    """

    max_batch_size: int = option(8, "Largest batch passed to the model, in items.")
    max_queue_delay_ms: float = option(
        5.0, "Longest time the oldest queued item waits for company while a model instance is idle, in ms."
    )
    preferred_batch_sizes: tuple[int, ...] = option(
        (), "Batch sizes dispatched at once, without waiting out the queue delay; comma-separated, optional."
    )
    max_queue_size: int = option(
        64,
        "Items that may wait in the queue; when full, new requests fail RESOURCE_EXHAUSTED. 0 = unbounded.",
    )
    default_queue_timeout_ms: float = option(
        0.0,
        "Longest time an item may wait in the queue, in ms; a caller's deadline only shortens it. 0 = none.",
    )
    priority_levels: int = option(1, "Number of priority levels; 0 is served first. 1 = no priorities.")
    instance_count: int = option(1, "Model instances, each with its own inference thread, fed by one queue.")


def check_batching_config(config: BatchingConfig) -> None:
    """Validates batching settings.

    Raises:
        ValueError: On a value out of range, naming the flag.
    """
    if config.max_batch_size < 1:
        raise ValueError(f"--max-batch-size must be at least 1, got {config.max_batch_size}")
    if config.max_queue_delay_ms < 0:
        raise ValueError(f"--max-queue-delay-ms must be >= 0, got {config.max_queue_delay_ms}")
    bad = [p for p in config.preferred_batch_sizes if not 1 <= p <= config.max_batch_size]
    if bad:
        raise ValueError(
            f"--preferred-batch-sizes must lie in [1, max_batch_size={config.max_batch_size}], got {bad}"
        )
    if config.max_queue_size < 0:
        raise ValueError(f"--max-queue-size must be >= 0, got {config.max_queue_size}")
    if config.default_queue_timeout_ms < 0:
        raise ValueError(f"--default-queue-timeout-ms must be >= 0, got {config.default_queue_timeout_ms}")
    if config.priority_levels < 1:
        raise ValueError(f"--priority-levels must be at least 1, got {config.priority_levels}")
    if config.instance_count < 1:
        raise ValueError(f"--instance-count must be at least 1, got {config.instance_count}")


@dataclasses.dataclass(eq=False)
class Entry(Generic[I]):
    """One queued request.

    Attributes:
        item: The caller's input.
        seq: Arrival number, unique per queue (FIFO order within a priority level).
        priority: Level, 0 first.
        key: ``batch_key(item)``, or None without a key function.
        enqueued_at: Clock time the item was queued, in seconds.
        deadline: Clock time after which it must not be computed, in seconds; None for no deadline.
        waiter: Opaque slot for the runtime (the future to resolve).
    """

    item: I
    seq: int
    priority: int
    key: Hashable
    enqueued_at: float
    deadline: float | None
    waiter: Any = None

    def expired(self, now: float) -> bool:
        """Whether the deadline has passed (a deadline equal to ``now`` counts as passed)."""
        return self.deadline is not None and self.deadline <= now


@dataclasses.dataclass(frozen=True)
class Decision(Generic[I]):
    """What an idle model instance should do now.

    Attributes:
        batch: Entries to compute now, already removed from the queue; empty to wait.
        wake_at: When ``batch`` is empty: the clock time (s) at which the decision may change without
            a new arrival (the batch being formed reaches its queue delay, or an item's deadline passes);
            None to wait for an arrival.
    """

    batch: list[Entry[I]]
    wake_at: float | None = None


class BatchQueue(Generic[I]):
    """The scheduling policy: queued items in, batches out. Pure: no threads, time passed in.

    Not thread-safe: :class:`DynamicBatcher` calls it under its lock.

    Args:
        config: Validated with :func:`check_batching_config`.
        batch_key: Items with different keys never share a batch; None puts every item in one bucket.

    Raises:
        ValueError: On invalid settings.
    """

    def __init__(self, config: BatchingConfig, batch_key: Callable[[I], Hashable] | None = None):
        check_batching_config(config)
        self.config = config
        self._batch_key = batch_key
        self._delay_s = config.max_queue_delay_ms / 1000.0
        self._default_timeout_s = config.default_queue_timeout_ms / 1000.0 or None
        self._preferred = sorted(set(config.preferred_batch_sizes), reverse=True)
        # One insertion-ordered dict per level: FIFO iteration, O(1) removal on cancel or expiry.
        self._levels: list[dict[int, Entry[I]]] = [{} for _ in range(config.priority_levels)]
        self._seq = itertools.count()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def entries(self) -> Iterator[Entry[I]]:
        """Queued entries in service order: priority level, then arrival."""
        for level in self._levels:
            yield from level.values()

    def deadline_for(self, now: float, timeout_s: float | None) -> float | None:
        """Effective deadline of an item queued at ``now``: the earlier of the caller's and the default."""
        candidates = [now + t for t in (timeout_s, self._default_timeout_s) if t is not None]
        return min(candidates) if candidates else None

    def push(
        self,
        item: I,
        now: float,
        *,
        timeout_s: float | None = None,
        priority: int | None = None,
        waiter: Any = None,
    ) -> Entry[I]:
        """Queues ``item``. Call :meth:`expire` first so that dead items do not count towards the bound.

        Args:
            item: The input.
            now: Current clock time, in seconds.
            timeout_s: Time the caller can still wait, in seconds (gRPC ``context.time_remaining()``);
                None for no caller deadline.
            priority: Level in ``[0, priority_levels)``; None for the lowest priority
                (``priority_levels - 1``), so that only requests that ask for it pass others.
            waiter: Stored on the entry for the runtime.

        Raises:
            InvalidArgument: ``priority`` out of range.
            DeadlineExceeded: ``timeout_s`` is not positive (the deadline has already passed).
            ResourceExhausted: The queue holds ``max_queue_size`` items.
        """
        levels = self.config.priority_levels
        level = levels - 1 if priority is None else priority
        if not 0 <= level < levels:
            raise InvalidArgument(f"priority must be in [0, {levels - 1}], got {priority}")
        if timeout_s is not None and timeout_s <= 0:
            raise DeadlineExceeded("deadline passed before the request was queued")
        if self.config.max_queue_size and self._size >= self.config.max_queue_size:
            raise ResourceExhausted(f"batch queue full ({self._size} items waiting); retry later")
        key = self._batch_key(item) if self._batch_key is not None else None
        entry = Entry(item, next(self._seq), level, key, now, self.deadline_for(now, timeout_s), waiter)
        self._levels[level][entry.seq] = entry
        self._size += 1
        return entry

    def remove(self, entry: Entry[I]) -> bool:
        """Removes a queued entry (cancelled by its caller); False when it is no longer queued."""
        if self._levels[entry.priority].pop(entry.seq, None) is None:
            return False
        self._size -= 1
        return True

    def take(self, key: Hashable, limit: int, now: float) -> list[Entry[I]]:
        """Removes and returns up to ``limit`` live entries of batch key ``key``, in service order."""
        taken = [e for e in self.entries() if e.key == key and not e.expired(now)][: max(0, limit)]
        for entry in taken:
            self.remove(entry)
        return taken

    def expire(self, now: float) -> list[Entry[I]]:
        """Removes and returns the entries whose deadline has passed at ``now``."""
        dead = [e for e in self.entries() if e.expired(now)]
        for entry in dead:
            self.remove(entry)
        return dead

    def drain(self) -> list[Entry[I]]:
        """Removes and returns every queued entry, in service order."""
        entries = list(self.entries())
        for level in self._levels:
            level.clear()
        self._size = 0
        return entries

    def next_batch(self, now: float, *, flush: bool = False) -> Decision[I]:
        """Decides, for one idle model instance, what to compute at ``now``.

        The first live entry in service order (highest priority, then oldest) heads the batch; the batch
        is filled with live entries of the same key in service order, up to ``max_batch_size``. It is
        dispatched at once when it reaches ``max_batch_size`` or a preferred size (the largest one that
        fits), or once its oldest entry has waited ``max_queue_delay_ms``; otherwise the instance waits.
        Expired entries are skipped, never dispatched (:meth:`expire` reaps them).

        Args:
            now: Current clock time, in seconds.
            flush: Dispatch whatever can be formed without waiting (used while closing).

        Returns:
            The batch to run (removed from the queue), or when to look again.
        """
        candidates: list[Entry[I]] = []
        next_deadline: float | None = None
        for entry in self.entries():
            if entry.expired(now):
                continue
            if entry.deadline is not None and (next_deadline is None or entry.deadline < next_deadline):
                next_deadline = entry.deadline
            if len(candidates) < self.config.max_batch_size and (
                not candidates or entry.key == candidates[0].key
            ):
                candidates.append(entry)
        if not candidates:
            return Decision([], None)
        size = len(candidates)
        ready_at = min(e.enqueued_at for e in candidates) + self._delay_s
        if size < self.config.max_batch_size and not flush and now < ready_at:
            preferred = next((p for p in self._preferred if p <= size), 0)
            if not preferred:
                wake_at = ready_at if next_deadline is None else min(ready_at, next_deadline)
                return Decision([], wake_at)
            size = preferred
        batch = candidates[:size]
        for entry in batch:
            self.remove(entry)
        return Decision(batch)


def call_batch_fn(
    fn: Callable[..., Sequence[O]],
    items: list[I],
    join: Callable[[int], list[I]] | None = None,
    done: Callable[[int, O], None] | None = None,
) -> list[O]:
    """Calls a batch function and checks that it returned one output per input.

    Args:
        fn: A :data:`BatchFn`: maps a list of inputs to a sequence of outputs, one per input, in order; or,
            with ``join``, a :data:`JoiningBatchFn`, called as ``fn(items, join)``.
        items: The batch, at least one item.
        join: Takes up to n more items into the running batch (in-flight batching); None for a static batch.
        done: With ``join``: answers one item before the batch ends.

    Returns:
        The outputs, ``outputs[i]`` for ``items[i]``, then one per joined item in the order joined.

    Raises:
        ParleyError: Raised by ``fn``, passed through unchanged.
        BatchError: ``fn`` raised any other exception (its ``__cause__``), or returned a number of
            outputs other than the number of items (joined ones included), or something without a length.
    """
    joined: list[I] = []

    def counted(limit: int) -> list[I]:
        assert join is not None
        more = join(limit)
        joined.extend(more)
        return more

    try:
        outputs = fn(items) if join is None else fn(items, counted, done)
    except ParleyError:
        raise
    except Exception as exc:
        raise BatchError(
            f"batch function failed on a batch of {len(items)}: {type(exc).__name__}: {exc}"
        ) from exc
    expected = len(items) + len(joined)
    try:
        count = len(outputs)
    except TypeError:
        raise BatchError(
            f"batch function returned {type(outputs).__name__}, not a sequence of {expected} outputs"
        ) from None
    if count != expected:
        raise BatchError(f"batch function returned {count} outputs for {expected} inputs")
    return list(outputs)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a device running out of memory: a ``RuntimeError`` saying "out of memory".

    CTranslate2 raises ``RuntimeError("CUDA failed with error out of memory")``; PyTorch's
    ``torch.cuda.OutOfMemoryError`` is a ``RuntimeError`` whose message starts "CUDA out of memory".
    """
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def split_on_oom(fn: BatchFn[I, O]) -> Callable[[list[I]], list[O]]:
    """Wraps a batch function so that a batch that runs out of memory is split in halves and retried.

    Each half is retried the same way, recursively, down to single items; outputs are concatenated in
    input order. A batch that fits is never split, so the wrapper costs nothing until memory runs out.

    Args:
        fn: The batch function (one output per input, in order).

    Returns:
        A batch function with the same contract.

    Raises:
        ResourceExhausted: One item alone still runs out of memory (the whole batch fails, as any batch
            whose function raises); the message lists the batch sizes tried down to it ("out of GPU
            memory at batch sizes 8, 4, 2, 1: ...").
    """

    def run(items: list[I], sizes: tuple[int, ...]) -> list[O]:
        try:
            return list(fn(items))
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
            tried = (*sizes, len(items))
            if len(items) == 1:
                raise ResourceExhausted(
                    f"out of GPU memory at batch sizes {', '.join(map(str, tried))}: {exc}"
                ) from exc
            half = len(items) // 2
            logger.warning(
                "out of memory at batch size %d; retrying as %d + %d", len(items), half, len(items) - half
            )
            return run(items[:half], tried) + run(items[half:], tried)

    def batch(items: list[I]) -> list[O]:
        return run(items, ())

    return batch


@dataclasses.dataclass(frozen=True)
class BatchStats:
    """Counts since the batcher started (the Prometheus metrics, without scraping).

    Attributes:
        requests: Items passed to the model.
        executions: Batch function calls.
        rejected: Items refused because the queue was full.
        expired: Items dropped because their deadline passed while queued.
        cancelled: Items removed from the queue because their caller went away.
        closed: Items failed UNAVAILABLE by ``close(drain=False)``.
        failed: Items whose batch function raised or returned the wrong number of outputs.
        batch_sizes: Executions per batch size.
    """

    requests: int = 0
    executions: int = 0
    rejected: int = 0
    expired: int = 0
    cancelled: int = 0
    closed: int = 0
    failed: int = 0
    batch_sizes: dict[int, int] = dataclasses.field(default_factory=dict)

    @property
    def mean_batch_size(self) -> float:
        """Mean batch size: requests / executions; 0.0 before the first execution."""
        return self.requests / self.executions if self.executions else 0.0


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled: nobody waits for this outcome
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


_INSTANCE_THREADS: weakref.WeakSet[threading.Thread] = weakref.WeakSet()


def busy_instance_threads() -> list[str]:
    """Names of the batchers' inference threads still running (a batch a close did not wait out)."""
    return sorted(thread.name for thread in _INSTANCE_THREADS if thread.is_alive())


class DynamicBatcher(Generic[I, O]):
    """Queues requests from asyncio servicers and computes them in batches on model-instance threads.

    Example (in a stage's ``load`` and servicer)::

        batcher = DynamicBatcher("stt", [engine.transcribe_batch] * config.instance_count, config,
                                 batch_key=lambda item: item.window_s)
        text = await batcher.submit(item, timeout_s=context.time_remaining(), priority=0)
        ...
        batcher.close()  # in Stage.close, on a worker thread

    Args:
        name: Label of the metrics and prefix of the thread names (the stage name).
        batch_fns: One batch function per model instance (``len == config.instance_count``); each is
            only ever called from its own thread, with a list of 1..max_batch_size items, and must return
            one output per item, in order. Pass the same function N times when one model is safe to call
            from N threads (CTranslate2: GIL released, weights shared). With ``joining``, each is a
            :data:`JoiningBatchFn`.
        config: Batching settings (a stage config inheriting :class:`BatchingConfig` will do).
        batch_key: Items with different keys never share a batch.
        clock: Monotonic time in seconds; must advance in real seconds (deadlines and waits use it).
        joining: In-flight batching (module docstring): batch functions are called as
            ``fn(items, join, done)``.

    Raises:
        ValueError: On invalid settings, or when ``len(batch_fns) != config.instance_count``.
    """

    def __init__(
        self,
        name: str,
        batch_fns: Sequence[BatchFn[I, O]] | Sequence[JoiningBatchFn[I, O]],
        config: BatchingConfig,
        *,
        batch_key: Callable[[I], Hashable] | None = None,
        clock: Callable[[], float] = time.monotonic,
        joining: bool = False,
    ):
        if len(batch_fns) != config.instance_count:
            raise ValueError(
                f"got {len(batch_fns)} batch functions for instance_count={config.instance_count}"
            )
        self.name = name
        self.config = config
        self._joining = joining
        self._queue: BatchQueue[I] = BatchQueue(config, batch_key)
        self._clock = clock
        self._cond = threading.Condition()
        self._closing = False
        self._drain = True
        self._counts: collections.Counter[str] = collections.Counter()
        self._batch_sizes: collections.Counter[int] = collections.Counter()
        self._requests = REQUESTS.labels(name)
        self._executions = EXECUTIONS.labels(name)
        self._failed = FAILED.labels(name)
        self._queue_time = QUEUE_TIME.labels(name)
        self._compute_time = COMPUTE_TIME.labels(name)
        self._depth = QUEUE_DEPTH.labels(name)
        self._depth.set(0)
        self._threads = [
            threading.Thread(target=self._serve, args=(fn,), name=f"{name}-instance-{i}", daemon=True)
            for i, fn in enumerate(batch_fns)
        ]
        for thread in self._threads:
            _INSTANCE_THREADS.add(thread)
            thread.start()

    @property
    def stats(self) -> BatchStats:
        """A snapshot of the counts."""
        with self._cond:
            return BatchStats(batch_sizes=dict(self._batch_sizes), **self._counts)

    @property
    def queue_depth(self) -> int:
        """Items waiting now."""
        with self._cond:
            return len(self._queue)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._closing

    async def submit(self, item: I, *, timeout_s: float | None = None, priority: int | None = None) -> O:
        """Queues ``item`` and returns its output once its batch has run.

        Args:
            item: One input for the batch function.
            timeout_s: Time the caller can still wait, in seconds; pass ``context.time_remaining()``.
                It can only shorten ``default_queue_timeout_ms``. None: no caller deadline.
            priority: Level in ``[0, priority_levels)``, 0 served first; None for the lowest.

        Returns:
            The batch function's output for ``item``.

        Raises:
            ResourceExhausted: The queue is full (raised at once).
            Unavailable: The batcher is closing or closed.
            DeadlineExceeded: The deadline passed while the item was queued; it was never computed.
            InvalidArgument: ``priority`` out of range.
            BatchError: The batch function failed on this item's batch, or returned the wrong count.
            ParleyError: Raised by the batch function for this item's batch.
            asyncio.CancelledError: The caller was cancelled; a still queued item is removed.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[O] = loop.create_future()
        with self._cond:
            if self._closing:
                raise Unavailable(f"{self.name} batcher is shutting down")
            now = self._clock()
            self._expire_locked(now)
            try:
                entry = self._queue.push(
                    item, now, timeout_s=timeout_s, priority=priority, waiter=(loop, future)
                )
            except ResourceExhausted:
                self._count("rejected", "queue_full")
                raise
            self._depth.set(len(self._queue))
            self._cond.notify_all()
        try:
            if entry.deadline is None:
                return await future
            # Expire promptly even while every instance is busy (no thread then looks at the queue).
            await asyncio.wait((future,), timeout=max(0.0, entry.deadline - self._clock()))
            if not future.done():
                with self._cond:
                    if self._queue.remove(entry):
                        self._count("expired", "deadline")
                        self._depth.set(len(self._queue))
                        waited_s = self._clock() - entry.enqueued_at
                        raise DeadlineExceeded(f"deadline passed after {waited_s:.3f} s in the batch queue")
            # Dispatched before its deadline: the computation is not interrupted.
            return await future
        except asyncio.CancelledError:
            with self._cond:
                if self._queue.remove(entry):
                    self._count("cancelled", "cancelled")
                    self._depth.set(len(self._queue))
            future.cancel()
            raise

    def close(self, *, drain: bool = True, timeout_s: float | None = None) -> bool:
        """Stops accepting requests, settles the queued ones and joins the inference threads.

        Blocks: call it from a worker thread (``Stage.close`` runs on one), not on the event loop.
        Idempotent. A stage server closes with ``drain=False`` and :data:`STAGE_CLOSE_TIMEOUT_S`: it runs
        after ``server.stop(grace)``, so whatever is still queued belongs to calls already cancelled.

        Args:
            drain: True: queued items are computed (without waiting out the queue delay). False: they
                fail UNAVAILABLE. Batches already computing always finish.
            timeout_s: Longest wait for each thread, in seconds; None waits as long as the batches take.

        Returns:
            True when every inference thread has stopped; False when one is still computing a batch (its
            model must then not be released: the threads are daemons and end with the process).
        """
        with self._cond:
            self._closing = True
            self._drain = self._drain and drain
            if not self._drain:
                for entry in self._queue.drain():
                    self._count("closed", "closed")
                    self._resolve(
                        entry, None, Unavailable(f"{self.name} batcher closed before this request ran")
                    )
                self._depth.set(0)
            self._cond.notify_all()
        stopped = True
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout_s)
                if thread.is_alive():
                    stopped = False
                    logger.warning("%s: inference thread %s still busy after close", self.name, thread.name)
        return stopped

    def _count(self, stat: str, reason: str) -> None:
        self._counts[stat] += 1
        DROPPED.labels(self.name, reason).inc()

    def _resolve(self, entry: Entry[I], result: Any, error: BaseException | None) -> None:
        loop, future = entry.waiter
        try:
            loop.call_soon_threadsafe(_settle, future, result, error)
        except RuntimeError:  # the caller's event loop is closed: nobody is left to tell
            logger.debug("%s: dropped an outcome for a closed event loop", self.name)

    def _expire_locked(self, now: float) -> None:
        for entry in self._queue.expire(now):
            self._count("expired", "deadline")
            self._resolve(entry, None, DeadlineExceeded("deadline passed while queued for batching"))
        self._depth.set(len(self._queue))

    def _next_batch(self) -> list[Entry[I]] | None:
        """Blocks until this instance has a batch to run; None when the batcher is closed and empty."""
        with self._cond:
            while True:
                now = self._clock()
                self._expire_locked(now)
                decision = self._queue.next_batch(now, flush=self._closing)
                if decision.batch:
                    self._depth.set(len(self._queue))
                    if len(self._queue):
                        self._cond.notify_all()  # another idle instance may take what is left
                    return decision.batch
                if self._closing:
                    return None
                timeout = None if decision.wake_at is None else max(0.0, decision.wake_at - now)
                self._cond.wait(timeout)

    def _join(self, batch: list[Entry[I]], limit: int) -> list[I]:
        """Moves up to ``limit`` queued items of ``batch``'s key into the running ``batch``."""
        with self._cond:
            now = self._clock()
            self._expire_locked(now)
            joined = self._queue.take(batch[0].key, limit, now)
            self._depth.set(len(self._queue))
        for entry in joined:
            self._queue_time.observe(now - entry.enqueued_at)
        batch.extend(joined)
        return [entry.item for entry in joined]

    def _deliver(self, batch: list[Entry[I]], index: int, output: O) -> None:
        """Answers item ``index`` of a running batch (in-flight batching); its later answer is ignored."""
        self._resolve(batch[index], output, None)

    def _serve(self, fn: Callable[..., Sequence[O]]) -> None:
        while (batch := self._next_batch()) is not None:
            start = self._clock()
            for entry in batch:
                self._queue_time.observe(start - entry.enqueued_at)
            error: ParleyError | None = None
            outputs: list[O] = []
            join = functools.partial(self._join, batch) if self._joining else None
            done = functools.partial(self._deliver, batch) if self._joining else None
            try:
                outputs = call_batch_fn(fn, [entry.item for entry in batch], join, done)
            except ParleyError as exc:
                error = exc
                if isinstance(exc, BatchError):
                    logger.error(
                        "%s: batch of %d failed: %s", self.name, len(batch), exc, exc_info=exc.__cause__
                    )
            self._compute_time.observe(self._clock() - start)
            self._requests.inc(len(batch))
            self._executions.inc()
            with self._cond:
                self._counts["requests"] += len(batch)
                self._counts["executions"] += 1
                self._batch_sizes[len(batch)] += 1
                if error is not None:
                    self._counts["failed"] += len(batch)
            if error is not None:
                self._failed.inc(len(batch))
                for entry in batch:
                    self._resolve(entry, None, error)
            else:
                for entry, output in zip(batch, outputs, strict=True):
                    self._resolve(entry, output, None)
