"""Subtitles for a whole recording: the gateway's batch path over the VAD, STT and translation servers.

Pipeline (one :class:`FileTranslator` call)::

    16 kHz PCM_S16LE audio -> VAD Detect (windows of vad_window_s) -> speech segments
    segments -> chunks: neighbours merged while the stretch stays under max_chunk_s and no pause inside
                exceeds max_pause_s (one Whisper window each; one encoder pass instead of one per segment)
    chunks -> STT Transcribe(word_timestamps) : the longest first when the language must be detected (its
              language is then given to every other call), the rest sorted by duration and sent
              stt_concurrency at a time (similar durations side by side, so a batching STT server pads little)
    texts  -> Translate, many texts per call (translate_batch_texts / translate_batch_chars); a repetition
              loop in a translation (absent from its source) is cut to one occurrence and reported
    words  -> cues (services.subtitles), timing fixed, quality report

It calls the stages through the gateway's :class:`services.gateway.downstream.Downstream` (the stages'
breakers, deadlines, and channels that retry), so the gateway servicer exposes it in a few lines and the
``parley subtitles`` command can run it in-process too.

Memory: the whole recording is held as 16-bit PCM at 16 kHz (115 MB an hour, half of float32), received
into one growing buffer (no list of parts concatenated at the end, which would double the peak), and refused
as soon as it passes ``max_audio_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
import numpy as np

from parley.audio.v1 import audio_pb2
from parley.gateway.v1 import gateway_pb2
from parley.stt.v1 import stt_pb2
from parley.translate.v1 import translate_pb2
from parley.vad.v1 import vad_pb2
from services import subtitles as subs
from services.common.audio import SAMPLE_RATE_HZ as RATE_HZ
from services.common.audio import PcmStream, float_to_pcm16
from services.common.config import flag
from services.common.deadlines import Deadline
from services.common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ParleyError,
    ResourceExhausted,
    Unavailable,
)
from services.common.text import primary_language
from services.gateway.downstream import Downstream

logger = logging.getLogger(__name__)

R = TypeVar("R")

_PCM16_FORMAT = audio_pb2.AudioFormat(encoding=audio_pb2.PCM_S16LE, sample_rate_hz=RATE_HZ, channels=1)


@dataclass(frozen=True)
class FileJobSettings:
    """Settings of the batch path.

    Attributes:
        max_chunk_s: Longest stretch of audio sent to STT in one call, in seconds (under Whisper's 30 s).
        max_pause_s: A pause longer than this between two speech segments starts a new chunk, in seconds.
        stt_concurrency: STT calls in flight at once.
        translate_batch_texts: Most texts per Translate call.
        translate_batch_chars: Most characters per Translate call.
        vad_window_s: Audio per VAD Detect call, in seconds.
        max_audio_s: Longest recording accepted, in seconds (the gateway's ``--max-file-s``).
        stage_timeout_s: Per-attempt timeout of each stage call, in seconds, instead of the live path's
            (a Translate call carries up to ``translate_batch_chars``); the caller's deadline also applies.
        rules: Subtitle layout rules.
    """

    max_chunk_s: float = 28.0
    max_pause_s: float = 2.0
    stt_concurrency: int = 4
    translate_batch_texts: int = 32
    translate_batch_chars: int = 6000
    vad_window_s: float = 600.0
    max_audio_s: float = 3 * 3600.0
    stage_timeout_s: float = 600.0
    rules: subs.LayoutRules = field(default_factory=subs.LayoutRules)


@dataclass
class Chunk:
    """One stretch of speech sent to STT in one call; times in ms from the start of the audio."""

    index: int
    start_ms: int
    end_ms: int
    text: str = ""
    words: list[subs.Word] = field(default_factory=list)
    segments: list[subs.SegmentScore] = field(default_factory=list)
    dropped: list[subs.SegmentScore] = field(default_factory=list)
    translation: str = ""
    loops: list[str] = field(default_factory=list)

    @property
    def duration_ms(self) -> int:
        """Length, in ms."""
        return self.end_ms - self.start_ms


@dataclass
class FileResult:
    """Everything the batch path produced for one recording."""

    source_language: str
    target_language: str
    audio_duration_s: float
    speech_duration_s: float
    source_cues: list[subs.Cue]
    target_cues: list[subs.Cue]
    source_quality: subs.QualityReport
    target_quality: subs.QualityReport | None
    timings_ms: dict[str, float]
    translation_model: str = ""


Progress = Callable[[str, float], None]


def _pcm_bytes(samples: np.ndarray) -> bytes:
    """int16 samples as PCM_S16LE bytes."""
    return samples.astype("<i2", copy=False).tobytes()


def _too_long(max_audio_s: float) -> InvalidArgument:
    return InvalidArgument(
        f"the recording is longer than the {max_audio_s:.0f} s accepted ({flag('max_file_s')}): split it"
    )


def _stage_error(stage: str, exc: BaseException) -> ParleyError:
    """A stage's RPC failure as the error this call reports (its status code kept where it makes sense)."""
    if isinstance(exc, ParleyError):
        return exc
    if isinstance(exc, grpc.aio.AioRpcError):
        code, details = exc.code(), exc.details() or exc.code().name
        if code is grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidArgument(f"{stage}: {details}")
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceeded(f"{stage}: the deadline expired ({details})")
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            return ResourceExhausted(f"{stage} is overloaded: {details}")
        return Unavailable(f"{stage} failed with {code.name}: {details}")
    return Unavailable(f"{stage} failed: {type(exc).__name__}: {exc}")


@contextlib.contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Puts the time the block took, in ms, in ``timings[key]`` (when it ends without an error)."""
    started = time.perf_counter()
    yield
    timings[key] = (time.perf_counter() - started) * 1000


def make_chunks(segments: Sequence[tuple[int, int]], max_chunk_ms: int, max_pause_ms: int) -> list[Chunk]:
    """Merges speech segments (start_ms, end_ms), in time order, into chunks for STT.

    A segment joins the chunk before it when the pause between them is at most ``max_pause_ms`` and the
    chunk would stay within ``max_chunk_ms``; a segment longer than ``max_chunk_ms`` is cut in equal parts.
    """
    chunks: list[Chunk] = []
    for start, end in segments:
        parts = max(1, -(-(end - start) // max_chunk_ms))
        step = (end - start) / parts
        for k in range(parts):
            s, e = start + round(k * step), start + round((k + 1) * step)
            last = chunks[-1] if chunks else None
            if last is not None and s - last.end_ms <= max_pause_ms and e - last.start_ms <= max_chunk_ms:
                last.end_ms = e
            else:
                chunks.append(Chunk(index=len(chunks), start_ms=s, end_ms=e))
    return chunks


def merge_windows(windows: Sequence[tuple[int, list[tuple[int, int]]]]) -> list[tuple[int, int]]:
    """Joins the VAD segments of consecutive windows (offset_ms, segments relative to the window).

    A segment that ends at its window's end and one that starts at the next window's start are one segment
    cut by the window border; they are merged.
    """
    out: list[tuple[int, int]] = []
    for offset, segments in windows:
        for start, end in segments:
            s, e = offset + start, offset + end
            if out and s <= offset + 100 and out[-1][1] >= offset - 100 and offset > 0:
                out[-1] = (out[-1][0], max(out[-1][1], e))
            else:
                out.append((s, e))
    return out


@dataclass
class _Job:
    """One recording's run: its audio, the caller's request, and the audio processed so far."""

    audio: np.ndarray
    request_id: str
    beam_size: int
    deadline: Deadline
    report: Progress
    done_s: float = 0.0

    @property
    def duration_s(self) -> float:
        """Length of the recording, in seconds."""
        return len(self.audio) / RATE_HZ

    def advance(self, stage: str, seconds: float) -> None:
        """Counts ``seconds`` more audio as processed by ``stage`` and reports the total."""
        self.done_s += seconds
        self.report(stage, self.done_s)


class FileTranslator:
    """Runs the batch path through the gateway's guarded stage calls.

    Args:
        downstream: The stages' calls (:class:`services.gateway.downstream.Downstream`: ``detect``,
            ``transcribe``, ``translate``), each under its stage's breaker and retried by its channel; the
            gateway passes its own, so live streams and file jobs share each stage's breaker.
        settings: Batch-path settings.
    """

    def __init__(self, downstream: Downstream, settings: FileJobSettings | None = None):
        self.down = downstream
        self.settings = settings or FileJobSettings()

    async def _call(self, stage: str, call: Awaitable[R]) -> R:
        """Awaits one stage call; its failure becomes the error this job reports (:func:`_stage_error`)."""
        try:
            return await call
        except Exception as exc:
            raise _stage_error(stage, exc) from exc

    async def _detect(self, job: _Job) -> list[tuple[int, int]]:
        """Speech segments (start_ms, end_ms) of the whole recording, detected in ``vad_window_s`` windows."""
        window = max(1, int(self.settings.vad_window_s * RATE_HZ))
        params = vad_pb2.VadParameters(max_speech_s=self.settings.max_chunk_s)
        windows = []
        for offset in range(0, len(job.audio), window):
            request = vad_pb2.DetectRequest(
                request_id=job.request_id,
                audio=_pcm_bytes(job.audio[offset : offset + window]),
                format=_PCM16_FORMAT,
                parameters=params,
            )
            response = await self._call(
                "vad", self.down.detect(request, job.deadline, stage_timeout_s=self.settings.stage_timeout_s)
            )
            windows.append(
                (offset * 1000 // RATE_HZ, [(int(s.start_ms), int(s.end_ms)) for s in response.segments])
            )
        return merge_windows(windows)

    async def _transcribe(self, job: _Job, chunk: Chunk, language: str) -> str:
        """Transcribes one chunk into its words, segments and text; returns the language STT heard."""
        piece = job.audio[chunk.start_ms * RATE_HZ // 1000 : chunk.end_ms * RATE_HZ // 1000]
        request = stt_pb2.TranscribeRequest(
            request_id=job.request_id,
            audio=_pcm_bytes(piece),
            format=_PCM16_FORMAT,
            config=stt_pb2.RecognitionConfig(
                language=language,
                beam_size=job.beam_size,
                word_timestamps=True,
                vad_filter=False,  # the chunk is speech already: the VAD ran over the whole file
                task=stt_pb2.TRANSCRIBE,
            ),
        )
        response = await self._call(
            "stt", self.down.transcribe(request, job.deadline, stage_timeout_s=self.settings.stage_timeout_s)
        )
        offset = chunk.start_ms
        for segment in response.segments:
            chunk.segments.append(_score(segment, offset))
            if segment.words:
                chunk.words += _join_words(segment.words, offset)
            else:
                chunk.words += subs.words_from_text(
                    segment.text, offset + int(segment.start_ms), offset + int(segment.end_ms)
                )
        chunk.dropped = [_score(s, offset) for s in response.dropped_segments]
        chunk.text = " ".join(w.text for w in chunk.words)
        return str(response.language)

    async def _transcribe_all(self, job: _Job, chunks: Sequence[Chunk], language: str) -> str:
        """Transcribes every chunk; returns the spoken language (BCP-47 primary subtag; "" if no speech).

        Without ``language``, the longest chunk is transcribed first and the language it is heard in is
        given to every other call. The rest go longest first, ``stt_concurrency`` at a time.
        """
        concurrency = max(1, self.settings.stt_concurrency)
        order = sorted(chunks, key=lambda c: c.duration_ms, reverse=True)
        if order and not language:
            language = await self._transcribe(job, order[0], "")
            job.advance("stt", order[0].duration_ms / 1000)
            order = order[1:]
        for at in range(0, len(order), concurrency):
            group = order[at : at + concurrency]
            await asyncio.gather(*(self._transcribe(job, c, language) for c in group))
            job.advance("stt", sum(c.duration_ms for c in group) / 1000)
        return primary_language(language) if language else ""

    def _batches(self, chunks: Sequence[Chunk]) -> list[list[Chunk]]:
        """The chunks with text, in order, in Translate calls of ``translate_batch_texts`` / ``_chars``."""
        batches: list[list[Chunk]] = []
        for chunk in (c for c in chunks if c.text.strip()):
            last = batches[-1] if batches else None
            if (
                last is not None
                and len(last) < self.settings.translate_batch_texts
                and sum(len(c.text) for c in last) + len(chunk.text) <= self.settings.translate_batch_chars
            ):
                last.append(chunk)
            else:
                batches.append([chunk])
        return batches

    async def _translate_all(self, job: _Job, chunks: Sequence[Chunk], source: str, target: str) -> str:
        """Translates the chunks' texts into ``chunk.translation``; returns the translation model's name."""
        model = ""
        for batch in self._batches(chunks):
            request = translate_pb2.TranslateRequest(
                request_id=job.request_id,
                texts=[c.text for c in batch],
                source_language=source,
                target_language=target,
            )
            response = await self._call(
                "translate",
                self.down.translate(request, job.deadline, stage_timeout_s=self.settings.stage_timeout_s),
            )
            if len(response.translations) != len(batch):
                raise Unavailable(
                    f"translate returned {len(response.translations)} translations for {len(batch)} texts"
                )
            for chunk, text in zip(batch, response.translations, strict=True):
                chunk.translation = text.strip()
                # A loop the source does not have is the translation model's: shown once, reported.
                cut, loops = subs.cut_tandem_repeats(chunk.translation)
                if loops and not subs.cut_tandem_repeats(chunk.text)[1]:
                    chunk.translation, chunk.loops = cut, loops
            model = response.model or model
        return model

    def _source_track(
        self, chunks: Sequence[Chunk], language: str, media_end_ms: int
    ) -> tuple[list[subs.Cue], subs.QualityReport]:
        """The cues of what was said, laid out and timed, and their quality report."""
        rules = self.settings.rules
        raw_cues: list[subs.Cue] = []
        for chunk in chunks:
            raw_cues += subs.layout_words(chunk.words, chunk.index, rules)
        cues = subs.fix_timing(raw_cues, rules, media_end_ms)
        quality = subs.quality_report(
            cues,
            language,
            rules=rules,
            segments=[s for c in chunks for s in c.segments],
            dropped=[s for c in chunks for s in c.dropped],
        )
        return cues, quality

    async def _target_track(
        self, job: _Job, chunks: Sequence[Chunk], source_cues: Sequence[subs.Cue], language: str, target: str
    ) -> tuple[list[subs.Cue], subs.QualityReport, str]:
        """The translation's cues (laid out over each chunk's source cues), their report, and the model."""
        rules = self.settings.rules
        cues: list[subs.Cue] = []
        model = ""
        if any(c.text for c in chunks):
            model = await self._translate_all(job, chunks, language, target)
            by_utterance: dict[int, list[subs.Cue]] = {}
            for cue in source_cues:
                by_utterance.setdefault(cue.utterance, []).append(cue)
            raw: list[subs.Cue] = []
            for chunk in chunks:
                raw += subs.layout_translation(chunk.translation, by_utterance.get(chunk.index, []), rules)
            cues = subs.fix_timing(raw, rules, round(job.duration_s * 1000))
        quality = subs.quality_report(
            cues,
            target,
            rules=rules,
            source_texts={c.index: c.text for c in chunks if c.text},
            loops={c.index: c.loops for c in chunks if c.loops},
        )
        job.report("translate", job.duration_s)
        return cues, quality, model

    def _job(
        self,
        audio: np.ndarray,
        request_id: str,
        beam_size: int,
        deadline: Deadline | None,
        progress: Progress | None,
    ) -> _Job:
        """A run of ``audio``, checked: int16 and at most ``max_audio_s`` long.

        Raises:
            TypeError: ``audio`` is not int16.
            InvalidArgument: ``audio`` is longer than ``max_audio_s``.
        """
        if audio.dtype != np.int16:
            raise TypeError(f"audio must be int16 PCM samples, not {audio.dtype}")
        job = _Job(
            audio, request_id, beam_size, deadline or Deadline(None), progress or (lambda stage, s: None)
        )
        if job.duration_s > self.settings.max_audio_s:
            raise _too_long(self.settings.max_audio_s)
        return job

    async def _speech(self, job: _Job) -> list[Chunk]:
        """The recording's speech, as chunks for STT; the silence between them counts as processed."""
        segments = await self._detect(job) if len(job.audio) else []
        chunks = make_chunks(
            segments, int(self.settings.max_chunk_s * 1000), int(self.settings.max_pause_s * 1000)
        )
        job.advance("vad", job.duration_s - sum(c.duration_ms for c in chunks) / 1000)
        return chunks

    async def run(
        self,
        audio: np.ndarray,
        *,
        source_language: str = "",
        target_language: str = "",
        beam_size: int = 0,
        request_id: str = "",
        deadline: Deadline | None = None,
        progress: Progress | None = None,
    ) -> FileResult:
        """Subtitles for one recording: VAD, chunks, STT, the source track, then translation and its track.

        Args:
            audio: int16 PCM samples, shape (n_samples,), 16 kHz mono.
            source_language: Spoken language (BCP-47); empty to detect it (on the longest chunk).
            target_language: Translation target (BCP-47); empty or the spoken language: no translation.
            beam_size: STT beam size; 0 for the server's default.
            request_id: Passed to every stage call.
            deadline: The caller's deadline.
            progress: Called with (stage, audio processed in seconds) as the work advances.

        Returns:
            The cues of both tracks and their quality reports. No speech gives empty tracks.

        Raises:
            InvalidArgument: Audio longer than ``max_audio_s``, or a stage refused the request (bad language).
            Unavailable, ResourceExhausted, DeadlineExceeded: A stage failed or the deadline passed.
            TypeError: ``audio`` is not int16 (float samples would be read as silence).
        """
        job = self._job(audio, request_id, beam_size, deadline, progress)
        timings: dict[str, float] = {}
        with _timed(timings, "total_ms"):
            with _timed(timings, "vad_ms"):
                chunks = await self._speech(job)
            with _timed(timings, "stt_ms"):
                language = await self._transcribe_all(job, chunks, source_language)
            source_cues, source_quality = self._source_track(chunks, language, round(job.duration_s * 1000))
            target = (
                target_language if target_language and primary_language(target_language) != language else ""
            )
            with _timed(timings, "translation_ms"):
                target_cues, target_quality, model = (
                    await self._target_track(job, chunks, source_cues, language, target)
                    if target
                    else ([], None, "")
                )
        return FileResult(
            source_language=language,
            target_language=target,
            audio_duration_s=job.duration_s,
            speech_duration_s=sum(c.duration_ms for c in chunks) / 1000,
            source_cues=source_cues,
            target_cues=target_cues,
            source_quality=source_quality,
            target_quality=target_quality,
            timings_ms=timings,
            translation_model=model,
        )

    async def _receive(
        self, requests: AsyncIterator[gateway_pb2.TranslateFileRequest], fmt: audio_pb2.AudioFormat
    ) -> np.ndarray:
        """The recording the audio messages carry, as int16 samples at 16 kHz, shape (n_samples,).

        Raises:
            InvalidArgument: A second config, an empty message, a bad audio format, or audio longer than
                ``max_audio_s`` (refused as soon as it arrives).
        """
        pcm = PcmStream(fmt.encoding, fmt.sample_rate_hz, fmt.channels, target_rate_hz=RATE_HZ)
        received = bytearray()
        async for message in requests:
            kind = message.WhichOneof("request")
            if kind == "config":
                raise InvalidArgument("a second config message: send the config first, and only once")
            if kind != "audio":
                raise InvalidArgument("empty TranslateFile message: set config (first message) or audio")
            samples = pcm.push(message.audio)
            if pcm.duration_s > self.settings.max_audio_s:
                raise _too_long(self.settings.max_audio_s)
            received += float_to_pcm16(samples)
        received += float_to_pcm16(pcm.flush())
        return np.frombuffer(received, dtype="<i2")  # a view: no second copy of the recording

    async def serve(
        self,
        requests: AsyncIterator[gateway_pb2.TranslateFileRequest],
        deadline: Deadline,
        *,
        check: Callable[[gateway_pb2.TranslateFileConfig], Awaitable[None]] | None = None,
    ) -> AsyncIterator[gateway_pb2.TranslateFileResponse]:
        """The ``TranslateFile`` RPC: reads the config and the audio, yields progress events, then the result.

        Args:
            requests: The call's messages: the config, then audio.
            deadline: The caller's deadline.
            check: Awaited with the config before any audio is read; raises to refuse the call.

        Raises:
            InvalidArgument: No config first, a second config, an empty message, a bad audio format, or audio
                longer than ``max_audio_s``; and the errors of ``check`` and :meth:`run`.
        """
        first = await anext(aiter(requests), None)
        if first is None or first.WhichOneof("request") != "config":
            raise InvalidArgument("the first TranslateFile message must be a TranslateFileConfig; then audio")
        config = first.config
        if check is not None:
            await check(config)
        audio = await self._receive(requests, config.input_format)
        events: asyncio.Queue[gateway_pb2.TranslateFileResponse] = asyncio.Queue()

        def progress(stage: str, done_s: float) -> None:
            events.put_nowait(_progress_event(config.request_id, stage, done_s, len(audio) / RATE_HZ))

        job = asyncio.ensure_future(
            self.run(
                audio,
                source_language=config.source_language,
                target_language=config.target_language,
                beam_size=config.beam_size,
                request_id=config.request_id,
                deadline=deadline,
                progress=progress,
            )
        )
        try:
            while not job.done() or not events.empty():
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, job}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            result = job.result()
        finally:
            job.cancel()
        yield gateway_pb2.TranslateFileResponse(request_id=config.request_id, result=result_to_proto(result))


def _progress_event(
    request_id: str, stage: str, done_s: float, duration_s: float
) -> gateway_pb2.TranslateFileResponse:
    """A ``TranslateFile`` progress message: ``done_s`` of ``duration_s`` seconds of audio processed."""
    return gateway_pb2.TranslateFileResponse(
        request_id=request_id,
        progress=gateway_pb2.TranslateFileProgress(
            stage=stage, audio_processed_s=done_s, audio_duration_s=duration_s
        ),
    )


def _join_words(words: Sequence[stt_pb2.Word], offset_ms: int) -> list[subs.Word]:
    """Whisper's words as display words, times in ms from the start of the audio.

    A piece decoded without a leading space ("'accident" after " l") belongs to the word before it.
    """
    out: list[subs.Word] = []
    for w in words:
        text = w.word.strip()
        if not text:
            continue
        word = subs.Word(offset_ms + int(w.start_ms), offset_ms + int(w.end_ms), text, float(w.probability))
        if out and not w.word[:1].isspace():
            last = out[-1]
            out[-1] = subs.Word(
                last.start_ms, word.end_ms, last.text + text, min(last.probability, word.probability)
            )
        else:
            out.append(word)
    return out


def _score(segment: stt_pb2.Segment, offset_ms: int) -> subs.SegmentScore:
    return subs.SegmentScore(
        start_ms=offset_ms + int(segment.start_ms),
        end_ms=offset_ms + int(segment.end_ms),
        text=segment.text.strip(),
        avg_logprob=float(segment.avg_logprob),
        no_speech_prob=float(segment.no_speech_prob),
        compression_ratio=float(segment.compression_ratio),
    )


# -- proto conversion -------------------------------------------------------------------------------------


def _cue_pb(cue: subs.Cue, report: subs.CueReport) -> gateway_pb2.SubtitleCue:
    return gateway_pb2.SubtitleCue(
        start_ms=cue.start_ms,
        end_ms=cue.end_ms,
        lines=cue.lines,
        utterance_index=cue.utterance,
        quality=gateway_pb2.CueQuality(
            chars_per_second=report.cps if report.cps != float("inf") else 0.0,
            max_line_chars=report.max_line_chars,
            violations=report.violations,
            repeated_ngrams=report.repeated,
            avg_logprob=report.avg_logprob or 0.0,
            no_speech_prob=report.no_speech_prob or 0.0,
            min_word_probability=report.min_word_probability or 0.0,
            low_confidence=report.low_confidence,
            length_ratio=report.length_ratio or 0.0,
        ),
    )


def _track_pb(report: subs.QualityReport | None) -> gateway_pb2.TrackQuality | None:
    if report is None:
        return None
    return gateway_pb2.TrackQuality(
        language=report.language,
        violations=report.violation_counts,
        repetition_cues=report.repetition_cues,
        low_confidence_cues=report.low_confidence_cues,
        dropped_segments=[
            gateway_pb2.FilteredSegment(
                start_ms=s.start_ms,
                end_ms=s.end_ms,
                text=s.text,
                avg_logprob=s.avg_logprob,
                no_speech_prob=s.no_speech_prob,
                compression_ratio=s.compression_ratio,
            )
            for s in report.dropped_segments
        ],
        length_ratio=report.length_ratio or 0.0,
        length_ratio_outliers=report.length_ratio_outliers,
        max_chars_per_second=report.max_cps,
    )


def result_to_proto(result: FileResult) -> gateway_pb2.TranslateFileResult:
    """The wire form of a :class:`FileResult`."""
    target_reports = result.target_quality.cues if result.target_quality is not None else []
    return gateway_pb2.TranslateFileResult(
        source_language=result.source_language,
        target_language=result.target_language,
        audio_duration_s=result.audio_duration_s,
        speech_duration_s=result.speech_duration_s,
        source_cues=[
            _cue_pb(c, r) for c, r in zip(result.source_cues, result.source_quality.cues, strict=True)
        ],
        target_cues=[_cue_pb(c, r) for c, r in zip(result.target_cues, target_reports, strict=True)],
        source_quality=_track_pb(result.source_quality),
        target_quality=_track_pb(result.target_quality),
        timings=gateway_pb2.FileTimings(**result.timings_ms),
        translation_model=result.translation_model,
    )


def cues_from_proto(cues: Sequence[gateway_pb2.SubtitleCue]) -> list[subs.Cue]:
    """Cues of a :class:`gateway_pb2.TranslateFileResult` track, for the SRT and WebVTT writers."""
    return [subs.Cue(int(c.start_ms), int(c.end_ms), list(c.lines), int(c.utterance_index)) for c in cues]


def report_from_proto(
    track: gateway_pb2.TrackQuality, cues: Sequence[gateway_pb2.SubtitleCue]
) -> subs.QualityReport:
    """A :class:`subs.QualityReport` rebuilt from its wire form (for the terminal table and the JSON)."""
    reports = [
        subs.CueReport(
            index=i,
            start_ms=int(c.start_ms),
            end_ms=int(c.end_ms),
            text=" ".join(c.lines),
            lines=len(c.lines),
            max_line_chars=c.quality.max_line_chars,
            cps=c.quality.chars_per_second,
            violations=list(c.quality.violations),
            repeated=list(c.quality.repeated_ngrams),
            avg_logprob=c.quality.avg_logprob,
            no_speech_prob=c.quality.no_speech_prob,
            min_word_probability=c.quality.min_word_probability,
            low_confidence=c.quality.low_confidence,
            length_ratio=c.quality.length_ratio or None,
        )
        for i, c in enumerate(cues, start=1)
    ]
    counts = dict.fromkeys(subs.VIOLATIONS, 0)
    counts.update({k: int(v) for k, v in track.violations.items()})
    return subs.QualityReport(
        language=track.language,
        cues=reports,
        violation_counts=counts,
        repetition_cues=track.repetition_cues,
        low_confidence_cues=track.low_confidence_cues,
        dropped_segments=[
            subs.SegmentScore(
                int(s.start_ms), int(s.end_ms), s.text, s.avg_logprob, s.no_speech_prob, s.compression_ratio
            )
            for s in track.dropped_segments
        ],
        length_ratio=track.length_ratio or None,
        length_ratio_outliers=track.length_ratio_outliers,
        max_cps=track.max_chars_per_second,
    )
