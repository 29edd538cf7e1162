"""Streaming endpointing: utterances cut from scripted speech probabilities (a fake VAD)."""

from __future__ import annotations

import numpy as np
import pytest

from services.stt.endpointing import WINDOW_SAMPLES, EndpointParams, UtteranceTracker

RATE = 16000


class LoudnessVad:
    """Fake VAD: one probability per 512-sample window, 0.9 when the window is loud, 0.05 when quiet."""

    def __init__(self):
        self.pending = np.zeros(0, dtype=np.float32)

    def __call__(self, samples):
        data = np.concatenate([self.pending, samples])
        whole = len(data) - len(data) % WINDOW_SAMPLES
        self.pending = data[whole:]
        windows = data[:whole].reshape(-1, WINDOW_SAMPLES)
        return np.where(np.abs(windows).max(axis=1) > 0.1, 0.9, 0.05).astype(np.float32)


def speech(seconds):
    return np.full(int(seconds * RATE), 0.5, dtype=np.float32)


def silence(seconds):
    return np.zeros(int(seconds * RATE), dtype=np.float32)


def feed(tracker, audio, chunk_s=0.1):
    step = int(chunk_s * RATE)
    out = []
    for i in range(0, len(audio), step):
        out += tracker.push(audio[i : i + step])
    return out


PARAMS = EndpointParams(endpoint_silence_ms=700, min_speech_ms=200, speech_pad_ms=300, max_utterance_s=30.0)


def test_two_utterances_separated_by_a_pause():
    tracker = UtteranceTracker(LoudnessVad(), PARAMS)
    audio = np.concatenate([silence(1.0), speech(2.0), silence(1.5), speech(1.0), silence(1.0)])
    done = feed(tracker, audio) + tracker.finish()
    assert [u.index for u in done] == [0, 1]
    first, second = done
    # Speech 1.0-3.0 s, padded by 0.3 s each side (to window precision: 32 ms).
    assert first.start_ms == pytest.approx(700, abs=40)
    assert first.end_ms == pytest.approx(3300, abs=40)
    assert second.start_ms == pytest.approx(4200, abs=40)
    assert second.end_ms == pytest.approx(5800, abs=40)
    assert len(first.audio) == first.end_sample - first.start_sample
    # The audio is the stream's own samples at those positions.
    np.testing.assert_array_equal(first.audio, audio[first.start_sample : first.end_sample])
    np.testing.assert_array_equal(second.audio, audio[second.start_sample : second.end_sample])


def test_short_pause_does_not_end_the_utterance():
    tracker = UtteranceTracker(LoudnessVad(), PARAMS)
    audio = np.concatenate([speech(1.0), silence(0.4), speech(1.0), silence(1.0)])
    done = feed(tracker, audio) + tracker.finish()
    assert len(done) == 1
    assert done[0].start_ms == 0
    assert done[0].end_ms == pytest.approx(2700, abs=40)


def test_end_of_stream_finalises_the_utterance_in_progress():
    tracker = UtteranceTracker(LoudnessVad(), PARAMS)
    audio = np.concatenate([silence(0.5), speech(1.5)])
    assert feed(tracker, audio) == []
    (last,) = tracker.finish()
    assert last.end_sample == len(audio)
    assert tracker.finish() == []


def test_blips_shorter_than_min_speech_are_ignored():
    tracker = UtteranceTracker(LoudnessVad(), PARAMS)
    audio = np.concatenate([silence(0.5), speech(0.1), silence(1.5), speech(0.5), silence(1.0)])
    done = feed(tracker, audio) + tracker.finish()
    assert len(done) == 1
    assert done[0].index == 0
    assert done[0].start_ms == pytest.approx(1800, abs=40)


def test_long_speech_is_cut_at_max_utterance():
    params = EndpointParams(max_utterance_s=2.0, speech_pad_ms=0)
    tracker = UtteranceTracker(LoudnessVad(), params)
    done = feed(tracker, speech(5.0)) + tracker.finish()
    assert len(done) == 3
    assert all(u.end_ms - u.start_ms <= 2000 for u in done)
    assert [u.start_sample for u in done[1:]] == [u.end_sample for u in done[:-1]]
    assert done[-1].end_sample == 5 * RATE


def test_interims_come_every_interval_during_speech_only():
    tracker = UtteranceTracker(LoudnessVad(), PARAMS)
    interval = RATE // 2
    interims = []
    for chunk in np.split(np.concatenate([silence(1.0), speech(2.0), silence(1.0)]), 40):
        tracker.push(chunk)
        current = tracker.interim(interval)
        if current is not None:
            interims.append(current)
    # Speech lasts 2 s (+ padding, + 0.7 s of trailing silence before the endpoint): one every 0.5 s.
    assert 4 <= len(interims) <= 6
    assert all(u.index == 0 for u in interims)
    ends = [u.end_sample for u in interims]
    assert ends == sorted(ends) and all(b - a >= interval for a, b in zip(ends, ends[1:], strict=False))
    assert tracker.interim(interval) is None  # the utterance has ended


def test_memory_stays_bounded_on_long_silence():
    tracker = UtteranceTracker(LoudnessVad(), PARAMS)
    feed(tracker, silence(60.0), chunk_s=1.0)
    assert len(tracker._audio) <= int(0.3 * RATE) + 2 * WINDOW_SAMPLES
