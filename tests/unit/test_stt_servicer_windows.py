"""The STT servicer's window flow with a fake backend: language detection first, bounded in-flight windows, a
pause decoded before an agreement decode of the audio it ends."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest

from parley.audio.v1 import audio_pb2
from parley.stt.v1 import stt_pb2
from services.common.batching import DynamicBatcher
from services.stt.__main__ import batcher_for
from services.stt.config import SttConfig
from services.stt.engine import DecodeOptions, Segment, Transcript, Window
from services.stt.servicer import SpeechToTextServicer

pytestmark = pytest.mark.timeout(30)

WINDOW_S = 30.0


class FakeBackend:
    """Cuts audio into 30 s windows; "detects" French; records every batch it is given; its default beam is
    the server's."""

    sample_rate_hz = 16000
    workers = 1
    word_timestamps = True

    def __init__(self, compute_s: float = 0.02):
        self.batches: list[list[Window]] = []
        self.compute_s = compute_s
        self.lock = threading.Lock()

    def options(self, *, language: str = "", beam_size: int = 0, **_) -> DecodeOptions:
        return DecodeOptions(language=language or None, beam_size=beam_size or SttConfig().beam_size)

    def windows(self, audio: np.ndarray, options: DecodeOptions) -> list[Window]:
        step = int(WINDOW_S * self.sample_rate_hz)
        return [
            Window(
                audio[i : i + step],
                ((i / self.sample_rate_hz, min(len(audio), i + step) / self.sample_rate_hz),),
                WINDOW_S,
                options,
            )
            for i in range(0, len(audio), step)
        ]

    @staticmethod
    def batch_key(window: Window) -> tuple[float, int]:
        return (window.window_s, window.options.beam_size)

    def transcribe_batch(self, windows: Sequence[Window]) -> list[Transcript]:
        with self.lock:
            self.batches.append(list(windows))
        time.sleep(self.compute_s)
        out = []
        for w in windows:
            start_s, end_s = w.spans_s[0]
            text = f"[{start_s:g}-{end_s:g} {w.options.language}]"
            segment = Segment(start_s, end_s, text, -0.1, 0.0, 1.0)
            out.append(Transcript(text, w.options.language or "fr", 0.9, end_s - start_s, [segment]))
        return out

    def close(self) -> None:
        pass


class Context:
    def time_remaining(self) -> float | None:
        return None


def servicer(backend: FakeBackend, **config) -> tuple[SpeechToTextServicer, DynamicBatcher]:
    settings = SttConfig(max_queue_delay_ms=20.0, **config)
    batcher = batcher_for(backend, settings)  # type: ignore[arg-type]
    return SpeechToTextServicer(backend, batcher, settings), batcher  # type: ignore[arg-type]


def close(stt: SpeechToTextServicer, batcher: DynamicBatcher) -> None:
    batcher.close()
    stt.close()


async def test_language_is_detected_on_the_first_window_then_given_to_the_others():
    backend = FakeBackend()
    stt, batcher = servicer(backend)
    try:
        audio = np.zeros(int(100 * 16000), np.float32)  # four windows
        result = await stt._decode(audio, DecodeOptions(language=None), Context(), 2)
    finally:
        await asyncio.to_thread(close, stt, batcher)
    assert [len(b) for b in backend.batches][0] == 1 and backend.batches[0][0].options.language is None
    assert all(w.options.language == "fr" for b in backend.batches[1:] for w in b)
    assert result.text == "[0-30 None] [30-60 fr] [60-90 fr] [90-100 fr]"
    assert [s.start_s for s in result.segments] == [0, 30, 60, 90] and result.duration_s == 100


async def test_a_long_request_never_has_more_than_max_windows_in_flight():
    backend = FakeBackend()
    stt, batcher = servicer(backend, max_batch_size=8, max_windows_in_flight=2)
    try:
        audio = np.zeros(int(300 * 16000), np.float32)  # ten windows, language given
        result = await stt._decode(audio, DecodeOptions(language="en"), Context(), 2)
    finally:
        await asyncio.to_thread(close, stt, batcher)
    assert sum(len(b) for b in backend.batches) == 10 and len(result.segments) == 10
    assert max(len(b) for b in backend.batches) <= 2


async def test_a_short_request_is_decoded_between_the_windows_of_a_long_one():
    backend = FakeBackend(compute_s=0.05)
    stt, batcher = servicer(backend, max_batch_size=8, max_windows_in_flight=1)
    done: list[str] = []

    async def decode(name: str, seconds: float) -> None:
        audio = np.zeros(int(seconds * 16000), np.float32)
        await stt._decode(audio, DecodeOptions(language="en"), Context(), 2)
        done.append(name)

    try:
        long = asyncio.create_task(decode("long", 300))
        await asyncio.sleep(0.08)  # the long request is on its second window
        await decode("short", 3)
        await long
    finally:
        await asyncio.to_thread(close, stt, batcher)
    assert done == ["short", "long"]


async def test_a_pause_right_behind_its_audio_is_decoded_before_an_agreement_decode_of_that_audio():
    backend = FakeBackend()
    stt, batcher = servicer(backend)
    boundary = stt_pb2.SpeechBoundary

    async def requests():
        yield stt_pb2.StreamingRecognizeRequest(
            streaming_config=stt_pb2.StreamingRecognitionConfig(
                format=audio_pb2.AudioFormat(encoding=audio_pb2.PCM_S16LE, sample_rate_hz=16000, channels=1),
                config=stt_pb2.RecognitionConfig(language="en"),
                commit_policy=stt_pb2.LOCAL_AGREEMENT,
                caller_endpointing=True,
            )
        )
        yield stt_pb2.StreamingRecognizeRequest(boundary=boundary(kind=boundary.START, at_ms=0))
        await asyncio.sleep(0.01)
        # 1.5 s of audio: enough for an agreement decode, then the pause, as the network delivers it.
        yield stt_pb2.StreamingRecognizeRequest(audio_content=bytes(2 * 24000))
        await asyncio.sleep(0.002)
        yield stt_pb2.StreamingRecognizeRequest(boundary=boundary(kind=boundary.PAUSE, at_ms=1500))
        yield stt_pb2.StreamingRecognizeRequest(boundary=boundary(kind=boundary.END, at_ms=1500))

    try:
        results = [r async for r in stt.StreamingRecognize(requests(), Context())]
    finally:
        await asyncio.to_thread(close, stt, batcher)
    beams = [w.options.beam_size for b in backend.batches for w in b]
    assert beams == [SttConfig().beam_size]  # the final decode only: no agreement decode ran before it
    assert results[-1].results[-1].is_final
