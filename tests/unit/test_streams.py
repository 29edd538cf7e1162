"""Stream bounds: the shared helpers (idle timeout, longest stream, slots, caller key), and the VAD and STT
streaming servicers using them, with fakes and no sockets."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from parley.audio.v1 import audio_pb2
from parley.stt.v1 import stt_pb2
from parley.vad.v1 import vad_pb2
from services.common.batching import DynamicBatcher
from services.common.config import StreamLimitsConfig
from services.common.errors import DeadlineExceeded, ResourceExhausted
from services.common.streams import StreamSlots, bounded_requests, caller_key
from services.stt.__main__ import batcher_for
from services.stt.config import SttConfig
from services.stt.engine import DecodeOptions
from services.stt.servicer import SpeechToTextServicer
from services.vad.config import VadConfig
from services.vad.servicer import VadServicer
from tests.unit.test_stt_servicer_windows import FakeBackend

pytestmark = pytest.mark.timeout(30)


async def paced(messages, gap_s: float, then_wait_s: float = 0.0):
    """Yields ``messages`` ``gap_s`` apart, then waits ``then_wait_s`` before ending."""
    for message in messages:
        await asyncio.sleep(gap_s)
        yield message
    await asyncio.sleep(then_wait_s)


async def test_a_client_silent_past_the_idle_timeout_ends_the_stream_naming_the_flag():
    limits = StreamLimitsConfig(stream_idle_timeout_s=0.2)
    got = []
    with pytest.raises(DeadlineExceeded, match="--stream-idle-timeout-s"):
        async for message in bounded_requests(paced([1, 2], 0.05, then_wait_s=10), limits):
            got.append(message)
    assert got == [1, 2]


async def test_time_the_server_spends_between_reads_is_not_idle_time():
    limits = StreamLimitsConfig(stream_idle_timeout_s=0.1)
    got = []
    async for message in bounded_requests(paced([1, 2, 3], 0.01), limits):
        got.append(message)
        await asyncio.sleep(0.2)  # backpressure: the server is busy, the client is not idle
    assert got == [1, 2, 3]


async def test_a_stream_sending_past_the_longest_duration_ends_naming_the_flag():
    limits = StreamLimitsConfig(stream_idle_timeout_s=1.0, max_stream_duration_s=0.3)
    got = []
    with pytest.raises(DeadlineExceeded, match="--max-stream-duration-s"):
        async for message in bounded_requests(paced(range(100), 0.05), limits):
            got.append(message)
    assert 2 <= len(got) < 10


async def test_zero_disables_both_limits():
    limits = StreamLimitsConfig(stream_idle_timeout_s=0, max_stream_duration_s=0)
    assert [m async for m in bounded_requests(paced([1, 2], 0.05, then_wait_s=0.1), limits)] == [1, 2]


def test_slots_bound_all_streams_and_each_callers():
    slots = StreamSlots("Rpc", 3, "max_streams", per_caller=2, per_caller_field="max_streams_per_caller")
    with slots.hold("a"), slots.hold("a"):
        with pytest.raises(
            ResourceExhausted, match="caller a already has 2 Rpc streams.*--max-streams-per-caller"
        ):
            with slots.hold("a"):
                pass
        with slots.hold("b"):
            assert slots.active == 3
            with pytest.raises(ResourceExhausted, match="3 Rpc streams \\(--max-streams\\)"):
                with slots.hold("c"):
                    pass
    assert slots.active == 0
    with slots.hold("a"), slots.hold("a"):  # released: a's slots are free again
        pass


class Peer:
    def __init__(self, peer: str):
        self._peer = peer

    def peer(self) -> str:
        return self._peer


@pytest.mark.parametrize(
    ("peer", "key"),
    [
        ("ipv4:127.0.0.1:5555", "127.0.0.1"),
        ("ipv6:[::1]:5555", "::1"),
        ("ipv6:%5B2001:db8::7%5D:443", "2001:db8::7"),
        ("unix:/run/parley.sock", "unix:/run/parley.sock"),
    ],
)
def test_caller_key_is_the_peer_host(peer, key):
    assert caller_key(Peer(peer)) == key  # type: ignore[arg-type]


class Context:
    def time_remaining(self) -> float | None:
        return None


async def _drain(stream) -> list:
    return [response async for response in stream]


def _vad_servicer(**limits) -> tuple[VadServicer, DynamicBatcher]:
    config = VadConfig(**limits)
    batcher: DynamicBatcher = DynamicBatcher(
        "vad-test",
        [lambda items: [(np.zeros(len(w), dtype=np.float32), s) for w, s in items]] * config.instance_count,
        config,
    )
    return VadServicer(config, batcher), batcher


VAD_CONFIG = vad_pb2.StreamDetectRequest(
    config=vad_pb2.StreamDetectConfig(
        format=audio_pb2.AudioFormat(encoding=audio_pb2.PCM_S16LE, sample_rate_hz=16000)
    )
)


async def test_vad_stream_detect_has_a_stream_limit_and_an_idle_timeout():
    servicer, batcher = _vad_servicer(max_streams=1, stream_idle_timeout_s=0.3)
    try:
        held = asyncio.ensure_future(_drain(servicer.StreamDetect(paced([VAD_CONFIG], 0, 10), Context())))
        await asyncio.sleep(0.1)
        with pytest.raises(ResourceExhausted, match="1 StreamDetect streams \\(--max-streams\\)"):
            await _drain(servicer.StreamDetect(paced([VAD_CONFIG], 0), Context()))
        with pytest.raises(DeadlineExceeded, match="--stream-idle-timeout-s"):
            await held  # config only, then nothing: the slot is not held forever
        assert await _drain(servicer.StreamDetect(paced([VAD_CONFIG], 0), Context())) == []
    finally:
        batcher.close()


class StreamingBackend(FakeBackend):
    """The window fake, plus what streaming needs: options."""

    def options(self, *, language: str = "", translate: bool = False, **kwargs) -> DecodeOptions:
        return DecodeOptions(language=language or None, task="translate" if translate else "transcribe")


STT_CONFIG = stt_pb2.StreamingRecognizeRequest(
    streaming_config=stt_pb2.StreamingRecognitionConfig(
        format=audio_pb2.AudioFormat(encoding=audio_pb2.PCM_S16LE, sample_rate_hz=16000)
    )
)


async def test_stt_streaming_recognize_has_a_stream_limit_and_an_idle_timeout():
    config = SttConfig(max_queue_delay_ms=20.0, max_streams=1, stream_idle_timeout_s=0.3)
    backend = StreamingBackend()
    batcher = batcher_for(backend, config)  # type: ignore[arg-type]
    servicer = SpeechToTextServicer(backend, batcher, config)  # type: ignore[arg-type]
    try:
        held = asyncio.ensure_future(
            _drain(servicer.StreamingRecognize(paced([STT_CONFIG], 0, 10), Context()))
        )
        await asyncio.sleep(0.1)
        with pytest.raises(ResourceExhausted, match="--max-streams"):
            await _drain(servicer.StreamingRecognize(paced([STT_CONFIG], 0), Context()))
        with pytest.raises(DeadlineExceeded, match="--stream-idle-timeout-s"):
            await held
        audio = stt_pb2.StreamingRecognizeRequest(audio_content=b"\0\0" * 1600)
        responses = await _drain(servicer.StreamingRecognize(paced([STT_CONFIG, audio], 0), Context()))
        # Without boundaries the stream is one utterance: 0.1 s is too short to decode; its final is empty.
        results = [(r.is_final, r.transcript) for response in responses for r in response.results]
        assert results == [(True, "")]
    finally:
        batcher.close()
        servicer.close()
