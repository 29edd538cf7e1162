"""``parley.vad.v1.VoiceActivityDetection``: protos to engine calls and back."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np

from parley.vad.v1 import vad_pb2, vad_pb2_grpc
from services.common.audio import PCM_S16LE, PcmStream, decode_pcm
from services.common.batching import DynamicBatcher
from services.common.errors import InvalidArgument
from services.common.streams import StreamSlots, bounded_requests
from services.vad.config import VadConfig
from services.vad.engine import (
    SAMPLE_RATE_HZ,
    Event,
    ModelState,
    Segment,
    SpeechPause,
    SpeechStart,
    StreamEndpointer,
    VadParams,
    clip_windows,
    segments_of,
)

logger = logging.getLogger(__name__)


def resolve_params(request: vad_pb2.VadParameters, config: VadConfig) -> VadParams:
    """Request parameters, each unset field taking the configured default.

    Raises:
        InvalidArgument: A value out of range.
    """

    def pick(name: str) -> Any:
        return getattr(request, name) if request.HasField(name) else getattr(config, name)

    return VadParams(
        threshold=float(pick("threshold")),
        min_speech_ms=int(pick("min_speech_ms")),
        min_silence_ms=int(pick("min_silence_ms")),
        speech_pad_ms=int(pick("speech_pad_ms")),
        max_speech_s=float(pick("max_speech_s")),
        pause_ms=int(pick("pause_ms")),
    ).validate()


def _segment_pb(segment: Segment) -> vad_pb2.SpeechSegment:
    return vad_pb2.SpeechSegment(
        start_ms=segment.start_ms, end_ms=segment.end_ms, confidence=segment.confidence
    )


# Batcher levels: live streams first, whole clips after them.
STREAM_PRIORITY = 0
CLIP_PRIORITY = 1
# A StreamDetect response with no event, only audio_processed_ms, goes out after this much audio without
# an event, so a caller holding audio for utterances still to come (the gateway) can release what is done,
# and a caller that forwards audio to STT only once the VAD has seen it (the gateway) forwards it promptly.
PROGRESS_INTERVAL_MS = 200

VadBatcher = DynamicBatcher[tuple[np.ndarray, ModelState], tuple[np.ndarray, ModelState]]


class VadServicer(vad_pb2_grpc.VoiceActivityDetectionServicer):
    """Detect and StreamDetect on one shared Silero model, called through a dynamic batcher.

    Every model call is one batcher item ``(windows, state)``: a chunk of one stream's frames with that
    stream's own recurrent state, which comes back updated with the probabilities. Live streams are queued
    at level 0 and whole clips at the lowest level (with a single level, both share it).

    Args:
        config: Server configuration (parameter defaults, limits).
        batcher: Runs :meth:`~services.vad.engine.SileroVad.infer_batch` on its instance threads.
    """

    def __init__(self, config: VadConfig, batcher: VadBatcher):
        self._config = config
        self._batcher = batcher
        levels = batcher.config.priority_levels
        self._stream_priority = min(STREAM_PRIORITY, levels - 1)
        self._clip_priority = min(CLIP_PRIORITY, levels - 1)
        self._streams = StreamSlots("StreamDetect", config.max_streams, "max_streams")

    async def _infer(
        self, windows: np.ndarray, state: ModelState, context: grpc.aio.ServicerContext, priority: int
    ) -> tuple[np.ndarray, ModelState]:
        return await self._batcher.submit(
            (windows, state), timeout_s=context.time_remaining(), priority=priority
        )

    async def Detect(
        self, request: vad_pb2.DetectRequest, context: grpc.aio.ServicerContext
    ) -> vad_pb2.DetectResponse:
        """Speech segments of a whole clip."""
        params = resolve_params(request.parameters, self._config)
        fmt = request.format
        audio = decode_pcm(
            request.audio,
            fmt.encoding,
            fmt.sample_rate_hz,
            fmt.channels,
            target_rate_hz=SAMPLE_RATE_HZ,
            max_duration_s=self._config.max_audio_s,
        )
        state = ModelState.initial()
        chunks = []
        for windows in clip_windows(audio, self._config.detect_frames_per_call):
            probs, state = await self._infer(windows, state, context, self._clip_priority)
            chunks.append(probs)
        probs = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
        segments = segments_of(probs, len(audio), params)
        frame_bytes = (2 if fmt.encoding == PCM_S16LE else 4) * (fmt.channels or 1)
        duration_s = len(request.audio) / frame_bytes / fmt.sample_rate_hz
        return vad_pb2.DetectResponse(
            request_id=request.request_id,
            segments=[_segment_pb(s) for s in segments],
            duration_s=duration_s,
        )

    async def StreamDetect(
        self,
        request_iterator: AsyncIterator[vad_pb2.StreamDetectRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[vad_pb2.StreamDetectResponse]:
        """Endpointing of a live stream: SpeechStarted, SpeechPaused and SpeechEnded events.

        Raises:
            InvalidArgument: No config first, a second config, bad parameters, a bad format or bad audio.
            ResourceExhausted: ``max_streams`` streams are already being served.
            DeadlineExceeded: The client sent nothing for ``stream_idle_timeout_s``, or kept sending past
                ``max_stream_duration_s``.
        """
        with self._streams.hold():
            requests = bounded_requests(request_iterator, self._config)
            async for response in self._stream_detect(requests, context):
                yield response

    async def _stream_detect(
        self,
        request_iterator: AsyncIterator[vad_pb2.StreamDetectRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[vad_pb2.StreamDetectResponse]:
        first = await anext(aiter(request_iterator), None)
        if first is None:
            return
        if first.WhichOneof("request") != "config":
            raise InvalidArgument("the first StreamDetect message must be a config (StreamDetectConfig)")
        config = first.config
        params = resolve_params(config.parameters, self._config)
        fmt = config.format
        pcm = PcmStream(fmt.encoding, fmt.sample_rate_hz, fmt.channels, target_rate_hz=SAMPLE_RATE_HZ)
        endpointer = StreamEndpointer(params)
        reported_ms = 0
        async for message in request_iterator:
            if message.WhichOneof("request") != "audio":
                raise InvalidArgument("StreamDetect takes one config, as the first message only; then audio")
            events = await self._accept(endpointer, endpointer.add(pcm.push(message.audio)), context)
            processed_ms = round(pcm.duration_s * 1000)
            out = _responses(events, config.request_id, processed_ms)
            if not out and processed_ms - reported_ms >= PROGRESS_INTERVAL_MS:
                out = [
                    vad_pb2.StreamDetectResponse(
                        request_id=config.request_id, audio_processed_ms=processed_ms
                    )
                ]
            for response in out:
                reported_ms = response.audio_processed_ms
                yield response
        tail = pcm.flush()
        events = await self._accept(endpointer, endpointer.add(tail) if len(tail) else None, context)
        events += await self._accept(endpointer, endpointer.flush(), context)
        events += endpointer.finish()
        for response in _responses(events, config.request_id, round(pcm.duration_s * 1000)):
            yield response

    async def _accept(
        self, endpointer: StreamEndpointer, windows: np.ndarray | None, context: grpc.aio.ServicerContext
    ) -> list[Event]:
        """Runs the model on a stream's new windows (none: no call) and returns the events they decide."""
        if windows is None:
            return []
        probs, state = await self._infer(windows, endpointer.state, context, self._stream_priority)
        return endpointer.accept(probs, state)


def _responses(events: list[Event], request_id: str, processed_ms: int) -> list[vad_pb2.StreamDetectResponse]:
    """One StreamDetect response per event, each reporting ``processed_ms``."""
    out = []
    for event in events:
        response = vad_pb2.StreamDetectResponse(request_id=request_id, audio_processed_ms=processed_ms)
        if isinstance(event, SpeechStart):
            response.speech_started.start_ms = event.start_ms
        elif isinstance(event, SpeechPause):
            response.speech_paused.CopyFrom(
                vad_pb2.SpeechPaused(start_ms=event.start_ms, end_ms=event.end_ms)
            )
        else:
            response.speech_ended.segment.CopyFrom(_segment_pb(event.segment))
        out.append(response)
    return out
