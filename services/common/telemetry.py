"""OpenTelemetry tracing for every Parley process, configured by the standard ``OTEL_*`` environment.

``OTEL_TRACES_EXPORTER``: ``otlp`` (OTLP/gRPC to ``OTEL_EXPORTER_OTLP_ENDPOINT``, default
``http://localhost:4317``), ``console`` (JSON spans on stdout, into the server's log) or ``none``.
Unlike the SDK's own default (``otlp``), tracing is OFF when the variable is unset, so a laptop without a
collector does not log export failures. ``OTEL_SERVICE_NAME`` overrides the service name
(``parley-<stage>``). The batch processor honours ``OTEL_BSP_SCHEDULE_DELAY`` and friends.

W3C trace context travels in gRPC metadata through ``opentelemetry-instrumentation-grpc``'s aio
interceptors: :func:`server_interceptors` on every server (health and reflection calls excluded) and
:func:`client_interceptors` on every channel the gateway opens.
"""

from __future__ import annotations

import logging
import os

import grpc
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

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


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """The OpenTelemetry aio server interceptor (health and reflection calls are not traced)."""
    return [aio_server_interceptor(filter_=_traced)]


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """OpenTelemetry aio client interceptors that inject W3C trace context into each call's metadata."""
    return list(aio_client_interceptors(filter_=_traced))


def tracer(name: str) -> trace.Tracer:
    """A tracer from the global provider (a no-op tracer while tracing is off)."""
    return trace.get_tracer(name)
