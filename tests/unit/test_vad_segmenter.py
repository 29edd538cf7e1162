"""The streaming segment state machine on synthetic probabilities, against faster-whisper's reference."""

from __future__ import annotations

import numpy as np
import pytest
from faster_whisper import vad as fw_vad

from services.common.errors import InvalidArgument
from services.vad.engine import (
    CONTEXT_SAMPLES,
    WINDOW_SAMPLES,
    Segmenter,
    SpeechEnd,
    SpeechStart,
    StreamEndpointer,
    VadParams,
    frame_windows,
)

FRAME_MS = WINDOW_SAMPLES / 16


def synthetic_probs(rng: np.random.Generator, n_frames: int) -> np.ndarray:
    """Runs of speech, silence and in-between probabilities, like a real VAD's output."""
    out = []
    while len(out) < n_frames:
        kind = rng.choice(["speech", "silence", "between", "blip"], p=[0.35, 0.35, 0.15, 0.15])
        length = {
            "speech": rng.integers(3, 120),
            "silence": rng.integers(1, 60),
            "between": rng.integers(1, 10),
        }.get(kind, 1)
        low, high = {"speech": (0.6, 1.0), "silence": (0.0, 0.3), "between": (0.3, 0.6), "blip": (0.7, 1.0)}[
            kind
        ]
        out.extend(rng.uniform(low, high, size=length))
    return np.array(out[:n_frames], dtype=np.float32)


def reference_segments(
    monkeypatch, probs: np.ndarray, n_samples: int, params: VadParams
) -> list[tuple[int, int]]:
    """faster-whisper's get_speech_timestamps on ``probs``, its model replaced by the probabilities."""
    assert -(-n_samples // WINDOW_SAMPLES) == len(probs)
    monkeypatch.setattr(fw_vad, "get_vad_model", lambda: lambda audio: probs)
    options = fw_vad.VadOptions(
        threshold=params.threshold,
        min_speech_duration_ms=params.min_speech_ms,
        min_silence_duration_ms=params.min_silence_ms,
        speech_pad_ms=params.speech_pad_ms,
        max_speech_duration_s=params.max_speech_s,
    )
    speeches = fw_vad.get_speech_timestamps(np.zeros(n_samples, dtype=np.float32), options)
    return [(s["start"], s["end"]) for s in speeches]


PARAMS = [
    VadParams(),
    VadParams(threshold=0.5, min_speech_ms=250, min_silence_ms=100, speech_pad_ms=30, max_speech_s=30.0),
    VadParams(threshold=0.4, min_speech_ms=0, min_silence_ms=0, speech_pad_ms=0, max_speech_s=5.0),
    VadParams(threshold=0.6, min_speech_ms=100, min_silence_ms=50, speech_pad_ms=200, max_speech_s=2.0),
    VadParams(threshold=0.5, min_speech_ms=250, min_silence_ms=2000, speech_pad_ms=400, max_speech_s=3.0),
    VadParams(threshold=0.5, min_speech_ms=500, min_silence_ms=300, speech_pad_ms=30, max_speech_s=1.5),
]


@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("seed", range(8))
def test_segments_equal_faster_whisper_reference(monkeypatch, params, seed):
    rng = np.random.default_rng(seed)
    n_frames = int(rng.integers(50, 1500))
    n_samples = (n_frames - 1) * WINDOW_SAMPLES + int(rng.integers(1, WINDOW_SAMPLES))
    probs = synthetic_probs(rng, n_frames)
    segmenter = Segmenter(params.validate())
    events = segmenter.push(probs) + segmenter.finish(n_samples)
    ours = [(e.segment.start_sample, e.segment.end_sample) for e in events if isinstance(e, SpeechEnd)]
    assert ours == reference_segments(monkeypatch, probs, n_samples, params)


@pytest.mark.parametrize("params", PARAMS)
def test_events_are_paired_ordered_and_independent_of_chunking(params):
    rng = np.random.default_rng(42)
    probs = synthetic_probs(rng, 2000)
    n_samples = len(probs) * WINDOW_SAMPLES
    whole = Segmenter(params)
    expected = whole.push(probs) + whole.finish(n_samples)
    one_by_one = Segmenter(params)
    events = []
    for p in probs:
        events += one_by_one.push([p])
    events += one_by_one.finish(n_samples)
    assert events == expected
    open_start = None
    last_end = 0
    for event in events:
        if isinstance(event, SpeechStart):
            assert open_start is None, "two starts without an end"
            open_start = event.start_sample
        else:
            assert open_start == event.segment.start_sample
            assert last_end <= event.segment.start_sample < event.segment.end_sample <= n_samples
            assert 0.0 <= event.segment.confidence <= 1.0
            last_end, open_start = event.segment.end_sample, None
    assert open_start is None


def test_endpoint_is_decided_after_min_silence():
    params = VadParams(
        threshold=0.5, min_speech_ms=250, min_silence_ms=500, speech_pad_ms=30, max_speech_s=30.0
    )
    speech_frames, silence_frames = 40, 60
    probs = np.concatenate([np.full(10, 0.05), np.full(speech_frames, 0.95), np.full(silence_frames, 0.05)])
    segmenter = Segmenter(params)
    decided_at = {}
    for i, p in enumerate(probs):
        for event in segmenter.push([p]):
            decided_at[type(event)] = i
            if isinstance(event, SpeechEnd):
                segment = event.segment
    # Speech is confirmed once longer than min_speech (250 ms = 7.8 frames), ended after 500 ms of silence.
    assert decided_at[SpeechStart] == 10 + 8
    silence_start = 10 + speech_frames
    assert decided_at[SpeechEnd] == silence_start + int(np.ceil(500 / FRAME_MS))
    assert segment.start_sample == 10 * WINDOW_SAMPLES - 480
    assert segment.end_sample == silence_start * WINDOW_SAMPLES + 480
    assert segment.confidence == pytest.approx(0.95)


def test_short_blip_is_dropped_and_gives_no_event():
    segmenter = Segmenter(VadParams())
    probs = np.concatenate([np.full(10, 0.0), np.full(5, 0.9), np.full(40, 0.0)])
    assert segmenter.push(probs) + segmenter.finish(len(probs) * WINDOW_SAMPLES) == []


def test_silence_gives_no_event():
    segmenter = Segmenter(VadParams())
    assert segmenter.push(np.zeros(500)) + segmenter.finish(500 * WINDOW_SAMPLES) == []


def test_frame_windows_prepends_previous_context():
    samples = np.arange(3 * WINDOW_SAMPLES, dtype=np.float32)
    context = np.full(CONTEXT_SAMPLES, -1.0, dtype=np.float32)
    windows = frame_windows(samples, context)
    assert windows.shape == (3, WINDOW_SAMPLES + CONTEXT_SAMPLES)
    np.testing.assert_array_equal(windows[0, :CONTEXT_SAMPLES], context)
    np.testing.assert_array_equal(
        windows[1, :CONTEXT_SAMPLES], samples[WINDOW_SAMPLES - CONTEXT_SAMPLES : WINDOW_SAMPLES]
    )
    np.testing.assert_array_equal(windows[2, CONTEXT_SAMPLES:], samples[2 * WINDOW_SAMPLES :])


def test_endpointer_windows_do_not_depend_on_chunk_size():
    audio = np.random.default_rng(0).uniform(-0.5, 0.5, 5000).astype(np.float32)
    whole = StreamEndpointer(VadParams())
    expected = [whole.add(audio), whole.flush()]
    chunked = StreamEndpointer(VadParams())
    got = [
        w for start in range(0, len(audio), 320) if (w := chunked.add(audio[start : start + 320])) is not None
    ]
    got.append(chunked.flush())
    np.testing.assert_array_equal(np.concatenate(got), np.concatenate(expected))
    assert chunked.samples_received == len(audio)
    assert len(np.concatenate(got)) == -(-len(audio) // WINDOW_SAMPLES)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("threshold", -0.1),
        ("threshold", 1.5),
        ("threshold", float("nan")),
        ("min_speech_ms", 10**6),
        ("min_silence_ms", 10**6),
        ("speech_pad_ms", 10**5),
        ("max_speech_s", 0.0),
        ("max_speech_s", float("inf")),
        ("max_speech_s", 0.05),
    ],
)
def test_out_of_range_parameters_are_rejected_with_the_field_name(field, value):
    with pytest.raises(InvalidArgument, match=field):
        VadParams(**{field: value}).validate()
