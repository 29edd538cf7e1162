"""Server tracing of streaming responses: no context left attached across a ``yield``."""

from __future__ import annotations

import asyncio
import collections
import gc
import logging

import grpc
import pytest

from services.common.telemetry import TracingInterceptor

Metadatum = collections.namedtuple("Metadatum", "key value")  # what grpc's invocation_metadata() holds


class FakeContext:
    def invocation_metadata(self):
        return (Metadatum("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),)

    def peer(self):
        return "ipv4:127.0.0.1:5555"

    def code(self):
        return None


class Details(grpc.HandlerCallDetails):
    def __init__(self, method: str):
        self.method = method
        self.invocation_metadata = ()


async def _handler() -> grpc.RpcMethodHandler:
    async def responses(request, context):
        for i in range(10):
            await asyncio.sleep(0)
            yield i

    return grpc.unary_stream_rpc_method_handler(responses)


async def test_a_stream_abandoned_at_a_yield_logs_no_context_detach_error(caplog):
    """The caller goes away while a response is being written: the generator is finalised elsewhere."""
    caplog.set_level(logging.WARNING)

    async def continuation(_details):
        return await _handler()

    handler = await TracingInterceptor().intercept_service(continuation, Details("/parley.x.v1.X/Stream"))

    async def take_one() -> None:
        stream = handler.unary_stream(object(), FakeContext())
        assert await anext(stream) == 0  # suspended at its yield, never closed by this task

    await asyncio.create_task(take_one())
    gc.collect()  # the event loop's async-generator finaliser closes the stream in a task of its own
    for _ in range(5):
        await asyncio.sleep(0)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_a_stream_runs_to_its_end_inside_its_span():
    async def continuation(_details):
        return await _handler()

    handler = await TracingInterceptor().intercept_service(continuation, Details("/parley.x.v1.X/Stream"))
    assert [r async for r in handler.unary_stream(object(), FakeContext())] == list(range(10))


@pytest.mark.parametrize(
    "method", ["/grpc.health.v1.Health/Watch", "/grpc.reflection.v1alpha.ServerReflection/X"]
)
async def test_health_and_reflection_are_not_wrapped(method):
    handler = await _handler()

    async def continuation(_details):
        return handler

    assert await TracingInterceptor().intercept_service(continuation, Details(method)) is handler
