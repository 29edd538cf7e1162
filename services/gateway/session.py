"""One TranslateSpeech stream: endpointing, then STT, translation and TTS per utterance, pipelined.

Data flow (every queue bounded)::

    client audio -> decode to 16 kHz -> ring buffer (max_buffer_s)
                                     -> VAD StreamDetect --SpeechEnded--> cut utterance from the buffer
    utterance -> [stt queue] -> STT worker -> [mt queue] -> translation + TTS worker
    every utterance's events -> its own event queue -> sender, utterance by utterance

Ordering guarantee: the response stream is sorted by utterance index. Every event of utterance n
(speech_started, interim transcripts, final transcript, translation, audio chunks, timings, errors) is sent
before any event of utterance n+1; within an utterance the order is the one above. Work is still pipelined:
the STT worker transcribes utterance n+1 while the other worker translates and speaks utterance n; only the
sending waits, so n+1's speech_started may reach the client after n's last audio chunk.

Backpressure, not loss: at most ``max_pending_utterances`` utterances are detected but not yet fully
sent; when that many are waiting, endpointing stops consuming VAD events. Audio intake then stops too,
before the ring buffer would overwrite audio an utterance may still be cut from
(:meth:`StreamSession._hold_from`: the open utterance's start, or the VAD's consumed position less a
look-back), so the reader stops taking
requests and gRPC flow control slows the client, whatever speed it sends at. An utterance whose audio is
gone anyway (a defect) ends in a DATA_LOSS error event naming the span, never in silence.
"""

from __future__ import annotations

import asyncio
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
from services.common.audio import PcmStream, float_to_pcm16
from services.common.errors import DeadlineExceeded, InvalidArgument
from services.common.resilience import BreakerOpen, BreakerState, Deadline, error_code
from services.common.telemetry import tracer
from services.common.text import primary_language
from services.gateway.config import GatewayConfig
from services.gateway.downstream import Downstream

logger = logging.getLogger(__name__)

RATE_HZ = 16000
SAMPLES_PER_MS = RATE_HZ // 1000
# How far before the VAD position it reported an utterance may still start: a speech start is confirmed
# after min_speech_ms and padded by speech_pad_ms (VAD defaults 250 + 30 ms); 2 s leaves room for any
# configured values.
VAD_LOOKBACK_SAMPLES = 2 * RATE_HZ

STAGE_LATENCY = Histogram(
    "parley_gateway_stage_duration_seconds",
    "Time of each downstream stage call for one utterance, in seconds (tts: to its last chunk).",
    ["stage"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30),
)
END_TO_FIRST_AUDIO = Histogram(
    "parley_gateway_end_of_speech_to_first_audio_seconds",
    "VAD end of speech to the first synthesized audio byte, in seconds.",
    buckets=(0.1, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 2, 3, 5, 10),
)
QUEUE_DEPTH = Gauge(
    "parley_gateway_queue_depth", "Utterances waiting, over all streams, by queue.", ["queue"]
)
UTTERANCE_ERRORS = Counter(
    "parley_gateway_utterance_errors",
    "Utterance error events sent, by stage and status code.",
    ["stage", "code"],
)

_DONE = object()


class AudioBuffer:
    """Ring buffer of the stream's most recent audio, float32 16 kHz mono, addressed by absolute sample index.

    Args:
        capacity_samples: Samples kept; older audio is overwritten.
    """

    def __init__(self, capacity_samples: int):
        self.capacity = max(1, capacity_samples)
        self._data = np.zeros(self.capacity, dtype=np.float32)
        self.end = 0

    def push(self, samples: np.ndarray) -> None:
        """Appends samples (float32, shape ``(n,)``)."""
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
            return np.zeros(0, dtype=np.float32)
        idx = np.arange(start, stop) % self.capacity
        return self._data[idx]


@dataclass
class Utterance:
    """One utterance's state while it moves through the pipeline."""

    index: int
    start_ms: int
    end_ms: int = 0
    audio: np.ndarray | None = None
    ended_at_s: float | None = None
    text: str = ""
    language: str = ""
    translation: str | None = None
    final_sent: bool = False
    events: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    timings: gateway_pb2.UtteranceTimings = field(default_factory=gateway_pb2.UtteranceTimings)
    span: Any = None
    interim: asyncio.Task[None] | None = None
    last_interim: str = ""
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


def _word_stability(previous: str, current: str) -> float:
    """Share of the current interim's words already present, in place, in the previous one, in [0, 1]."""
    old, new = previous.split(), current.split()
    if not new:
        return 0.0
    same = 0
    for a, b in zip(old, new, strict=False):
        if a != b:
            break
        same += 1
    return same / len(new)


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
        self.pcm = PcmStream(fmt.encoding, fmt.sample_rate_hz, fmt.channels, target_rate_hz=RATE_HZ)
        self.mode = plan_mode(request, settings.direct_to_english)
        self.target = request.target_language
        self.buffer = AudioBuffer(int(settings.max_buffer_s * RATE_HZ))
        pending = max(1, settings.max_pending_utterances)
        self._slots = asyncio.Semaphore(pending)
        self._vad_in: asyncio.Queue[np.ndarray | None] = asyncio.Queue(maxsize=64)
        self._stt_q: asyncio.Queue[Utterance | None] = asyncio.Queue(maxsize=pending)
        self._mt_q: asyncio.Queue[Utterance | None] = asyncio.Queue(maxsize=pending)
        self._order: asyncio.Queue[Utterance | None] = asyncio.Queue()
        self._failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._utterances = 0
        self._current: Utterance | None = None
        self._vad_pos = 0  # absolute samples the consumed VAD responses account for
        self._open: dict[int, Utterance] = {}  # started, last event not yet queued
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
        tasks = self._tasks = [
            asyncio.create_task(self._guarded(coro))
            for coro in (self._read(requests), self._endpoint(), self._stt_worker(), self._mt_worker())
        ]
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
            if self._current is not None and self._current.interim is not None:
                self._current.interim.cancel()

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
        """Sends the utterance's error event, counted, logged and marked on its span."""
        UTTERANCE_ERRORS.labels(stage, code.name).inc()
        logger.warning("utterance %d: %s failed: %s %s", utterance.index, stage, code.name, message)
        if utterance.span is not None:
            utterance.span.set_attribute(f"error.{stage}", code.name)
        self._emit(
            utterance, error=gateway_pb2.UtteranceError(stage=stage, code=code.value[0], message=message)
        )

    # -- audio intake and endpointing -----------------------------------------------------------------

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
        """Buffers and endpoints samples, waiting first while they would overwrite audio still needed."""
        piece = max(1, self.buffer.capacity // 8)
        for start in range(0, len(samples), piece):
            chunk = samples[start : start + piece]
            while self.buffer.end + len(chunk) - self._hold_from() > self.buffer.capacity:
                self._room.clear()
                await self._room.wait()
            self.buffer.push(chunk)
            await self._vad_in.put(chunk)

    def _hold_from(self) -> int:
        """Absolute index of the first sample an utterance may still be cut from.

        The open utterance's start, else the consumed VAD position less :data:`VAD_LOOKBACK_SAMPLES`; never
        earlier than the longest utterance (``max_utterance_s``) before that position, since
        :meth:`_end_utterance` keeps only an utterance's last ``max_utterance_s``. So intake can always run
        ``max_buffer_s - max_utterance_s - 2 s`` ahead of the VAD, and the VAD can always end an utterance.
        """
        hold = self._vad_pos - VAD_LOOKBACK_SAMPLES
        if self._current is not None:
            hold = min(hold, self._current.start_ms * SAMPLES_PER_MS)
        return max(
            0, hold, self._vad_pos - int(self.settings.max_utterance_s * RATE_HZ) - VAD_LOOKBACK_SAMPLES
        )

    def _vad_reached(self, samples: int) -> None:
        """Records that VAD results up to absolute sample ``samples`` are consumed; wakes a waiting intake."""
        if samples > self._vad_pos:
            self._vad_pos = samples
            self._room.set()

    async def _start_utterance(self, start_ms: int) -> Utterance:
        await self._slots.acquire()
        utterance = Utterance(index=self._utterances, start_ms=start_ms)
        self._utterances += 1
        self._open[utterance.index] = utterance
        self._order.put_nowait(utterance)
        self._emit(utterance, speech_started=gateway_pb2.SpeechStarted(start_ms=start_ms))
        if self.request.interim_results:
            utterance.interim = asyncio.create_task(self._guarded(self._interim(utterance)))
        return utterance

    async def _end_utterance(self, utterance: Utterance, start_ms: int, end_ms: int) -> None:
        if utterance.interim is not None:
            utterance.interim.cancel()
        max_samples = int(self.settings.max_utterance_s * RATE_HZ)
        start, stop = start_ms * SAMPLES_PER_MS, end_ms * SAMPLES_PER_MS
        utterance.audio = self.buffer.slice(max(start, stop - max_samples), stop)
        utterance.start_ms, utterance.end_ms = start_ms, end_ms
        utterance.ended_at_s = self.clock.monotonic()
        self._room.set()
        utterance.span = self._tracer.start_span(
            "gateway.utterance",
            context=self._context,
            attributes={
                "utterance.index": utterance.index,
                "audio.duration_s": len(utterance.audio) / RATE_HZ,
                "audio.start_s": start_ms / 1000,
            },
        )
        QUEUE_DEPTH.labels("stt").inc()
        await self._stt_q.put(utterance)

    async def _vad_requests(self, state: dict[str, Any]) -> AsyncIterator[vad_pb2.StreamDetectRequest]:
        params = vad_pb2.VadParameters()
        if self.settings.vad_min_silence_ms is not None:
            params.min_silence_ms = self.settings.vad_min_silence_ms
        yield vad_pb2.StreamDetectRequest(
            config=vad_pb2.StreamDetectConfig(
                request_id=self.request.request_id,
                format=audio_pb2.AudioFormat(
                    encoding=audio_pb2.PCM_S16LE, sample_rate_hz=RATE_HZ, channels=1
                ),
                parameters=params,
            )
        )
        while (samples := await self._vad_in.get()) is not None:
            state["sent"] += len(samples)
            yield vad_pb2.StreamDetectRequest(audio=float_to_pcm16(samples))
        state["eof"] = True

    async def _endpoint(self) -> None:
        """Runs VAD StreamDetect; reconnects (from the current position) when the VAD stage fails."""
        guard = self.down.guards["vad"]
        state: dict[str, Any] = {"sent": 0, "eof": False}
        while not state["eof"]:
            offset_ms = state["sent"] // SAMPLES_PER_MS
            try:
                timeout_s = self.deadline.timeout_for(None, guard.margin_s)
                guard.breaker.acquire()
            except BreakerOpen as exc:
                await self._vad_failed(exc, state)
                continue
            started_s = self.clock.monotonic()
            call = self.down.vad.StreamDetect(self._vad_requests(state), timeout=timeout_s)
            try:
                healthy = False
                async for response in call:
                    if not healthy:
                        # The stream works: close the breaker now, not when this long call ends, so a
                        # half-open probe does not block other streams' VAD calls for a whole stream.
                        healthy = True
                        guard.record(None, timeout_s, started_s)
                        self._vad_down = False
                    await self._on_vad(response, offset_ms)
                    self._vad_reached((offset_ms + response.audio_processed_ms) * SAMPLES_PER_MS)
                if not healthy:
                    guard.record(None, timeout_s, started_s)
                self._vad_down = False
            except asyncio.CancelledError:
                guard.breaker.release()
                call.cancel()
                raise
            except grpc.aio.AioRpcError as exc:
                guard.record(exc, timeout_s, started_s)
                if exc.code() is grpc.StatusCode.INVALID_ARGUMENT:
                    raise InvalidArgument(f"VAD rejected the audio: {exc.details()}") from exc
                await self._vad_failed(exc, state)
        if self._current is not None:
            utterance, self._current = self._current, None
            await self._end_utterance(utterance, utterance.start_ms, state["sent"] // SAMPLES_PER_MS)
        await self._stt_q.put(None)

    async def _vad_failed(self, exc: BaseException, state: dict[str, Any]) -> None:
        """Handles a VAD failure: reports it once per outage and closes the utterance in progress.

        Then drops audio from endpointing until the breaker lets a new VAD stream be tried.
        """
        if not self._vad_down:
            self._vad_down = True
            utterance = self._current or await self._start_utterance(state["sent"] // SAMPLES_PER_MS)
            self._error(utterance, "vad", exc)
            self._current = None
            await self._end_utterance(utterance, utterance.start_ms, state["sent"] // SAMPLES_PER_MS)
        # Audio that arrives while the VAD is down stays in the buffer but is not endpointed.
        breaker = self.down.guards["vad"].breaker
        while True:
            samples = await self._vad_in.get()
            if samples is None:
                state["eof"] = True
                return
            state["sent"] += len(samples)
            self._vad_reached(state["sent"])
            if breaker.state is not BreakerState.OPEN:
                return

    async def _on_vad(self, response: vad_pb2.StreamDetectResponse, offset_ms: int) -> None:
        kind = response.WhichOneof("event")
        if kind == "speech_started":
            if self._current is None:
                self._current = await self._start_utterance(offset_ms + response.speech_started.start_ms)
        elif kind == "speech_ended":
            segment = response.speech_ended.segment
            utterance = self._current or await self._start_utterance(offset_ms + segment.start_ms)
            self._current = None
            await self._end_utterance(utterance, offset_ms + segment.start_ms, offset_ms + segment.end_ms)

    # -- interim transcripts --------------------------------------------------------------------------

    async def _interim(self, utterance: Utterance) -> None:
        """Sends interim transcripts of the utterance in progress.

        Every ``interim_interval_s``, a greedy decode of the audio so far, only while this stream has no
        utterance waiting for STT, so it never delays a final transcript.
        """
        interval_s = max(0.2, self.settings.interim_interval_s)
        while True:
            await asyncio.sleep(interval_s)
            if not self._stt_q.empty() or self.down.guards["stt"].breaker.state is not BreakerState.CLOSED:
                continue
            audio = self.buffer.slice(utterance.start_ms * SAMPLES_PER_MS, self.buffer.end)
            if len(audio) < RATE_HZ // 2:
                continue
            request = self._stt_request(audio, stt_pb2.TRANSCRIBE, beam_size=1)
            try:
                response = await self.down.transcribe(request, self.deadline)
            except Exception:  # noqa: BLE001 - an interim is best effort; the final transcript reports errors
                logger.debug("utterance %d: interim transcript failed", utterance.index, exc_info=True)
                continue
            text = response.text.strip()
            if text and not utterance.final_sent:
                stability = _word_stability(utterance.last_interim, text)
                utterance.last_interim = text
                self._emit(
                    utterance,
                    transcript=gateway_pb2.Transcript(
                        text=text,
                        is_final=False,
                        stability=stability,
                        start_ms=utterance.start_ms,
                        end_ms=self.buffer.end // SAMPLES_PER_MS,
                        language=response.language,
                    ),
                )

    # -- speech-to-text -------------------------------------------------------------------------------

    def _stt_request(
        self, audio: np.ndarray, task: stt_pb2.Task, beam_size: int = 0
    ) -> stt_pb2.TranscribeRequest:
        return stt_pb2.TranscribeRequest(
            request_id=self.request.request_id,
            audio=float_to_pcm16(audio),
            format=audio_pb2.AudioFormat(encoding=audio_pb2.PCM_S16LE, sample_rate_hz=RATE_HZ, channels=1),
            config=stt_pb2.RecognitionConfig(
                language=self.request.source_language, task=task, beam_size=beam_size
            ),
        )

    async def _stt_worker(self) -> None:
        while (utterance := await self._stt_q.get()) is not None:
            QUEUE_DEPTH.labels("stt").dec()
            if utterance.audio is not None and len(utterance.audio):
                await self._transcribe(utterance)
            elif utterance.end_ms > utterance.start_ms:  # (an empty span is a VAD outage's, reported)
                self._report(
                    utterance,
                    "gateway",
                    grpc.StatusCode.DATA_LOSS,
                    f"audio {utterance.start_ms}-{utterance.end_ms} ms was no longer buffered",
                )
            QUEUE_DEPTH.labels("translate").inc()
            await self._mt_q.put(utterance)
        await self._mt_q.put(None)

    async def _stage_call(self, utterance: Utterance, stage: str, coro: Any, **attributes: Any) -> Any:
        """Awaits one stage call inside a span; records its latency."""
        parent = trace.set_span_in_context(utterance.span) if utterance.span is not None else self._context
        started_s = self.clock.monotonic()
        with self._tracer.start_as_current_span(f"gateway.{stage}", context=parent, attributes=attributes):
            try:
                return await coro
            finally:
                STAGE_LATENCY.labels(stage).observe(self.clock.monotonic() - started_s)

    async def _transcribe(self, utterance: Utterance) -> None:
        assert utterance.audio is not None
        direct = self.mode == gateway_pb2.DIRECT
        calls = [self.down.transcribe(self._stt_request(utterance.audio, stt_pb2.TRANSCRIBE), self.deadline)]
        if direct:
            calls.append(
                self.down.transcribe(self._stt_request(utterance.audio, stt_pb2.TRANSLATE), self.deadline)
            )
        started_s = self.clock.monotonic()
        results = await self._stage_call(
            utterance,
            "stt",
            asyncio.gather(*calls, return_exceptions=True),
            **{"audio.duration_s": len(utterance.audio) / RATE_HZ, "stt.direct": direct},
        )
        utterance.timings.stt_ms = (self.clock.monotonic() - started_s) * 1000
        transcript = results[0]
        if isinstance(transcript, BaseException):
            self._error(utterance, "stt", transcript)
            return
        utterance.text = transcript.text.strip()
        utterance.language = transcript.language or primary_language(self.request.source_language)
        utterance.final_sent = True
        utterance.timings.end_of_speech_to_transcript_ms = self._since_end_ms(utterance)
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
        if direct:
            translated = results[1]
            if isinstance(translated, BaseException):
                self._error(utterance, "stt", translated)
                return
            utterance.translation = translated.text.strip()
            utterance.timings.translation_ms = 0.0
            self._emit_translation(utterance)

    def _since_end_ms(self, utterance: Utterance) -> float:
        assert utterance.ended_at_s is not None
        return (self.clock.monotonic() - utterance.ended_at_s) * 1000

    def _emit_translation(self, utterance: Utterance) -> None:
        utterance.timings.end_of_speech_to_translation_ms = self._since_end_ms(utterance)
        self._emit(
            utterance,
            translation=gateway_pb2.Translation(
                text=utterance.translation or "",
                source_language=utterance.language,
                target_language=self.target,
            ),
        )

    # -- translation and speech -----------------------------------------------------------------------

    async def _mt_worker(self) -> None:
        while (utterance := await self._mt_q.get()) is not None:
            QUEUE_DEPTH.labels("translate").dec()
            try:
                await self._translate_and_speak(utterance)
            finally:
                if utterance.ended_at_s is not None and utterance.final_sent:
                    self._emit(utterance, timings=utterance.timings)
                if utterance.span is not None:
                    utterance.span.end()
                self._close(utterance)
        await self._order.put(None)

    async def _translate_and_speak(self, utterance: Utterance) -> None:
        if not utterance.text or not self.target:
            return
        if utterance.translation is None:
            if primary_language(utterance.language) == primary_language(self.target):
                utterance.translation = utterance.text
            else:
                started_s = self.clock.monotonic()
                request = translate_pb2.TranslateRequest(
                    request_id=self.request.request_id,
                    texts=[utterance.text],
                    source_language=utterance.language,
                    target_language=self.target,
                )
                try:
                    response = await self._stage_call(
                        utterance,
                        "translate",
                        self.down.translate(request, self.deadline),
                        **{"text.chars": len(utterance.text)},
                    )
                except Exception as exc:  # noqa: BLE001 - reported as the utterance's error event
                    self._error(utterance, "translate", exc)
                    return
                finally:
                    utterance.timings.translation_ms = (self.clock.monotonic() - started_s) * 1000
                utterance.translation = response.translations[0].strip() if response.translations else ""
            self._emit_translation(utterance)
        if self.request.synthesize_speech and utterance.translation:
            await self._speak(utterance, utterance.translation)

    async def _speak(self, utterance: Utterance, text: str) -> None:
        request = tts_pb2.SynthesizeRequest(
            request_id=self.request.request_id,
            text=text,
            language=self.target,
            voice=self.request.voice,
            sample_rate_hz=self.request.output_sample_rate_hz,
        )
        started_s = self.clock.monotonic()

        async def stream() -> None:
            async for chunk in self.down.synthesize_stream(request, self.deadline):
                if not utterance.timings.tts_first_audio_ms and chunk.audio:
                    utterance.timings.tts_first_audio_ms = (self.clock.monotonic() - started_s) * 1000
                    utterance.timings.end_of_speech_to_first_audio_ms = self._since_end_ms(utterance)
                    END_TO_FIRST_AUDIO.observe(utterance.timings.end_of_speech_to_first_audio_ms / 1000)
                self._emit(
                    utterance,
                    audio=gateway_pb2.SynthesizedAudio(
                        audio=chunk.audio,
                        format=chunk.format,
                        sentence_index=chunk.sentence_index,
                        is_last=chunk.is_last,
                    ),
                )

        try:
            await self._stage_call(utterance, "tts", stream(), **{"text.chars": len(text)})
        except Exception as exc:  # noqa: BLE001 - reported as the utterance's error event
            self._error(utterance, "tts", exc)
        finally:
            utterance.timings.tts_ms = (self.clock.monotonic() - started_s) * 1000
