"""The one way to run a stage server.

Loads and warms the model, serves gRPC with health and reflection (plaintext, TLS or mutual TLS, and bearer
tokens when configured: :mod:`services.common.tls`, :mod:`services.common.auth`), maps errors to status
codes, exports metrics, and drains gracefully on SIGTERM.

Start-up order (grpc ``examples/python/helloworld/async_greeter_server_with_graceful_shutdown.py``):
load and warm the engine on a worker thread, add the servicers, ``grpc.health.v1`` and reflection, start,
then set SERVING and log "ready" once. On SIGTERM or SIGINT: NOT_SERVING, wait ``drain_delay_s`` so load
balancers and health watchers move traffic away, then ``server.stop(grace_s)`` so in-flight calls finish,
while the stage's drain hook (the gateway's) ends its long streams cleanly within the grace.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter, Histogram, start_http_server

from services.common.auth import TokenAuthInterceptor, load_tokens
from services.common.batching import busy_instance_threads
from services.common.config import ConfigError, ServerConfig
from services.common.errors import ParleyError
from services.common.handlers import same_kind
from services.common.messages import accepted, accepted_stream, checked_deserializer
from services.common.resilience import PREVIOUS_ATTEMPTS_KEY
from services.common.telemetry import server_interceptors, setup_tracing
from services.common.tls import server_credentials

logger = logging.getLogger(__name__)

C = TypeVar("C", bound=ServerConfig)
E = TypeVar("E")
M = TypeVar("M")
B = TypeVar("B")
S = TypeVar("S")

REQUESTS = Counter(
    "parley_grpc_requests", "gRPC calls handled, by method and status code.", ["method", "code"]
)
LATENCY = Histogram(
    "parley_grpc_request_duration_seconds",
    "Time from call start to the last response, in seconds.",
    ["method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


def configure_logging(level: str) -> None:
    """Configures the root logger once, for a server process."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, ParleyError):
        return grpc.StatusCode[exc.code], str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"


class StatusMappingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc ships no type stubs: its base classes are Any
    """Maps exceptions raised by servicers to gRPC status codes, and counts and times every call.

    :class:`ParleyError` subclasses become their status code with their message; any other exception
    becomes INTERNAL and is logged with its traceback. A request message that does not decode, or that holds
    an undefined enum value, becomes INVALID_ARGUMENT (:mod:`services.common.messages`). Health and
    reflection calls pass through untouched.

    A unary call's trailing metadata carries its attempt number (``grpc-previous-rpc-attempts``: 0 for a
    first attempt), which the caller's channel sends on its retries (gRFC A6) but does not hand back to the
    caller: its :class:`services.common.resilience.Guard` counts the retries and failed attempts from it.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Wraps the method's handler; health and reflection pass through."""
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith("/grpc."):
            return handler
        request_deserializer = checked_deserializer(handler.request_deserializer, method)
        accept = accepted_stream if handler.request_streaming else accepted

        async def fail(exc: BaseException, context: grpc.aio.ServicerContext) -> None:
            code, details = _status(exc)
            if code is grpc.StatusCode.INTERNAL:
                logger.error("%s failed", method, exc_info=exc)
            REQUESTS.labels(method, code.name).inc()
            await context.abort(code, details)

        def done(start: float, context: grpc.aio.ServicerContext) -> None:
            LATENCY.labels(method).observe(time.perf_counter() - start)
            code = context.code() if hasattr(context, "code") else None
            REQUESTS.labels(method, code.name if isinstance(code, grpc.StatusCode) else "OK").inc()

        if handler.unary_unary or handler.stream_unary:
            behavior = handler.unary_unary or handler.stream_unary

            async def unary_response(request: Any, context: grpc.aio.ServicerContext) -> Any:
                start = time.perf_counter()
                context.set_trailing_metadata(((PREVIOUS_ATTEMPTS_KEY, _previous_attempts(context)),))
                try:
                    response = await behavior(accept(request), context)
                except (grpc.aio.AbortError, asyncio.CancelledError):
                    raise
                except Exception as exc:  # noqa: BLE001 - every error gets a status code, once, here
                    await fail(exc, context)
                done(start, context)
                return response

            return same_kind(handler, unary_response, request_deserializer)

        behavior = handler.unary_stream or handler.stream_stream

        async def stream_response(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            start = time.perf_counter()
            try:
                async for response in behavior(accept(request), context):
                    yield response
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as exc:  # noqa: BLE001 - every error gets a status code, once, here
                await fail(exc, context)
            done(start, context)

        return same_kind(handler, stream_response, request_deserializer)


def _previous_attempts(context: grpc.aio.ServicerContext) -> str:
    """The call's ``grpc-previous-rpc-attempts`` request header (set by the caller's retries), or "0"."""
    for key, value in context.invocation_metadata() or ():
        if key == PREVIOUS_ATTEMPTS_KEY:
            return value if isinstance(value, str) else value.decode()
    return "0"


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


@dataclasses.dataclass(frozen=True)
class Stage(Generic[C, E]):
    """How to serve one stage.

    Attributes:
        name: Short name ("vad", "stt", ...), used in logs and thread names.
        service_names: Full proto service names, for health and reflection.
        load: Loads and warms the engine; blocking, runs on a worker thread before serving starts.
        add_servicers: Registers the stage's servicers on the server. It may return a drain hook: on
            SIGTERM, while ``server.stop(grace_s)`` waits for the in-flight calls, the hook is awaited with
            the grace period in seconds, so a servicer can bring its long calls to a clean end within it.
        close: Releases the engine after the server has stopped.
    """

    name: str
    service_names: tuple[str, ...]
    load: Callable[[C], E]
    add_servicers: Callable[[grpc.aio.Server, E, C], Callable[[float], Awaitable[None]] | None]
    close: Callable[[E], None] | None = None


@dataclasses.dataclass(frozen=True)
class ModelRuntime(Generic[M, B, S]):
    """What a model stage's ``load`` wires, in this order: config -> engine -> batcher -> servicer.

    Every model stage's ``__main__`` builds all three in its ``load`` (on the loading thread), registers
    ``servicer`` in ``add_servicers`` and, in ``close``, stops ``batcher`` before releasing ``engine``.

    Attributes:
        engine: The loaded, warmed model wrapper (imports no grpc).
        batcher: What queues the model calls: a :class:`~services.common.batching.DynamicBatcher`, or the
            TTS voices' instance groups.
        servicer: The proto servicer over ``engine`` and ``batcher``.
    """

    engine: M
    batcher: B
    servicer: S


async def serve(stage: Stage[C, E], config: C, *, stop: asyncio.Event | None = None) -> None:
    """Serves ``stage`` until SIGTERM or SIGINT (or until ``stop`` is set), then drains.

    TLS (``--tls-*``) and tokens (``--auth-*``) are checked before the model loads, so a bad setting fails
    at once.

    Raises:
        ConfigError: A TLS or token setting is invalid, or names a file that cannot be used.
        OSError: When the port cannot be bound.
    """
    credentials = server_credentials(config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file)
    tokens = load_tokens(config.auth_tokens_file, config.auth_tokens)
    auth = (
        [] if tokens is None else [TokenAuthInterceptor(tokens, reflection_open=config.auth_reflection_open)]
    )
    started = time.perf_counter()
    engine = await asyncio.to_thread(stage.load, config)
    logger.info("%s: model loaded and warmed in %.1f s", stage.name, time.perf_counter() - started)

    server = _grpc_server(config, auth)
    drain = stage.add_servicers(server, engine, config)
    health = _add_health_and_reflection(server, stage.service_names)
    bind = f"{config.host}:{config.port}"
    port = (
        server.add_insecure_port(bind) if credentials is None else server.add_secure_port(bind, credentials)
    )
    if config.metrics_port:
        start_http_server(config.metrics_port, addr=config.host)
    await server.start()
    for name in ("", *stage.service_names):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    address = f"{config.host}:{port}"
    if config.ready_file:
        await asyncio.to_thread(_write_atomically, Path(config.ready_file), address)
    transport = "mutual TLS" if config.tls_client_ca_file else "TLS" if credentials else "plaintext"
    access = "no authentication" if tokens is None else f"bearer tokens: {len(tokens)}"
    logger.info("%s: ready, SERVING on %s (%s, %s)", stage.name, address, transport, access)

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    logger.info("%s: draining: NOT_SERVING, in-flight calls get %.1f s", stage.name, config.grace_s)
    await health.enter_graceful_shutdown()
    await asyncio.sleep(config.drain_delay_s)
    if drain is None:
        await server.stop(config.grace_s)
    else:
        await asyncio.gather(server.stop(config.grace_s), drain(config.grace_s))
    if stage.close is not None:
        await asyncio.to_thread(stage.close, engine)
    logger.info("%s: stopped", stage.name)


def _grpc_server(config: ServerConfig, auth: list[grpc.aio.ServerInterceptor]) -> grpc.aio.Server:
    """The aio server with the interceptors every stage runs (tracing, auth, status codes) and its limits."""
    max_bytes = config.max_message_mb * 1024 * 1024
    return grpc.aio.server(
        interceptors=[*server_interceptors(), *auth, StatusMappingInterceptor()],
        options=[
            ("grpc.max_receive_message_length", max_bytes),
            ("grpc.max_send_message_length", max_bytes),
            ("grpc.so_reuseport", 0),
            # The gateway pings every 10 s to find connections that died silently (a network partition);
            # its health Watch keeps a call open without data, so allow pings without data that often.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        ],
    )


def _add_health_and_reflection(server: grpc.aio.Server, service_names: Sequence[str]) -> HealthServicer:
    """Registers ``grpc.health.v1`` and server reflection (for grpcurl) for the stage's services."""
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    return health


def run(stage: Stage[C, E], config: C) -> None:
    """Configures logging and serves ``stage`` in a new event loop; the body of every ``__main__``.

    Raises:
        SystemExit: With code 2 on a :class:`ConfigError` (logged as one line, without a traceback).
    """
    configure_logging(config.log_level)
    provider = setup_tracing(stage.name)
    try:
        asyncio.run(serve(stage, config))
    except ConfigError as exc:
        logger.error("%s: cannot start: %s", stage.name, exc)
        raise SystemExit(2) from None
    finally:
        if provider is not None:
            provider.shutdown()
    busy = busy_instance_threads()
    if busy:
        # A native batch (CTranslate2) still running on a daemon thread would crash the interpreter's
        # finalization as it frees the model under it (SIGSEGV, seen with Whisper): leave without it.
        logger.info("%s: exiting with %s still running", stage.name, ", ".join(busy))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
