"""Bounds on client-streaming calls, shared by every stage that reads a client stream.

* :class:`~services.common.config.StreamLimitsConfig` holds the ``--max-streams``,
  ``--stream-idle-timeout-s`` and ``--max-stream-duration-s`` flags these enforce.
* :class:`StreamSlots`: streams open at once, in all and per caller; past a bound, RESOURCE_EXHAUSTED at once
  (never a queue: a refused caller retries with backoff).
* :func:`bounded_requests`: wraps a call's request iterator; a client that sends nothing for the idle timeout,
  or keeps sending past the longest stream, ends the call with DEADLINE_EXCEEDED, so idle or endless streams
  cannot hold every slot while health still says SERVING.
* :func:`caller_key`: who a stream belongs to, for the per-caller bound.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from typing import TypeVar

import grpc

from services.common.auth import token_name
from services.common.config import StreamLimitsConfig, flag
from services.common.errors import DeadlineExceeded, ResourceExhausted

T = TypeVar("T")


def caller_key(context: grpc.aio.ServicerContext) -> str:
    """Who a call belongs to, for per-caller limits: its bearer token's name, else the peer address's host.

    ``token:alice`` for a call authenticated with an ``alice:...`` token
    (:func:`services.common.auth.token_name`); else ``ipv4:127.0.0.1:5555`` -> ``127.0.0.1``,
    ``ipv6:[::1]:5555`` -> ``::1``, any other peer (a Unix socket) as gRPC gives it. Unauthenticated
    callers behind one proxy or NAT share a key.
    """
    name = token_name()
    if name:
        return f"token:{name}"
    peer = urllib.parse.unquote(context.peer() or "")
    scheme, _, address = peer.partition(":")
    if scheme in ("ipv4", "ipv6"):
        return address.rpartition(":")[0].strip("[]")
    return peer


class StreamSlots:
    """Streams of one RPC open at once: a bound on all of them and, optionally, on each caller's.

    Used from the server's event loop only (no lock).

    Args:
        rpc: The RPC's name, for error messages ("StreamDetect").
        limit: Most streams open at once.
        limit_field: Config field setting ``limit``; errors name its flag.
        per_caller: Most streams one caller (:func:`caller_key`) may hold at once; 0 for no per-caller bound.
        per_caller_field: Config field setting ``per_caller``.
    """

    def __init__(
        self, rpc: str, limit: int, limit_field: str, *, per_caller: int = 0, per_caller_field: str = ""
    ):
        self._rpc = rpc
        self._limit = limit
        self._limit_flag = flag(limit_field)
        self._per_caller = per_caller
        self._per_caller_flag = flag(per_caller_field) if per_caller_field else ""
        self._by_caller: collections.Counter[str] = collections.Counter()
        self.active = 0

    @contextlib.contextmanager
    def hold(self, caller: str = "") -> Iterator[None]:
        """Holds one slot for ``caller`` while the ``with`` block runs.

        Raises:
            ResourceExhausted: ``limit`` streams are open, or ``per_caller`` of them are ``caller``'s.
        """
        if self.active >= self._limit:
            raise ResourceExhausted(
                f"this server already serves {self._limit} {self._rpc} streams ({self._limit_flag}): "
                "retry later, with backoff"
            )
        if self._per_caller and self._by_caller[caller] >= self._per_caller:
            raise ResourceExhausted(
                f"caller {caller} already has {self._per_caller} {self._rpc} streams open "
                f"({self._per_caller_flag}): end one before opening another"
            )
        self.active += 1
        self._by_caller[caller] += 1
        try:
            yield
        finally:
            self.active -= 1
            self._by_caller[caller] -= 1
            if not self._by_caller[caller]:
                del self._by_caller[caller]


async def bounded_requests(requests: AsyncIterator[T], limits: StreamLimitsConfig) -> AsyncIterator[T]:
    """Yields a call's request messages, ending the call when its client idles or sends for too long.

    Only time spent waiting for the client counts as idle: time the server takes between two reads (its
    backpressure) does not. The longest stream is counted from the first read to the client's half-close.

    Args:
        requests: The call's request iterator.
        limits: ``stream_idle_timeout_s`` and ``max_stream_duration_s`` (0 disables either).

    Raises:
        DeadlineExceeded: No message for ``stream_idle_timeout_s`` seconds, or the client still sending
            ``max_stream_duration_s`` seconds after the stream started; the message names the flag.
    """
    loop = asyncio.get_running_loop()
    idle_s = limits.stream_idle_timeout_s if limits.stream_idle_timeout_s > 0 else math.inf
    duration_s = limits.max_stream_duration_s if limits.max_stream_duration_s > 0 else math.inf
    ends_s = loop.time() + duration_s
    iterator = aiter(requests)
    while True:
        wait_s = min(idle_s, ends_s - loop.time())
        timeout = asyncio.timeout(None if math.isinf(wait_s) else max(0.0, wait_s))
        try:
            async with timeout:
                message = await anext(iterator)
        except StopAsyncIteration:
            return
        except TimeoutError:
            if not timeout.expired():
                raise
            if wait_s < idle_s:
                raise DeadlineExceeded(
                    f"the stream has been sending for {duration_s:g} s, the longest this server allows "
                    f"({flag('max_stream_duration_s')}): start a new stream"
                ) from None
            raise DeadlineExceeded(
                f"no message for {idle_s:g} s: the stream was idle too long "
                f"({flag('stream_idle_timeout_s')}); send audio continuously, silence included"
            ) from None
        yield message
