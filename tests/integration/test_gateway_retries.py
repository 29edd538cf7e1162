"""The gateway's stage channels retry by themselves (gRPC service-config retryPolicy and retryThrottling),
against scripted stage servers on port 0 that fail as told; the guard counts what the stages report.

Each server runs behind the stages' own StatusMappingInterceptor, which reports every attempt's number in the
trailing metadata. Each test has its own servers (new ports): gRPC keeps a retry throttle per server name.
"""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from parley.stt.v1 import stt_pb2, stt_pb2_grpc
from parley.tts.v1 import tts_pb2, tts_pb2_grpc
from parley.vad.v1 import vad_pb2, vad_pb2_grpc
from services.common.errors import DeadlineExceeded
from services.common.resilience import BreakerState, Deadline
from services.common.server import StatusMappingInterceptor
from services.gateway.config import GatewayConfig
from services.gateway.downstream import Downstream
from services.gateway.file_job import FileTranslator

pytestmark = [pytest.mark.asyncio(loop_scope="function"), pytest.mark.timeout(60)]

RATE_HZ = 16000
OK = "ok"


class ScriptedStages(
    vad_pb2_grpc.VoiceActivityDetectionServicer,
    stt_pb2_grpc.SpeechToTextServicer,
    tts_pb2_grpc.SpeechSynthesisServicer,
):
    """VAD Detect, STT Transcribe and TTS SynthesizeStream that answer per a script of status codes.

    Each call takes the script's next entry (OK once the script is done): a status code aborts the call with
    it. Records each call's arrival time, its ``grpc-previous-rpc-attempts`` header and its request size.
    """

    def __init__(self, *script: grpc.StatusCode | str):
        self.script = list(script)
        self.calls: list[tuple[float, str | None, int]] = []
        self.languages: list[str] = []

    def _take(self, request, context) -> grpc.StatusCode | str:
        """Records the call and takes its outcome from the script."""
        headers = dict(context.invocation_metadata())
        self.calls.append((time.monotonic(), headers.get("grpc-previous-rpc-attempts"), request.ByteSize()))
        return self.script.pop(0) if self.script else OK

    async def _answer(self, outcome: grpc.StatusCode | str, context) -> None:
        if isinstance(outcome, grpc.StatusCode):
            await context.abort(outcome, f"scripted {outcome.name}")

    async def Detect(self, request, context):  # noqa: N802 - generated gRPC method name
        await self._answer(self._take(request, context), context)
        segments = [(1000, 4000), (20000, 26000)]
        return vad_pb2.DetectResponse(
            segments=[vad_pb2.SpeechSegment(start_ms=s, end_ms=e) for s, e in segments]
        )

    async def Transcribe(self, request, context):  # noqa: N802 - generated gRPC method name
        outcome = self._take(request, context)
        self.languages.append("down" if outcome != OK else request.config.language)
        await self._answer(outcome, context)
        duration_ms = len(request.audio) // 2 * 1000 // RATE_HZ
        words = [
            stt_pb2.Word(start_ms=t, end_ms=t + 300, word=f" w{t}.", probability=0.9)
            for t in range(0, duration_ms - 300, 400)
        ]
        segment = stt_pb2.Segment(
            start_ms=0, end_ms=duration_ms, text="".join(w.word for w in words), words=words
        )
        return stt_pb2.TranscribeResponse(text=segment.text, language="fr", segments=[segment])

    async def SynthesizeStream(self, request, context):  # noqa: N802 - generated gRPC method name
        await self._answer(self._take(request, context), context)
        yield tts_pb2.SynthesizeStreamResponse(audio=b"\0\0", is_last=True)


async def serve(stages: ScriptedStages, **config) -> tuple[grpc.aio.Server, Downstream]:
    server = grpc.aio.server(interceptors=[StatusMappingInterceptor()])
    vad_pb2_grpc.add_VoiceActivityDetectionServicer_to_server(stages, server)
    stt_pb2_grpc.add_SpeechToTextServicer_to_server(stages, server)
    tts_pb2_grpc.add_SpeechSynthesisServicer_to_server(stages, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    config.setdefault("retry_initial_backoff_ms", 10)
    gateway = GatewayConfig(vad_address=address, stt_address=address, tts_address=address, **config)
    return server, Downstream(gateway)


async def close(server: grpc.aio.Server, downstream: Downstream) -> None:
    await downstream.close()
    await server.stop(0)


def retries(stage: str) -> float:
    return REGISTRY.get_sample_value("parley_retries_total", {"stage": stage}) or 0.0


def transcribe_request(seconds: float = 1.0) -> stt_pb2.TranscribeRequest:
    return stt_pb2.TranscribeRequest(audio=bytes(int(seconds * RATE_HZ) * 2))


async def test_a_stage_failing_unavailable_once_is_retried_and_one_retry_is_counted():
    stages = ScriptedStages(grpc.StatusCode.UNAVAILABLE)
    server, downstream = await serve(stages)
    before = retries("stt")
    try:
        # 60 s of audio (1.9 MB): past gRPC's default 256 KiB retry buffer, which would forbid the retry.
        response = await downstream.transcribe(transcribe_request(60.0), Deadline.after(10.0))
    finally:
        await close(server, downstream)
    assert response.language == "fr"
    assert [previous for _, previous, _ in stages.calls] == [None, "1"]
    assert retries("stt") == before + 1
    assert downstream.guards["stt"].breaker.state is BreakerState.CLOSED


async def test_retries_on_unavailable_with_growing_jittered_backoff():
    stages = ScriptedStages(grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE)
    server, downstream = await serve(stages, retry_initial_backoff_ms=100, retry_max_backoff_ms=1000)
    try:
        await downstream.transcribe(transcribe_request(), Deadline(None))
    finally:
        await close(server, downstream)
    assert len(stages.calls) == 3
    waits_s = [later[0] - earlier[0] for earlier, later in zip(stages.calls, stages.calls[1:], strict=False)]
    # Bounds 0.1 s then 0.2 s; grpc-core jitters each by up to 20 %; 0.1 s for a loaded machine.
    assert 0 < waits_s[0] <= 0.1 * 1.2 + 0.1 and 0 < waits_s[1] <= 0.2 * 1.2 + 0.1, waits_s
    assert downstream.guards["stt"].breaker.state is BreakerState.CLOSED


@pytest.mark.parametrize(
    "code",
    [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL],
)
async def test_never_retries_other_codes(code):
    stages = ScriptedStages(code)
    server, downstream = await serve(stages)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await downstream.transcribe(transcribe_request(), Deadline(None))
    finally:
        await close(server, downstream)
    assert err.value.code() == code and len(stages.calls) == 1


async def test_never_retries_streams():
    stages = ScriptedStages(grpc.StatusCode.UNAVAILABLE)
    server, downstream = await serve(stages, breaker_failure_threshold=1)
    try:
        with pytest.raises(grpc.aio.AioRpcError):
            async for _ in downstream.synthesize_stream(tts_pb2.SynthesizeRequest(text="a"), Deadline(None)):
                pass
    finally:
        await close(server, downstream)
    assert len(stages.calls) == 1
    assert downstream.guards["tts"].breaker.state is BreakerState.OPEN


async def test_gives_up_after_max_attempts():
    stages = ScriptedStages(*[grpc.StatusCode.UNAVAILABLE] * 5)
    server, downstream = await serve(stages, retry_max_attempts=2, breaker_failure_threshold=10)
    try:
        with pytest.raises(grpc.aio.AioRpcError):
            await downstream.transcribe(transcribe_request(), Deadline(None))
    finally:
        await close(server, downstream)
    assert len(stages.calls) == 2


async def test_retry_throttle_stops_retries_while_half_its_tokens_are_spent():
    # gRPC's throttle (gRFC A6): 10 tokens, each failed attempt takes one, no retry at 5 or fewer; each
    # success gives back retry_budget_ratio. A stage that keeps failing gets 2 retries, then none.
    stages = ScriptedStages(*[grpc.StatusCode.UNAVAILABLE] * 100)
    server, downstream = await serve(
        stages, retry_max_attempts=2, retry_budget_ratio=0.1, breaker_failure_threshold=10_000
    )
    try:
        for _ in range(20):
            with pytest.raises(grpc.aio.AioRpcError):
                await downstream.transcribe(transcribe_request(), Deadline(None))
        assert len(stages.calls) - 20 == 2
        stages.script.clear()  # the stage is back: 70 successes refill the empty bucket to 7 tokens
        for _ in range(70):
            await downstream.transcribe(transcribe_request(), Deadline(None))
        stages.script.append(grpc.StatusCode.UNAVAILABLE)
        await downstream.transcribe(transcribe_request(), Deadline(None))
    finally:
        await close(server, downstream)
    assert [previous for _, previous, _ in stages.calls[-2:]] == [None, "1"]  # 6 left after it: retried


async def test_never_retries_past_the_callers_deadline():
    stages = ScriptedStages(*[grpc.StatusCode.UNAVAILABLE] * 10)
    server, downstream = await serve(
        stages, retry_max_attempts=5, retry_initial_backoff_ms=100, breaker_failure_threshold=100
    )
    started_s = time.monotonic()
    try:
        with pytest.raises((grpc.aio.AioRpcError, DeadlineExceeded)):
            await downstream.transcribe(transcribe_request(), Deadline.after(0.25))
    finally:
        await close(server, downstream)
    assert time.monotonic() - started_s < 0.25 + 0.1
    assert all(at - started_s < 0.25 for at, _, _ in stages.calls)


async def test_a_stage_restarting_mid_file_job_is_retried():
    stages = ScriptedStages(OK, grpc.StatusCode.UNAVAILABLE)  # VAD answers; the first Transcribe: restarting
    server, downstream = await serve(stages)
    try:
        result = await FileTranslator(downstream).run(np.zeros(30 * RATE_HZ, np.int16), source_language="fr")
    finally:
        await close(server, downstream)
    assert stages.languages == ["down", "fr", "fr"]  # the failed chunk sent again, then the other one
    assert result.source_cues


async def test_an_unreachable_stage_opens_its_breaker_on_one_call():
    stages = ScriptedStages()
    server, downstream = await serve(stages, retry_max_attempts=2, breaker_failure_threshold=2)
    await server.stop(0)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await downstream.transcribe(transcribe_request(), Deadline.after(5.0))
    finally:
        await downstream.close()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert downstream.guards["stt"].breaker.state is BreakerState.OPEN  # 2 attempts refused at once
