"""Every stage server's lifecycle as a real process: port 0, reflection, health, graceful drain on SIGTERM.

To add a stage, write an ``async def start_<stage>_call(channel)`` that starts a call, waits until the server
is working on it, and returns an awaitable that finishes the call and checks its results; then add a
``StageCase`` row to ``CASES``.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from parley.audio.v1 import audio_pb2
from parley.stt.v1 import stt_pb2, stt_pb2_grpc
from parley.translate.v1 import translate_pb2, translate_pb2_grpc
from parley.tts.v1 import tts_pb2, tts_pb2_grpc
from parley.vad.v1 import vad_pb2, vad_pb2_grpc
from services.harness import read_wav, start_server
from tests.helpers import read_manifest

pytestmark = pytest.mark.timeout(180)

DRAIN_DELAY_S = 3.0  # long enough for a health check to see NOT_SERVING on a loaded 2-core machine

InFlight = Callable[[grpc.aio.Channel], Awaitable[Awaitable[None]]]


@dataclass(frozen=True)
class StageCase:
    """One stage under test.

    Attributes:
        stage: Stage name, as in ``python -m services.<stage>``.
        service: Full proto service name, as reflection and health report it.
        start_call: Starts an in-flight call on the channel; returns an awaitable that completes it and
            asserts its results.
        flags: Extra server flags.
    """

    stage: str
    service: str
    start_call: InFlight
    flags: tuple[str, ...] = ()


async def start_vad_call(channel: grpc.aio.Channel) -> Awaitable[None]:
    """An open StreamDetect stream: half of a recording sent, speech started; the rest is sent later."""
    pcm, rate = read_wav(read_manifest("jfk")[0]["path"])
    call = vad_pb2_grpc.VoiceActivityDetectionStub(channel).StreamDetect()
    fmt = audio_pb2.AudioFormat(encoding=audio_pb2.PCM_S16LE, sample_rate_hz=rate, channels=1)
    await call.write(
        vad_pb2.StreamDetectRequest(config=vad_pb2.StreamDetectConfig(request_id="life", format=fmt))
    )
    half = len(pcm) // 2
    chunk = 640
    for start in range(0, half, chunk):
        await call.write(vad_pb2.StreamDetectRequest(audio=pcm[start : start + chunk]))
    first = await asyncio.wait_for(call.read(), 30)
    while first.WhichOneof("event") is None:  # progress reports (audio_processed_ms only)
        first = await asyncio.wait_for(call.read(), 30)
    assert first.WhichOneof("event") == "speech_started"

    async def finish() -> None:
        for start in range(half - half % chunk, len(pcm), chunk):
            await call.write(vad_pb2.StreamDetectRequest(audio=pcm[start : start + chunk]))
        await call.done_writing()
        responses = [first]
        while (response := await call.read()) is not grpc.aio.EOF:
            responses.append(response)
        assert await call.code() == grpc.StatusCode.OK
        ended = [r.speech_ended.segment for r in responses if r.WhichOneof("event") == "speech_ended"]
        assert len(ended) >= 2 and all(r.request_id == "life" for r in responses)
        assert ended[-1].end_ms > len(pcm) / 2 / rate * 1000 / 2, "the second half was processed too"

    return finish()


async def start_stt_call(channel: grpc.aio.Channel) -> Awaitable[None]:
    """An open StreamingRecognize stream: half of a recording sent, a first result received.

    The first result is an interim, or the final of "And so my fellow Americans" when the endpointer
    closes that utterance (JFK pauses after it) before an interim was decoded.
    """
    row = read_manifest("jfk")[0]
    pcm, rate = read_wav(row["path"])
    call = stt_pb2_grpc.SpeechToTextStub(channel).StreamingRecognize()
    fmt = audio_pb2.AudioFormat(encoding=audio_pb2.PCM_S16LE, sample_rate_hz=rate, channels=1)
    config = stt_pb2.RecognitionConfig(language="en")
    await call.write(
        stt_pb2.StreamingRecognizeRequest(
            streaming_config=stt_pb2.StreamingRecognitionConfig(
                request_id="life", format=fmt, config=config, interim_results=True
            )
        )
    )
    half = len(pcm) // 2
    chunk = 3200
    for start in range(0, half, chunk):
        await call.write(stt_pb2.StreamingRecognizeRequest(audio_content=pcm[start : start + chunk]))
    first = await asyncio.wait_for(call.read(), 60)
    assert first.request_id == "life" and first.results and first.results[0].transcript

    async def finish() -> None:
        for start in range(half - half % chunk, len(pcm), chunk):
            await call.write(stt_pb2.StreamingRecognizeRequest(audio_content=pcm[start : start + chunk]))
        await call.done_writing()
        responses = [first]
        while (response := await call.read()) is not grpc.aio.EOF:
            responses.append(response)
        assert await call.code() == grpc.StatusCode.OK
        assert all(r.request_id == "life" for r in responses)
        finals = " ".join(r.transcript for response in responses for r in response.results if r.is_final)
        assert "country" in finals.lower(), "the second half was processed too"

    return finish()


async def start_translate_call(channel: grpc.aio.Channel) -> Awaitable[None]:
    """A Translate call of 48 sentences on the default llm backend (several seconds of work), under way.

    It must outlast SIGTERM + the drain delay + 0.5 s, or the server rightly exits before the test finishes
    the call: the server decodes one sentence at a time (``--max-batch-size 1``: 3.9 s for 24 sentences
    here, 1.7 s batched, which once ended before the drain delay was over).
    """
    texts = 6 * [
        "Where is the station?",
        "I would like a ticket to Paris, please.",
        "The train leaves at eight o'clock.",
        "Is there a restaurant near the hotel?",
        "My friend is waiting for me outside.",
        "How much does this book cost?",
        "We are going to the beach tomorrow.",
        "Thank you very much for your help.",
    ]
    request = translate_pb2.TranslateRequest(
        request_id="life", texts=texts, source_language="en", target_language="fr"
    )
    call = asyncio.ensure_future(translate_pb2_grpc.TranslationStub(channel).Translate(request, timeout=120))
    await asyncio.sleep(0.5)
    assert not call.done(), "the call should still be translating"

    async def finish() -> None:
        response = await call
        assert response.request_id == "life" and len(response.translations) == len(texts)
        assert all(response.translations)

    return finish()


async def start_tts_call(channel: grpc.aio.Channel) -> Awaitable[None]:
    """A SynthesizeStream of 60 sentences (several seconds of Piper work), its first sentence received."""
    sentences = [
        f"This is sentence number {n}, spoken slowly so that the stream takes a while." for n in range(60)
    ]
    request = tts_pb2.SynthesizeRequest(request_id="life", text=" ".join(sentences), language="en")
    call = tts_pb2_grpc.SpeechSynthesisStub(channel).SynthesizeStream(request, timeout=120)
    first = await asyncio.wait_for(call.read(), 60)
    assert first.sentence_index == 0 and not first.is_last

    async def finish() -> None:
        responses = [first]
        while (response := await call.read()) is not grpc.aio.EOF:
            responses.append(response)
        assert await call.code() == grpc.StatusCode.OK
        assert [r.sentence_index for r in responses] == list(range(len(sentences)))
        assert responses[-1].is_last and all(r.request_id == "life" and r.audio for r in responses)

    return finish()


CASES = [
    StageCase("vad", "parley.vad.v1.VoiceActivityDetection", start_vad_call),
    StageCase("stt", "parley.stt.v1.SpeechToText", start_stt_call),
    StageCase(
        "translate",
        "parley.translate.v1.Translation",
        start_translate_call,
        ("--grace-s", "60", "--max-batch-size", "1"),
    ),
    StageCase(
        "tts",
        "parley.tts.v1.SpeechSynthesis",
        start_tts_call,
        ("--espeak-languages", "fr", "--grace-s", "60"),
    ),
]


async def _health(channel: grpc.aio.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await asyncio.wait_for(stub.Check(health_pb2.HealthCheckRequest(service=service)), 5)
    return response.status


@pytest.mark.parametrize("case", CASES, ids=[c.stage for c in CASES])
async def test_start_reflect_health_and_drain_on_sigterm(case: StageCase):
    server = start_server(case.stage, "--drain-delay-s", str(DRAIN_DELAY_S), "--grace-s", "20", *case.flags)
    try:
        host, port = server.address.rsplit(":", 1)
        assert int(port) > 0
        async with grpc.aio.insecure_channel(server.address) as channel:
            reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
            replies = reflect.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
            names = [s.name async for r in replies for s in r.list_services_response.service]
            assert case.service in names and "grpc.health.v1.Health" in names

            assert await _health(channel, case.service) == health_pb2.HealthCheckResponse.SERVING
            assert await _health(channel, "") == health_pb2.HealthCheckResponse.SERVING

            completion = await case.start_call(channel)
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            status = health_pb2.HealthCheckResponse.SERVING
            while status == health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() - signalled < DRAIN_DELAY_S, "health still SERVING after SIGTERM"
                await asyncio.sleep(0.05)
                status = await _health(channel, case.service)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING

            # Finish the call only once the drain delay is over, while server.stop(grace_s) is running.
            await asyncio.sleep(max(0.0, signalled + DRAIN_DELAY_S + 0.5 - time.monotonic()))
            assert server.process.poll() is None, "the server exited with a call in flight"
            await asyncio.wait_for(completion, 60)
        returncode = await asyncio.to_thread(server.process.wait, 30)
        assert returncode == 0, server.log()
        assert "ready, SERVING" in server.log() and "stopped" in server.log()
    finally:
        if server.process.poll() is None:
            server.process.kill()


async def test_stt_exits_within_its_grace_with_long_calls_queued():
    """SIGTERM while the batcher holds minutes of windows: calls cut at the grace end, queued windows dropped.

    Before, closing the batcher decoded every queued window of the cancelled calls (37-39 s past SIGTERM
    with a 10 s grace).
    """
    grace_s = 2.0
    server = start_server("stt", "--drain-delay-s", "0.2", "--grace-s", str(grace_s))
    rows = read_manifest("ljspeech")[:8]
    pcm = b"".join(read_wav(row["path"])[0] for row in rows)  # about 50 s: several windows per call
    request = stt_pb2.TranscribeRequest(
        audio=pcm,
        format=audio_pb2.AudioFormat(encoding=audio_pb2.PCM_S16LE, sample_rate_hz=16000, channels=1),
        config=stt_pb2.RecognitionConfig(language="en"),
    )
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = stt_pb2_grpc.SpeechToTextStub(channel)
            calls = [stub.Transcribe(request, timeout=600) for _ in range(8)]  # minutes of queued windows
            await asyncio.sleep(3.0)  # the first windows are decoding, the rest queued
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            returncode = await asyncio.to_thread(server.process.wait, 60)
            exit_s = time.monotonic() - signalled
            codes = []
            for call in calls:
                try:
                    await call
                    codes.append(grpc.StatusCode.OK)
                except grpc.aio.AioRpcError as exc:
                    codes.append(exc.code())
        assert returncode == 0, server.log()
        # Drain delay + grace + at most 2 s for a running batch + process teardown on a loaded machine; the
        # old close decoded every queued window first (19.9 s with half this queue, measured here).
        assert exit_s < 0.2 + grace_s + 2.0 + 15.0, (exit_s, server.log()[-2000:])
        # Calls whose windows all decoded within the grace may end OK; the rest were cut, not drained.
        assert codes.count(grpc.StatusCode.OK) < len(codes), codes
    finally:
        if server.process.poll() is None:
            server.process.kill()
