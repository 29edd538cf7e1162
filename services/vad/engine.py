"""Silero VAD v6 on onnxruntime: frame probabilities, segmentation, and per-stream endpointing.

The model is the ONNX export shipped in faster-whisper's assets. It is fed 512-sample windows of 16 kHz
audio, each preceded by the previous window's last 64 samples (zeros before the first), as rows of a
``(seq_len, 576)`` float32 tensor; its LSTM state ``h``/``c`` (each ``(1, 1, 128)``) carries over between
calls. Axis 0 is time, not batch, and the state's batch axis is fixed at 1: one call serves one stream's
run of frames, so frames of several streams cannot be stacked into one call with this export.

Segmentation follows faster-whisper's ``get_speech_timestamps`` exactly (threshold / ``threshold - 0.15``
hysteresis, minimum speech, minimum silence, split of over-long speech, padding), but runs incrementally in
:class:`Segmenter`: faster-whisper's function calls its own cached single-thread session on a whole clip,
so it can neither share our session nor serve a live stream. ``Detect`` and ``StreamDetect`` both run
:class:`Segmenter`, so a clip streamed in chunks gives the segments it gives whole.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from services.common.audio import SAMPLE_RATE_HZ
from services.common.errors import InvalidArgument

logger = logging.getLogger(__name__)

WINDOW_SAMPLES = 512
CONTEXT_SAMPLES = 64
STATE_SHAPE = (1, 1, 128)
_SAMPLES_PER_MS = SAMPLE_RATE_HZ // 1000
# faster-whisper: a split of over-long speech happens only at a silence longer than 98 ms.
_MIN_SILENCE_AT_MAX_SPEECH_SAMPLES = SAMPLE_RATE_HZ * 98 / 1000
# Frames per ONNX call in Detect: bounds the input tensor (4096 x 576 floats, 9 MiB) on long clips.
_FRAMES_PER_CALL = 4096

MAX_MIN_SPEECH_MS = 60_000
MAX_MIN_SILENCE_MS = 60_000
MAX_SPEECH_PAD_MS = 2_000
MAX_MAX_SPEECH_S = 3_600.0


@dataclasses.dataclass(frozen=True)
class VadParams:
    """Detection parameters, in the units of ``parley.vad.v1.VadParameters``.

    Attributes:
        threshold: Speech probability threshold in [0, 1]; speech ends below ``max(threshold - 0.15, 0.01)``.
        min_speech_ms: Segments not longer than this are dropped, in ms.
        min_silence_ms: Silence that ends a segment, in ms.
        speech_pad_ms: Padding on each side of a segment, in ms (halved between two close segments).
        max_speech_s: Longer speech is split, at a silence over 98 ms when there is one, in seconds.
        pause_ms: Silence inside a kept segment that emits a :class:`SpeechPause` (streaming), in ms; 0 for
            none. It does not change segmentation.
    """

    threshold: float = 0.5
    min_speech_ms: int = 250
    min_silence_ms: int = 500
    speech_pad_ms: int = 30
    max_speech_s: float = 30.0
    pause_ms: int = 0

    def validate(self) -> VadParams:
        """Returns ``self`` when every value is in range.

        Raises:
            InvalidArgument: A value out of range, naming the field and its allowed range.
        """
        if not (math.isfinite(self.threshold) and 0.0 <= self.threshold <= 1.0):
            raise InvalidArgument(f"parameters.threshold {self.threshold} is outside [0, 1]")
        if not 0 <= self.min_speech_ms <= MAX_MIN_SPEECH_MS:
            raise InvalidArgument(
                f"parameters.min_speech_ms {self.min_speech_ms} is outside [0, {MAX_MIN_SPEECH_MS}]"
            )
        if not 0 <= self.min_silence_ms <= MAX_MIN_SILENCE_MS:
            raise InvalidArgument(
                f"parameters.min_silence_ms {self.min_silence_ms} is outside [0, {MAX_MIN_SILENCE_MS}]"
            )
        if not 0 <= self.pause_ms <= MAX_MIN_SILENCE_MS:
            raise InvalidArgument(f"parameters.pause_ms {self.pause_ms} is outside [0, {MAX_MIN_SILENCE_MS}]")
        if not 0 <= self.speech_pad_ms <= MAX_SPEECH_PAD_MS:
            raise InvalidArgument(
                f"parameters.speech_pad_ms {self.speech_pad_ms} is outside [0, {MAX_SPEECH_PAD_MS}]"
            )
        if not (math.isfinite(self.max_speech_s) and 0.0 < self.max_speech_s <= MAX_MAX_SPEECH_S):
            raise InvalidArgument(
                f"parameters.max_speech_s {self.max_speech_s} is outside (0, {MAX_MAX_SPEECH_S:.0f}]"
            )
        if self.max_speech_s * 1000 < 2 * self.speech_pad_ms + 2 * WINDOW_SAMPLES / _SAMPLES_PER_MS:
            raise InvalidArgument(
                f"parameters.max_speech_s {self.max_speech_s} is too short for speech_pad_ms "
                f"{self.speech_pad_ms}: it must be at least 2 * speech_pad_ms + 64 ms"
            )
        return self


@dataclasses.dataclass(frozen=True)
class Segment:
    """One span of speech, padding included.

    Attributes:
        start_sample: First sample, at 16 kHz from the start of the audio.
        end_sample: One past the last sample, at 16 kHz.
        confidence: Mean speech probability of the frames of the unpadded span, in [0, 1].
    """

    start_sample: int
    end_sample: int
    confidence: float

    @property
    def start_ms(self) -> int:
        """Start, in ms from the start of the audio."""
        return round(self.start_sample / _SAMPLES_PER_MS)

    @property
    def end_ms(self) -> int:
        """End, in ms from the start of the audio."""
        return round(self.end_sample / _SAMPLES_PER_MS)


@dataclasses.dataclass(frozen=True)
class SpeechStart:
    """Speech has begun (the segment is long enough to be kept); ``start_sample`` includes padding."""

    start_sample: int

    @property
    def start_ms(self) -> int:
        """Start, in ms from the start of the audio."""
        return round(self.start_sample / _SAMPLES_PER_MS)


@dataclasses.dataclass(frozen=True)
class SpeechEnd:
    """Speech has ended: the whole segment, final."""

    segment: Segment


@dataclasses.dataclass(frozen=True)
class SpeechPause:
    """Speech stopped ``pause_ms`` ago inside a kept segment that has not ended (it may resume).

    Attributes:
        start_sample: Start of the segment in progress, padding included (as its :class:`SpeechStart`).
        end_sample: End of the speech before the silence plus the padding, at 16 kHz.
    """

    start_sample: int
    end_sample: int

    @property
    def start_ms(self) -> int:
        """Start of the segment, in ms from the start of the audio."""
        return round(self.start_sample / _SAMPLES_PER_MS)

    @property
    def end_ms(self) -> int:
        """End of the speech before the pause, in ms from the start of the audio."""
        return round(self.end_sample / _SAMPLES_PER_MS)


Event = SpeechStart | SpeechPause | SpeechEnd


@dataclasses.dataclass
class _Raw:
    """A kept segment before padding, in samples."""

    start: int
    end: int
    confidence: float
    padded_start: int


class Segmenter:
    """faster-whisper's ``get_speech_timestamps`` post-processing, fed one frame probability at a time.

    Each frame is 512 samples at 16 kHz. Events come out as soon as they are certain: ``SpeechStart`` once
    the segment in progress can no longer be dropped as too short, ``SpeechPause`` once a started segment
    has been silent for ``pause_ms`` (at most once per silence), ``SpeechEnd`` once its padded end cannot
    change (its end padding depends on where the next kept segment starts). After :meth:`finish`, the
    ``SpeechEnd`` segments are exactly those ``get_speech_timestamps`` returns on the same probabilities.

    Args:
        params: Validated detection parameters.
    """

    def __init__(self, params: VadParams):
        self._threshold = params.threshold
        self._neg_threshold = max(params.threshold - 0.15, 0.01)
        self._min_speech = SAMPLE_RATE_HZ * params.min_speech_ms / 1000
        self._min_silence = SAMPLE_RATE_HZ * params.min_silence_ms / 1000
        self._pad = SAMPLE_RATE_HZ * params.speech_pad_ms // 1000
        self._max_speech = SAMPLE_RATE_HZ * params.max_speech_s - WINDOW_SAMPLES - 2 * self._pad
        self._pause = SAMPLE_RATE_HZ * params.pause_ms / 1000
        self._paused = False  # SpeechPause sent for the current silence
        self._frame = 0
        self._triggered = False
        self._start = 0
        self._temp_end = 0
        self._prev_end = 0
        self._next_start = 0
        self._started = False  # SpeechStart sent for the segment in progress
        self._pending: _Raw | None = None  # last kept segment, its padded end not yet final
        self._last_end: int | None = None  # raw end of the last kept segment
        self._probs: list[float] = []
        self._probs_base = 0  # frame index of self._probs[0]

    @property
    def frames(self) -> int:
        """Frames consumed so far."""
        return self._frame

    def push(self, probs: Sequence[float] | np.ndarray) -> list[Event]:
        """Consumes frame probabilities in time order; returns the events they decide."""
        events: list[Event] = []
        for prob in probs:
            self._step(float(prob), events)
        return events

    def finish(self, total_samples: int) -> list[Event]:
        """Ends the audio after ``total_samples`` samples (16 kHz); returns the last events."""
        events: list[Event] = []
        if self._triggered and total_samples - self._start > self._min_speech:
            self._append(self._start, total_samples, events)
        self._triggered = False
        if self._pending is not None:
            raw = self._pending
            self._emit_end(raw, min(total_samples, raw.end + self._pad), events)
        return events

    def _step(self, prob: float, events: list[Event]) -> None:
        i = self._frame
        pos = WINDOW_SAMPLES * i
        self._frame += 1
        self._probs.append(prob)
        self._step_rules(prob, pos, events)
        self._check_pause(pos, events)
        if self._triggered and not self._started:
            candidate_end = self._temp_end or pos
            if candidate_end - self._start > self._min_speech:
                self._confirm(events)
        if self._pending is not None:
            # No kept segment can start before this (pos, not pos + 512: end + pad stays inside the audio).
            earliest_start = self._start if self._triggered else pos
            if earliest_start - self._pending.end >= 2 * self._pad:
                raw = self._pending
                self._emit_end(raw, raw.end + self._pad, events)
        keep_from = self._start // WINDOW_SAMPLES if self._triggered else self._frame
        if keep_from > self._probs_base:
            del self._probs[: keep_from - self._probs_base]
            self._probs_base = keep_from

    def _check_pause(self, pos: int, events: list[Event]) -> None:
        if not (self._triggered and self._temp_end):
            self._paused = False  # speech goes on (or no segment): the next silence may pause again
            return
        if self._pause and self._started and not self._paused and pos - self._temp_end >= self._pause:
            self._paused = True
            events.append(SpeechPause(self._padded_start(self._start), self._temp_end + self._pad))

    def _step_rules(self, prob: float, pos: int, events: list[Event]) -> None:
        # A line-by-line port of the loop body of faster_whisper.vad.get_speech_timestamps.
        if prob >= self._threshold and self._temp_end:
            self._temp_end = 0
            if self._next_start < self._prev_end:
                self._next_start = pos
        if prob >= self._threshold and not self._triggered:
            self._triggered = True
            self._started = False
            self._start = pos
            return
        if self._triggered and pos - self._start > self._max_speech:
            if self._prev_end:
                self._append(self._start, self._prev_end, events)
                if self._next_start < self._prev_end:
                    self._triggered = False
                else:
                    self._start = self._next_start
                    self._started = False
                self._prev_end = self._next_start = self._temp_end = 0
            else:
                self._append(self._start, pos, events)
                self._prev_end = self._next_start = self._temp_end = 0
                self._triggered = False
                return
        if prob < self._neg_threshold and self._triggered:
            if not self._temp_end:
                self._temp_end = pos
            if pos - self._temp_end > _MIN_SILENCE_AT_MAX_SPEECH_SAMPLES:
                self._prev_end = self._temp_end
            if pos - self._temp_end < self._min_silence:
                return
            if self._temp_end - self._start > self._min_speech:
                self._append(self._start, self._temp_end, events)
            self._prev_end = self._next_start = self._temp_end = 0
            self._triggered = False

    def _confidence(self, start: int, end: int) -> float:
        first = start // WINDOW_SAMPLES - self._probs_base
        last = -(-end // WINDOW_SAMPLES) - self._probs_base
        window = self._probs[max(first, 0) : max(last, first + 1)]
        return float(np.mean(window)) if window else 0.0

    def _padded_start(self, start: int) -> int:
        if self._last_end is None:
            return max(0, start - self._pad)
        gap = start - self._last_end
        return max(0, start - (gap // 2 if gap < 2 * self._pad else self._pad))

    def _confirm(self, events: list[Event]) -> None:
        """The segment in progress will be kept: its start and the previous segment's end are final."""
        start = self._start
        if self._pending is not None:
            raw = self._pending
            gap = start - raw.end
            self._emit_end(raw, raw.end + gap // 2 if gap < 2 * self._pad else raw.end + self._pad, events)
        self._started = True
        events.append(SpeechStart(self._padded_start(start)))

    def _append(self, start: int, end: int, events: list[Event]) -> None:
        if not self._started:
            self._confirm(events)
        self._pending = _Raw(start, end, self._confidence(start, end), self._padded_start(start))
        self._last_end = end
        self._started = False

    def _emit_end(self, raw: _Raw, padded_end: int, events: list[Event]) -> None:
        events.append(SpeechEnd(Segment(raw.padded_start, padded_end, raw.confidence)))
        self._pending = None


@dataclasses.dataclass
class ModelState:
    """Silero's recurrent state for one stream: LSTM ``h`` and ``c``, each float32 ``(1, 1, 128)``."""

    h: np.ndarray
    c: np.ndarray

    @classmethod
    def initial(cls) -> ModelState:
        """The state before the first frame."""
        return cls(np.zeros(STATE_SHAPE, dtype=np.float32), np.zeros(STATE_SHAPE, dtype=np.float32))


def frame_windows(samples: np.ndarray, context: np.ndarray) -> np.ndarray:
    """Builds the model's input rows from whole windows of audio.

    Args:
        samples: float32 16 kHz mono, shape ``(n * 512,)``.
        context: The 64 samples before ``samples`` (zeros at the start of the audio), shape ``(64,)``.

    Returns:
        float32 ``(n, 576)``: each row is the 64 samples before a window, then the window.
    """
    windows = samples.reshape(-1, WINDOW_SAMPLES)
    contexts = np.empty((len(windows), CONTEXT_SAMPLES), dtype=np.float32)
    if len(windows):
        contexts[0] = context
        contexts[1:] = windows[:-1, -CONTEXT_SAMPLES:]
    return np.concatenate([contexts, windows], axis=1)


def clip_windows(audio: np.ndarray, frames_per_call: int = _FRAMES_PER_CALL) -> list[np.ndarray]:
    """A whole clip's model input, cut into consecutive calls of at most ``frames_per_call`` frames.

    Run them in order, each with the state the previous one returned (as :meth:`SileroVad.probabilities`
    does); the probabilities do not depend on where the cuts fall.

    Args:
        audio: float32 in [-1, 1], shape ``(n_samples,)``, 16 kHz mono; a last partial frame is
            zero-padded.
        frames_per_call: Most frames per call, at least 1.

    Returns:
        float32 arrays ``(n, 576)``, n <= frames_per_call; empty for empty audio.
    """
    n_frames = -(-len(audio) // WINDOW_SAMPLES)
    padded = np.zeros(n_frames * WINDOW_SAMPLES, dtype=np.float32)
    padded[: len(audio)] = audio
    windows = frame_windows(padded, np.zeros(CONTEXT_SAMPLES, dtype=np.float32))
    step = max(1, frames_per_call)
    return [windows[first : first + step] for first in range(0, n_frames, step)]


def segments_of(probs: np.ndarray, n_samples: int, params: VadParams) -> list[Segment]:
    """Speech segments of a whole clip from its frame probabilities.

    Args:
        probs: float32 ``(ceil(n_samples / 512),)``, from :meth:`SileroVad.probabilities`.
        n_samples: Length of the clip, in samples at 16 kHz.
        params: Validated detection parameters.

    Returns:
        Segments in time order, not overlapping, within ``[0, n_samples]``.
    """
    segmenter = Segmenter(params)
    events = segmenter.push(probs)
    events += segmenter.finish(n_samples)
    return [e.segment for e in events if isinstance(e, SpeechEnd)]


class SileroVad:
    """Silero VAD v6 in one onnxruntime session, shared by every call and stream.

    ``InferenceSession.run`` is safe to call from several threads at once, so a server passes
    :meth:`infer_batch` to a :class:`~services.common.batching.DynamicBatcher` once per instance thread.

    Args:
        model_path: The Silero VAD v6 ONNX file.
        intra_op_threads: onnxruntime intra-op threads per call.

    Raises:
        FileNotFoundError: ``model_path`` does not exist.
    """

    def __init__(self, model_path: str | Path, intra_op_threads: int = 1):
        import onnxruntime

        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"Silero VAD model not found: {path}")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = max(1, intra_op_threads)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self._session = onnxruntime.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        logger.info("loaded Silero VAD from %s (%d intra-op threads)", path, options.intra_op_num_threads)

    def infer(self, windows: np.ndarray, state: ModelState) -> tuple[np.ndarray, ModelState]:
        """Speech probabilities of consecutive frames of one stream.

        Args:
            windows: float32 ``(n, 576)`` from :func:`frame_windows`, n >= 1.
            state: The stream's state before the first of these frames (not modified).

        Returns:
            Probabilities in [0, 1], float32 ``(n,)``, and the state after the last frame.
        """
        probs, h, c = self._session.run(None, {"input": windows, "h": state.h, "c": state.c})
        return np.asarray(probs, dtype=np.float32).reshape(-1), ModelState(h, c)

    def infer_batch(
        self, items: Sequence[tuple[np.ndarray, ModelState]]
    ) -> list[tuple[np.ndarray, ModelState]]:
        """:meth:`infer` over several streams' ``(windows, state)`` pairs, one result per pair, in order.

        This is the entry point a dynamic batcher calls. The v6 export fixes the state's batch axis at 1
        (axis 0 of ``input`` is time), so the streams run one after another within the call.
        """
        return [self.infer(windows, state) for windows, state in items]

    def probabilities(self, audio: np.ndarray) -> np.ndarray:
        """Speech probability of every 512-sample frame of a whole clip.

        Args:
            audio: float32 in [-1, 1], shape ``(n_samples,)``, 16 kHz mono. A last partial frame is
                zero-padded.

        Returns:
            float32 ``(ceil(n_samples / 512),)``.
        """
        state = ModelState.initial()
        out = []
        for windows in clip_windows(audio):
            probs, state = self.infer(windows, state)
            out.append(probs)
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def detect(self, audio: np.ndarray, params: VadParams) -> list[Segment]:
        """Speech segments of a whole clip.

        Args:
            audio: float32 in [-1, 1], shape ``(n_samples,)``, 16 kHz mono.
            params: Validated detection parameters.

        Returns:
            Segments in time order, not overlapping, within ``[0, n_samples]``.
        """
        return segments_of(self.probabilities(audio), len(audio), params)

    def warmup(self) -> None:
        """Runs one second of silence through the model, so the first request pays no start-up cost."""
        self.probabilities(np.zeros(SAMPLE_RATE_HZ, dtype=np.float32))

    def close(self) -> None:
        """Releases the session."""
        self._session = None


class StreamEndpointer:
    """Per-stream state of StreamDetect: pending samples, context, model state and segmenter.

    Usage per chunk: ``windows = ep.add(samples)``; when not ``None``, run
    ``probs, state = vad.infer(windows, ep.state)`` (off the event loop), then ``events = ep.accept(probs,
    state)``. At the end of the stream, the same with :meth:`flush`, then :meth:`finish`.

    Args:
        params: Validated detection parameters.
    """

    def __init__(self, params: VadParams):
        self.state = ModelState.initial()
        self._segmenter = Segmenter(params)
        self._pending = np.zeros(0, dtype=np.float32)
        self._context = np.zeros(CONTEXT_SAMPLES, dtype=np.float32)
        self.samples_received = 0

    def add(self, samples: np.ndarray) -> np.ndarray | None:
        """Buffers float32 16 kHz mono samples; returns the model input for the whole windows, if any.

        Returns:
            float32 ``(n, 576)``, or ``None`` when less than one window is buffered.
        """
        self.samples_received += len(samples)
        buffered = np.concatenate([self._pending, samples]) if len(self._pending) else samples
        whole = len(buffered) - len(buffered) % WINDOW_SAMPLES
        self._pending = np.array(buffered[whole:], dtype=np.float32)
        if not whole:
            return None
        ready = np.asarray(buffered[:whole], dtype=np.float32)
        windows = frame_windows(ready, self._context)
        self._context = ready[-CONTEXT_SAMPLES:].copy()
        return windows

    def flush(self) -> np.ndarray | None:
        """Ends the audio: returns the model input for the last partial window (zero-padded), if any."""
        if not len(self._pending):
            return None
        last = np.zeros(WINDOW_SAMPLES, dtype=np.float32)
        last[: len(self._pending)] = self._pending
        self._pending = np.zeros(0, dtype=np.float32)
        return frame_windows(last, self._context)

    def accept(self, probs: np.ndarray, state: ModelState) -> list[Event]:
        """Takes the model's output for the windows last returned; returns the events they decide."""
        self.state = state
        return self._segmenter.push(probs)

    def finish(self) -> list[Event]:
        """After :meth:`flush` was run: returns the last events (the open segment ends with the audio)."""
        return self._segmenter.finish(self.samples_received)
