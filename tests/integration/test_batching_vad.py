"""The VAD server's dynamic batcher: many concurrent streams, each with its own model state.

Every model call is a batcher item carrying one stream's state; interleaving streams in batches must not
mix their states, so each concurrent stream must produce exactly the events it produces alone, and a
clip cut into many items (Detect) exactly the segments of the unbatched engine.
"""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from parley.audio.v1 import audio_pb2
from parley.vad.v1 import vad_pb2, vad_pb2_grpc
from services.common.models import silero_vad_path
from services.harness import batch_counts, free_port, read_wav, start_server
from services.vad.engine import SileroVad, VadParams
from tests.helpers import read_manifest

pytestmark = [pytest.mark.timeout(300), pytest.mark.asyncio(loop_scope="session")]

PCM16_16K = audio_pb2.AudioFormat(encoding=audio_pb2.PCM_S16LE, sample_rate_hz=16000, channels=1)
CHUNK_BYTES = 3200  # 100 ms of PCM_S16LE at 16 kHz: 3 or 4 model windows per call
STREAMS = 8
DETECT_FRAMES_PER_CALL = 64


@pytest.fixture(scope="module")
def metrics_port():
    return free_port()


@pytest.fixture(scope="module")
def server(metrics_port):
    proc = start_server(
        "vad",
        "--detect-frames-per-call",
        str(DETECT_FRAMES_PER_CALL),
        "--max-queue-delay-ms",
        "2",
        "--metrics-port",
        str(metrics_port),
    )
    yield proc
    assert proc.terminate() == 0, proc.log()


@pytest.fixture
async def stub(server):
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield vad_pb2_grpc.VoiceActivityDetectionStub(channel)


def recordings() -> list[bytes]:
    """Real speech: FLEURS, LJSpeech and JFK clips, 16 kHz PCM16 mono."""
    out = []
    for folder, index in (("fleurs", 0), ("fleurs", 5), ("ljspeech", 0), ("ljspeech", 2), ("jfk", 0)):
        pcm, rate = read_wav(read_manifest(folder)[index]["path"])
        assert rate == 16000
        out.append(pcm)
    return out


async def stream(stub, audio: bytes) -> list[tuple[str, int, int]]:
    async def requests():
        yield vad_pb2.StreamDetectRequest(config=vad_pb2.StreamDetectConfig(request_id="s", format=PCM16_16K))
        for start in range(0, len(audio), CHUNK_BYTES):
            yield vad_pb2.StreamDetectRequest(audio=audio[start : start + CHUNK_BYTES])

    async def collect():
        events = []
        async for r in stub.StreamDetect(requests()):
            if r.WhichOneof("event") == "speech_started":
                events.append(("start", r.speech_started.start_ms, r.audio_processed_ms))
            else:
                s = r.speech_ended.segment
                events.append(("end", s.start_ms, s.end_ms))
        return events

    return await asyncio.wait_for(collect(), 120)


async def test_concurrent_streams_each_get_the_events_they_get_alone(stub, metrics_port):
    clips = recordings()
    alone = [await stream(stub, pcm) for pcm in clips]
    assert all(any(kind == "end" for kind, *_ in events) for events in alone), "speech is found"
    chosen = [clips[i % len(clips)] for i in range(STREAMS)]
    requests_before, executions_before = await asyncio.to_thread(batch_counts, metrics_port, "vad")
    together = await asyncio.gather(*(stream(stub, pcm) for pcm in chosen))
    requests_after, executions_after = await asyncio.to_thread(batch_counts, metrics_port, "vad")
    assert together == [alone[i % len(clips)] for i in range(STREAMS)]
    items = requests_after - requests_before
    executions = executions_after - executions_before
    assert executions < items, f"mean batch size {items / executions:.2f}: streams shared batches"


async def test_detect_cut_into_many_batch_items_equals_the_unbatched_engine(stub):
    vad = await asyncio.to_thread(SileroVad, silero_vad_path())
    params = VadParams(
        threshold=0.5, min_speech_ms=250, min_silence_ms=500, speech_pad_ms=30, max_speech_s=30.0
    )
    for pcm in recordings():
        samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
        assert len(samples) > 4 * DETECT_FRAMES_PER_CALL * 512, "the clip spans several batcher items"
        expected = await asyncio.to_thread(vad.detect, samples, params.validate())
        response = await asyncio.wait_for(
            stub.Detect(vad_pb2.DetectRequest(request_id="d", audio=pcm, format=PCM16_16K)), 60
        )
        got = [(s.start_ms, s.end_ms, round(s.confidence, 4)) for s in response.segments]
        assert got == [(s.start_ms, s.end_ms, round(s.confidence, 4)) for s in expected]
        assert got
