"""The gateway in front of the four real stage servers (five processes), on real FLEURS recordings.

One cluster serves the whole module; every process exports its spans over OTLP/gRPC to a tiny collector
run by the test. The stage-kill test runs last: it kills and restarts the translation server.
"""

from __future__ import annotations

import asyncio
import re
import signal
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from concurrent import futures

import grpc
import numpy as np
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

from benchmarks.metrics import chrf, wer
from parley.audio.v1 import audio_pb2
from parley.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from parley.stt.v1 import stt_pb2, stt_pb2_grpc
from services.clients.gateway_client import Collector, GatewayClient, paced, split_pcm
from services.harness import free_port, read_wav, start_server
from tests.helpers import TraceReceiver, read_manifest

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]

RATE = 16000
SILENCE_S = 1.2
# Floors set under measured figures (fr->en: WER 0.28, chrF 43.9; en->fr: WER 0.11, chrF 33.3 with
# whisper base + gemma-3-270m) with room to spare; they catch a broken pipeline, not small drifts.
MAX_WER = {"fr": 0.40, "en": 0.25}
MIN_CHRF = {"en": 35.0, "fr": 25.0}


@pytest.fixture(scope="module")
def otlp():
    receiver = TraceReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    yield receiver, env
    server.stop(0)


@pytest.fixture(scope="module")
def cluster(otlp):
    _, env = otlp
    with futures.ThreadPoolExecutor(4) as pool:
        started = {
            stage: pool.submit(start_server, stage, env=env, timeout_s=240)
            for stage in ("vad", "stt", "translate", "tts")
        }
        stages = {stage: f.result() for stage, f in started.items()}
    metrics_port = free_port()
    gateway = start_server(
        "gateway",
        *(arg for stage, p in stages.items() for arg in (f"--{stage}-address", p.address)),
        "--metrics-port",
        str(metrics_port),
        "--breaker-failure-threshold",
        "2",
        "--breaker-reset-timeout-s",
        "1",
        env=env,
    )
    stages["gateway"] = gateway
    stages["metrics"] = metrics_port  # type: ignore[assignment]
    yield stages
    for name, process in stages.items():
        if name != "metrics":
            process.terminate()


def fleurs(language: str, files: list[str]) -> list[dict[str, str]]:
    rows = {row["file"]: row for row in read_manifest("fleurs")}
    return [rows[f] for f in files]


def joined_pcm(rows) -> bytes:
    silence = np.zeros(int(SILENCE_S * RATE), "<i2").tobytes()
    parts = [silence]
    for row in rows:
        pcm, rate = read_wav(row["path"])
        assert rate == RATE
        parts += [pcm, silence]
    return b"".join(parts)


def config(source: str, target: str, **kw) -> gateway_pb2.TranslateSpeechConfig:
    kw.setdefault("request_id", f"it-{source}-{target}")
    return gateway_pb2.TranslateSpeechConfig(
        source_language=source,
        target_language=target,
        input_format=audio_pb2.AudioFormat(encoding=audio_pb2.PCM_S16LE, sample_rate_hz=RATE, channels=1),
        synthesize_speech=True,
        **kw,
    )


class ClauseCollector(Collector):
    """A Collector that also records the clause index of each clause-level event, in arrival order."""

    def __init__(self) -> None:
        super().__init__()
        self.clause_events: list[tuple[int, str, int]] = []

    def add(self, response):
        kind = response.WhichOneof("event")
        if kind in ("commit", "translation", "audio", "clause_timings"):
            self.clause_events.append((response.utterance_index, kind, getattr(response, kind).clause_index))
        return super().add(response)


async def stream(address: str, cfg, pcm: bytes) -> ClauseCollector:
    collector = ClauseCollector()
    async with GatewayClient(address) as client:
        async for event in client.translate_speech(cfg, split_pcm(pcm, 200), timeout_s=240):
            assert event.request_id == cfg.request_id
            collector.add(event)
    return collector


async def transcribe_back(address: str, audio: bytes, rate: int, language: str) -> stt_pb2.TranscribeResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        response = await stt_pb2_grpc.SpeechToTextStub(channel).Transcribe(
            stt_pb2.TranscribeRequest(
                audio=audio,
                format=audio_pb2.AudioFormat(encoding=audio_pb2.PCM_S16LE, sample_rate_hz=rate, channels=1),
                config=stt_pb2.RecognitionConfig(language=language),
            ),
            timeout=120,
        )
    return response


def assert_in_order(collector: ClauseCollector) -> None:
    """The order gateway.proto promises (no interim results asked for: every transcript is final)."""
    indices = [i for i, kind in collector.events if kind != "end_of_stream"]
    assert indices == sorted(indices), collector.events
    for index in set(indices):
        kinds = [kind for i, kind in collector.events if i == index]
        assert kinds[0] == "speech_started", (index, kinds)
        if "timings" in kinds:
            assert kinds[-1] == "timings", (index, kinds)
        if "commit" in kinds and "transcript" in kinds:
            assert max(i for i, k in enumerate(kinds) if k == "commit") < kinds.index("transcript"), kinds
        clauses = [(kind, k) for i, kind, k in collector.clause_events if i == index]
        translated = [k for kind, k in clauses if kind == "translation"]
        assert translated == sorted(set(translated)), clauses
        spoken = [k for kind, k in clauses if kind == "audio"]
        assert spoken == sorted(spoken), clauses
        for position, (kind, k) in enumerate(clauses):
            if kind == "audio" and k in translated:
                assert ("translation", k) in clauses[:position], clauses
    assert collector.events[-1][1] == "end_of_stream"
    assert collector.end is not None and collector.end.utterances == len(collector.utterances)


@pytest.mark.parametrize(
    ("source", "target", "files"),
    [
        ("fr", "en", ["fleurs-fr-000.wav", "fleurs-fr-002.wav"]),
        ("en", "fr", ["fleurs-en-003.wav", "fleurs-en-001.wav"]),
    ],
)
async def test_speech_translation_on_fleurs(cluster, source, target, files):
    rows = fleurs(source, files)
    result = await stream(cluster["gateway"].address, config(source, target), joined_pcm(rows))
    assert_in_order(result)
    utterances = list(result.utterances.values())
    assert all(not u.errors for u in utterances), [u.errors for u in utterances]
    transcript = " ".join(u.transcript for u in utterances)
    translation = " ".join(u.translation for u in utterances)
    reference = " ".join(row["reference_text"] for row in rows)
    reference_translation = " ".join(row[f"translation_{target}"] for row in rows)
    transcript_wer = wer([reference], [transcript], source)
    translation_chrf = chrf([reference_translation], [translation])
    sys.stdout.write(
        f"{source}->{target}: WER {transcript_wer:.3f}, chrF {translation_chrf:.1f}, {len(utterances)} utt\n"
    )
    assert transcript_wer <= MAX_WER[source], (transcript, reference)
    assert translation_chrf >= MIN_CHRF[target], (translation, reference_translation)
    # The translated speech is real speech in the target language: transcribe it back.
    rate = utterances[0].audio_rate_hz
    assert rate and sum(len(u.audio) for u in utterances) / 2 / rate > 2.0
    # One utterance's speech at a time, in the target language: espeak-ng's French is robotic, and Whisper
    # base detected a 4.5 s clip of it as Japanese and a whole stream's clips as Latin. It recovers it only
    # roughly (chrF ~38 measured; unrelated text of the same language scores ~10).
    backs = [await transcribe_back(cluster["stt"].address, bytes(u.audio), rate, target) for u in utterances]
    back_text = " ".join(back.text for back in backs)
    assert chrf([translation], [back_text]) >= 25, (translation, back_text)
    for u in utterances:
        assert u.end_ms > u.start_ms
        assert (
            0 <= u.timings["end_of_speech_to_transcript_ms"] <= u.timings["end_of_speech_to_first_audio_ms"]
        )


@pytest.mark.timeout(300)
async def test_a_long_utterance_is_translated_and_spoken_while_the_speaker_talks(cluster):
    """LJSpeech sentences joined by 0.3 s pauses (shorter than the VAD's 0.5 s endpoint: one utterance of
    about 25 s), streamed at real time: the first clause's translated audio arrives before the speaker stops,
    commits move forward in time, and the final transcript is the commits, nothing else."""
    rows = read_manifest("ljspeech")[:4]
    pause = np.zeros(int(0.3 * RATE), "<i2").tobytes()
    pcm = pause.join(read_wav(r["path"])[0] for r in rows)
    silence = np.zeros(int(SILENCE_S * RATE), "<i2").tobytes()
    collector = ClauseCollector()
    words_ms: list[int] = []
    spellings: list[str] = []  # each committed word as decoded, with its leading space
    first_audio_s = 0.0
    async with GatewayClient(cluster["gateway"].address) as client:
        started_s = time.monotonic()
        cfg = config("en", "fr", request_id="long")
        async for event in client.translate_speech(cfg, paced(split_pcm(silence + pcm + silence, 100))):
            collector.add(event)
            if event.WhichOneof("event") == "commit" and event.utterance_index == 0:
                words_ms += [w.start_ms for w in event.commit.words]
                spellings += [w.word for w in event.commit.words]
            if event.WhichOneof("event") == "audio" and event.utterance_index == 0 and not first_audio_s:
                first_audio_s = time.monotonic()
    assert_in_order(collector)
    first = collector.utterances[0]
    assert first.end_ms - first.start_ms > 15000, "the pauses did not end the utterance"
    assert words_ms == sorted(words_ms), "commits move forward in time"
    # Joined as spelt: Whisper may split "present-concerned" into two words that two commits carry.
    assert "".join(spellings).strip() == first.transcript, "the final transcript is the commits"
    spoken_until_s = started_s + first.end_ms / 1000
    assert first_audio_s and first_audio_s < spoken_until_s, (
        f"first translated audio {first_audio_s - spoken_until_s:+.2f} s after the end of speech"
    )
    clauses = {k for i, kind, k in collector.clause_events if i == 0 and kind == "translation"}
    assert len(clauses) >= 2, "a 25 s utterance is translated in several clauses"
    reference = " ".join(r["reference_text"] for r in rows)
    assert wer([reference], [" ".join(u.transcript for u in collector.utterances.values())], "en") <= 0.2


async def faster_than_real_time(chunks: list[bytes], speed: float) -> AsyncIterator[bytes]:
    """Yields 16 kHz PCM_S16LE chunks at ``speed`` times real time."""
    for chunk in chunks:
        yield chunk
        await asyncio.sleep(len(chunk) / 2 / RATE / speed)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("speed", [10.0, None], ids=["10x-real-time", "file-speed"])
async def test_a_recording_faster_than_real_time_loses_no_utterance(cluster, speed):
    """12 LJSpeech sentences (78 s): every utterance told to the caller ends in a transcript or an error."""
    rows = read_manifest("ljspeech")[:12]
    chunks = split_pcm(joined_pcm(rows), 100)
    audio = chunks if speed is None else faster_than_real_time(chunks, speed)
    collector = Collector()
    cfg = config("en", "fr", request_id="fast")
    async with GatewayClient(cluster["gateway"].address) as client:
        async for event in client.translate_speech(cfg, audio, timeout_s=540):
            collector.add(event)
    started = {i for i, kind in collector.events if kind == "speech_started"}
    results = collector.utterances
    lost = [i for i in started if "final_transcript" not in results[i].received_s and not results[i].errors]
    assert not lost, f"{len(lost)} of {len(started)} utterances got speech_started and nothing after"
    assert collector.end is not None and collector.end.utterances == len(started) >= len(rows) - 2
    transcript = " ".join(u.transcript for u in collector.utterances.values())
    assert wer([" ".join(r["reference_text"] for r in rows)], [transcript], "en") <= 0.25, transcript


async def test_healthy_streams_log_nothing_at_warning_or_above(cluster):
    """Runs after the FLEURS streams (tracing on): no process logged a warning, an error or a traceback."""
    for name, server in cluster.items():
        if name == "metrics":
            continue
        bad = [
            line
            for line in server.log().splitlines()
            if re.search(r" (WARNING|ERROR|CRITICAL) |Traceback", line)
        ]
        assert not bad, (name, bad[:10])


async def test_one_call_is_one_trace_across_all_five_services(cluster, otlp):
    receiver, _ = otlp
    rows = fleurs("fr", ["fleurs-fr-004.wav"])
    result = await stream(
        cluster["gateway"].address, config("fr", "en", mode=gateway_pb2.CASCADE), joined_pcm(rows)
    )
    assert result.utterances and result.utterances[0].audio
    wanted = {"parley-gateway", "parley-vad", "parley-stt", "parley-translate", "parley-tts"}
    for _ in range(100):
        roots = {
            t for s, t, name in receiver.spans if s == "parley-gateway" and name.endswith("TranslateSpeech")
        }
        by_trace = {t: {s for s, t2, _ in receiver.spans if t2 == t} for t in roots}
        if any(services >= wanted for services in by_trace.values()):
            break
        await asyncio.sleep(0.1)
    assert any(services >= wanted for services in by_trace.values()), by_trace
    names = {name for _, t, name in receiver.spans}
    assert {"gateway.utterance", "gateway.stt", "gateway.translate", "gateway.tts"} <= names
    assert not any("grpc.health" in name for name in names)


async def test_protocol_error_on_the_real_gateway(cluster):
    async with grpc.aio.insecure_channel(cluster["gateway"].address) as channel:
        call = gateway_pb2_grpc.GatewayStub(channel).TranslateSpeech(
            iter([gateway_pb2.TranslateSpeechRequest(audio=b"\0\0")])
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in call:
                pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def breaker_state(metrics_port: int, stage: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    match = re.search(rf'^parley_breaker_state{{stage="{stage}"}} (\S+)$', body, re.M)
    assert match, body[:2000]
    return float(match.group(1))


@pytest.mark.timeout(400)
async def test_translation_killed_mid_stream_degrades_then_recovers(cluster):
    rows = fleurs("fr", ["fleurs-fr-002.wav", "fleurs-fr-004.wav", "fleurs-fr-000.wav"])
    silence = np.zeros(int(SILENCE_S * RATE), "<i2").tobytes()
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()
    collector = ClauseCollector()
    arrivals: list[tuple[float, int, str]] = []
    changed = asyncio.Event()

    async def audio():
        while (chunk := await queue.get()) is not None:
            yield chunk

    async def consume():
        async with GatewayClient(cluster["gateway"].address) as client:
            cfg = config("fr", "en", mode=gateway_pb2.CASCADE)
            async for event in client.translate_speech(cfg, audio(), timeout_s=380):
                collector.add(event)
                arrivals.append((time.monotonic(), event.utterance_index, event.WhichOneof("event")))
                changed.set()

    async def wait_for(predicate, timeout_s: float):
        async with asyncio.timeout(timeout_s):
            while not predicate():
                changed.clear()
                await changed.wait()

    def send(row):
        pcm, _ = read_wav(row["path"])
        for chunk in split_pcm(silence + pcm + silence, 200):
            queue.put_nowait(chunk)

    def done_with(n: int) -> bool:
        return sum(1 for _, _, kind in arrivals if kind == "timings") >= n

    consumer = asyncio.create_task(consume())
    translate = cluster["translate"]
    port = translate.address.rsplit(":", 1)[1]
    try:
        send(rows[0])
        await wait_for(lambda: done_with(1), 120)
        first = list(collector.utterances.values())
        assert all(u.translation and u.audio for u in first)
        assert breaker_state(cluster["metrics"], "translate") == 0

        translate.process.send_signal(signal.SIGKILL)
        translate.process.wait(10)
        before = len(collector.utterances)
        send(rows[1])
        await wait_for(lambda: done_with(before + 1), 120)
        hit = [u for u in collector.utterances.values() if u.index >= before]
        for u in hit:
            assert u.transcript, "transcripts still flow while translation is down"
            assert [e["stage"] for e in u.errors] == ["translate"] and u.errors[0]["code"] == 14
            assert not u.translation and not u.audio
            delay_s = u.received_s["error"] - u.received_s["final_transcript"]
            assert delay_s < 1.0, delay_s
        assert breaker_state(cluster["metrics"], "translate") == 2  # open

        restarted = start_server("translate", "--port", port, timeout_s=240)
        cluster["translate"] = restarted
        await asyncio.sleep(1.5)  # the breaker's reset timeout, then a probe
        before = len(collector.utterances)
        send(rows[2])
        await wait_for(lambda: done_with(before + 1), 120)
        recovered = [u for u in collector.utterances.values() if u.index >= before]
        assert all(u.translation and u.audio and not u.errors for u in recovered), [
            (u.translation, u.errors) for u in recovered
        ]
        assert breaker_state(cluster["metrics"], "translate") == 0  # closed
        queue.put_nowait(None)
        await asyncio.wait_for(consumer, 120)
        assert_in_order(collector)
    finally:
        consumer.cancel()
