"""Runs blocking model calls off the asyncio event loop."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

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
