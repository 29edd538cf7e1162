"""One TranslateSpeech stream: endpointing, incremental recognition, then translation and speech by clause.

Data flow (every queue bounded)::

    client audio -> decode to 16 kHz -> ring buffer (max_buffer_s) -> VAD StreamDetect
    VAD responses -> audio up to the VAD's position, then its boundary (START / PAUSE / END)
                  -> STT StreamingRecognize (caller endpointing, LocalAgreement-2)
    STT commits -> clauses (a commit that closes one: punctuation, a pause, the end)
    clause -> translation worker (Translate with the utterance's earlier clauses as context, or Whisper's
              translate task on the clause's audio in DIRECT mode) -> speech worker (TTS SynthesizeStream)
    every utterance's events -> its own event queue -> sender, utterance by utterance

Who decides what: the VAD server owns endpointing (where utterances start, pause and end); the STT server
owns recognition (what is committed, when, and the stability of the rest); the gateway only forwards audio
and boundaries in stream order and turns commits into clauses, translations and speech.

The gateway forwards audio to STT only once the VAD has seen it (the VAD reports its position at least every
200 ms), so each boundary reaches STT right after the audio it refers to.

Ordering guarantee: the response stream is sorted by utterance index: every event of utterance n comes
before any event of utterance n+1. Within an utterance: speech_started; then interim transcripts and
commits in time order, each clause's translation, then its audio chunks and its clause_timings (clause k
before clause k+1); the final transcript after the utterance's last commit; timings last. A long
utterance is translated and spoken while the speaker still talks.

Backpressure, not loss: at most ``max_pending_utterances`` utterances are started but not yet fully sent;
when that many are waiting, endpointing stops consuming VAD events, and when STT falls behind its request
queue fills, which stops endpointing too. Audio intake then stops before the ring buffer would overwrite
audio still needed (:meth:`StreamSession._hold_from`), so the reader stops taking requests and gRPC flow
control slows the client, whatever speed it sends at. Every speech_started ends in a final transcript or an
error event.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from opentelemetry import context as otel_context
from opentelemetry import trace
from prometheus_client import Counter, Gauge, Histogram

from parley.audio.v1 import audio_pb2
from parley.gateway.v1 import gateway_pb2
from parley.stt.v1 import stt_pb2
from parley.translate.v1 import translate_pb2
from parley.tts.v1 import tts_pb2
from parley.vad.v1 import vad_pb2
from services.common.audio import SAMPLE_RATE_HZ, PcmStream, float_to_pcm16
from services.common.deadlines import Deadline
from services.common.errors import DataLoss, DeadlineExceeded, InvalidArgument
from services.common.resilience import BreakerOpen, BreakerState, error_code
from services.common.telemetry import tracer
from services.common.text import primary_language
from services.gateway.config import CommitPolicy, GatewayConfig
from services.gateway.downstream import Downstream

logger = logging.getLogger(__name__)

SAMPLES_PER_MS = SAMPLE_RATE_HZ // 1000
# How far before the VAD position it reported an utterance may still start: a speech start is confirmed
# after min_speech_ms and padded by speech_pad_ms (VAD defaults 250 + 30 ms); 2 s leaves room for any
# configured values.
VAD_LOOKBACK_SAMPLES = 2 * SAMPLE_RATE_HZ
# Clauses (source and translation) given to the translation stage as the context of the next one.
CONTEXT_CLAUSES = 3
# Whisper's word end times may run past the VAD's end of speech: a pause or end this much before a clause's
# last word end still ends that clause (fleurs-fr-003's last clause was measured from its commit without it).
WORD_END_SLACK_MS = 500
# Clauses queued together that one Translate request may carry.
MAX_CLAUSES_PER_REQUEST = 8
# Messages (audio chunks and boundaries) waiting for the STT stream; when full, endpointing waits.
STT_QUEUE_MESSAGES = 64

STAGE_LATENCY = Histogram(
    "parley_gateway_stage_duration_seconds",
    "Time of each downstream stage call for one clause, in seconds (tts: to its last chunk).",
    ["stage"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30),
)
END_TO_FIRST_AUDIO = Histogram(
    "parley_gateway_end_of_speech_to_first_audio_seconds",
    "End of a clause's speech (VAD pause or end) to its first synthesized audio byte, in seconds.",
    buckets=(0.1, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 2, 3, 5, 10),
)
QUEUE_DEPTH = Gauge("parley_gateway_queue_depth", "Clauses waiting, over all streams, by queue.", ["queue"])
UTTERANCE_ERRORS = Counter(
    "parley_gateway_utterance_errors",
    "Utterance error events sent, by stage and status code.",
    ["stage", "code"],
)

_DONE = object()
_BOUNDARY = stt_pb2.SpeechBoundary
_SttItem = tuple[stt_pb2.StreamingRecognizeRequest, "Utterance | None", int]


class AudioBuffer:
    """Ring buffer of the stream's most recent audio, PCM_S16LE 16 kHz mono, by absolute sample index.

    Held as VAD and STT take it, so each sample is converted once.

    Args:
        capacity_samples: Samples kept; older audio is overwritten.
    """

    def __init__(self, capacity_samples: int):
        self.capacity = max(1, capacity_samples)
        self._data = np.zeros(self.capacity, dtype="<i2")
        self.end = 0

    def push(self, samples: np.ndarray) -> None:
        """Appends samples (int16, shape ``(n,)``)."""
        n = len(samples)
        if n == 0:
            return
        kept = samples[-self.capacity :]
        pos = (self.end + n - len(kept)) % self.capacity
        first = min(len(kept), self.capacity - pos)
        self._data[pos : pos + first] = kept[:first]
        self._data[: len(kept) - first] = kept[first:]
        self.end += n

    def slice(self, start: int, stop: int) -> np.ndarray:
        """Samples ``[start, stop)`` by absolute index, clipped to what is still held (a copy)."""
        start = max(start, self.end - self.capacity, 0)
        stop = min(stop, self.end)
        if stop <= start:
            return np.zeros(0, dtype="<i2")
        idx = np.arange(start, stop) % self.capacity
        return self._data[idx]


@dataclass
class Clause:
    """One committed clause of an utterance on its way through translation and speech."""

    utterance: Utterance
    index: int
    text: str
    start_ms: int
    end_ms: int
    closed_at_s: float  # when the gateway learnt its speech ended (boundary or commit)
    translation: str = ""
    timings: gateway_pb2.ClauseTimings = field(default_factory=gateway_pb2.ClauseTimings)


@dataclass
class Utterance:
    """One utterance's state while it moves through the pipeline."""

    index: int
    start_ms: int
    end_ms: int = 0
    language: str = ""
    text: str = ""
    final_sent: bool = False
    stt_done: bool = False  # its final transcript or its STT error is queued
    boundaries: list[tuple[int, float]] = field(default_factory=list)  # (PAUSE/END at_ms, received at s)
    open_words: list[stt_pb2.Word] = field(default_factory=list)  # committed, clause not closed yet
    clause_start_ms: int = 0
    clauses: list[Clause] = field(default_factory=list)
    sentences: int = 0  # audio sentence chunks sent
    audio_format: audio_pb2.AudioFormat | None = None  # of the chunks sent
    failed_stages: set[str] = field(default_factory=set)  # stages an error event was sent for
    stt_span: Any = None
    events: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    timings: gateway_pb2.UtteranceTimings = field(default_factory=gateway_pb2.UtteranceTimings)
    span: Any = None
    done: bool = False  # its last event is queued: nothing more is sent for it


def plan_mode(request: gateway_pb2.TranslateSpeechConfig, direct_to_english: bool) -> int:
    """Resolves the translation mode for a stream.

    Returns:
        ``gateway_pb2.DIRECT`` or ``gateway_pb2.CASCADE``.

    Raises:
        InvalidArgument: DIRECT asked for a target other than English.
    """
    target = primary_language(request.target_language)
    if request.mode == gateway_pb2.DIRECT:
        if target != "en":
            raise InvalidArgument(
                f"mode DIRECT translates into English only, not {request.target_language!r}: use CASCADE"
            )
        return gateway_pb2.DIRECT
    if request.mode == gateway_pb2.CASCADE:
        return gateway_pb2.CASCADE
    source = primary_language(request.source_language)
    if direct_to_english and target == "en" and source != "en":
        return gateway_pb2.DIRECT
    return gateway_pb2.CASCADE


def _since_ms(now_s: float, then_s: float) -> float:
    return max(0.0, (now_s - then_s) * 1000)


class StreamSession:
    """Runs one TranslateSpeech stream.

    Args:
        settings: Gateway configuration.
        downstream: Guarded stubs of the stages.
        request: The stream's validated config message.
        deadline: The caller's deadline.
    """

    def __init__(
        self,
        settings: GatewayConfig,
        downstream: Downstream,
        request: gateway_pb2.TranslateSpeechConfig,
        deadline: Deadline,
    ):
        self.settings = settings
        self.down = downstream
        self.request = request
        self.deadline = deadline
        self.clock = downstream.clock
        fmt = request.input_format
        self.pcm = PcmStream(fmt.encoding, fmt.sample_rate_hz, fmt.channels, target_rate_hz=SAMPLE_RATE_HZ)
        self.mode = plan_mode(request, settings.direct_to_english)
        self.target = request.target_language
        self.buffer = AudioBuffer(int(settings.max_buffer_s * SAMPLE_RATE_HZ))
        self._slots = asyncio.Semaphore(max(1, settings.max_pending_utterances))
        self._vad_in: asyncio.Queue[np.ndarray | None] = asyncio.Queue(maxsize=64)  # int16 chunks
        # (message, utterance a START belongs to, stream ms: an audio chunk's start or a boundary's time)
        self._stt_in: asyncio.Queue[_SttItem | None] = asyncio.Queue(maxsize=STT_QUEUE_MESSAGES)
        self._clauses: asyncio.Queue[Clause | Utterance | None] = asyncio.Queue()
        self._speech: asyncio.Queue[Clause | Utterance | None] = asyncio.Queue()
        self._order: asyncio.Queue[Utterance | None] = asyncio.Queue()
        self._failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._utterances = 0
        self._current: Utterance | None = None
        self._vad_pos = 0  # absolute samples the consumed VAD responses account for
        self._stt_sent = 0  # absolute samples forwarded to STT
        self._stt_retry: _SttItem | None = None
        self._held_clauses: dict[int, int] = {}  # DIRECT: id(clause) -> first sample still needed
        self._open: dict[int, Utterance] = {}  # started, last event not yet queued
        self._history: list[tuple[str, str]] = []  # the last clauses translated: (source, translation)
        self._tasks: list[asyncio.Task[None]] = []
        self._ended = asyncio.Event()  # EndOfStream is queued
        self._room = asyncio.Event()  # set whenever the hold point may have moved
        self._vad_down = False
        self._tracer = tracer(__name__)
        self._context = otel_context.get_current()

    # -- the response stream --------------------------------------------------------------------------

    async def run(
        self, requests: AsyncIterator[gateway_pb2.TranslateSpeechRequest]
    ) -> AsyncIterator[gateway_pb2.TranslateSpeechResponse]:
        """Consumes the audio requests (after the config) and yields the responses, EndOfStream last.

        Raises:
            InvalidArgument: A protocol error in the requests (a second config, an empty message).
        """
        workers = (
            self._read(requests),
            self._endpoint(),
            self._recognize(),
            self._translate_worker(),
            self._speech_worker(),
        )
        tasks = self._tasks = [asyncio.create_task(self._guarded(coro)) for coro in workers]
        try:
            while (utterance := await self._next(self._order)) is not None:
                while (event := await self._next(utterance.events)) is not _DONE:
                    yield event
                self._slots.release()
            self._ended.set()
            yield self._response(
                self._utterances,
                end_of_stream=gateway_pb2.EndOfStream(
                    utterances=self._utterances, audio_duration_s=self.pcm.duration_s
                ),
            )
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def drain(self, budget_s: float) -> None:
        """Ends the stream cleanly within ``budget_s`` seconds: the gateway is shutting down.

        Stops reading audio (what the caller sends from now on is not processed; EndOfStream's
        ``audio_duration_s`` says how much was), lets the utterances already detected finish while the
        budget lasts, then sends an UNAVAILABLE error event for each one still unfinished, and EndOfStream.
        """
        if not self._tasks:
            return
        reader = self._tasks[0]
        if not reader.done():
            reader.cancel()
            # End of input for endpointing: the utterance in progress ends where the audio stopped.
            self._tasks.append(asyncio.create_task(self._vad_in.put(None)))
        try:
            await asyncio.wait_for(self._ended.wait(), budget_s)
            return
        except TimeoutError:
            pass
        unfinished = list(self._open.values())
        logger.warning("draining: %d utterances unfinished when the grace ran out", len(unfinished))
        for utterance in unfinished:
            self._report(
                utterance,
                "gateway",
                grpc.StatusCode.UNAVAILABLE,
                "the gateway is shutting down: this utterance was not finished; send it again",
            )
            self._close(utterance)
        for task in self._tasks[1:]:
            task.cancel()
        self._order.put_nowait(None)

    def _close(self, utterance: Utterance) -> None:
        """Queues the utterance's end marker, once: the sender moves on to the next utterance."""
        if not utterance.done:
            utterance.done = True
            utterance.events.put_nowait(_DONE)
            self._open.pop(utterance.index, None)
            if utterance.span is not None:
                utterance.span.end()

    async def _guarded(self, coro: Any) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not self._failed.done():
                self._failed.set_exception(exc)

    async def _next(self, queue: asyncio.Queue[Any]) -> Any:
        """Next item of ``queue``, or the exception that failed the stream."""
        if not queue.empty():
            return queue.get_nowait()
        getter = asyncio.ensure_future(queue.get())
        try:
            await asyncio.wait({getter, self._failed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not getter.done():
                getter.cancel()
        if getter.done() and not getter.cancelled():
            return getter.result()
        raise self._failed.exception()  # type: ignore[misc]

    def _response(self, index: int, **event: Any) -> gateway_pb2.TranslateSpeechResponse:
        return gateway_pb2.TranslateSpeechResponse(
            request_id=self.request.request_id, utterance_index=index, **event
        )

    def _emit(self, utterance: Utterance, **event: Any) -> None:
        if not utterance.done:
            utterance.events.put_nowait(self._response(utterance.index, **event))

    def _error(self, utterance: Utterance, stage: str, exc: BaseException) -> None:
        """Sends the utterance's error event; fails the whole stream when the caller's deadline is spent.

        Raises:
            DeadlineExceeded: The stage ran out of the caller's time (not its own timeout), so no later
                work on this stream can finish either.
        """
        code = error_code(exc)
        remaining_s = self.deadline.remaining_s()
        if code is grpc.StatusCode.DEADLINE_EXCEEDED and remaining_s is not None:
            if remaining_s <= 2 * self.down.guards[stage].margin_s:
                raise DeadlineExceeded(f"the caller's deadline expired during {stage}") from exc
        details = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
        self._report(utterance, stage, code, details or code.name)

    def _report(self, utterance: Utterance, stage: str, code: grpc.StatusCode, message: str) -> None:
        """Sends the utterance's error event, counted, logged and marked on its span.

        One event per stage and utterance: the first failure (its later clauses still try the stage).
        """
        UTTERANCE_ERRORS.labels(stage, code.name).inc()
        logger.warning("utterance %d: %s failed: %s %s", utterance.index, stage, code.name, message)
        if stage in utterance.failed_stages:
            return
        utterance.failed_stages.add(stage)
        if utterance.span is not None:
            utterance.span.set_attribute(f"error.{stage}", code.name)
        self._emit(
            utterance, error=gateway_pb2.UtteranceError(stage=stage, code=code.value[0], message=message)
        )

    # -- audio intake ---------------------------------------------------------------------------------

    async def _read(self, requests: AsyncIterator[gateway_pb2.TranslateSpeechRequest]) -> None:
        async for request in requests:
            kind = request.WhichOneof("request")
            if kind == "config":
                raise InvalidArgument(
                    "a second config message: the config must be the first message, and only it"
                )
            if kind != "audio":
                raise InvalidArgument("empty request: set config (first message) or audio")
            await self._feed(self.pcm.push(request.audio))
        await self._feed(self.pcm.flush())
        await self._vad_in.put(None)

    async def _feed(self, samples: np.ndarray) -> None:
        """Buffers and endpoints float32 samples, waiting while they would overwrite audio still needed."""
        pcm = np.frombuffer(float_to_pcm16(samples), dtype="<i2")
        piece = max(1, self.buffer.capacity // 8)
        for start in range(0, len(pcm), piece):
            chunk = pcm[start : start + piece]
            while self.buffer.end + len(chunk) - self._hold_from() > self.buffer.capacity:
                self._room.clear()
                await self._room.wait()
            self.buffer.push(chunk)
            await self._vad_in.put(chunk)

    def _hold_from(self) -> int:
        """Absolute index of the first sample still needed.

        The earliest of: audio not yet forwarded to STT, the VAD's consumed position less
        :data:`VAD_LOOKBACK_SAMPLES` (an utterance may still start there), and in DIRECT mode the audio of
        clauses still to translate. So intake can always run ``max_buffer_s - 2 s`` ahead of the VAD.
        """
        hold = min(self._stt_sent, self._vad_pos - VAD_LOOKBACK_SAMPLES, *self._held_clauses.values())
        return max(0, hold)

    def _release(self) -> None:
        """Wakes a waiting intake: the hold point may have moved."""
        self._room.set()

    # -- endpointing (VAD) and forwarding to STT -------------------------------------------------------

    async def _vad_requests(self, state: dict[str, Any]) -> AsyncIterator[vad_pb2.StreamDetectRequest]:
        params = vad_pb2.VadParameters()
        if self.settings.vad_min_silence_ms is not None:
            params.min_silence_ms = self.settings.vad_min_silence_ms
        if self.settings.live_commit_policy is CommitPolicy.LOCAL_AGREEMENT:
            params.pause_ms = self.settings.clause_pause_ms
        yield vad_pb2.StreamDetectRequest(
            config=vad_pb2.StreamDetectConfig(
                request_id=self.request.request_id,
                format=audio_pb2.AudioFormat(
                    encoding=audio_pb2.PCM_S16LE, sample_rate_hz=SAMPLE_RATE_HZ, channels=1
                ),
                parameters=params,
            )
        )
        while (samples := await self._vad_in.get()) is not None:
            state["sent"] += len(samples)
            yield vad_pb2.StreamDetectRequest(audio=samples.tobytes())
        state["eof"] = True

    async def _endpoint(self) -> None:
        """Runs VAD StreamDetect; reconnects (from the current position) when the VAD stage fails."""
        guard = self.down.guards["vad"]
        state: dict[str, Any] = {"sent": 0, "eof": False}
        while not state["eof"]:
            offset_ms = state["sent"] // SAMPLES_PER_MS
            try:
                # The first response closes a half-open breaker (Guard.stream), not the end of this long call.
                async with guard.stream(
                    lambda timeout_s: self.down.vad.StreamDetect(timeout=timeout_s),
                    self.deadline,
                    stage_timeout_s=0,
                    requests=self._vad_requests(state),
                ) as responses:
                    async for response in responses:
                        self._vad_down = False
                        await self._on_vad(response, offset_ms)
                self._vad_down = False
            except BreakerOpen as exc:
                await self._vad_failed(exc, state)
            except grpc.aio.AioRpcError as exc:
                if exc.code() is grpc.StatusCode.INVALID_ARGUMENT:
                    raise InvalidArgument(f"VAD rejected the audio: {exc.details()}") from exc
                await self._vad_failed(exc, state)
        await self._forward_audio(state["sent"])
        if self._current is not None:
            await self._end_utterance(self._current, state["sent"] // SAMPLES_PER_MS)
        await self._stt_in.put(None)

    async def _vad_failed(self, exc: BaseException, state: dict[str, Any]) -> None:
        """Handles a VAD failure: reports it once per outage and closes the utterance in progress.

        Then drops audio from endpointing until the breaker lets a new VAD stream be tried.
        """
        if not self._vad_down:
            self._vad_down = True
            at_ms = state["sent"] // SAMPLES_PER_MS
            utterance = self._current or await self._start_utterance(at_ms, recognize=False)
            self._error(utterance, "vad", exc)
            if utterance is self._current:
                await self._end_utterance(utterance, at_ms)
            else:
                self._stt_finished(utterance)
        # Audio that arrives while the VAD is down is not endpointed, nor recognized.
        breaker = self.down.guards["vad"].breaker
        while not state["eof"]:  # the failed call may have taken the end of input already
            samples = await self._vad_in.get()
            if samples is None:
                state["eof"] = True
                return
            state["sent"] += len(samples)
            self._stt_sent = state["sent"]
            self._vad_reached(state["sent"])
            if breaker.state is not BreakerState.OPEN:
                return

    async def _on_vad(self, response: vad_pb2.StreamDetectResponse, offset_ms: int) -> None:
        """Forwards the audio the VAD has seen to STT, then the VAD's event as a boundary."""
        await self._forward_audio((offset_ms + response.audio_processed_ms) * SAMPLES_PER_MS)
        kind = response.WhichOneof("event")
        if kind == "speech_started":
            if self._current is None:
                self._current = await self._start_utterance(offset_ms + response.speech_started.start_ms)
        elif kind == "speech_paused" and self._current is not None:
            at_ms = offset_ms + response.speech_paused.end_ms
            self._current.boundaries.append((at_ms, self.clock.monotonic()))
            await self._to_stt(_BOUNDARY.PAUSE, at_ms)
        elif kind == "speech_ended":
            segment = response.speech_ended.segment
            utterance = self._current or await self._start_utterance(offset_ms + segment.start_ms)
            await self._end_utterance(utterance, offset_ms + segment.end_ms)
        self._vad_reached((offset_ms + response.audio_processed_ms) * SAMPLES_PER_MS)

    def _vad_reached(self, samples: int) -> None:
        """Records that VAD results up to absolute sample ``samples`` are consumed; wakes a waiting intake."""
        if samples > self._vad_pos:
            self._vad_pos = samples
            self._release()

    async def _forward_audio(self, until: int) -> None:
        """Sends the buffered audio up to absolute sample ``until`` to STT (what was not sent yet)."""
        if until <= self._stt_sent:
            return
        start = max(self._stt_sent, self.buffer.end - self.buffer.capacity)
        audio = self.buffer.slice(start, until)
        self._stt_sent = until
        self._release()
        if len(audio):
            message = stt_pb2.StreamingRecognizeRequest(audio_content=audio.tobytes())
            await self._stt_in.put((message, None, start // SAMPLES_PER_MS))

    async def _to_stt(
        self, kind: stt_pb2.SpeechBoundary.Kind, at_ms: int, utterance: Utterance | None = None
    ) -> None:
        """Queues a boundary at stream time ``at_ms`` (the STT call's own time is applied when it is sent)."""
        boundary = stt_pb2.SpeechBoundary(kind=kind)
        await self._stt_in.put((stt_pb2.StreamingRecognizeRequest(boundary=boundary), utterance, at_ms))

    async def _start_utterance(self, start_ms: int, recognize: bool = True) -> Utterance:
        """Announces an utterance (speech_started) and, with ``recognize``, starts it on the STT stream."""
        await self._slots.acquire()
        utterance = Utterance(index=self._utterances, start_ms=start_ms, clause_start_ms=start_ms)
        self._utterances += 1
        self._open[utterance.index] = utterance
        self._order.put_nowait(utterance)
        utterance.span = self._tracer.start_span(
            "gateway.utterance",
            context=self._context,
            attributes={"utterance.index": utterance.index, "audio.start_s": start_ms / 1000},
        )
        self._emit(utterance, speech_started=gateway_pb2.SpeechStarted(start_ms=start_ms))
        utterance.stt_span = self._tracer.start_span(
            "gateway.stt", context=trace.set_span_in_context(utterance.span)
        )
        if recognize:
            self._current = utterance
            await self._to_stt(_BOUNDARY.START, start_ms, utterance)
        return utterance

    async def _end_utterance(self, utterance: Utterance, end_ms: int) -> None:
        self._current = None
        utterance.end_ms = max(end_ms, utterance.start_ms)
        utterance.boundaries.append((utterance.end_ms, self.clock.monotonic()))
        await self._to_stt(_BOUNDARY.END, utterance.end_ms)

    # -- recognition (STT StreamingRecognize) ----------------------------------------------------------

    async def _stt_requests(
        self, started: list[Utterance], state: dict[str, Any]
    ) -> AsyncIterator[stt_pb2.StreamingRecognizeRequest]:
        """One STT call's requests: its config, then what endpointing queued, until the input ends."""
        policy = {
            CommitPolicy.LOCAL_AGREEMENT: stt_pb2.LOCAL_AGREEMENT,
            CommitPolicy.UTTERANCE: stt_pb2.UTTERANCE,
        }[self.settings.live_commit_policy]
        yield stt_pb2.StreamingRecognizeRequest(
            streaming_config=stt_pb2.StreamingRecognitionConfig(
                request_id=self.request.request_id,
                format=audio_pb2.AudioFormat(
                    encoding=audio_pb2.PCM_S16LE, sample_rate_hz=SAMPLE_RATE_HZ, channels=1
                ),
                config=stt_pb2.RecognitionConfig(
                    language=self.request.source_language, task=stt_pb2.TRANSCRIBE
                ),
                interim_results=self.request.interim_results,
                commit_policy=policy,
                caller_endpointing=True,
            )
        )
        state["offset_ms"] = None  # stream time of the call's first audio sample, once sent
        while True:
            item, self._stt_retry = self._stt_retry or await self._stt_in.get(), None
            if item is None:
                break
            message, utterance, at_ms = item
            if message.HasField("boundary"):
                if message.boundary.kind == _BOUNDARY.START:
                    if utterance is None or utterance.stt_done:
                        continue
                    started.append(utterance)
                offset_ms = at_ms if state["offset_ms"] is None else state["offset_ms"]
                message.boundary.at_ms = max(0, at_ms - offset_ms)
            elif state["offset_ms"] is None:
                state["offset_ms"] = at_ms
            yield message
        state["eof"] = True

    async def _recognize(self) -> None:
        """Runs STT StreamingRecognize; on a failure, fails the utterances it held and opens a new call."""
        guard = self.down.guards["stt"]
        state: dict[str, Any] = {"eof": False}
        while not state["eof"]:
            started: list[Utterance] = []

            try:
                async with guard.stream(
                    lambda timeout_s: self.down.stt.StreamingRecognize(timeout=timeout_s),
                    self.deadline,
                    stage_timeout_s=0,
                    requests=self._stt_requests(started, state),
                ) as responses:
                    async for response in responses:
                        for result in response.results:
                            self._on_stt(result, started, state["offset_ms"] or 0)
                # Left the stream: its requests are no longer read, so ``started`` is complete.
                self._lost(started, grpc.StatusCode.INTERNAL, "the STT stream ended without a final result")
            except BreakerOpen as exc:
                await self._stt_failed(exc, state)
            except grpc.aio.AioRpcError as exc:
                if exc.code() is grpc.StatusCode.INVALID_ARGUMENT:
                    raise InvalidArgument(f"STT rejected the stream: {exc.details()}") from exc
                for utterance in started:
                    if not utterance.stt_done:
                        self._error(utterance, "stt", exc)
                        self._stt_finished(utterance)
                if not state["eof"]:
                    await self._stt_failed(exc, state)
        await self._clauses.put(None)

    def _lost(self, utterances: list[Utterance], code: grpc.StatusCode, message: str) -> None:
        for utterance in utterances:
            if not utterance.stt_done:
                self._report(utterance, "stt", code, message)
                self._stt_finished(utterance)

    async def _stt_failed(self, exc: BaseException, state: dict[str, Any]) -> None:
        """While STT cannot be called: each utterance that starts gets an STT error; audio is dropped.

        Returns when the breaker lets a new STT call be tried (at the next utterance start), or at the end.
        """
        breaker = self.down.guards["stt"].breaker
        while True:
            item = await self._stt_in.get()
            if item is None:
                state["eof"] = True
                return
            utterance = item[1]
            if utterance is None or utterance.stt_done:
                continue
            if breaker.state is not BreakerState.OPEN:
                self._stt_retry = item  # the START goes first to the new call
                return
            self._error(utterance, "stt", exc)
            self._stt_finished(utterance)

    def _stt_finished(self, utterance: Utterance) -> None:
        """No more recognition results come for the utterance: its clauses are all queued."""
        utterance.stt_done = True
        utterance.stt_span.end()
        self._clauses.put_nowait(utterance)

    def _on_stt(
        self, result: stt_pb2.StreamingRecognitionResult, started: list[Utterance], offset_ms: int
    ) -> None:
        """Handles one STT result of the call that ``started`` the utterances; its times are call times."""
        if result.utterance_index >= len(started):
            return
        utterance = started[result.utterance_index]
        if utterance.stt_done:
            return
        utterance.language = result.language or utterance.language
        if result.HasField("committed"):
            self._on_commit(utterance, result, offset_ms)
        if result.is_final:
            self._on_final(utterance, result)
        elif self.request.interim_results and result.transcript:
            self._emit(
                utterance,
                transcript=gateway_pb2.Transcript(
                    text=result.transcript,
                    is_final=False,
                    stability=result.stability,
                    start_ms=utterance.start_ms,
                    end_ms=offset_ms + result.end_ms,
                    language=result.language,
                ),
            )

    def _on_commit(
        self, utterance: Utterance, result: stt_pb2.StreamingRecognitionResult, offset_ms: int
    ) -> None:
        """Sends the commit; a commit that closes a clause queues the clause for translation."""
        committed = result.committed
        words = [
            gateway_pb2.Word(
                word=w.word,
                start_ms=offset_ms + w.start_ms,
                end_ms=offset_ms + w.end_ms,
                probability=w.probability,
            )
            for w in committed.words
        ]
        clause_index = len(utterance.clauses)
        if words:
            self._emit(
                utterance,
                commit=gateway_pb2.TranscriptCommit(
                    text=committed.text,
                    start_ms=words[0].start_ms,
                    end_ms=words[-1].end_ms,
                    words=words,
                    clause_index=clause_index,
                    closes_clause=result.closes_clause,
                ),
            )
            utterance.open_words += words
        if not result.closes_clause or not utterance.open_words:
            return
        now_s = self.clock.monotonic()
        # The clause's speech ended when the gateway received the first pause or end at or after its end
        # (a final decode often closes it with a full stop, at its last word, before that boundary; Whisper's
        # last word may end after the VAD's end: WORD_END_SLACK_MS); one closed by punctuation while the
        # speaker goes on has no such boundary: its end is known now.
        end_ms = max(offset_ms + committed.end_ms, utterance.open_words[-1].end_ms)
        closed_at_s = next(
            (t for at_ms, t in utterance.boundaries if at_ms >= end_ms - WORD_END_SLACK_MS), now_s
        )
        clause = Clause(
            utterance=utterance,
            index=clause_index,
            text="".join(w.word for w in utterance.open_words).strip(),
            start_ms=utterance.clause_start_ms,
            end_ms=end_ms,
            closed_at_s=min(closed_at_s, now_s),
        )
        clause.timings.clause_index = clause_index
        clause.timings.end_ms = end_ms
        clause.timings.end_of_speech_to_commit_ms = _since_ms(now_s, clause.closed_at_s)
        utterance.clauses.append(clause)
        utterance.open_words = []
        utterance.clause_start_ms = end_ms
        if self.mode == gateway_pb2.DIRECT and self.target:
            self._held_clauses[id(clause)] = clause.start_ms * SAMPLES_PER_MS
        QUEUE_DEPTH.labels("translate").inc()
        self._clauses.put_nowait(clause)

    def _on_final(self, utterance: Utterance, result: stt_pb2.StreamingRecognitionResult) -> None:
        utterance.text = result.transcript.strip()
        utterance.language = result.language or primary_language(self.request.source_language)
        utterance.final_sent = True
        if utterance.clauses:
            last = utterance.clauses[-1]
            utterance.timings.end_of_speech_to_transcript_ms = last.timings.end_of_speech_to_commit_ms
            utterance.timings.stt_ms = last.timings.end_of_speech_to_commit_ms
        self._emit(
            utterance,
            transcript=gateway_pb2.Transcript(
                text=utterance.text,
                is_final=True,
                stability=1.0,
                start_ms=utterance.start_ms,
                end_ms=utterance.end_ms,
                language=utterance.language,
            ),
        )
        self._stt_finished(utterance)

    # -- translation, clause by clause -----------------------------------------------------------------

    async def _stage_call(self, utterance: Utterance, stage: str, coro: Any, **attributes: Any) -> Any:
        """Awaits one stage call inside a span; records its latency."""
        parent = trace.set_span_in_context(utterance.span) if utterance.span is not None else self._context
        started_s = self.clock.monotonic()
        with self._tracer.start_as_current_span(f"gateway.{stage}", context=parent, attributes=attributes):
            try:
                return await coro
            finally:
                STAGE_LATENCY.labels(stage).observe(self.clock.monotonic() - started_s)

    async def _translate_worker(self) -> None:
        """Translates clauses in order; passes them (and each utterance's end marker) to the speech worker.

        Clauses queued together (a final decode often closes two at once: "..., ... .") go to the
        translation stage in one request (:meth:`_batch`), which decodes them as one batch: the last
        clause does not wait for the one before it to be translated first.
        """
        carried: collections.deque[Any] = collections.deque()
        while (item := carried.popleft() if carried else await self._clauses.get()) is not None:
            if not isinstance(item, Clause):
                await self._speech.put(item)
                continue
            clauses = self._batch(item, carried)
            QUEUE_DEPTH.labels("translate").dec(len(clauses))
            try:
                spoken = await self._translate(clauses)
            finally:
                for clause in clauses:
                    self._held_clauses.pop(id(clause), None)
                self._release()
            for clause in spoken:
                await self._speech.put(clause)
        await self._speech.put(None)

    def _batch(self, first: Clause, carried: collections.deque[Any]) -> list[Clause]:
        """``first`` and the clauses queued right behind it that can share its translation request.

        Those are CASCADE clauses of the same source language, at most ``MAX_CLAUSES_PER_REQUEST``; the
        first other item goes to ``carried``, to be handled next.
        """
        clauses = [first]
        if self.mode == gateway_pb2.DIRECT or not self.target:
            return clauses
        while len(clauses) < MAX_CLAUSES_PER_REQUEST and not self._clauses.empty():
            item = self._clauses.get_nowait()
            if not isinstance(item, Clause) or item.utterance.language != first.utterance.language:
                carried.append(item)
                break
            clauses.append(item)
        return clauses

    async def _translate(self, clauses: list[Clause]) -> list[Clause]:
        """Translates clauses of one source language (one stage call) and sends each translation.

        Returns:
            The clauses that go on to speech. A failed call is one error event per utterance.
        """
        utterance = clauses[0].utterance
        if not self.target:
            return []
        started_s = self.clock.monotonic()
        if self.mode == gateway_pb2.DIRECT:
            stage, call = "stt", self._direct_translation(clauses[0])
        elif primary_language(utterance.language) == primary_language(self.target):
            stage, call = "", None
        else:
            stage, call = "translate", self._cascade_translations(clauses)
        try:
            if call is None:
                translations = [clause.text for clause in clauses]
            else:
                chars = sum(len(clause.text) for clause in clauses)
                translations = await self._stage_call(utterance, stage, call, **{"text.chars": chars})
        except Exception as exc:  # noqa: BLE001 - reported as the utterances' error events
            for failed in {id(clause.utterance): clause.utterance for clause in clauses}.values():
                self._error(failed, stage, exc)
            return []
        now_s = self.clock.monotonic()
        for clause, translation in zip(clauses, translations, strict=True):
            clause.translation = translation
            clause.timings.translation_ms = _since_ms(now_s, started_s)
            clause.timings.end_of_speech_to_translation_ms = _since_ms(now_s, clause.closed_at_s)
            timings = clause.utterance.timings
            timings.translation_ms += clause.timings.translation_ms
            timings.end_of_speech_to_translation_ms = clause.timings.end_of_speech_to_translation_ms
            self._emit(
                clause.utterance,
                translation=gateway_pb2.Translation(
                    text=clause.translation,
                    source_language=clause.utterance.language,
                    target_language=self.target,
                    clause_index=clause.index,
                ),
            )
        if not self.request.synthesize_speech:
            return []
        return [clause for clause in clauses if clause.translation]

    async def _cascade_translations(self, clauses: list[Clause]) -> list[str]:
        """One Translate call for clauses of one language, with the stream's earlier clauses as context."""
        context = translate_pb2.TranslationContext(
            source_text=" ".join(source for source, _ in self._history),
            translated_text=" ".join(target for _, target in self._history),
        )
        request = translate_pb2.TranslateRequest(
            request_id=self.request.request_id,
            texts=[clause.text for clause in clauses],
            source_language=clauses[0].utterance.language,
            target_language=self.target,
            context=context,
        )
        response = await self.down.translate(request, self.deadline)
        translations = [text.strip() for text in response.translations]
        if len(translations) != len(clauses):
            raise DataLoss(
                f"the translation stage returned {len(translations)} translations for {len(clauses)} texts"
            )
        done = [(clause.text, text) for clause, text in zip(clauses, translations, strict=True)]
        self._history = [*self._history, *done][-CONTEXT_CLAUSES:]
        return translations

    async def _direct_translation(self, clause: Clause) -> list[str]:
        """Whisper's translate task on the clause's audio (DIRECT mode), after its transcript was committed.

        One decode at a time per clause, after the transcribe decode that committed it: on CPU, running
        both tasks on the same audio at once made the transcript wait for both (issue 12's measurement).

        Raises:
            ParleyError: DATA_LOSS when the clause's audio is no longer buffered (a defect).
        """
        start, stop = clause.start_ms * SAMPLES_PER_MS, clause.end_ms * SAMPLES_PER_MS
        audio = self.buffer.slice(start, stop)
        if len(audio) < stop - start:
            raise DataLoss(f"audio {clause.start_ms}-{clause.end_ms} ms was no longer buffered")
        request = stt_pb2.TranscribeRequest(
            request_id=self.request.request_id,
            audio=audio.tobytes(),
            format=audio_pb2.AudioFormat(
                encoding=audio_pb2.PCM_S16LE, sample_rate_hz=SAMPLE_RATE_HZ, channels=1
            ),
            config=stt_pb2.RecognitionConfig(
                language=clause.utterance.language or self.request.source_language,
                task=stt_pb2.TRANSLATE,
                initial_prompt=" ".join(c.translation for c in clause.utterance.clauses[: clause.index]),
            ),
        )
        response = await self.down.transcribe(request, self.deadline)
        return [response.text.strip()]

    # -- speech, clause by clause ----------------------------------------------------------------------

    async def _speech_worker(self) -> None:
        """Speaks clauses in order; at each utterance's end marker, sends its timings and closes it."""
        while (item := await self._speech.get()) is not None:
            if isinstance(item, Clause):
                await self._speak(item)
                continue
            utterance = item
            if utterance.sentences:
                last = gateway_pb2.SynthesizedAudio(
                    format=utterance.audio_format,
                    is_last=True,
                    sentence_index=utterance.sentences,
                    clause_index=len(utterance.clauses) - 1,
                )
                self._emit(utterance, audio=last)
            if utterance.final_sent:
                utterance.timings.clauses = len([c for c in utterance.clauses if c.translation])
                self._emit(utterance, timings=utterance.timings)
            self._close(utterance)
        await self._order.put(None)

    async def _speak(self, clause: Clause) -> None:
        utterance = clause.utterance
        request = tts_pb2.SynthesizeRequest(
            request_id=self.request.request_id,
            text=clause.translation,
            language=self.target,
            voice=self.request.voice,
            sample_rate_hz=self.request.output_sample_rate_hz,
        )
        started_s = self.clock.monotonic()
        first = True

        async def stream() -> None:
            nonlocal first
            async for chunk in self.down.synthesize_stream(request, self.deadline):
                if first and chunk.audio:
                    first = False
                    now_s = self.clock.monotonic()
                    clause.timings.tts_first_audio_ms = _since_ms(now_s, started_s)
                    clause.timings.end_of_speech_to_first_audio_ms = _since_ms(now_s, clause.closed_at_s)
                    END_TO_FIRST_AUDIO.observe(clause.timings.end_of_speech_to_first_audio_ms / 1000)
                if not chunk.audio:
                    continue
                self._emit(
                    utterance,
                    audio=gateway_pb2.SynthesizedAudio(
                        audio=chunk.audio,
                        format=chunk.format,
                        sentence_index=utterance.sentences,
                        clause_index=clause.index,
                    ),
                )
                utterance.sentences += 1
                utterance.audio_format = chunk.format

        try:
            await self._stage_call(utterance, "tts", stream(), **{"text.chars": len(clause.text)})
        except Exception as exc:  # noqa: BLE001 - reported as the utterance's error event
            self._error(utterance, "tts", exc)
        finally:
            utterance.timings.tts_ms += _since_ms(self.clock.monotonic(), started_s)
        utterance.timings.tts_first_audio_ms = clause.timings.tts_first_audio_ms
        utterance.timings.end_of_speech_to_first_audio_ms = clause.timings.end_of_speech_to_first_audio_ms
        self._emit(utterance, clause_timings=clause.timings)
