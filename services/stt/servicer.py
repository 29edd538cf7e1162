"""``parley.stt.v1.SpeechToText``: proto <-> engine, for whole clips and for streams.

Errors are raised as :mod:`services.common.errors` exceptions; the shared interceptor maps them to status
codes. Audio is cut into windows (:meth:`~services.stt.engine.WhisperEngine.windows`, on the VAD pool) and
each window is one item of the dynamic batcher (:class:`~services.common.batching.DynamicBatcher`), batched
with windows of the same bucket (``batch_key``), in priority order: streaming finals first, then interim
results, then Transcribe; a window still queued when its call's deadline passes is never decoded. A long
request keeps at most ``max_windows_in_flight`` windows in the queue, so a short request sent meanwhile
waits behind a few windows, never behind the whole file. When the language must be detected, the first
window is decoded alone and the others with its language (faster-whisper detects on the first 30 s too).
Windows are cut on a pool of their own (faster-whisper's Silero VAD) so that never waits behind decoding.

Streaming (incremental recognition, :mod:`services.stt.streaming`): a reader task moves incoming messages
into a bounded queue. The main loop alternates between taking what is queued (audio into the stream's
:class:`~services.stt.streaming.StreamRecognizer`, boundaries scheduling flushes) and running the one decode
the recognizer asks for, one at a time per stream: flushes at pauses and ends first (final priority), else
a decode of the uncommitted audio (interim priority) once enough new audio arrived. Decodes never queue up
behind each other: when decoding falls behind, the next decode simply covers more audio. When the work not
yet committed exceeds ``_MAX_BACKLOG_S`` the loop stops taking messages, the queue fills, the reader stops
and gRPC flow control slows the client.
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
from services.common.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted
from services.common.inference import InferencePool
from services.common.streams import StreamSlots, bounded_requests
from services.stt.config import SttConfig
from services.stt.engine import DecodeOptions, Segment, SttBackend, Transcript, Window, merge_transcripts
from services.stt.streaming import (
    BoundaryKind,
    Commit,
    Policy,
    StreamingParams,
    StreamRecognizer,
    TimedWord,
    Update,
)

logger = logging.getLogger(__name__)

_END = object()
_QUEUE_MESSAGES = 256
# Batcher levels of Whisper calls: a stream's final result, its interim results, then whole clips.
_FINAL_PRIORITY, _INTERIM_PRIORITY, _TRANSCRIBE_PRIORITY = 0, 1, 2
_LEVELS = 3
# Audio a stream may hold uncommitted before its messages wait in the queue (backpressure), in seconds.
_MAX_BACKLOG_S = 60.0
# With caller endpointing, an agreement decode starts only after this long with no new message, in seconds
# (a message that comes meanwhile is taken first): the caller's VAD sends a pause right behind the audio it
# ends, and a decode already running when it arrives cannot be stopped, so the pause's final decode waited
# for all of it (0.27 s in one of 14 FLEURS clauses, that decode started 0 ms before the pause arrived).
_BOUNDARY_GRACE_S = 0.02


class _Inbox(asyncio.Queue[object]):
    """A stream's queued messages; :meth:`arrival` waits for one without taking it."""

    def __init__(self, maxsize: int):
        super().__init__(maxsize)
        self._arrived = asyncio.Event()

    def _put(self, item: object) -> None:  # asyncio.Queue's hook for subclasses (as PriorityQueue uses it)
        super()._put(item)
        self._arrived.set()

    async def arrival(self, timeout_s: float) -> bool:
        """Whether a message is queued within ``timeout_s`` seconds (at once when one is already)."""
        if not self.empty():
            return True
        self._arrived.clear()
        try:
            await asyncio.wait_for(self._arrived.wait(), timeout_s)
        except TimeoutError:
            return False
        return True


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
        config: Server settings (defaults, streaming, limits).

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
        """Recognises a stream incrementally (:mod:`services.stt.streaming`).

        A ``streaming_config`` first, then ``audio_content`` chunks of any size and, with
        ``caller_endpointing``, the caller's speech boundaries after the audio they refer to.

        Yields a result for each commit (interim, ``committed`` set), interim results with only unstable
        text when ``interim_results`` is set, and one final result per utterance.

        Raises:
            InvalidArgument: No config first, a second config, a bad format or language, NaN audio, a
                boundary without caller_endpointing.
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
        stream = _Stream(self._engine, self._config, streaming)
        queue = _Inbox(maxsize=_QUEUE_MESSAGES)
        reader = asyncio.create_task(self._read(requests, queue, streaming.caller_endpointing))
        try:
            ended = False
            while True:
                for update in stream.pending:
                    yield stream.response(update)
                stream.pending.clear()
                job = stream.recognizer.next_job()
                if job is None and ended:
                    break
                if job is None or (not queue.empty() and stream.recognizer.backlog_s < _MAX_BACKLOG_S):
                    # Take what arrived; wait only when there is nothing to decode.
                    ended = await self._take(queue, stream, block=job is None) or ended
                    continue
                if (
                    streaming.caller_endpointing
                    and not (job.final or ended)
                    and queue.empty()
                    and await queue.arrival(_BOUNDARY_GRACE_S)
                ):
                    continue  # take it first: a boundary right behind the audio changes what to decode
                options = stream.final_options if job.final else stream.agreement_options
                if job.language:
                    options = dataclasses.replace(options, language=job.language)
                options = dataclasses.replace(options, initial_prompt=job.prompt or None)
                priority = _FINAL_PRIORITY if job.final else _INTERIM_PRIORITY
                try:
                    transcript = await self._decode(job.audio, options, context, priority)
                except ResourceExhausted:
                    if job.final:
                        raise
                    # An agreement decode is an early look only: under overload it is skipped (the next
                    # one covers more audio; the pause or end decodes everything), the stream goes on.
                    logger.info("stream %s: decode skipped, the batcher's queue is full", stream.request_id)
                    stream.recognizer.apply(job, [], "")
                    continue
                for update in stream.recognizer.apply(
                    job, _timed_words(transcript, job.offset_ms), transcript.language
                ):
                    yield stream.response(update)
        finally:
            reader.cancel()

    async def _take(self, queue: asyncio.Queue[object], stream: _Stream, block: bool) -> bool:
        """Moves queued messages into the stream's recognizer; returns whether the input ended.

        Waits for one message when ``block``; then takes what is queued without waiting, while the
        recognizer's backlog is under :data:`_MAX_BACKLOG_S` (beyond it the queue fills, the reader stops
        reading and gRPC flow control slows the client).
        """
        items = [await queue.get()] if block else []
        while not queue.empty() and stream.recognizer.backlog_s < _MAX_BACKLOG_S:
            items.append(queue.get_nowait())
            if isinstance(items[-1], stt_pb2.SpeechBoundary):
                break  # a boundary decides work: schedule it before taking more audio
        ended = False
        for item in items:
            if item is _END:
                ended = True
                stream.pending += stream.end()
            elif isinstance(item, BaseException):
                raise item
            elif isinstance(item, stt_pb2.SpeechBoundary):
                stream.pending += stream.boundary(item)
            else:
                assert isinstance(item, bytes)
                stream.recognizer.add_audio(stream.pcm.push(item))
        return ended

    @staticmethod
    async def _read(
        requests: AsyncIterator[stt_pb2.StreamingRecognizeRequest],
        queue: asyncio.Queue[object],
        boundaries: bool,
    ) -> None:
        """Moves audio chunks and boundaries into ``queue``, then ``_END``; the error instead on a bad one."""
        try:
            async for message in requests:
                kind = message.WhichOneof("streaming_request")
                if kind == "audio_content":
                    await queue.put(message.audio_content)
                elif kind == "boundary" and boundaries:
                    await queue.put(message.boundary)
                elif kind == "boundary":
                    raise InvalidArgument(
                        "a boundary was sent but streaming_config.caller_endpointing is unset: set it to "
                        "send your VAD's speech boundaries, or send audio only"
                    )
                elif kind == "streaming_config":
                    raise InvalidArgument(
                        "streaming_config was sent again: send it once, as the first message, then only "
                        "audio_content and boundaries"
                    )
                else:
                    raise InvalidArgument(
                        "a StreamingRecognizeRequest carried neither streaming_config, audio_content nor a "
                        "boundary"
                    )
            await queue.put(_END)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the main loop, which raises it in order
            await queue.put(exc)


def _timed_words(transcript: Transcript, offset_ms: int) -> list[TimedWord]:
    """The transcript's words with stream times (``offset_ms`` is the stream time of its audio's start).

    A segment without word timings (a backend that gives none) has its words spread over its span in
    proportion to their lengths in characters: an estimate, enough for agreement and clause cuts.
    """
    words = []
    for segment in transcript.segments:
        if segment.words:
            words += [
                TimedWord(w.word, offset_ms + _ms(w.start_s), offset_ms + _ms(w.end_s), w.probability)
                for w in segment.words
            ]
            continue
        pieces = [f" {piece}" for piece in segment.text.split()]
        total = sum(len(p) for p in pieces) or 1
        start_s, span_s, done = segment.start_s, segment.end_s - segment.start_s, 0
        for piece in pieces:
            begin_s = start_s + span_s * done / total
            done += len(piece)
            words.append(
                TimedWord(piece, offset_ms + _ms(begin_s), offset_ms + _ms(start_s + span_s * done / total))
            )
    return words


def _word_pb(word: TimedWord) -> stt_pb2.Word:
    return stt_pb2.Word(
        start_ms=word.start_ms, end_ms=word.end_ms, word=word.word, probability=word.probability
    )


def _commit_pb(commit: Commit) -> stt_pb2.Segment:
    words = commit.words
    return stt_pb2.Segment(
        start_ms=words[0].start_ms if words else commit.end_ms,
        end_ms=commit.end_ms,
        text=commit.text,
        words=[_word_pb(w) for w in words],
    )


class _Stream:
    """One StreamingRecognize call's state: its config, PCM decoder and :class:`StreamRecognizer`.

    Raises:
        InvalidArgument: A bad format, language, task or commit policy in the config.
    """

    def __init__(self, engine: SttBackend, config: SttConfig, streaming: stt_pb2.StreamingRecognitionConfig):
        self.request_id = streaming.request_id
        recognition = streaming.config
        base = engine.options(
            language=recognition.language,
            translate=recognition.task == stt_pb2.TRANSLATE,
            beam_size=recognition.beam_size,
            word_timestamps=engine.word_timestamps,
            hotwords=recognition.hotwords,
            vad_filter=False,
        )
        self.final_options = base
        self.agreement_options = dataclasses.replace(
            base, beam_size=config.interim_beam_size, temperature_fallback=False
        )
        fmt = streaming.format
        self.pcm = PcmStream(
            fmt.encoding, fmt.sample_rate_hz, fmt.channels, target_rate_hz=engine.sample_rate_hz
        )
        policy = {
            stt_pb2.COMMIT_POLICY_UNSPECIFIED: config.commit_policy,
            stt_pb2.LOCAL_AGREEMENT: Policy.LOCAL_AGREEMENT,
            stt_pb2.UTTERANCE: Policy.UTTERANCE,
        }[streaming.commit_policy]
        params = StreamingParams(
            policy=policy,
            min_chunk_s=config.min_chunk_s,
            buffer_trim_s=config.buffer_trim_s,
            context_s=config.context_s,
            interim_results=streaming.interim_results,
        )
        self.recognizer = StreamRecognizer(params, recognition.initial_prompt, base.language)
        if not streaming.caller_endpointing:
            self.recognizer.start_whole_stream()
        self.pending: list[Update] = []

    def boundary(self, message: stt_pb2.SpeechBoundary) -> list[Update]:
        kind = _BOUNDARIES.get(message.kind)
        if kind is None:
            raise InvalidArgument("boundary.kind must be START, PAUSE or END")
        return self.recognizer.boundary(kind, message.at_ms)

    def end(self) -> list[Update]:
        tail = self.pcm.flush()
        if len(tail):
            self.recognizer.add_audio(tail)
        return self.recognizer.finish()

    def response(self, update: Update) -> stt_pb2.StreamingRecognizeResponse:
        """The update as one response: one result per commit it holds (a commit never spans two clauses)."""
        segments = [_commit_pb(c) for c in update.all_commits if c.words]  # final updates only

        def result(commit: Commit | None) -> stt_pb2.StreamingRecognitionResult:
            item = stt_pb2.StreamingRecognitionResult(
                transcript=update.transcript,
                is_final=update.is_final,
                stability=update.stability,
                utterance_index=update.utterance_index,
                start_ms=update.start_ms,
                end_ms=update.end_ms,
                language=update.language,
                segments=segments,
            )
            if commit is not None:
                item.committed.CopyFrom(_commit_pb(commit))
                item.closes_clause, item.commit_index = commit.closes_clause, commit.commit_index
            return item

        results = [result(c) for c in update.commits] or [result(None)]
        return stt_pb2.StreamingRecognizeResponse(
            request_id=self.request_id, results=results, audio_processed_s=self.pcm.duration_s
        )


_BOUNDARIES = {
    stt_pb2.SpeechBoundary.START: BoundaryKind.START,
    stt_pb2.SpeechBoundary.PAUSE: BoundaryKind.PAUSE,
    stt_pb2.SpeechBoundary.END: BoundaryKind.END,
}
