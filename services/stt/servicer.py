"""``parley.stt.v1.SpeechToText``: proto <-> engine, for whole clips and for streams.

Errors are raised as :mod:`services.common.errors` exceptions; the shared interceptor maps them to status
codes. Audio is cut into windows (:meth:`~services.stt.engine.WhisperEngine.windows`, on the VAD pool) and
each window is one item of the dynamic batcher (:class:`~services.common.batching.DynamicBatcher`), batched
with windows of the same bucket (``batch_key``), in priority order: streaming finals first, then interim
results, then Transcribe; a window still queued when its call's deadline passes is never decoded. A long
request keeps at most ``max_windows_in_flight`` windows in the queue, so a short request sent meanwhile
waits behind a few windows, never behind the whole file. When the language must be detected, the first
window is decoded alone and the others with its language (faster-whisper detects on the first 30 s too).
Streaming VAD runs on a pool of its own so endpointing never waits behind a long transcription.

Streaming: a reader task moves incoming messages into a bounded queue (its bound is the back-pressure on a
client that sends faster than the server decodes). The main loop takes everything queued at once, runs the
VAD on it, finalises the utterances that ended, then sends at most one interim result for the utterance
in progress. When decoding falls behind, interim results are therefore skipped rather than queued, and
finals are never delayed by interims that are already stale.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator

import grpc
import numpy as np

from parley.stt.v1 import stt_pb2, stt_pb2_grpc
from services.common.audio import PcmStream, decode_pcm
from services.common.batching import DynamicBatcher
from services.common.deadlines import Deadline
from services.common.errors import DeadlineExceeded, InvalidArgument
from services.common.inference import InferencePool
from services.common.streams import StreamSlots, bounded_requests
from services.stt.config import SttConfig
from services.stt.endpointing import EndpointParams, Utterance, UtteranceTracker
from services.stt.engine import DecodeOptions, Segment, SttBackend, Transcript, Window, merge_transcripts
from services.stt.filters import stability

logger = logging.getLogger(__name__)

_END = object()
_QUEUE_MESSAGES = 256
# Batcher levels of Whisper calls: a stream's final result, its interim results, then whole clips.
_FINAL_PRIORITY, _INTERIM_PRIORITY, _TRANSCRIBE_PRIORITY = 0, 1, 2
_LEVELS = 3


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


def _segment_pb(segment: Segment, offset_ms: int = 0) -> stt_pb2.Segment:
    return stt_pb2.Segment(
        start_ms=offset_ms + _ms(segment.start_s),
        end_ms=offset_ms + _ms(segment.end_s),
        text=segment.text,
        avg_logprob=segment.avg_logprob,
        no_speech_prob=segment.no_speech_prob,
        compression_ratio=segment.compression_ratio,
        words=[
            stt_pb2.Word(
                start_ms=offset_ms + _ms(w.start_s),
                end_ms=offset_ms + _ms(w.end_s),
                word=w.word,
                probability=w.probability,
            )
            for w in segment.words
        ],
    )


def _check_deadline(context: grpc.aio.ServicerContext) -> None:
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise DeadlineExceeded("the call's deadline passed before the audio could be decoded")


class SpeechToTextServicer(stt_pb2_grpc.SpeechToTextServicer):
    """Serves ``Transcribe`` and ``StreamingRecognize`` from one STT backend.

    Args:
        engine: The loaded, warmed backend (:class:`~services.stt.engine.SttBackend`).
        batcher: Runs the backend's ``transcribe_batch`` on its instances, keyed by its ``batch_key``, with
            at least :attr:`PRIORITY_LEVELS` priority levels (built by ``services.stt.__main__``).
        config: Server settings (defaults, endpointing, limits).

    Raises:
        ValueError: ``batcher`` has fewer than :attr:`PRIORITY_LEVELS` priority levels.
    """

    PRIORITY_LEVELS = _LEVELS

    def __init__(self, engine: SttBackend, batcher: DynamicBatcher[Window, Transcript], config: SttConfig):
        if batcher.config.priority_levels < _LEVELS:
            raise ValueError(
                f"the STT batcher needs {_LEVELS} priority levels, not {batcher.config.priority_levels}"
            )
        self._engine = engine
        self._config = config
        self._batcher = batcher
        self._vad_pool = InferencePool("stt-vad", 2)
        self._endpoint = EndpointParams(
            threshold=config.vad_threshold,
            endpoint_silence_ms=config.endpoint_silence_ms,
            min_speech_ms=config.min_speech_ms,
            speech_pad_ms=config.speech_pad_ms,
            max_utterance_s=config.max_utterance_s,
        )
        self._streams = StreamSlots("StreamingRecognize", config.max_streams, "max_streams")

    def close(self) -> None:
        """Stops the streaming VAD threads (the batcher and the backend are closed by their owner)."""
        self._vad_pool.close()

    async def _decode(
        self,
        audio: np.ndarray,
        options: DecodeOptions,
        context: grpc.aio.ServicerContext,
        priority: int,
    ) -> Transcript:
        """Transcribes one clip through the batcher, window by window (see the module docstring).

        Raises:
            DeadlineExceeded: The deadline passed before a window was decoded.
            ResourceExhausted: The batcher's queue is full.
        """
        _check_deadline(context)
        windows = await self._vad_pool.run(self._engine.windows, audio, options)
        duration_s = len(audio) / self._engine.sample_rate_hz

        async def decode(window: Window) -> Transcript:
            _check_deadline(context)
            remaining_s = context.time_remaining()
            window = dataclasses.replace(window, deadline=Deadline.after(remaining_s))
            return await self._batcher.submit(window, timeout_s=remaining_s, priority=priority)

        parts = []
        if options.language is None and len(windows) > 1:
            parts.append(await decode(windows[0]))
            detected = dataclasses.replace(options, language=parts[0].language)
            windows = [dataclasses.replace(w, options=detected) for w in windows[1:]]
        in_flight = asyncio.Semaphore(self._config.max_windows_in_flight)

        async def bounded(window: Window) -> Transcript:
            async with in_flight:
                return await decode(window)

        parts += await asyncio.gather(*(bounded(w) for w in windows))
        return merge_transcripts(parts, duration_s, options.language or "")

    def _options(self, config: stt_pb2.RecognitionConfig) -> DecodeOptions:
        return self._engine.options(
            language=config.language,
            translate=config.task == stt_pb2.TRANSLATE,
            beam_size=config.beam_size,
            word_timestamps=config.word_timestamps,
            initial_prompt=config.initial_prompt,
            hotwords=config.hotwords,
            vad_filter=config.vad_filter if config.HasField("vad_filter") else None,
        )

    async def Transcribe(  # noqa: N802 - generated gRPC method name
        self, request: stt_pb2.TranscribeRequest, context: grpc.aio.ServicerContext
    ) -> stt_pb2.TranscribeResponse:
        """Transcribes (or translates) one clip.

        Raises:
            InvalidArgument: Empty or malformed audio, a bad format, audio longer than ``max_audio_s``, an
                unknown language, or a language or task the model cannot do.
            DeadlineExceeded: The deadline passed before decoding started.
        """
        options = self._options(request.config)
        fmt = request.format
        audio = await asyncio.to_thread(
            decode_pcm,
            request.audio,
            fmt.encoding,
            fmt.sample_rate_hz,
            fmt.channels,
            target_rate_hz=self._engine.sample_rate_hz,
            max_duration_s=self._config.max_audio_s,
        )
        result = await self._decode(audio, options, context, _TRANSCRIBE_PRIORITY)
        return stt_pb2.TranscribeResponse(
            request_id=request.request_id,
            text=result.text,
            language=result.language,
            language_probability=result.language_probability,
            duration_s=result.duration_s,
            segments=[_segment_pb(s) for s in result.segments],
            dropped_segments=[_segment_pb(s) for s in result.dropped],
        )

    async def StreamingRecognize(  # noqa: N802 - generated gRPC method name
        self,
        request_iterator: AsyncIterator[stt_pb2.StreamingRecognizeRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[stt_pb2.StreamingRecognizeResponse]:
        """Recognises a stream: a ``streaming_config`` first, then ``audio_content`` chunks of any size.

        Yields interim results (``is_final`` false, with a stability) when ``interim_results`` is set, and
        one final result per utterance, at its endpoint or at the end of the stream.

        Raises:
            InvalidArgument: No config first, a second config, a bad format or language, NaN audio.
            ResourceExhausted: ``max_streams`` streams are already being served.
            DeadlineExceeded: The client sent nothing for ``stream_idle_timeout_s``, or kept sending past
                ``max_stream_duration_s``.
        """
        with self._streams.hold():
            requests = bounded_requests(request_iterator, self._config)
            async for response in self._recognize(requests, context):
                yield response

    async def _recognize(
        self,
        request_iterator: AsyncIterator[stt_pb2.StreamingRecognizeRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[stt_pb2.StreamingRecognizeResponse]:
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        if first is None or first.WhichOneof("streaming_request") != "streaming_config":
            raise InvalidArgument(
                "the first message of StreamingRecognize must be a streaming_config (format and recognition "
                "config); send audio_content only after it"
            )
        streaming = first.streaming_config
        options = self._options(streaming.config)
        interim_options = dataclasses.replace(
            options,
            beam_size=self._config.interim_beam_size,
            word_timestamps=False,
            temperature_fallback=False,
        )
        fmt = streaming.format
        pcm = PcmStream(
            fmt.encoding, fmt.sample_rate_hz, fmt.channels, target_rate_hz=self._engine.sample_rate_hz
        )
        tracker = UtteranceTracker(self._engine.vad_stream(), self._endpoint)
        interval = max(1, int(self._config.interim_interval_s * self._engine.sample_rate_hz))
        queue: asyncio.Queue = asyncio.Queue(maxsize=_QUEUE_MESSAGES)
        reader = asyncio.create_task(self._read(requests, queue))
        public_index: dict[int, int] = {}
        previous_interim: dict[int, str] = {}

        def response(result: stt_pb2.StreamingRecognitionResult) -> stt_pb2.StreamingRecognizeResponse:
            return stt_pb2.StreamingRecognizeResponse(
                request_id=streaming.request_id, results=[result], audio_processed_s=pcm.duration_s
            )

        try:
            ended = False
            while not ended:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                chunks = []
                for item in items:
                    if item is _END:
                        ended = True
                    elif isinstance(item, BaseException):
                        raise item
                    else:
                        chunks.append(item)
                parts = [pcm.push(b"".join(chunks))] if chunks else []
                if ended:
                    parts.append(pcm.flush())
                samples = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
                utterances = await self._vad_pool.run(tracker.push, samples) if len(samples) else []
                if ended:
                    utterances += tracker.finish()
                for utterance in utterances:
                    transcript = await self._decode(utterance.audio, options, context, _FINAL_PRIORITY)
                    if not transcript.text and utterance.index not in public_index:
                        continue  # nothing was said and nothing was shown: no result
                    index = public_index.setdefault(utterance.index, len(public_index))
                    yield response(self._final(index, utterance, transcript))
                if streaming.interim_results and not ended:
                    current = tracker.interim(interval)
                    if current is None:
                        continue
                    transcript = await self._decode(
                        current.audio, interim_options, context, _INTERIM_PRIORITY
                    )
                    if not transcript.text:
                        continue
                    index = public_index.setdefault(current.index, len(public_index))
                    score = stability(previous_interim.get(current.index), transcript.text)
                    previous_interim[current.index] = transcript.text
                    yield response(
                        stt_pb2.StreamingRecognitionResult(
                            transcript=transcript.text,
                            is_final=False,
                            stability=score,
                            utterance_index=index,
                            start_ms=current.start_ms,
                            end_ms=current.end_ms,
                            language=transcript.language,
                        )
                    )
        finally:
            reader.cancel()

    @staticmethod
    def _final(
        index: int, utterance: Utterance, transcript: Transcript
    ) -> stt_pb2.StreamingRecognitionResult:
        return stt_pb2.StreamingRecognitionResult(
            transcript=transcript.text,
            is_final=True,
            stability=1.0,
            utterance_index=index,
            start_ms=utterance.start_ms,
            end_ms=utterance.end_ms,
            language=transcript.language,
            segments=[_segment_pb(s, utterance.start_ms) for s in transcript.segments],
        )

    @staticmethod
    async def _read(requests: AsyncIterator[stt_pb2.StreamingRecognizeRequest], queue: asyncio.Queue) -> None:
        """Moves audio chunks into ``queue``, then ``_END``; puts the error instead on a bad message."""
        try:
            async for message in requests:
                kind = message.WhichOneof("streaming_request")
                if kind == "audio_content":
                    await queue.put(message.audio_content)
                elif kind == "streaming_config":
                    raise InvalidArgument(
                        "streaming_config was sent again: send it once, as the first message, then only "
                        "audio_content"
                    )
                else:
                    raise InvalidArgument(
                        "a StreamingRecognizeRequest carried neither streaming_config nor audio"
                    )
            await queue.put(_END)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the main loop, which raises it in order
            await queue.put(exc)
