"""Streaming endpointing: Silero VAD run incrementally, and utterances cut from its speech probabilities.

:class:`StreamingSilero` gives exactly the probabilities faster-whisper's ``SileroVADModel`` gives on the
whole recording (same 512-sample windows, same 64-sample context, LSTM state carried between calls), but
chunk by chunk. :class:`UtteranceTracker` turns them into utterances with the hysteresis of
faster-whisper's ``get_speech_timestamps`` (speech starts at ``threshold``, ends below
``threshold - 0.15``), plus an endpoint silence, padding and a maximum length.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.common.audio import SAMPLE_RATE_HZ

WINDOW_SAMPLES = 512  # Silero VAD's window at 16 kHz: 32 ms
_CONTEXT_SAMPLES = 64


class SileroSession:
    """The Silero VAD v6 ONNX model, shared by every stream (onnxruntime sessions are thread-safe).

    Args:
        path: ``silero_vad_v6.onnx`` (``services.common.models.silero_vad_path()``).
    """

    def __init__(self, path: str | Path):
        import onnxruntime

        opts = onnxruntime.SessionOptions()
        opts.inter_op_num_threads = 1
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 4
        self._session = onnxruntime.InferenceSession(
            str(path), providers=["CPUExecutionProvider"], sess_options=opts
        )

    def stream(self) -> StreamingSilero:
        """A new per-stream VAD state."""
        return StreamingSilero(self._session)


class StreamingSilero:
    """Speech probabilities of a 16 kHz stream, one per 512-sample (32 ms) window, computed incrementally.

    Not thread-safe: one per stream, called from one thread at a time.
    """

    def __init__(self, session):
        self._session = session
        self._h = np.zeros((1, 1, 128), dtype=np.float32)
        self._c = np.zeros((1, 1, 128), dtype=np.float32)
        self._context = np.zeros(_CONTEXT_SAMPLES, dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.float32)

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        """Feeds float32 samples in [-1, 1], shape (n,), 16 kHz; returns one probability per new window."""
        data = np.concatenate([self._pending, samples.astype(np.float32, copy=False)])
        whole = len(data) - len(data) % WINDOW_SAMPLES
        self._pending = data[whole:]
        if not whole:
            return np.zeros(0, dtype=np.float32)
        windows = data[:whole].reshape(-1, WINDOW_SAMPLES)
        context = np.concatenate([self._context[None, :], windows[:-1, -_CONTEXT_SAMPLES:]], axis=0)
        probs, self._h, self._c = self._session.run(
            None, {"input": np.concatenate([context, windows], axis=1), "h": self._h, "c": self._c}
        )
        self._context = windows[-1, -_CONTEXT_SAMPLES:].copy()
        return np.asarray(probs, dtype=np.float32).reshape(-1)


@dataclass(frozen=True)
class EndpointParams:
    """Endpointing settings.

    Attributes:
        threshold: Speech probability at or above which a window starts or continues speech.
        endpoint_silence_ms: Silence (probability below ``threshold - 0.15``) that ends an utterance, in ms.
        min_speech_ms: Utterances with less speech than this are discarded, in ms.
        speech_pad_ms: Audio kept before the first and after the last speech window, in ms.
        max_utterance_s: Length at which an utterance is cut even without a pause, in s.
    """

    threshold: float = 0.5
    endpoint_silence_ms: int = 700
    min_speech_ms: int = 200
    speech_pad_ms: int = 300
    max_utterance_s: float = 30.0


@dataclass(frozen=True)
class Utterance:
    """Audio of one utterance (in progress or complete).

    Attributes:
        index: Order of the utterance in the stream, from 0 (counting only utterances with enough speech).
        start_sample: First sample, counted from the start of the stream at 16 kHz.
        end_sample: One past the last sample.
        audio: float32 in [-1, 1], shape (end_sample - start_sample,), 16 kHz mono.
    """

    index: int
    start_sample: int
    end_sample: int
    audio: np.ndarray

    @property
    def start_ms(self) -> int:
        """Start in milliseconds from the start of the stream."""
        return self.start_sample * 1000 // SAMPLE_RATE_HZ

    @property
    def end_ms(self) -> int:
        """End in milliseconds from the start of the stream."""
        return self.end_sample * 1000 // SAMPLE_RATE_HZ


class UtteranceTracker:
    """Cuts a 16 kHz stream into utterances from per-window speech probabilities.

    Args:
        vad: Called with each chunk of samples; returns one speech probability per completed 512-sample
            window (a :class:`StreamingSilero`, or a fake in tests).
        params: Endpointing settings.
    """

    def __init__(self, vad: Callable[[np.ndarray], np.ndarray], params: EndpointParams):
        self._vad = vad
        self._params = params
        ms = SAMPLE_RATE_HZ // 1000
        self._neg_threshold = max(params.threshold - 0.15, 0.01)
        self._silence_samples = params.endpoint_silence_ms * ms
        self._min_speech_samples = params.min_speech_ms * ms
        self._pad_samples = params.speech_pad_ms * ms
        self._max_samples = int(params.max_utterance_s * SAMPLE_RATE_HZ)
        self._audio = np.zeros(0, dtype=np.float32)
        self._audio_start = 0  # stream sample index of self._audio[0]
        self._received = 0
        self._windows = 0
        self._floor = 0  # end of the last utterance: the next one never starts before it
        self._in_speech = False
        self._start = 0
        self._speech = 0
        self._silence_start: int | None = None
        self._count = 0
        self._interim_at = 0

    @property
    def received_samples(self) -> int:
        """Samples received so far."""
        return self._received

    def push(self, samples: np.ndarray) -> list[Utterance]:
        """Feeds float32 samples, shape (n,), 16 kHz; returns the utterances this chunk completed."""
        self._audio = np.concatenate([self._audio, samples.astype(np.float32, copy=False)])
        self._received += len(samples)
        done = []
        for prob in self._vad(samples):
            begin = self._windows * WINDOW_SAMPLES
            end = begin + WINDOW_SAMPLES
            self._windows += 1
            utterance = self._step(float(prob), begin, end)
            if utterance is not None:
                done.append(utterance)
        self._trim()
        return done

    def finish(self) -> list[Utterance]:
        """Ends the stream; returns the utterance in progress, if it holds enough speech."""
        if not self._in_speech:
            return []
        utterance = self._close(self._received)
        return [utterance] if utterance is not None else []

    def interim(self, interval_samples: int) -> Utterance | None:
        """The utterance so far, if it holds enough speech and ``interval_samples`` came since the last."""
        if not self._in_speech or self._speech < self._min_speech_samples:
            return None
        if self._received - max(self._interim_at, self._start) < interval_samples:
            return None
        self._interim_at = self._received
        return self._slice(self._count, self._start, self._received)

    def _step(self, prob: float, begin: int, end: int) -> Utterance | None:
        params = self._params
        if not self._in_speech:
            if prob >= params.threshold:
                self._in_speech = True
                self._start = max(self._floor, self._audio_start, begin - self._pad_samples)
                self._speech = WINDOW_SAMPLES
                self._silence_start = None
                self._interim_at = self._start
            return None
        closed = None
        if prob >= params.threshold:
            self._silence_start = None
            self._speech += WINDOW_SAMPLES
        elif prob < self._neg_threshold:
            if self._silence_start is None:
                self._silence_start = begin
            if end - self._silence_start >= self._silence_samples:
                return self._close(min(self._silence_start + self._pad_samples, end))
        elif self._silence_start is None:
            self._speech += WINDOW_SAMPLES
        if end + WINDOW_SAMPLES - self._start > self._max_samples:
            closed = self._close(end)
            # Speech goes on: the next utterance starts right here.
            self._in_speech = True
            self._start = end
            self._speech = 0
            self._silence_start = None
            self._interim_at = end
        return closed

    def _close(self, end: int) -> Utterance | None:
        utterance = None
        if self._speech >= self._min_speech_samples:
            utterance = self._slice(self._count, self._start, end)
            self._count += 1
        self._in_speech = False
        self._floor = end
        self._silence_start = None
        return utterance

    def _slice(self, index: int, start: int, end: int) -> Utterance:
        audio = self._audio[start - self._audio_start : end - self._audio_start].copy()
        return Utterance(index, start, end, audio)

    def _trim(self) -> None:
        next_window = self._windows * WINDOW_SAMPLES
        keep_from = self._start if self._in_speech else max(self._floor, next_window - self._pad_samples)
        drop = keep_from - self._audio_start
        if drop > 0:
            self._audio = self._audio[drop:]
            self._audio_start = keep_from
