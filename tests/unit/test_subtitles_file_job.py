"""The TranslateFile batch path on fake stage stubs: chunking, language detection, batching, the RPC shape."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from parley.audio.v1 import audio_pb2
from parley.gateway.v1 import gateway_pb2
from parley.stt.v1 import stt_pb2
from parley.translate.v1 import translate_pb2
from parley.vad.v1 import vad_pb2
from services.common.deadlines import Deadline
from services.common.errors import InvalidArgument, Unavailable
from services.common.resilience import BreakerState
from services.gateway.config import GatewayConfig
from services.gateway.downstream import Downstream
from services.gateway.file_job import FileJobSettings, FileTranslator

RATE_HZ = 16000
SPEECH = [(1000, 4000), (4300, 8000), (20000, 26000)]  # ms; the first two merge into one chunk


class FakeVad:
    def __init__(self, segments: list[tuple[int, int]] | None = None):
        self.calls = 0
        self.segments = SPEECH if segments is None else segments

    async def Detect(self, request, timeout=None):  # noqa: N802 - generated gRPC method name
        self.calls += 1
        return vad_pb2.DetectResponse(
            segments=[vad_pb2.SpeechSegment(start_ms=s, end_ms=e) for s, e in self.segments],
            duration_s=len(request.audio) / 2 / RATE_HZ,
        )


class FakeStt:
    """Says 'word<n>' every 400 ms of the clip; records the languages asked for and the concurrency."""

    def __init__(self):
        self.languages: list[str] = []
        self.running = 0
        self.peak = 0

    async def Transcribe(self, request, timeout=None):  # noqa: N802 - generated gRPC method name
        assert request.config.word_timestamps
        self.languages.append(request.config.language)
        self.running += 1
        self.peak = max(self.peak, self.running)
        await asyncio.sleep(0.01)
        self.running -= 1
        duration_ms = len(request.audio) // 2 * 1000 // RATE_HZ
        words = [
            stt_pb2.Word(start_ms=t, end_ms=t + 300, word=f" word{t // 400}.", probability=0.9)
            for t in range(0, duration_ms - 300, 400)
        ]
        segment = stt_pb2.Segment(
            start_ms=0,
            end_ms=duration_ms,
            text="".join(w.word for w in words),
            avg_logprob=-0.2,
            no_speech_prob=0.01,
            words=words,
        )
        dropped = [stt_pb2.Segment(start_ms=0, end_ms=100, text=" Thanks for watching!", no_speech_prob=0.9)]
        return stt_pb2.TranscribeResponse(
            text=segment.text, language="fr", segments=[segment], dropped_segments=dropped
        )


class FakeTranslation:
    def __init__(self, fail: bool = False):
        self.batches: list[int] = []
        self.fail = fail

    async def Translate(self, request, timeout=None):  # noqa: N802 - generated gRPC method name
        if self.fail:
            raise Unavailable("translation is down")
        self.batches.append(len(request.texts))
        return translate_pb2.TranslateResponse(
            translations=[t.upper() for t in request.texts], model="fake-mt"
        )


def stages(vad, stt, translation, config: GatewayConfig | None = None) -> Downstream:
    """The gateway's downstream calls over fake stubs (no channels)."""
    return Downstream(config or GatewayConfig(), stubs={"vad": vad, "stt": stt, "translate": translation})


def audio(seconds: float = 30.0) -> np.ndarray:
    return np.zeros(int(seconds * RATE_HZ), dtype=np.int16)


async def test_batch_path_detects_once_translates_in_one_batch_and_keeps_the_rules():
    vad, stt, mt = FakeVad(), FakeStt(), FakeTranslation()
    job = FileTranslator(stages(vad, stt, mt), FileJobSettings(stt_concurrency=4))
    progress: list[tuple[str, float]] = []
    result = await job.run(audio(), target_language="en", progress=lambda s, d: progress.append((s, d)))
    # Two chunks: the longest transcribed first with the language empty (detected), the other told "fr".
    assert stt.languages == ["", "fr"]
    assert mt.batches == [2]
    assert result.source_language == "fr" and result.target_language == "en"
    assert result.translation_model == "fake-mt"
    assert result.speech_duration_s == pytest.approx(7.0 + 6.0)
    assert [c.start_ms for c in result.source_cues] == sorted(c.start_ms for c in result.source_cues)
    assert result.source_quality.violation_total == 0
    assert result.target_quality is not None and result.target_quality.violation_total == 0
    assert all(c.text == c.text.upper() for c in result.target_cues)
    # Word times are shifted by the chunk's start: the first cue starts with the first chunk.
    assert result.source_cues[0].start_ms == 1000
    assert len(result.source_quality.dropped_segments) == 2
    assert [s for s, _ in progress] == ["vad", "stt", "stt", "translate"]
    assert progress[-1][1] == pytest.approx(30.0)


async def test_same_language_target_means_no_translation():
    mt = FakeTranslation()
    result = await FileTranslator(stages(FakeVad(), FakeStt(), mt)).run(
        audio(), source_language="fr", target_language="fr"
    )
    assert mt.batches == [] and result.target_cues == [] and result.target_quality is None


async def test_stt_calls_run_concurrently_in_groups():
    stt = FakeStt()
    vad = FakeVad([(i * 3000, i * 3000 + 2000) for i in range(10)])
    job = FileTranslator(
        stages(vad, stt, FakeTranslation()), FileJobSettings(stt_concurrency=3, max_pause_s=0.5)
    )
    await job.run(audio(), source_language="fr")
    assert len(stt.languages) == 10 and stt.peak == 3


async def test_long_audio_is_detected_in_vad_windows():
    vad = FakeVad()
    await FileTranslator(stages(vad, FakeStt(), FakeTranslation()), FileJobSettings(vad_window_s=10.0)).run(
        audio(30.0), source_language="fr"
    )
    assert vad.calls == 3


async def test_stage_failure_is_reported_with_its_stage():
    job = FileTranslator(stages(FakeVad(), FakeStt(), FakeTranslation(fail=True)))
    with pytest.raises(Unavailable, match="translation is down"):
        await job.run(audio(), target_language="en")


async def test_stage_rpc_error_keeps_invalid_argument():
    class BadStt:
        async def Transcribe(self, request, timeout=None):  # noqa: N802 - generated gRPC method name
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                "unknown language 'xx'",
            )

    with pytest.raises(InvalidArgument, match="stt: unknown language"):
        await FileTranslator(stages(FakeVad(), BadStt(), FakeTranslation())).run(
            audio(), source_language="xx"
        )


def unavailable() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "connection refused"
    )


async def test_a_dead_stage_opens_its_breaker():
    # A fake that answers nothing is an unreachable stage: each of the channel's 2 attempts counts. The
    # restart case (a chunk retried after UNAVAILABLE) needs a real channel: test_gateway_retries.py.
    class DeadStt:
        calls = 0

        async def Transcribe(self, request, timeout=None):  # noqa: N802 - generated gRPC method name
            DeadStt.calls += 1
            raise unavailable()

    config = GatewayConfig(retry_max_attempts=2, breaker_failure_threshold=2)
    job = FileTranslator(stages(FakeVad(), DeadStt(), FakeTranslation(), config))
    guards = job.down.guards
    with pytest.raises(Unavailable, match="^stt"):
        await job.run(audio(), source_language="fr")
    assert guards["stt"].breaker.state is BreakerState.OPEN
    calls = DeadStt.calls
    with pytest.raises(Unavailable, match="breaker"):
        await job.run(audio(), source_language="fr")
    assert DeadStt.calls == calls  # refused at once: the stage is given time to come back


async def test_silence_gives_empty_tracks_without_stt_calls():
    stt = FakeStt()
    result = await FileTranslator(stages(FakeVad([]), stt, FakeTranslation())).run(
        audio(), target_language="en"
    )
    assert stt.languages == [] and result.source_cues == [] and result.target_cues == []


async def test_rpc_streams_progress_then_one_result():
    job = FileTranslator(stages(FakeVad(), FakeStt(), FakeTranslation()))
    pcm = np.zeros(30 * RATE_HZ, dtype="<i2").tobytes()

    async def requests():
        yield gateway_pb2.TranslateFileRequest(
            config=gateway_pb2.TranslateFileConfig(
                request_id="r1",
                target_language="en",
                input_format=audio_pb2.AudioFormat(
                    encoding=audio_pb2.PCM_S16LE, sample_rate_hz=RATE_HZ, channels=1
                ),
            )
        )
        for at in range(0, len(pcm), 10_000):
            yield gateway_pb2.TranslateFileRequest(audio=pcm[at : at + 10_000])

    responses = [r async for r in job.serve(requests(), Deadline(None))]
    kinds = [r.WhichOneof("event") for r in responses]
    assert kinds[-1] == "result" and set(kinds[:-1]) == {"progress"}
    assert all(r.request_id == "r1" for r in responses)
    result = responses[-1].result
    assert result.audio_duration_s == pytest.approx(30.0)
    assert result.source_language == "fr" and len(result.target_cues) > 0
    assert result.source_quality.violations["reading_speed"] == 0
    assert len(result.source_quality.dropped_segments) == 2
    assert result.target_cues[0].quality.length_ratio == pytest.approx(1.0)


def file_requests(pcm: bytes, chunk_bytes: int = 10_000, sample_rate_hz: int = RATE_HZ):
    async def requests():
        yield gateway_pb2.TranslateFileRequest(
            config=gateway_pb2.TranslateFileConfig(
                request_id="r1",
                input_format=audio_pb2.AudioFormat(
                    encoding=audio_pb2.PCM_S16LE, sample_rate_hz=sample_rate_hz, channels=1
                ),
            )
        )
        for at in range(0, len(pcm), chunk_bytes):
            yield gateway_pb2.TranslateFileRequest(audio=pcm[at : at + chunk_bytes])

    return requests()


async def test_rpc_holds_the_recording_as_16_bit_pcm():
    held = []

    class Recording(FileTranslator):
        async def run(self, audio, **kwargs):
            held.append(audio)
            return await super().run(audio, **kwargs)

    job = Recording(stages(FakeVad([]), FakeStt(), FakeTranslation()))
    tone = (np.sin(np.arange(48000) / 10) * 20000).astype("<i2")  # 1 s at 48 kHz, resampled to 16 kHz
    responses = [r async for r in job.serve(file_requests(tone.tobytes(), 3333 * 2, 48000), Deadline(None))]
    assert responses[-1].result.audio_duration_s == pytest.approx(1.0, abs=0.01)
    (recording,) = held
    assert recording.dtype == np.int16 and recording.nbytes == pytest.approx(2 * RATE_HZ, rel=0.01)
    assert 18000 < np.abs(recording.astype(np.int32)).max() <= 20001


async def test_rpc_refuses_a_recording_past_max_audio_s_while_it_arrives():
    received = []

    async def counted(requests):
        async for request in requests:
            received.append(request)
            yield request

    job = FileTranslator(stages(FakeVad(), FakeStt(), FakeTranslation()), FileJobSettings(max_audio_s=2.0))
    pcm = np.zeros(10 * RATE_HZ, dtype="<i2").tobytes()
    with pytest.raises(InvalidArgument, match="longer than the 2 s accepted \\(--max-file-s\\)"):
        async for _ in job.serve(counted(file_requests(pcm, 2 * RATE_HZ)), Deadline(None)):
            pass
    assert len(received) == 1 + 3  # the config, then refused on the first second of audio too many


async def test_rpc_needs_the_config_first():
    job = FileTranslator(stages(FakeVad(), FakeStt(), FakeTranslation()))

    async def requests():
        yield gateway_pb2.TranslateFileRequest(audio=b"\0\0")

    with pytest.raises(InvalidArgument, match="first TranslateFile message"):
        async for _ in job.serve(requests(), Deadline(None)):
            pass


async def test_a_translation_loop_is_cut_and_reported():
    class LoopingTranslation(FakeTranslation):
        async def Translate(self, request, timeout=None):  # noqa: N802 - generated gRPC method name
            return translate_pb2.TranslateResponse(
                translations=["It is so so so so so so so so so so good." for _ in request.texts],
                model="loop",
            )

    result = await FileTranslator(stages(FakeVad(), FakeStt(), LoopingTranslation())).run(
        audio(), target_language="en"
    )
    assert " ".join(c.text for c in result.target_cues) == "It is so good. It is so good."  # two chunks
    assert result.target_quality is not None
    assert result.target_quality.repetition_cues == len(result.target_cues) > 0
    assert all("so" in c.repeated for c in result.target_quality.cues)
