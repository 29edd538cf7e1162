"""OpenTelemetry tracing for every Parley process, configured by the standard ``OTEL_*`` environment.

``OTEL_TRACES_EXPORTER``: ``otlp`` (OTLP/gRPC to ``OTEL_EXPORTER_OTLP_ENDPOINT``, default
``http://localhost:4317``), ``console`` (JSON spans on stdout, into the server's log) or ``none``.
Unlike the SDK's own default (``otlp``), tracing is OFF when the variable is unset, so a laptop without a
collector does not log export failures. ``OTEL_SERVICE_NAME`` overrides the service name
(``parley-<stage>``). The batch processor honours ``OTEL_BSP_SCHEDULE_DELAY`` and friends.

W3C trace context travels in gRPC metadata through ``opentelemetry-instrumentation-grpc``'s aio
interceptors: :func:`server_interceptors` on every server (health and reflection calls excluded) and
:func:`client_interceptors` on every channel the gateway opens.

Streaming responses are traced here, not by the library: its aio server interceptor keeps the span's context
attached across each ``yield`` of the handler, so a stream whose caller went away while a response was
being written leaves that generator suspended; the event loop's finaliser closes it later in another
context, and OpenTelemetry logs "Failed to detach context" at ERROR with a traceback
(open-telemetry/opentelemetry-python-contrib#2357). :class:`TracingInterceptor` attaches the span around
each step of the handler only, never across a ``yield``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from services.common.handlers import same_kind

logger = logging.getLogger(__name__)

_EXCLUDED_PREFIXES = ("grpc.health.", "grpc.reflection.")


def _exporter(name: str) -> SpanExporter | None:
    if name == "console":
        return ConsoleSpanExporter()
    if name == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if name not in ("", "none"):
        logger.warning(
            "OTEL_TRACES_EXPORTER=%s is not supported (otlp, console or none): tracing is off", name
        )
    return None


def setup_tracing(service: str) -> TracerProvider | None:
    """Installs the global tracer provider for this process, from ``OTEL_TRACES_EXPORTER``.

    Args:
        service: Default service name (``parley-<service>``), unless ``OTEL_SERVICE_NAME`` is set.

    Returns:
        The provider (call ``shutdown()`` on exit to flush spans), or ``None`` when tracing is off.
    """
    exporter = _exporter(os.environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower())
    if exporter is None:
        return None
    name = os.environ.get("OTEL_SERVICE_NAME") or f"parley-{service}"
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    logger.info("tracing: exporting spans of %s with %s", name, type(exporter).__name__)
    return provider


def _traced(details: grpc.HandlerCallDetails | grpc.aio.ClientCallDetails) -> bool:
    method = details.method
    if isinstance(method, bytes):
        method = method.decode()
    return not method.lstrip("/").startswith(_EXCLUDED_PREFIXES)


class TracingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc ships no type stubs: its base classes are Any
    """Server spans for every call but health and reflection, parented on the caller's W3C trace context.

    Unary responses go through ``opentelemetry-instrumentation-grpc``'s interceptor; streaming responses
    through :meth:`_stream`, which attaches the span's context only while the handler computes its next
    response (see the module docstring).
    """

    def __init__(self) -> None:
        # opentelemetry-instrumentation-grpc's aio helpers carry no annotations
        self._unary = aio_server_interceptor(filter_=_traced)  # type: ignore[no-untyped-call]
        self._tracer = trace.get_tracer(__name__)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Wraps the method's handler in a span."""
        handler = await continuation(handler_call_details)
        if handler is None or not _traced(handler_call_details):
            return handler
        if handler.unary_stream or handler.stream_stream:
            behavior = handler.unary_stream or handler.stream_stream
            return same_kind(handler, self._stream(behavior, handler_call_details.method))

        async def resolved(_: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
            return handler

        return await self._unary.intercept_service(resolved, handler_call_details)

    def _stream(
        self, behavior: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]], method: str
    ) -> Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]:
        service, _, name = method.lstrip("/").partition("/")
        tracer = self._tracer

        async def traced(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            parent = propagate.extract(dict(context.invocation_metadata() or ()))
            span = tracer.start_span(
                method,
                context=parent,
                kind=trace.SpanKind.SERVER,
                attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
            )
            current = trace.set_span_in_context(span, parent)
            responses = behavior(request, context)
            try:
                while True:
                    token = otel_context.attach(current)
                    try:
                        response = await anext(responses)
                    except StopAsyncIteration:
                        return
                    finally:
                        otel_context.detach(token)
                    yield response
            except Exception as exc:
                span.record_exception(exc)
                span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
                raise
            finally:
                code = context.code() if hasattr(context, "code") else None
                if isinstance(code, grpc.StatusCode):
                    span.set_attribute("rpc.grpc.status_code", code.value[0])
                span.end()

        return traced


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """The tracing interceptor (health and reflection calls are not traced)."""
    return [TracingInterceptor()]


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """OpenTelemetry aio client interceptors that inject W3C trace context into each call's metadata."""
    # opentelemetry-instrumentation-grpc's aio helpers carry no annotations
    return list(aio_client_interceptors(filter_=_traced))  # type: ignore[no-untyped-call]


def tracer(name: str) -> trace.Tracer:
    """A tracer from the global provider (a no-op tracer while tracing is off)."""
    return trace.get_tracer(name)
