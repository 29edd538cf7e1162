"""The VAD server as a real process with the real Silero VAD v6 model on real recordings."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
import soxr

from parley.audio.v1 import audio_pb2
from parley.vad.v1 import vad_pb2, vad_pb2_grpc
from services.harness import read_wav, start_server
from tests.helpers import read_manifest

pytestmark = [pytest.mark.timeout(300), pytest.mark.asyncio(loop_scope="session")]

MAX_AUDIO_S = 60
PCM16_16K = audio_pb2.AudioFormat(encoding=audio_pb2.PCM_S16LE, sample_rate_hz=16000, channels=1)
F32_16K = audio_pb2.AudioFormat(encoding=audio_pb2.PCM_F32LE, sample_rate_hz=16000, channels=1)
CHUNK_BYTES_20MS = 640  # 20 ms of PCM_S16LE at 16 kHz
DEFAULT_MIN_SILENCE_MS = 500


@pytest.fixture(scope="module")
def server():
    proc = start_server("vad", "--max-audio-s", str(MAX_AUDIO_S))
    yield proc
    assert proc.terminate() == 0, proc.log()


@pytest.fixture
async def stub(server):
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield vad_pb2_grpc.VoiceActivityDetectionStub(channel)


def pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


async def detect(stub, audio: bytes, fmt=PCM16_16K, **params) -> vad_pb2.DetectResponse:
    request = vad_pb2.DetectRequest(
        request_id="d", audio=audio, format=fmt, parameters=vad_pb2.VadParameters(**params)
    )
    return await asyncio.wait_for(stub.Detect(request), 60)


async def stream(
    stub, audio: bytes, chunk_bytes: int = CHUNK_BYTES_20MS, fmt=PCM16_16K, *, progress: bool = False
) -> list[vad_pb2.StreamDetectResponse]:
    """StreamDetect's responses to ``audio``: the events only, or every response with ``progress``."""

    async def requests():
        yield vad_pb2.StreamDetectRequest(config=vad_pb2.StreamDetectConfig(request_id="s", format=fmt))
        for start in range(0, len(audio), chunk_bytes):
            yield vad_pb2.StreamDetectRequest(audio=audio[start : start + chunk_bytes])

    async def collect():
        return [r async for r in stub.StreamDetect(requests()) if progress or r.WhichOneof("event")]

    return await asyncio.wait_for(collect(), 120)


def spans(segments) -> list[tuple[int, int]]:
    return [(s.start_ms, s.end_ms) for s in segments]


async def test_every_command_recording_has_speech_inside_the_file(stub):
    rows = read_manifest("commands")
    recordings = [read_wav(row["path"]) for row in rows]
    responses = await asyncio.gather(*(detect(stub, pcm) for pcm, _ in recordings))
    confidences = []
    for row, (pcm, rate), response in zip(rows, recordings, responses, strict=True):
        duration_ms = len(pcm) / 2 / rate * 1000
        assert response.request_id == "d"
        assert response.duration_s == pytest.approx(len(pcm) / 2 / rate)
        assert response.segments, f"{row['file']} ({row['reference_text']!r}): no speech found"
        previous_end = 0
        for segment in response.segments:
            assert previous_end <= segment.start_ms < segment.end_ms <= duration_ms + 1, row["file"]
            assert 0.0 < segment.confidence <= 1.0, row["file"]
            confidences.append(segment.confidence)
            previous_end = segment.end_ms
    assert np.mean(confidences) > 0.6


async def test_silence_and_quiet_white_noise_have_no_speech(stub):
    silence = np.zeros(3 * 16000, dtype=np.float32)
    noise = np.random.default_rng(0).normal(0.0, 10 ** (-30 / 20), 3 * 16000).astype(np.float32)
    assert 20 * np.log10(np.sqrt(np.mean(noise**2))) == pytest.approx(-30, abs=0.1)
    for audio in (silence, noise):
        assert list((await detect(stub, pcm16(audio))).segments) == []
        assert list((await detect(stub, audio.tobytes(), fmt=F32_16K)).segments) == []
        events = await stream(stub, pcm16(audio))
        assert [r.WhichOneof("event") for r in events] == []


async def test_progress_is_reported_every_200_ms_without_an_event(stub):
    """An event-less response tells a caller (the gateway) how far endpointing got, during silence too."""
    pcm, _ = read_wav(read_manifest("jfk")[0]["path"])
    silence = pcm16(np.zeros(4 * 16000, dtype=np.float32))
    responses = await stream(stub, silence + pcm + silence, progress=True)
    processed = [r.audio_processed_ms for r in responses]
    assert processed == sorted(processed) and processed[-1] >= 18000
    progress = [r.audio_processed_ms for r in responses if r.WhichOneof("event") is None]
    assert 200 <= progress[0] <= 300, progress  # 20 ms chunks: the first whole 32 ms frame past 200 ms
    # No stretch of more than 200 ms (and a frame) without a response, before the stream's end.
    assert all(b - a <= 300 for a, b in zip([0, *processed[:-1]], processed, strict=True)), processed
    assert [r.WhichOneof("event") for r in responses if r.WhichOneof("event")][:1] == ["speech_started"]


@pytest.mark.parametrize(
    ("folder", "index"),
    [("fleurs", 0), ("fleurs", 5), ("ljspeech", 0), ("ljspeech", 2), ("jfk", 0), ("commands", 0)],
)
async def test_stream_in_20ms_chunks_agrees_with_detect(stub, folder, index):
    pcm, _ = read_wav(read_manifest(folder)[index]["path"])
    whole = await detect(stub, pcm)
    events = await stream(stub, pcm)
    assert whole.segments
    ended = [r.speech_ended.segment for r in events if r.WhichOneof("event") == "speech_ended"]
    assert len(ended) == len(whole.segments), (spans(ended), spans(whole.segments))
    for got, want in zip(ended, whole.segments, strict=True):
        assert abs(got.start_ms - want.start_ms) <= 100 and abs(got.end_ms - want.end_ms) <= 100
        assert got.confidence == pytest.approx(want.confidence, abs=0.05)

    # Events come as the audio arrives, each start before its end; an end is decided about min_silence
    # after the speech stops, not at the end of the stream.
    assert all(r.request_id == "s" for r in events)
    processed = [r.audio_processed_ms for r in events]
    assert processed == sorted(processed)
    kinds = [r.WhichOneof("event") for r in events]
    assert kinds == ["speech_started", "speech_ended"] * len(ended)
    for started, end in zip(events[0::2], events[1::2], strict=True):
        assert started.speech_started.start_ms == end.speech_ended.segment.start_ms
        assert started.audio_processed_ms < end.audio_processed_ms
    duration_ms = len(pcm) / 2 / 16
    for response in events[1::2][:-1]:
        delay_ms = response.audio_processed_ms - response.speech_ended.segment.end_ms
        assert 0 <= delay_ms <= DEFAULT_MIN_SILENCE_MS + 100
        assert response.audio_processed_ms < duration_ms


async def test_resampled_stereo_float_audio_agrees_with_16k(stub):
    pcm, rate = read_wav(read_manifest("jfk")[0]["path"])
    mono = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768
    at_48k = soxr.resample(mono, rate, 48000).astype(np.float32)
    stereo = np.stack([at_48k, at_48k], axis=1).astype("<f4").tobytes()
    fmt = audio_pb2.AudioFormat(encoding=audio_pb2.PCM_F32LE, sample_rate_hz=48000, channels=2)
    want = (await detect(stub, pcm)).segments
    got = (await detect(stub, stereo, fmt=fmt)).segments
    # 48 kHz stereo float sent in 20 ms chunks, resampled by the stream's own soxr state.
    streamed = await stream(stub, stereo, chunk_bytes=48 * 20 * 2 * 4, fmt=fmt)
    ended = [r.speech_ended.segment for r in streamed if r.WhichOneof("event") == "speech_ended"]
    assert len(got) == len(want) == len(ended) >= 2
    for g, e, w in zip(got, ended, want, strict=True):
        assert abs(g.start_ms - w.start_ms) <= 100 and abs(g.end_ms - w.end_ms) <= 100
        assert abs(e.start_ms - w.start_ms) <= 100 and abs(e.end_ms - w.end_ms) <= 100


async def test_request_parameters_override_server_defaults(stub):
    pcm, _ = read_wav(read_manifest("jfk")[0]["path"])
    default = (await detect(stub, pcm)).segments
    merged = (await detect(stub, pcm, min_silence_ms=2000)).segments
    padded = (await detect(stub, pcm, speech_pad_ms=200)).segments
    strict = (await detect(stub, pcm, threshold=0.99)).segments
    assert len(merged) < len(default)
    assert padded[0].start_ms < default[0].start_ms
    assert sum(s.end_ms - s.start_ms for s in strict) < sum(s.end_ms - s.start_ms for s in default)
    split = (await detect(stub, pcm, max_speech_s=1.0)).segments
    assert len(split) > len(default) and all(s.end_ms - s.start_ms <= 1000 for s in split)


def _config_request(fmt=PCM16_16K, **params):
    return vad_pb2.StreamDetectRequest(
        config=vad_pb2.StreamDetectConfig(format=fmt, parameters=vad_pb2.VadParameters(**params))
    )


_ONE_S = pcm16(np.zeros(16000, dtype=np.float32))
_NAN = np.array([0.0, np.nan, 0.1], dtype="<f4").tobytes()
_INF = np.array([0.0, np.inf, 0.1], dtype="<f4").tobytes()
_TOO_LONG = bytes(2 * 16000 * (MAX_AUDIO_S + 1))

BAD_DETECT = {
    "empty audio": (b"", PCM16_16K, {}, "empty"),
    "unspecified encoding": (_ONE_S, audio_pb2.AudioFormat(sample_rate_hz=16000), {}, "encoding"),
    "unknown encoding": (_ONE_S, audio_pb2.AudioFormat(encoding=7, sample_rate_hz=16000), {}, "encoding"),
    "odd byte count": (_ONE_S + b"\x00", PCM16_16K, {}, "whole number"),
    "NaN floats": (_NAN, F32_16K, {}, "NaN"),
    "infinite floats": (_INF, F32_16K, {}, "infinite"),
    "floats beyond full scale": (np.full(160, 1e30, dtype="<f4").tobytes(), F32_16K, {}, "outside [-1, 1]"),
    "sample rate too low": (
        _ONE_S,
        audio_pb2.AudioFormat(encoding=1, sample_rate_hz=4000),
        {},
        "sample_rate_hz",
    ),
    "sample rate zero": (_ONE_S, audio_pb2.AudioFormat(encoding=1), {}, "sample_rate_hz"),
    "too long": (_TOO_LONG, PCM16_16K, {}, f"{MAX_AUDIO_S} s"),
    "threshold above 1": (_ONE_S, PCM16_16K, {"threshold": 1.5}, "threshold"),
    "threshold below 0": (_ONE_S, PCM16_16K, {"threshold": -0.2}, "threshold"),
    "min_speech_ms too large": (_ONE_S, PCM16_16K, {"min_speech_ms": 10**6}, "min_speech_ms"),
    "min_silence_ms too large": (_ONE_S, PCM16_16K, {"min_silence_ms": 10**6}, "min_silence_ms"),
    "speech_pad_ms too large": (_ONE_S, PCM16_16K, {"speech_pad_ms": 10**5}, "speech_pad_ms"),
    "max_speech_s zero": (_ONE_S, PCM16_16K, {"max_speech_s": 0.0}, "max_speech_s"),
    "max_speech_s NaN": (_ONE_S, PCM16_16K, {"max_speech_s": float("nan")}, "max_speech_s"),
}


@pytest.mark.parametrize("case", BAD_DETECT, ids=list(BAD_DETECT))
async def test_bad_detect_is_invalid_argument_and_server_keeps_serving(stub, case):
    audio, fmt, params, message = BAD_DETECT[case]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await detect(stub, audio, fmt=fmt, **params)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
    pcm, _ = read_wav(read_manifest("commands")[0]["path"])
    assert (await detect(stub, pcm)).segments


BAD_STREAM = {
    "first message is audio": ([vad_pb2.StreamDetectRequest(audio=_ONE_S)], "first"),
    "second config": (
        [_config_request(), vad_pb2.StreamDetectRequest(audio=_ONE_S), _config_request()],
        "one config",
    ),
    "empty first message": ([vad_pb2.StreamDetectRequest()], "first"),
    "unknown encoding": (
        [_config_request(fmt=audio_pb2.AudioFormat(encoding=9, sample_rate_hz=16000))],
        "encoding",
    ),
    "sample rate too high": (
        [_config_request(fmt=audio_pb2.AudioFormat(encoding=1, sample_rate_hz=400000))],
        "sample_rate_hz",
    ),
    "threshold out of range": ([_config_request(threshold=2.0)], "threshold"),
    "NaN floats": ([_config_request(fmt=F32_16K), vad_pb2.StreamDetectRequest(audio=_NAN)], "NaN"),
}


@pytest.mark.parametrize("case", BAD_STREAM, ids=list(BAD_STREAM))
async def test_bad_stream_is_invalid_argument_and_server_keeps_serving(stub, case):
    messages, message = BAD_STREAM[case]

    async def consume():
        return [r async for r in stub.StreamDetect(iter(messages))]

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await asyncio.wait_for(consume(), 30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
    pcm, _ = read_wav(read_manifest("commands")[0]["path"])
    events = await stream(stub, pcm)
    assert [r.WhichOneof("event") for r in events] == ["speech_started", "speech_ended"]
