"""The gateway against scripted in-process fake stage servers: ordering, pipelining, protocol errors,
stream limit, degradation with breakers, and deadline cancellation."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import time

import grpc
import numpy as np
import pytest

from parley.audio.v1 import audio_pb2
from parley.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from parley.stt.v1 import stt_pb2, stt_pb2_grpc
from parley.translate.v1 import translate_pb2, translate_pb2_grpc
from parley.tts.v1 import tts_pb2, tts_pb2_grpc
from parley.vad.v1 import vad_pb2, vad_pb2_grpc
from services.clients.gateway_client import Collector, GatewayClient, split_pcm
from services.common.server import StatusMappingInterceptor
from services.common.telemetry import server_interceptors
from services.gateway.config import GatewayConfig
from services.gateway.downstream import Downstream
from services.gateway.servicer import GatewayServicer

RATE = 16000
pytestmark = pytest.mark.asyncio(loop_scope="session")


class FakeVad(vad_pb2_grpc.VoiceActivityDetectionServicer):
    """Energy endpointer: 10 ms frames above 0.05 RMS are speech; 200 ms of silence ends a segment."""

    def __init__(self):
        self.cancelled = 0
        self.fail = False
        self.fail_at_end = False  # fails once the caller has sent all its audio

    async def StreamDetect(self, request_iterator, context):
        if self.fail:
            await context.read()
            await context.abort(grpc.StatusCode.UNAVAILABLE, "vad is down")
        if self.fail_at_end:
            async for _ in request_iterator:
                pass
            await context.abort(grpc.StatusCode.UNAVAILABLE, "vad is down")
        first = True
        pos = 0
        start = None
        silence = 0
        pending = np.zeros(0, dtype=np.float32)
        try:
            async for request in request_iterator:
                if first:
                    first = False
                    continue
                pending = np.concatenate(
                    [pending, np.frombuffer(request.audio, "<i2").astype(np.float32) / 32768]
                )
                while len(pending) >= 160:
                    frame, pending = pending[:160], pending[160:]
                    speech = float(np.sqrt(np.mean(frame**2))) > 0.05
                    pos += 10
                    if pos % 1000 == 0:  # progress, as the real VAD reports it
                        yield vad_pb2.StreamDetectResponse(audio_processed_ms=pos)
                    if speech:
                        silence = 0
                        if start is None:
                            start = pos - 10
                            yield vad_pb2.StreamDetectResponse(
                                speech_started=vad_pb2.SpeechStarted(start_ms=start), audio_processed_ms=pos
                            )
                    elif start is not None:
                        silence += 10
                        if silence >= 200:
                            segment = vad_pb2.SpeechSegment(start_ms=start, end_ms=pos - silence)
                            yield vad_pb2.StreamDetectResponse(
                                speech_ended=vad_pb2.SpeechEnded(segment=segment), audio_processed_ms=pos
                            )
                            start, silence = None, 0
            if start is not None:
                segment = vad_pb2.SpeechSegment(start_ms=start, end_ms=pos)
                yield vad_pb2.StreamDetectResponse(speech_ended=vad_pb2.SpeechEnded(segment=segment))
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


class FakeStt(stt_pb2_grpc.SpeechToTextServicer):
    """Transcript = "words N" with N the utterance's whole seconds (rounded); TRANSLATE prefixes "en:".

    StreamingRecognize follows the caller's boundaries: at each END, after ``delay_s``, one commit (one word
    spanning the utterance, closing its clause) and the final result; with ``clauses`` > 1, that many
    one-word clauses ("words N," "part 2," ... "part K.") committed in one response, as a final decode
    that closes several clauses at once; with interim_results, an interim "words k" after each second of an
    utterance's audio. Transcribe serves DIRECT mode's translations.
    """

    def __init__(self, delay_s: float = 0.0, clauses: int = 1):
        self.delay_s = delay_s
        self.clauses = clauses
        self.log: list[tuple[str, float, float]] = []
        self.called = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def _decode(self, text: str) -> None:
        started = time.monotonic()
        self.called.set()
        try:
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        self.log.append((text, started, time.monotonic()))

    async def StreamingRecognize(self, request_iterator, context):
        requests = aiter(request_iterator)
        config = (await anext(requests)).streaming_config
        assert config.caller_endpointing
        position_ms, start_ms, index, interims = 0, None, -1, 0
        async for request in requests:
            if request.WhichOneof("streaming_request") == "audio_content":
                position_ms += len(request.audio_content) // 32
                heard_ms = position_ms - start_ms if start_ms is not None else 0
                if config.interim_results and heard_ms >= 1000 * (interims + 1):
                    interims += 1
                    yield self._result(index, f"words {interims}", start_ms, position_ms, stability=0.0)
                continue
            boundary = request.boundary
            if boundary.kind == stt_pb2.SpeechBoundary.START:
                start_ms, index, interims = boundary.at_ms, index + 1, 0
            elif boundary.kind == stt_pb2.SpeechBoundary.END and start_ms is not None:
                texts = [f"words {round((boundary.at_ms - start_ms) / 1000)}"]
                texts += [f"part {k + 2}" for k in range(self.clauses - 1)]
                text = " ".join(texts)
                await self._decode(text)
                committed = stt_pb2.StreamingRecognizeResponse()
                span_ms = (boundary.at_ms - start_ms) // len(texts)
                for k, clause in enumerate(texts):
                    end_ms = boundary.at_ms if k == len(texts) - 1 else start_ms + (k + 1) * span_ms
                    word = stt_pb2.Word(word=" " + clause, start_ms=start_ms + k * span_ms, end_ms=end_ms)
                    result = self._result(index, text, start_ms, end_ms, stability=1.0).results[0]
                    result.committed.CopyFrom(stt_pb2.Segment(text=clause, words=[word]))
                    result.closes_clause, result.commit_index = True, k
                    committed.results.append(result)
                yield committed
                final = self._result(index, text, start_ms, boundary.at_ms, stability=1.0)
                final.results[0].is_final = True
                yield final
                start_ms = None

    @staticmethod
    def _result(index, text, start_ms, end_ms, stability):
        return stt_pb2.StreamingRecognizeResponse(
            results=[
                stt_pb2.StreamingRecognitionResult(
                    transcript=text,
                    stability=stability,
                    utterance_index=index,
                    start_ms=start_ms,
                    end_ms=end_ms,
                    language="fr",
                )
            ]
        )

    async def Transcribe(self, request, context):
        seconds = round(len(request.audio) / 2 / RATE)
        text = f"words {seconds}"
        if request.config.task == stt_pb2.TRANSLATE:
            text = "en: " + text
        await self._decode(text)
        return stt_pb2.TranscribeResponse(
            request_id=request.request_id, text=text, language=request.config.language or "fr"
        )


class FakeTranslation(translate_pb2_grpc.TranslationServicer):
    def __init__(self):
        self.fail = False
        self.calls = 0
        self.requests: list[list[str]] = []  # the texts of each call
        self.pairs: list[tuple[str, str]] | None = None  # None: ListLanguagePairs is UNIMPLEMENTED

    async def ListLanguagePairs(self, request, context):
        if self.pairs is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no listing")
        return translate_pb2.ListLanguagePairsResponse(
            pairs=[translate_pb2.LanguagePair(source_language=s, target_language=t) for s, t in self.pairs],
            model="fake",
        )

    async def Translate(self, request, context):
        self.calls += 1
        self.requests.append(list(request.texts))
        if self.fail:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "translation is down")
        return translate_pb2.TranslateResponse(
            request_id=request.request_id, translations=[f"T({t})" for t in request.texts]
        )


class FakeTts(tts_pb2_grpc.SpeechSynthesisServicer):
    """Two sentences per text; the first text is slow to speak (to test ordering under pipelining)."""

    def __init__(self, slow_first_s: float = 0.0):
        self.slow_first_s = slow_first_s
        self.log: list[tuple[str, float, float]] = []
        self.fail = False
        self.voices: list[tuple[str, str]] | None = None  # None: ListVoices is UNIMPLEMENTED

    async def ListVoices(self, request, context):
        if self.voices is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no listing")
        return tts_pb2.ListVoicesResponse(
            voices=[tts_pb2.Voice(name=n, language=lang, backend="piper") for n, lang in self.voices]
        )

    async def SynthesizeStream(self, request, context):
        if self.fail:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "tts is down")
        started = time.monotonic()
        delay = self.slow_first_s if not self.log else 0.0
        self.log.append((request.text, started, 0.0))
        for i in range(2):
            await asyncio.sleep(delay / 2)
            yield tts_pb2.SynthesizeStreamResponse(
                request_id=request.request_id,
                audio=b"\x01\x00" * 1600,
                format=audio_pb2.AudioFormat(encoding=audio_pb2.PCM_S16LE, sample_rate_hz=22050, channels=1),
                sentence_index=i,
                is_last=i == 1,
            )
        self.log[-1] = (request.text, started, time.monotonic())


@dataclasses.dataclass
class Cluster:
    vad: FakeVad
    stt: FakeStt
    translation: FakeTranslation
    tts: FakeTts
    gateway: str
    servicer: GatewayServicer


async def _serve(add) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server(interceptors=[*server_interceptors(), StatusMappingInterceptor()])
    add(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
async def cluster(request):
    params = getattr(request, "param", {})
    vad, stt, tr, tts = (
        FakeVad(),
        FakeStt(params.get("stt_delay_s", 0.05), params.get("clauses", 1)),
        FakeTranslation(),
        FakeTts(params.get("slow_first_s", 0.0)),
    )
    servers = []
    addresses = {}
    for name, servicer, add in (
        ("vad", vad, vad_pb2_grpc.add_VoiceActivityDetectionServicer_to_server),
        ("stt", stt, stt_pb2_grpc.add_SpeechToTextServicer_to_server),
        ("translate", tr, translate_pb2_grpc.add_TranslationServicer_to_server),
        ("tts", tts, tts_pb2_grpc.add_SpeechSynthesisServicer_to_server),
    ):
        server, address = await _serve(lambda s, servicer=servicer, add=add: add(servicer, s))
        servers.append(server)
        addresses[name] = address
    config = GatewayConfig(
        vad_address=addresses["vad"],
        stt_address=addresses["stt"],
        translate_address=addresses["translate"],
        tts_address=addresses["tts"],
        max_streams=params.get("max_streams", 4),
        max_pending_utterances=params.get("max_pending_utterances", 4),
        max_buffer_s=params.get("max_buffer_s", 60.0),
        max_utterance_s=params.get("max_utterance_s", 30.0),
        breaker_failure_threshold=2,
        breaker_reset_timeout_s=0.5,
        retry_initial_backoff_ms=10,
        **params.get("gateway", {}),
    )
    downstream = Downstream(config)
    servicer = GatewayServicer(config, downstream)
    gateway, address = await _serve(lambda s: gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, s))
    servers.append(gateway)
    yield Cluster(vad, stt, tr, tts, address, servicer)
    await downstream.close()
    for server in servers:
        await server.stop(0)


def speech(*durations_s: float, gap_s: float = 0.4) -> bytes:
    """Bursts of noise (speech to the fake VAD) separated by silence, as PCM_S16LE 16 kHz."""
    rng = np.random.default_rng(0)
    parts = [np.zeros(int(0.2 * RATE), np.float32)]
    for d in durations_s:
        parts.append((0.3 * rng.standard_normal(int(d * RATE))).clip(-1, 1).astype(np.float32))
        parts.append(np.zeros(int(gap_s * RATE), np.float32))
    return (np.concatenate(parts) * 32767).astype("<i2").tobytes()


def config(**kw) -> gateway_pb2.TranslateSpeechConfig:
    base = dict(
        request_id="r1",
        source_language="fr",
        target_language="de",
        input_format=audio_pb2.AudioFormat(encoding=audio_pb2.PCM_S16LE, sample_rate_hz=RATE, channels=1),
        synthesize_speech=True,
    )
    base.update(kw)
    return gateway_pb2.TranslateSpeechConfig(**base)


async def run_stream(address, cfg, pcm, **kw) -> Collector:
    collector = Collector()
    async with GatewayClient(address) as client:
        async for event in client.translate_speech(cfg, split_pcm(pcm, 50), **kw):
            assert event.request_id == cfg.request_id
            collector.add(event)
    return collector


@pytest.mark.timeout(30)
async def test_healthy_and_abandoned_streams_log_nothing_at_warning_or_above(cluster, caplog):
    """Tracing off (no provider), the servers' OpenTelemetry interceptors still in place, as in production."""
    caplog.set_level(logging.WARNING)
    result = await run_stream(cluster.gateway, config(), speech(1.0, 2.0))
    assert result.end.utterances == 2
    async with GatewayClient(cluster.gateway) as client:  # a caller that walks away after the first event
        async for _ in client.translate_speech(config(), split_pcm(speech(1.0, 2.0, 3.0), 50)):
            break
    await asyncio.wait_for(_until(lambda: cluster.servicer.streams.active == 0), timeout=20)
    gc.collect()  # abandoned async generators are finalised here, where a context detach error would log
    await asyncio.sleep(0.1)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "cluster",
    [{"stt_delay_s": 0.05, "max_pending_utterances": 2, "max_buffer_s": 8.0, "max_utterance_s": 3.0}],
    indirect=True,
)
async def test_audio_sent_at_file_speed_loses_no_utterance(cluster):
    """40 utterances (58 s) sent at once into an 8 s buffer: intake waits for the pipeline, none is lost."""
    result = await run_stream(cluster.gateway, config(), speech(*[1.0] * 40))
    assert result.end.utterances == 40
    for index, u in result.utterances.items():
        assert u.transcript == "words 1" and not u.errors, (index, u.transcript, u.errors)
    assert [u.translation for u in result.utterances.values()] == ["T(words 1)"] * 40


async def _held_stream(cluster, pcm: bytes, release: asyncio.Event) -> tuple[Collector, grpc.StatusCode]:
    """Sends ``pcm`` at once, then keeps the stream open (like a live caller) until ``release`` is set."""
    audio = [gateway_pb2.TranslateSpeechRequest(audio=chunk) for chunk in split_pcm(pcm, 100)]
    requests = _held(gateway_pb2.TranslateSpeechRequest(config=config()), release, *audio, gap_s=0.0)
    collector = Collector()
    async with grpc.aio.insecure_channel(cluster.gateway) as channel:
        call = gateway_pb2_grpc.GatewayStub(channel).TranslateSpeech(requests)
        async for event in call:
            collector.add(event)
        return collector, await call.code()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("cluster", "budget_s", "finished"),
    [({"stt_delay_s": 0.2}, 20.0, True), ({"stt_delay_s": 60.0}, 0.5, False)],
    indirect=["cluster"],
    ids=["utterances-finish", "grace-runs-out"],
)
async def test_drain_ends_live_streams_with_every_utterance_answered(cluster, budget_s, finished):
    """On SIGTERM the gateway ends open streams itself: each detected utterance gets a result or an error."""
    release = asyncio.Event()
    stream = asyncio.ensure_future(_held_stream(cluster, speech(1.0, 1.0, 1.0), release))
    await asyncio.wait_for(_until(lambda: len(cluster.stt.log) >= 2 or cluster.stt.called.is_set()), 20)
    await asyncio.sleep(0.5)  # the third utterance is detected
    await cluster.servicer.drain(budget_s + 1.0)  # the servicer keeps 1 s of the grace for sending
    collector, code = await asyncio.wait_for(stream, 20)
    release.set()
    assert code == grpc.StatusCode.OK and collector.end is not None
    started = {i for i, kind in collector.events if kind == "speech_started"}
    assert started and collector.end.utterances == len(started)
    for i in started:
        u = collector.utterances[i]
        if finished:
            assert u.transcript == "words 1" and not u.errors, (i, u.transcript, u.errors)
        else:
            assert u.transcript or [e["code"] for e in u.errors] == [14], (i, u.errors)
    if not finished:
        assert any(e["stage"] == "gateway" for u in collector.utterances.values() for e in u.errors)


# One clause per utterance with the fake STT: its commit, translation, two audio chunks and clause timings,
# then the utterance's empty last audio chunk and timings. The final transcript comes after the commit.
EXPECTED_ORDER = [
    "speech_started",
    "commit",
    "translation",
    "audio",
    "audio",
    "clause_timings",
    "audio",
    "timings",
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("cluster", [{"slow_first_s": 1.0, "stt_delay_s": 0.05}], indirect=True)
async def test_events_stay_in_utterance_order_while_stages_pipeline(cluster):
    result = await run_stream(cluster.gateway, config(), speech(1.0, 2.0, 3.0))
    indices = [i for i, kind in result.events if kind != "end_of_stream"]
    assert indices == sorted(indices)
    for index in range(3):
        kinds = [kind for i, kind in result.events if i == index and kind != "end_of_stream"]
        assert [k for k in kinds if k != "transcript"] == EXPECTED_ORDER, (index, kinds)
        assert kinds.index("commit") < kinds.index("transcript") < kinds.index("timings"), kinds
    assert [u.transcript for u in result.utterances.values()] == ["words 1", "words 2", "words 3"]
    assert [u.translation for u in result.utterances.values()] == ["T(words 1)", "T(words 2)", "T(words 3)"]
    assert result.events[-1] == (3, "end_of_stream") and result.end.utterances == 3
    assert result.end.audio_duration_s == pytest.approx(0.2 + 6.0 + 3 * 0.4, abs=0.01)
    # Pipelined: utterance 1 was transcribed while utterance 0 was still being spoken (slow TTS).
    tts0_end = cluster.tts.log[0][2]
    stt1_start = next(start for text, start, _ in cluster.stt.log if text == "words 2")
    assert stt1_start < tts0_end
    u0 = result.utterances[0]
    assert u0.start_ms == pytest.approx(200, abs=20) and u0.end_ms == pytest.approx(1200, abs=20)
    assert u0.timings["tts_ms"] >= 900 and u0.timings["end_of_speech_to_first_audio_ms"] > 0
    assert len(u0.audio) == 2 * 3200


@pytest.mark.timeout(30)
@pytest.mark.parametrize("cluster", [{"clauses": 3}], indirect=True)
async def test_clauses_closed_together_share_one_translation_request(cluster):
    result = await run_stream(cluster.gateway, config(), speech(1.0, 2.0))
    assert cluster.translation.requests == [["words 1", "part 2", "part 3"], ["words 2", "part 2", "part 3"]]
    for u in result.utterances.values():
        assert [t["clause_index"] for t in u.clause_timings] == [0, 1, 2], u.clause_timings
        assert u.translation == f"T(words {u.index + 1}) T(part 2) T(part 3)"
        assert not u.errors

    cluster.translation.fail = True
    failed = await run_stream(cluster.gateway, config(), speech(1.0))
    assert [[e["stage"] for e in u.errors] for u in failed.utterances.values()] == [["translate"]]


@pytest.mark.timeout(30)
async def test_direct_mode_uses_whisper_translate_without_the_translation_stage(cluster):
    result = await run_stream(
        cluster.gateway, config(target_language="en", mode=gateway_pb2.DIRECT), speech(1.0)
    )
    u = result.utterances[0]
    assert u.transcript == "words 1" and u.translation == "en: words 1"
    assert cluster.translation.calls == 0


@pytest.mark.timeout(30)
async def test_transcription_only_when_no_target(cluster):
    result = await run_stream(
        cluster.gateway, config(target_language="", synthesize_speech=True), speech(1.0)
    )
    kinds = [kind for _, kind in result.events]
    assert kinds == ["speech_started", "commit", "transcript", "timings", "end_of_stream"]


@pytest.mark.timeout(30)
async def test_translation_down_transcripts_still_flow_and_breaker_fails_fast(cluster):
    cluster.translation.fail = True
    result = await run_stream(cluster.gateway, config(), speech(1.0, 1.0, 1.0, 1.0))
    assert [u.transcript for u in result.utterances.values()] == ["words 1"] * 4
    for u in result.utterances.values():
        assert [e["stage"] for e in u.errors] == ["translate"] and u.errors[0]["code"] == 14
        assert not u.audio
    # Threshold 2 failures (retries included): the later utterances are refused by the open breaker.
    assert "circuit breaker open" in result.utterances[3].errors[0]["message"]
    calls_when_open = cluster.translation.calls
    assert calls_when_open <= 4
    # After the reset timeout the probe succeeds and full results return.
    cluster.translation.fail = False
    await asyncio.sleep(0.6)
    result = await run_stream(cluster.gateway, config(), speech(1.0))
    assert result.utterances[0].translation == "T(words 1)" and not result.utterances[0].errors
    assert cluster.servicer.downstream.guards["translate"].breaker.state.name == "CLOSED"


@pytest.mark.timeout(30)
async def test_tts_down_text_still_flows(cluster):
    cluster.tts.fail = True
    result = await run_stream(cluster.gateway, config(), speech(1.0))
    u = result.utterances[0]
    assert u.transcript == "words 1" and u.translation == "T(words 1)" and not u.audio
    assert u.errors == [{"stage": "tts", "code": 14, "message": "tts is down"}]


async def _expect_code(address, requests, code):
    return await _expect_code_of(address, iter(requests), code)


@pytest.mark.timeout(30)
async def test_protocol_errors_end_the_stream_with_invalid_argument_while_others_go_on(cluster):
    audio = gateway_pb2.TranslateSpeechRequest(audio=speech(1.0))
    cfg = gateway_pb2.TranslateSpeechRequest(config=config())
    healthy = asyncio.create_task(run_stream(cluster.gateway, config(), speech(1.0, 1.0)))
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert "before the config" in await _expect_code(cluster.gateway, [audio], invalid)
    assert "second config" in await _expect_code(cluster.gateway, [cfg, audio, cfg], invalid)
    undefined = gateway_pb2.TranslateSpeechRequest(
        config=config(input_format=audio_pb2.AudioFormat(encoding=7, sample_rate_hz=RATE))
    )
    details = await _expect_code(cluster.gateway, [undefined], invalid)
    assert "config.input_format.encoding 7 is not defined" in details
    unspecified = gateway_pb2.TranslateSpeechRequest(
        config=config(input_format=audio_pb2.AudioFormat(sample_rate_hz=RATE))
    )
    assert "unknown audio encoding" in await _expect_code(cluster.gateway, [unspecified], invalid)
    direct_fr = gateway_pb2.TranslateSpeechRequest(
        config=config(mode=gateway_pb2.DIRECT, target_language="fr")
    )
    assert "English only" in await _expect_code(cluster.gateway, [direct_fr], invalid)
    assert "before its config" in await _expect_code(cluster.gateway, [], invalid)
    result = await asyncio.wait_for(healthy, 20)
    assert [u.translation for u in result.utterances.values()] == ["T(words 1)"] * 2


@pytest.mark.timeout(30)
@pytest.mark.parametrize("cluster", [{"max_streams": 1}], indirect=True)
async def test_past_max_streams_resource_exhausted_at_once(cluster):
    release = asyncio.Event()

    async def held():
        yield gateway_pb2.TranslateSpeechRequest(config=config())
        await release.wait()

    async with grpc.aio.insecure_channel(cluster.gateway) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        first = stub.TranslateSpeech(held())
        await asyncio.wait_for(_until(lambda: cluster.servicer.streams.active == 1), timeout=20)
        # Refused while the first stream still holds the only slot: not queued behind it.
        second = stub.TranslateSpeech(iter([gateway_pb2.TranslateSpeechRequest(config=config())]))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in second:
                pass
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        release.set()
        events = [e async for e in first]
        assert events[-1].WhichOneof("event") == "end_of_stream"
    await asyncio.wait_for(_until(lambda: cluster.servicer.streams.active == 0), timeout=20)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("cluster", [{"stt_delay_s": 120.0}], indirect=True)
async def test_short_deadline_ends_the_call_and_cancels_downstream_work(cluster):
    pcm = speech(10.0)  # sent at once: the fake VAD ends the utterance when the stream half-closes
    timeout_s = 3.0  # room for the utterance to reach STT on a loaded machine; STT itself never answers
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await run_stream(cluster.gateway, config(), pcm, timeout_s=timeout_s)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < timeout_s + 2.0
    assert cluster.stt.called.is_set(), "the utterance never reached STT before the deadline"
    # No stage keeps working on it: the STT call (its own timeout was the remaining deadline) is cancelled.
    await asyncio.wait_for(cluster.stt.cancelled.wait(), timeout=30)
    assert not cluster.stt.log
    await asyncio.wait_for(_until(lambda: cluster.servicer.streams.active == 0), timeout=30)


async def _until(predicate) -> None:
    """Returns once ``predicate()`` holds, checking every 10 ms (bound it with ``asyncio.wait_for``)."""
    while not predicate():  # noqa: ASYNC110 - a counter with no event to wait on
        await asyncio.sleep(0.01)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("cluster", [{"stt_delay_s": 0.3}], indirect=True)
async def test_interim_transcripts_precede_the_final_one(cluster):
    async def realtime():
        for chunk in split_pcm(speech(2.5), 100):
            yield chunk
            await asyncio.sleep(0.1)

    collector = Collector()
    async with GatewayClient(cluster.gateway) as client:
        async for event in client.translate_speech(config(interim_results=True), realtime()):
            collector.add(event)
    kinds = [kind for _, kind in collector.events]
    transcripts = [i for i, k in enumerate(kinds) if k == "transcript"]
    assert len(transcripts) >= 2, kinds
    assert collector.utterances[0].interim and collector.utterances[0].transcript == "words 2"
    assert collector.utterances[0].interim[0] == "words 1"  # STT's interims, forwarded before the final


@pytest.mark.timeout(30)
async def test_vad_down_reports_an_error_event_and_the_stream_still_ends_cleanly(cluster):
    cluster.vad.fail = True
    result = await run_stream(cluster.gateway, config(), speech(1.0, 1.0))
    errors = [e for u in result.utterances.values() for e in u.errors]
    # UNAVAILABLE as sent; grpc-core may report INTERNAL instead when the abort races the client's write.
    assert [e["stage"] for e in errors] == ["vad"] and errors[0]["code"] in (13, 14)
    assert result.events[-1][1] == "end_of_stream"
    cluster.vad.fail = False
    await asyncio.sleep(0.6)  # breaker reset timeout
    result = await run_stream(cluster.gateway, config(), speech(1.0, 1.0))
    assert [u.translation for u in result.utterances.values()] == ["T(words 1)"] * 2


@pytest.mark.timeout(30)
async def test_vad_failing_after_the_whole_input_was_sent_still_ends_the_stream(cluster):
    cluster.vad.fail_at_end = True
    result = await run_stream(cluster.gateway, config(), speech(1.0, 1.0))
    errors = [e for u in result.utterances.values() for e in u.errors]
    assert [e["stage"] for e in errors] == ["vad"] and result.events[-1][1] == "end_of_stream"


async def _held(first, release: asyncio.Event, *more, gap_s: float = 0.0):
    """Sends ``first`` and ``more`` (``gap_s`` apart), then nothing until ``release`` is set.

    A test expecting the server to end the call sends nothing after it may have: a write racing the server's
    status can fail the call INTERNAL on the client side.
    """
    yield first
    for message in more:
        await asyncio.sleep(gap_s)
        yield message
    await release.wait()


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "cluster", [{"max_streams": 2, "gateway": {"stream_idle_timeout_s": 0.5}}], indirect=True
)
async def test_config_only_streams_time_out_instead_of_locking_everyone_out(cluster):
    release = asyncio.Event()
    async with grpc.aio.insecure_channel(cluster.gateway) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        idle = [
            stub.TranslateSpeech(_held(gateway_pb2.TranslateSpeechRequest(config=config()), release))
            for _ in range(2)
        ]
        for call in idle:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in call:
                    pass
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "--stream-idle-timeout-s" in err.value.details()
        release.set()
    await asyncio.wait_for(_until(lambda: cluster.servicer.streams.active == 0), timeout=20)
    result = await run_stream(cluster.gateway, config(), speech(1.0))  # the slots are free again
    assert result.utterances[0].translation == "T(words 1)"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("cluster", [{"gateway": {"max_stream_duration_s": 0.6}}], indirect=True)
async def test_a_stream_sending_past_max_stream_duration_s_ends(cluster):
    chunks = [gateway_pb2.TranslateSpeechRequest(audio=c) for c in split_pcm(speech(1.0), 100)[:4]]
    started = time.monotonic()
    details = await _expect_code_of(
        cluster.gateway,
        _held(gateway_pb2.TranslateSpeechRequest(config=config()), asyncio.Event(), *chunks, gap_s=0.1),
        grpc.StatusCode.DEADLINE_EXCEEDED,
    )
    assert "--max-stream-duration-s" in details  # not the idle timeout (30 s): the stream still had time
    assert time.monotonic() - started < 5


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "cluster", [{"max_streams": 4, "gateway": {"max_streams_per_caller": 1}}], indirect=True
)
async def test_one_caller_cannot_take_every_stream(cluster):
    release = asyncio.Event()
    async with grpc.aio.insecure_channel(cluster.gateway) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        first = stub.TranslateSpeech(_held(gateway_pb2.TranslateSpeechRequest(config=config()), release))
        await asyncio.wait_for(_until(lambda: cluster.servicer.streams.active == 1), timeout=20)
        second = stub.TranslateSpeech(iter([gateway_pb2.TranslateSpeechRequest(config=config())]))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in second:
                pass
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "caller 127.0.0.1 already has 1 TranslateSpeech streams" in err.value.details()
        assert "--max-streams-per-caller" in err.value.details()
        release.set()
        events = [e async for e in first]
        assert events[-1].WhichOneof("event") == "end_of_stream"


async def _refused_at_config(address, cfg, code) -> str:
    """The call's error details, for a stream that sends ``cfg`` and then neither audio nor a half-close."""
    never = asyncio.Event()
    return await _expect_code_of(address, _held(gateway_pb2.TranslateSpeechRequest(config=cfg), never), code)


async def _expect_code_of(address, requests, code) -> str:
    async with grpc.aio.insecure_channel(address) as channel:
        call = gateway_pb2_grpc.GatewayStub(channel).TranslateSpeech(requests)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in call:
                pass
        assert err.value.code() == code, err.value.details()
        return err.value.details()


@pytest.mark.timeout(30)
async def test_malformed_configs_are_refused_before_any_audio(cluster):
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    cases = [
        (config(mode=99), "config.mode 99 is not defined in parley.gateway.v1.TranslationMode"),
        (config(source_language="français"), "source_language 'français' is not a BCP-47"),
        (config(target_language="en!"), "target_language 'en!' is not a BCP-47"),
        (config(output_sample_rate_hz=1), "output_sample_rate_hz 1 is out of range"),
    ]
    for cfg, message in cases:
        assert message in await _refused_at_config(cluster.gateway, cfg, invalid)
    assert cluster.stt.log == [] and cluster.tts.log == []


@pytest.mark.timeout(30)
async def test_a_language_pair_or_voice_the_cluster_lacks_fails_precondition_up_front(cluster):
    cluster.translation.pairs = [("fr", "de"), ("de", "fr"), ("fr", "he")]
    cluster.tts.voices = [("fake-de", "de-DE"), ("fake-fr", "fr")]
    precondition = grpc.StatusCode.FAILED_PRECONDITION

    async def refused(cfg, code=precondition) -> str:
        return await _refused_at_config(cluster.gateway, cfg, code)

    assert "does not translate fr into ja" in await refused(
        config(target_language="ja", synthesize_speech=False)
    )
    assert "does not translate tr into de" in await refused(config(source_language="tr"))
    assert "no TTS voice speaks iw" in await refused(config(target_language="iw"))  # he: a pair
    assert "voice 'nobody' is not loaded" in await refused(config(voice="nobody"))
    mismatch = await refused(config(voice="fake-fr"), grpc.StatusCode.INVALID_ARGUMENT)
    assert "speaks fr, not de" in mismatch
    result = await run_stream(cluster.gateway, config(voice="fake-de"), speech(1.0))
    assert result.utterances[0].translation == "T(words 1)" and result.utterances[0].audio
    # Detected source: any pair into the target will do; no synthesis, no voice needed.
    result = await run_stream(
        cluster.gateway,
        config(source_language="", synthesize_speech=False),
        speech(1.0),
    )
    assert result.utterances[0].translation == "T(words 1)"


async def _file_call(stub, requests):
    call = stub.TranslateFile(requests)
    return [r async for r in call]


def _file_config(**kw) -> gateway_pb2.TranslateFileRequest:
    return gateway_pb2.TranslateFileRequest(
        config=gateway_pb2.TranslateFileConfig(
            request_id="f1",
            input_format=audio_pb2.AudioFormat(encoding=audio_pb2.PCM_S16LE, sample_rate_hz=RATE, channels=1),
            **kw,
        )
    )


@pytest.mark.timeout(30)
@pytest.mark.parametrize("cluster", [{"gateway": {"max_file_jobs": 1, "max_file_s": 1.0}}], indirect=True)
async def test_translate_file_has_a_job_limit_a_length_limit_and_checks_its_config(cluster):
    release = asyncio.Event()
    async with grpc.aio.insecure_channel(cluster.gateway) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        first = asyncio.ensure_future(_file_call(stub, _held(_file_config(), release)))
        await asyncio.wait_for(_until(lambda: cluster.servicer.file_jobs.active == 1), timeout=20)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _file_call(stub, iter([_file_config()]))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "1 TranslateFile streams (--max-file-jobs)" in err.value.details()
        release.set()
        await first  # no audio: empty tracks
        too_long = gateway_pb2.TranslateFileRequest(audio=speech(2.0))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _file_call(stub, _held(_file_config(), asyncio.Event(), too_long))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "--max-file-s" in err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _file_call(stub, iter([_file_config(target_language="en_US!")]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "target_language 'en_US!' is not a BCP-47" in err.value.details()
        cluster.translation.pairs = [("fr", "de")]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _file_call(stub, iter([_file_config(source_language="fr", target_language="ja")]))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await asyncio.wait_for(_until(lambda: cluster.servicer.file_jobs.active == 0), timeout=20)
