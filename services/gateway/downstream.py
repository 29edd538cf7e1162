"""The gateway's channels to the four stages: calls guarded by deadline and breaker, retried by channels."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

from google.protobuf.descriptor import ServiceDescriptor

from parley.stt.v1 import stt_pb2, stt_pb2_grpc
from parley.translate.v1 import translate_pb2, translate_pb2_grpc
from parley.tts.v1 import tts_pb2, tts_pb2_grpc
from parley.vad.v1 import vad_pb2, vad_pb2_grpc
from services.common.deadlines import Clock, Deadline, SystemClock
from services.common.resilience import CircuitBreaker, Guard, retry_service_config
from services.common.telemetry import client_interceptors
from services.common.tls import ClientTls, client_tls, open_channel
from services.gateway.config import GatewayConfig

STAGES = ("vad", "stt", "translate", "tts")

SERVICES: dict[str, ServiceDescriptor] = {
    "vad": vad_pb2.DESCRIPTOR.services_by_name["VoiceActivityDetection"],
    "stt": stt_pb2.DESCRIPTOR.services_by_name["SpeechToText"],
    "translate": translate_pb2.DESCRIPTOR.services_by_name["Translation"],
    "tts": tts_pb2.DESCRIPTOR.services_by_name["SpeechSynthesis"],
}

# Client-side balancing: a stage address that resolves to several replicas (``dns:///stt:50053`` behind
# Compose's --scale or a headless Kubernetes Service) gets its calls spread round-robin, and a replica
# that is down or whose grpc.health.v1 Watch says NOT_SERVING (draining) gets none.
SERVICE_CONFIG = {"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": ""}}

# The retry throttle's bucket (gRFC A6 ``maxTokens``): retries stop while half of it is spent.
RETRY_MAX_TOKENS = 10


def retried_methods(stage: str) -> list[tuple[str, str]]:
    """The stage's unary methods, as (service, method): each is an idempotent read, safe to send again.

    Streaming methods are never retried: a stream that fails is the caller's to restart.
    """
    service = SERVICES[stage]
    return [
        (service.full_name, m.name) for m in service.methods if not (m.client_streaming or m.server_streaming)
    ]


def service_config(config: GatewayConfig, stage: str | None) -> dict[str, Any]:
    """A stage channel's service config: round-robin with health checks, and retries (gRFC A6).

    The ``--retry-*`` flags become the stage's ``retryPolicy`` (on its unary methods) and
    ``retryThrottling``; ``stage`` ``None``: balancing only.
    """
    retries = retry_service_config(
        retried_methods(stage) if stage is not None else [],
        max_attempts=config.retry_max_attempts,
        initial_backoff_s=config.retry_initial_backoff_ms / 1000,
        max_backoff_s=config.retry_max_backoff_ms / 1000,
        max_tokens=RETRY_MAX_TOKENS,
        token_ratio=config.retry_budget_ratio,
    )
    return {**SERVICE_CONFIG, **retries}


def channel_options(config: GatewayConfig, stage: str | None = None) -> list[tuple[str, Any]]:
    """Channel options: message size, reconnects, balancing, the stage's retries (:func:`service_config`).

    ``stage`` ``None``: no retry policy. The reconnect backoff is short so that a restarted stage is found
    fast. A request is kept for a retry up to the largest message (gRPC's default, 256 KiB, would leave
    calls with more than 8 s of audio unretried).
    """
    max_bytes = config.max_message_mb * 1024 * 1024
    return [
        ("grpc.service_config", json.dumps(service_config(config, stage))),
        ("grpc.enable_retries", 1),
        ("grpc.per_rpc_retry_buffer_size", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.initial_reconnect_backoff_ms", min(100, config.reconnect_backoff_max_ms)),
        ("grpc.min_reconnect_backoff_ms", min(100, config.reconnect_backoff_max_ms)),
        ("grpc.max_reconnect_backoff_ms", config.reconnect_backoff_max_ms),
        # A partitioned stage sends no RST: keepalive pings find the dead connection within ~15 s, and a
        # replica that moved (restarted, reconnected) is looked up again in DNS after 1 s, not 30 s.
        ("grpc.keepalive_time_ms", 10000),
        ("grpc.keepalive_timeout_ms", 5000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.dns_min_time_between_resolutions_ms", 1000),
    ]


def stage_tls(config: GatewayConfig) -> ClientTls | None:
    """TLS of the channels to the stages (``--stage-tls-*``); ``None``: plaintext.

    Raises:
        ConfigError: Settings without ``--stage-tls-ca-file``, or a certificate without its key.
    """
    return client_tls(
        config.stage_tls_ca_file,
        config.stage_tls_cert_file,
        config.stage_tls_key_file,
        config.stage_tls_server_name,
        flag_prefix="--stage-tls-",
    )


def stage_guards(config: GatewayConfig, clock: Clock) -> dict[str, Guard]:
    """One :class:`Guard` per stage (its own breaker) under the gateway's policy.

    Args:
        config: Per-stage timeouts (VAD: none), retry attempts, breaker settings, deadline margin.
        clock: Monotonic clock of the breakers.
    """
    timeouts = {
        "vad": None,
        "stt": config.stt_timeout_s,
        "translate": config.translate_timeout_s,
        "tts": config.tts_timeout_s,
    }
    return {
        stage: Guard(
            CircuitBreaker(stage, config.breaker_failure_threshold, config.breaker_reset_timeout_s, clock),
            stage_timeout_s=timeouts[stage],
            margin_s=config.deadline_margin_ms / 1000,
            max_attempts=config.retry_max_attempts,
        )
        for stage in STAGES
    }


class Downstream:
    """Stubs for the four stages with one :class:`Guard` (breaker, timeout) per stage.

    Build it inside the event loop that will use it (gRPC aio channels bind to their loop).
    The channels are plaintext, or TLS (mutual with a client certificate) per :func:`stage_tls`; each
    retries its stage's unary calls (all idempotent) on UNAVAILABLE itself (:func:`channel_options`).

    Args:
        config: Addresses, timeouts and the resilience policy.
        clock: Monotonic clock for breakers and deadlines.
        stubs: Stubs by stage name ("vad", "stt", "translate", "tts") to use instead of opening channels
            (in-process fakes in tests): objects with the stubs' awaitable methods. A stage left out has
            no stub.

    Raises:
        ConfigError: The stage TLS settings are invalid or name a file that cannot be used.
    """

    def __init__(
        self, config: GatewayConfig, *, clock: Clock | None = None, stubs: Mapping[str, Any] | None = None
    ):
        self.config = config
        self.clock = clock or SystemClock()
        self.channels: dict[str, Any] = {}
        if stubs is None:
            tls = stage_tls(config)
            addresses = {
                "vad": config.vad_address,
                "stt": config.stt_address,
                "translate": config.translate_address,
                "tts": config.tts_address,
            }
            self.channels = {
                stage: open_channel(
                    address, tls, options=channel_options(config, stage), interceptors=client_interceptors()
                )
                for stage, address in addresses.items()
            }
            stubs = {
                "vad": vad_pb2_grpc.VoiceActivityDetectionStub(self.channels["vad"]),
                "stt": stt_pb2_grpc.SpeechToTextStub(self.channels["stt"]),
                "translate": translate_pb2_grpc.TranslationStub(self.channels["translate"]),
                "tts": tts_pb2_grpc.SpeechSynthesisStub(self.channels["tts"]),
            }
        self.vad: Any = stubs.get("vad")
        self.stt: Any = stubs.get("stt")
        self.translation: Any = stubs.get("translate")
        self.tts: Any = stubs.get("tts")
        self.guards = stage_guards(config, self.clock)

    async def _unary(
        self, stage: str, rpc: Any, request: Any, deadline: Deadline, stage_timeout_s: float | None
    ) -> Any:
        return await self.guards[stage].call(
            lambda timeout_s: rpc(request, timeout=timeout_s), deadline, stage_timeout_s=stage_timeout_s
        )

    async def detect(
        self, request: vad_pb2.DetectRequest, deadline: Deadline, *, stage_timeout_s: float | None = None
    ) -> vad_pb2.DetectResponse:
        """VAD ``Detect``; ``stage_timeout_s`` instead of the stage's timeout (a batch job's longer calls)."""
        return await self._unary("vad", self.vad.Detect, request, deadline, stage_timeout_s)

    async def transcribe(
        self, request: stt_pb2.TranscribeRequest, deadline: Deadline, *, stage_timeout_s: float | None = None
    ) -> stt_pb2.TranscribeResponse:
        """STT ``Transcribe``; ``stage_timeout_s`` instead of the stage's timeout."""
        return await self._unary("stt", self.stt.Transcribe, request, deadline, stage_timeout_s)

    async def translate(
        self,
        request: translate_pb2.TranslateRequest,
        deadline: Deadline,
        *,
        stage_timeout_s: float | None = None,
    ) -> translate_pb2.TranslateResponse:
        """Translation ``Translate``; ``stage_timeout_s`` instead of the stage's timeout."""
        return await self._unary("translate", self.translation.Translate, request, deadline, stage_timeout_s)

    async def synthesize_stream(
        self, request: tts_pb2.SynthesizeRequest, deadline: Deadline
    ) -> AsyncIterator[tts_pb2.SynthesizeStreamResponse]:
        """TTS ``SynthesizeStream``: never retried; its first response closes a half-open breaker."""
        async with self.guards["tts"].stream(
            lambda timeout_s: self.tts.SynthesizeStream(request, timeout=timeout_s), deadline
        ) as responses:
            async for response in responses:
                yield response

    async def close(self) -> None:
        """Closes the channels (in-flight calls are cancelled)."""
        await asyncio.gather(*(channel.close() for channel in self.channels.values()))
