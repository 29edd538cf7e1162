"""The Silero VAD engine in-process with the real model: faster-whisper parity, per-stream state."""

from __future__ import annotations

import numpy as np
import pytest
from faster_whisper import vad as fw_vad

from services.common.models import silero_vad_path
from services.harness import read_wav
from services.vad.engine import (
    CONTEXT_SAMPLES,
    WINDOW_SAMPLES,
    ModelState,
    SileroVad,
    StreamEndpointer,
    VadParams,
    frame_windows,
)
from tests.helpers import read_manifest

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def vad():
    model = SileroVad(silero_vad_path())
    yield model
    model.close()


def load(folder: str, index: int) -> np.ndarray:
    pcm, rate = read_wav(read_manifest(folder)[index]["path"])
    assert rate == 16000
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768


@pytest.mark.parametrize(("folder", "index"), [("jfk", 0), ("fleurs", 1), ("librispeech", 0)])
def test_detect_matches_faster_whisper_get_speech_timestamps(vad, folder, index):
    audio = load(folder, index)
    params = VadParams()
    ours = [(s.start_sample, s.end_sample) for s in vad.detect(audio, params)]
    options = fw_vad.VadOptions(
        threshold=params.threshold,
        min_speech_duration_ms=params.min_speech_ms,
        min_silence_duration_ms=params.min_silence_ms,
        speech_pad_ms=params.speech_pad_ms,
        max_speech_duration_s=params.max_speech_s,
    )
    reference = [(s["start"], s["end"]) for s in fw_vad.get_speech_timestamps(audio, options)]
    # faster-whisper zeroes the last 64 samples of the last window, so only the last frame may differ.
    assert len(ours) == len(reference) and ours
    for (start, end), (ref_start, ref_end) in zip(ours, reference, strict=True):
        assert abs(start - ref_start) <= 512 and abs(end - ref_end) <= 512


def test_probabilities_equal_faster_whisper_model(vad):
    audio = load("fleurs", 0)
    padded = np.pad(audio, (0, WINDOW_SAMPLES - len(audio) % WINDOW_SAMPLES))
    reference = fw_vad.get_vad_model()(padded).reshape(-1)
    ours = vad.probabilities(audio)
    assert len(ours) == -(-len(audio) // WINDOW_SAMPLES)
    # faster-whisper pads a whole extra window when the length is a multiple of 512, and zeroes the last
    # 64 samples of its last window; every other frame is fed alike.
    assert len(reference) in (len(ours), len(ours) + 1)
    np.testing.assert_allclose(ours[:-1], reference[: len(ours) - 1], atol=1e-5)
    assert ours.max() > 0.9 and ours.min() < 0.1


def test_streams_interleaved_on_one_session_keep_their_own_state(vad):
    clips = [
        load("jfk", 0)[: 200 * WINDOW_SAMPLES],
        load("ljspeech", 1),
        load("fleurs", 6)[: 150 * WINDOW_SAMPLES],
    ]
    alone = [vad.probabilities(clip) for clip in clips]
    endpointers = [StreamEndpointer(VadParams()) for _ in clips]
    got: list[list[np.ndarray]] = [[] for _ in clips]
    chunk = 7 * WINDOW_SAMPLES + 100
    for start in range(0, max(len(c) for c in clips), chunk):
        items, owners = [], []
        for k, (clip, endpointer) in enumerate(zip(clips, endpointers, strict=True)):
            if start < len(clip):
                windows = endpointer.add(clip[start : start + chunk])
                if start + chunk >= len(clip) and (tail := endpointer.flush()) is not None:
                    windows = tail if windows is None else np.concatenate([windows, tail])
                if windows is not None:
                    items.append((windows, endpointer.state))
                    owners.append(k)
        for k, (probs, state) in zip(owners, vad.infer_batch(items), strict=True):
            endpointers[k].accept(probs, state)
            got[k].append(probs)
    for k, clip_probs in enumerate(alone):
        np.testing.assert_allclose(np.concatenate(got[k]), clip_probs, atol=1e-5)


def test_infer_batch_equals_infer_per_stream(vad):
    audio = load("librispeech", 0)
    rows = frame_windows(audio[: 60 * WINDOW_SAMPLES], np.zeros(CONTEXT_SAMPLES, dtype=np.float32))
    items = [
        (rows[:20], ModelState.initial()),
        (rows[20:45], ModelState.initial()),
        (rows[45:], ModelState.initial()),
    ]
    batched = vad.infer_batch(items)
    for (windows, state), (probs, new_state) in zip(items, batched, strict=True):
        want, want_state = vad.infer(windows, state)
        np.testing.assert_array_equal(probs, want)
        np.testing.assert_array_equal(new_state.h, want_state.h)
        np.testing.assert_array_equal(new_state.c, want_state.c)
