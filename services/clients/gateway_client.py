"""Client of the gateway: audio chunks in (a sync or async iterable), an async iterator of events out.

Example::

    async with GatewayClient("gateway.example:50051", tls=ClientTls("ca.pem"), token=token) as client:
        config = gateway_pb2.TranslateSpeechConfig(source_language="fr", target_language="en", ...)
        async for event in client.translate_speech(config, chunks):
            ...
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc

from parley.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from services.common.audio import SAMPLE_RATE_HZ
from services.common.auth import bearer_metadata
from services.common.tls import ClientTls, open_channel


async def _chunks(audio: Iterable[bytes] | AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    if isinstance(audio, AsyncIterable):
        async for chunk in audio:
            yield chunk
    else:
        for chunk in audio:
            yield chunk
            await asyncio.sleep(0)


def split_pcm(
    pcm: bytes, chunk_ms: float = 100.0, sample_rate_hz: int = SAMPLE_RATE_HZ, sample_width: int = 2
) -> list[bytes]:
    """Splits mono PCM into chunks of ``chunk_ms`` milliseconds (the last may be shorter)."""
    size = max(sample_width, int(sample_rate_hz * chunk_ms / 1000) * sample_width)
    return [pcm[i : i + size] for i in range(0, len(pcm), size)]


async def paced(
    chunks: Iterable[bytes], sample_rate_hz: int = SAMPLE_RATE_HZ, sample_width: int = 2
) -> AsyncIterator[bytes]:
    """Yields mono PCM chunks no faster than real time (as a microphone would)."""
    start = time.monotonic()
    sent_s = 0.0
    for chunk in chunks:
        wait_s = start + sent_s - time.monotonic()
        if wait_s > 0:
            await asyncio.sleep(wait_s)
        yield chunk
        sent_s += len(chunk) / sample_width / sample_rate_hz


class GatewayClient:
    """Wraps the generated ``GatewayStub``.

    Args:
        target: ``host:port`` of the gateway, or an open ``grpc.aio.Channel`` (not closed by the client).
        tls: How to verify the gateway (and present a client certificate) when ``target`` is an address;
            ``None``: plaintext.
        token: Bearer token sent with every call (``authorization`` metadata); empty: none.

    Raises:
        ConfigError: A TLS file cannot be read or holds no PEM certificate (key).
    """

    def __init__(self, target: str | grpc.aio.Channel, *, tls: ClientTls | None = None, token: str = ""):
        self._own = isinstance(target, str)
        self.channel = open_channel(target, tls) if isinstance(target, str) else target
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)
        self._auth = bearer_metadata(token)

    async def __aenter__(self) -> GatewayClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel when the client opened it."""
        if self._own:
            await self.channel.close()

    async def translate_speech(
        self,
        config: gateway_pb2.TranslateSpeechConfig,
        audio: Iterable[bytes] | AsyncIterable[bytes],
        *,
        timeout_s: float | None = None,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> AsyncIterator[gateway_pb2.TranslateSpeechResponse]:
        """Streams ``audio`` (raw PCM in ``config.input_format``, chunks of any size) through the gateway.

        Yields:
            Every response, in the order the gateway sends them; EndOfStream last.

        Raises:
            grpc.aio.AioRpcError: The call failed (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED;
                UNAUTHENTICATED without a token, PERMISSION_DENIED with one the gateway does not accept).
        """

        async def requests() -> AsyncIterator[gateway_pb2.TranslateSpeechRequest]:
            yield gateway_pb2.TranslateSpeechRequest(config=config)
            async for chunk in _chunks(audio):
                yield gateway_pb2.TranslateSpeechRequest(audio=chunk)

        call = self.stub.TranslateSpeech(
            requests(), timeout=timeout_s, metadata=(*self._auth, *(metadata or ()))
        )
        try:
            async for response in call:
                yield response
        finally:
            call.cancel()


@dataclass
class UtteranceResult:
    """Everything the gateway sent about one utterance."""

    index: int
    start_ms: int = 0
    end_ms: int = 0
    transcript: str = ""
    language: str = ""
    interim: list[str] = field(default_factory=list)
    commits: list[str] = field(default_factory=list)
    translation: str = ""
    clause_timings: list[dict[str, float]] = field(default_factory=list)
    audio: bytearray = field(default_factory=bytearray)
    audio_rate_hz: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)
    received_s: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary (audio as its duration in seconds)."""
        duration_s = len(self.audio) / 2 / self.audio_rate_hz if self.audio_rate_hz else 0.0
        return {
            "utterance": self.index,
            "start_ms": self.start_ms,
            "end_ms": self.end_ms,
            "language": self.language,
            "transcript": self.transcript,
            "translation": self.translation,
            "audio_s": round(duration_s, 3),
            "timings_ms": {k: round(v, 1) for k, v in self.timings.items()},
            "errors": self.errors,
        }


class Collector:
    """Folds a response stream into per-utterance results, recording when each kind first arrived."""

    def __init__(self) -> None:
        self.utterances: dict[int, UtteranceResult] = {}
        self.events: list[tuple[int, str]] = []
        self.end: gateway_pb2.EndOfStream | None = None

    def add(self, response: gateway_pb2.TranslateSpeechResponse) -> UtteranceResult | None:
        """Records one response; returns its utterance (``None`` for EndOfStream)."""
        kind = response.WhichOneof("event")
        self.events.append((response.utterance_index, kind))
        if kind == "end_of_stream":
            self.end = response.end_of_stream
            return None
        result = self.utterances.setdefault(
            response.utterance_index, UtteranceResult(index=response.utterance_index)
        )
        result.received_s.setdefault(kind, time.monotonic())
        if kind == "speech_started":
            result.start_ms = response.speech_started.start_ms
        elif kind == "transcript":
            t = response.transcript
            if t.is_final:
                result.transcript, result.language = t.text, t.language
                result.start_ms, result.end_ms = t.start_ms, t.end_ms
                result.received_s.setdefault("final_transcript", time.monotonic())
            else:
                result.interim.append(t.text)
        elif kind == "commit":
            result.commits.append(response.commit.text)
        elif kind == "translation":  # one per clause: the utterance's translation is their texts joined
            result.translation = f"{result.translation} {response.translation.text}".strip()
        elif kind == "audio":
            result.audio += response.audio.audio
            result.audio_rate_hz = response.audio.format.sample_rate_hz or result.audio_rate_hz
        elif kind == "clause_timings":
            t = response.clause_timings
            result.clause_timings.append({f.name: getattr(t, f.name) for f in t.DESCRIPTOR.fields})
        elif kind == "timings":
            result.timings = {
                f.name: getattr(response.timings, f.name) for f in response.timings.DESCRIPTOR.fields
            }
        elif kind == "error":
            e = response.error
            result.errors.append({"stage": e.stage, "code": e.code, "message": e.message})
        return result
