"""The gateway's channels to the four stages, each call guarded by deadline, retries and a breaker."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from parley.stt.v1 import stt_pb2, stt_pb2_grpc
from parley.translate.v1 import translate_pb2, translate_pb2_grpc
from parley.tts.v1 import tts_pb2, tts_pb2_grpc
from parley.vad.v1 import vad_pb2_grpc
from services.common.deadlines import Clock, Deadline, SystemClock
from services.common.resilience import CircuitBreaker, Guard, RetryBudget, RetryPolicy
from services.common.telemetry import client_interceptors
from services.common.tls import ClientTls, client_tls, open_channel
from services.gateway.config import GatewayConfig

STAGES = ("vad", "stt", "translate", "tts")


# Client-side balancing: a stage address that resolves to several replicas (``dns:///stt:50053`` behind
# Compose's --scale or a headless Kubernetes Service) gets its calls spread round-robin, and a replica
# that is down or whose grpc.health.v1 Watch says NOT_SERVING (draining) gets none.
SERVICE_CONFIG = {"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": ""}}


def channel_options(config: GatewayConfig) -> list[tuple[str, Any]]:
    """Channel options: message size, fast reconnects, round-robin over a stage's healthy addresses.

    The reconnect backoff is short so that a restarted stage is found fast.
    """
    max_bytes = config.max_message_mb * 1024 * 1024
    return [
        ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.initial_reconnect_backoff_ms", min(100, config.reconnect_backoff_max_ms)),
        ("grpc.min_reconnect_backoff_ms", min(100, config.reconnect_backoff_max_ms)),
        ("grpc.max_reconnect_backoff_ms", config.reconnect_backoff_max_ms),
        ("grpc.enable_retries", 0),  # retries are ours (budget, deadline), not the channel's
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


def stage_guards(
    config: GatewayConfig,
    clock: Clock,
    *,
    rng: random.Random | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> dict[str, Guard]:
    """One :class:`Guard` per stage (its own breaker and retry budget) under the gateway's policy.

    Args:
        config: Per-stage timeouts (VAD: none), retry policy and budget, breaker settings, deadline margin.
        clock: Monotonic clock of the breakers.
        rng: Random source for retry jitter.
        sleep: Awaitable sleep for retry backoff.
    """
    policy = RetryPolicy(
        max_attempts=config.retry_max_attempts,
        initial_backoff_s=config.retry_initial_backoff_ms / 1000,
        max_backoff_s=config.retry_max_backoff_ms / 1000,
    )
    timeouts = {
        "vad": None,
        "stt": config.stt_timeout_s,
        "translate": config.translate_timeout_s,
        "tts": config.tts_timeout_s,
    }
    return {
        stage: Guard(
            CircuitBreaker(stage, config.breaker_failure_threshold, config.breaker_reset_timeout_s, clock),
            RetryBudget(config.retry_budget_ratio),
            policy,
            stage_timeout_s=timeouts[stage],
            margin_s=config.deadline_margin_ms / 1000,
            rng=rng,
            sleep=sleep,
        )
        for stage in STAGES
    }


class Downstream:
    """Stubs for the four stages with one :class:`Guard` (breaker, retry budget, timeout) per stage.

    Build it inside the event loop that will use it (gRPC aio channels bind to their loop).
    The channels are plaintext, or TLS (mutual with a client certificate) per :func:`stage_tls`.

    Args:
        config: Addresses, timeouts and the resilience policy.
        clock: Monotonic clock for breakers and deadlines.
        rng: Random source for retry jitter.
        sleep: Awaitable sleep for retry backoff.

    Raises:
        ConfigError: The stage TLS settings are invalid or name a file that cannot be used.
    """

    def __init__(
        self,
        config: GatewayConfig,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        self.config = config
        self.clock = clock or SystemClock()
        options = channel_options(config)
        tls = stage_tls(config)
        addresses = {
            "vad": config.vad_address,
            "stt": config.stt_address,
            "translate": config.translate_address,
            "tts": config.tts_address,
        }
        self.channels = {
            stage: open_channel(address, tls, options=options, interceptors=client_interceptors())
            for stage, address in addresses.items()
        }
        self.vad = vad_pb2_grpc.VoiceActivityDetectionStub(self.channels["vad"])
        self.stt = stt_pb2_grpc.SpeechToTextStub(self.channels["stt"])
        self.translation = translate_pb2_grpc.TranslationStub(self.channels["translate"])
        self.tts = tts_pb2_grpc.SpeechSynthesisStub(self.channels["tts"])
        self.guards = stage_guards(config, self.clock, rng=rng, sleep=sleep)

    async def transcribe(
        self, request: stt_pb2.TranscribeRequest, deadline: Deadline
    ) -> stt_pb2.TranscribeResponse:
        """STT ``Transcribe`` (idempotent: retried on UNAVAILABLE)."""
        return await self.guards["stt"].call(
            lambda timeout_s: self.stt.Transcribe(request, timeout=timeout_s), deadline, idempotent=True
        )

    async def translate(
        self, request: translate_pb2.TranslateRequest, deadline: Deadline
    ) -> translate_pb2.TranslateResponse:
        """Translation ``Translate`` (idempotent: retried on UNAVAILABLE)."""
        return await self.guards["translate"].call(
            lambda timeout_s: self.translation.Translate(request, timeout=timeout_s),
            deadline,
            idempotent=True,
        )

    async def synthesize_stream(
        self, request: tts_pb2.SynthesizeRequest, deadline: Deadline
    ) -> AsyncIterator[tts_pb2.SynthesizeStreamResponse]:
        """TTS ``SynthesizeStream``: server-streaming, so never retried; the breaker sees its outcome."""
        guard = self.guards["tts"]
        timeout_s = deadline.timeout_for(guard.stage_timeout_s, guard.margin_s)
        guard.breaker.acquire()
        started_s = self.clock.monotonic()
        call = self.tts.SynthesizeStream(request, timeout=timeout_s)
        try:
            async for response in call:
                yield response
        except asyncio.CancelledError:
            guard.breaker.release()
            call.cancel()
            raise
        except Exception as exc:
            guard.record(exc, timeout_s, started_s)
            raise
        except BaseException:
            # The consumer closed the generator early (GeneratorExit): no verdict on the stage.
            guard.breaker.release()
            call.cancel()
            raise
        guard.record(None, timeout_s, started_s)

    async def close(self) -> None:
        """Closes the channels (in-flight calls are cancelled)."""
        await asyncio.gather(*(channel.close() for channel in self.channels.values()))
