"""The speech-to-text server's window batching on real recordings (Whisper base, CPU).

Two servers: the default (adaptive windows, batches of up to 8) and the same with ``--max-batch-size 1``.
Concurrent requests must share batches (the batcher's counters), leave the English word error rate within
1 point of the unbatched server, and a short utterance sent during a long transcription must not wait for
the whole long one (the long audio is decoded window by window).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from benchmarks.bench_stt import build_utterance
from benchmarks.metrics import wer
from parley.audio.v1 import audio_pb2
from parley.stt.v1 import stt_pb2, stt_pb2_grpc
from services.common.audio import float_to_pcm16
from services.harness import ENGLISH_SETS, batch_counts, free_port, read_wav, start_server
from tests.helpers import read_manifest, report

pytestmark = pytest.mark.timeout(900)

RATE = 16000
S16 = audio_pb2.AudioFormat(encoding=audio_pb2.PCM_S16LE, sample_rate_hz=RATE, channels=1)


@pytest.fixture(scope="module")
def metrics_port():
    return free_port()


@pytest.fixture(scope="module")
def batched(metrics_port):
    process = start_server("stt", "--metrics-port", str(metrics_port))
    yield process
    assert process.terminate() == 0, process.log()


@pytest.fixture(scope="module")
def english():
    rows = [row for name in ENGLISH_SETS for row in read_manifest(name)]
    return [read_wav(r["path"])[0] for r in rows], [r["reference_text"] for r in rows]


def transcribe_all(address: str, pcms: list[bytes], in_flight: int) -> list[str]:
    with grpc.insecure_channel(address) as channel, ThreadPoolExecutor(in_flight) as pool:
        stub = stt_pb2_grpc.SpeechToTextStub(channel)
        config = stt_pb2.RecognitionConfig(language="en")

        def one(pcm: bytes) -> str:
            request = stt_pb2.TranscribeRequest(audio=pcm, format=S16, config=config)
            return stub.Transcribe(request, timeout=300).text

        return list(pool.map(one, pcms))


def test_batched_word_error_rate_is_within_one_point_of_unbatched(batched, metrics_port, english):
    pcms, refs = english
    requests_before, executions_before = batch_counts(metrics_port, "stt")
    started = time.perf_counter()
    texts = transcribe_all(batched.address, pcms, in_flight=8)
    batched_s = time.perf_counter() - started
    requests_after, executions_after = batch_counts(metrics_port, "stt")
    requests, executions = requests_after - requests_before, executions_after - executions_before
    unbatched_server = start_server("stt", "--max-batch-size", "1")
    try:
        started = time.perf_counter()
        alone = transcribe_all(unbatched_server.address, pcms, in_flight=8)
        alone_s = time.perf_counter() - started
    finally:
        assert unbatched_server.terminate() == 0
    batched_wer, alone_wer = wer(refs, texts, "en"), wer(refs, alone, "en")
    report(
        f"\nEnglish WER batched {batched_wer:.2%} ({batched_s:.1f} s, mean batch "
        f"{requests / executions:.2f}) vs max_batch_size 1 {alone_wer:.2%} ({alone_s:.1f} s), "
        f"{len(refs)} utterances, 8 in flight"
    )
    assert requests >= len(pcms) and requests / executions > 1.5, "concurrent windows must share batches"
    assert abs(batched_wer - alone_wer) <= 0.01
    assert batched_wer < 0.10


def test_short_utterance_finishes_before_a_long_transcription(batched):
    rows = read_manifest("ljspeech")
    long_pcm = b"".join(read_wav(r["path"])[0] for r in rows[:24])  # about 170 s: six 30 s windows
    short = min(rows[24:], key=lambda r: abs(len(read_wav(r["path"])[0]) / (2 * RATE) - 3.0))
    short_pcm = read_wav(short["path"])[0]
    finished: dict[str, float] = {}
    texts: dict[str, str] = {}

    with grpc.insecure_channel(batched.address) as channel, ThreadPoolExecutor(2) as pool:
        stub = stt_pb2_grpc.SpeechToTextStub(channel)

        def run(name: str, pcm: bytes) -> None:
            request = stt_pb2.TranscribeRequest(
                audio=pcm, format=S16, config=stt_pb2.RecognitionConfig(language="en")
            )
            texts[name] = stub.Transcribe(request, timeout=300).text
            finished[name] = time.perf_counter()

        started = time.perf_counter()
        long_call = pool.submit(run, "long", long_pcm)
        time.sleep(1.0)  # the long transcription is decoding its first windows
        sent = time.perf_counter()
        pool.submit(run, "short", short_pcm).result()
        long_call.result()

    report(
        f"\nshort ({len(short_pcm) / 2 / RATE:.1f} s) done {finished['short'] - sent:.1f} s after it was "
        f"sent; long ({len(long_pcm) / 2 / RATE:.0f} s) done after {finished['long'] - started:.1f} s"
    )
    assert finished["short"] < finished["long"]
    assert wer([short["reference_text"]], [texts["short"]], "en") <= 0.25
    long_refs = " ".join(r["reference_text"] for r in rows[:24])
    assert wer([long_refs], [texts["long"]], "en") <= 0.15


def test_speech_filling_a_whole_window_is_transcribed_to_its_end(batched):
    # Whisper stops early when speech runs to the end of its window; windows keep window_margin_s after it.
    audio, reference = build_utterance(30.0)
    with grpc.insecure_channel(batched.address) as channel:
        request = stt_pb2.TranscribeRequest(
            audio=float_to_pcm16(audio), format=S16, config=stt_pb2.RecognitionConfig(language="en")
        )
        response = stt_pb2_grpc.SpeechToTextStub(channel).Transcribe(request, timeout=120)
    report(f"\n30 s of speech: {response.text!r}")
    assert wer([reference], [response.text], "en") <= 0.10
    assert response.segments[-1].end_ms >= 28000


@pytest.mark.gpu
def test_whisper_on_cuda_matches_the_cpu_word_error_rate(batched, english):
    import ctranslate2

    if ctranslate2.get_cuda_device_count() == 0:
        pytest.skip("no CUDA device")
    pcms, refs = english
    audio_s = sum(len(p) for p in pcms) / 2 / RATE
    cpu_texts = transcribe_all(batched.address, pcms, in_flight=8)
    rates = {}
    texts = {}
    for batch in (1, 8):
        gpu = start_server("stt", "--device", "cuda", "--max-batch-size", str(batch))
        try:
            transcribe_all(gpu.address, pcms[:8], in_flight=8)  # warm-up
            started = time.perf_counter()
            texts[batch] = transcribe_all(gpu.address, pcms, in_flight=8)
            rates[batch] = audio_s / (time.perf_counter() - started)
        finally:
            assert gpu.terminate() == 0
    cpu_wer, gpu_wer = wer(refs, cpu_texts, "en"), wer(refs, texts[8], "en")
    report(
        f"\nCUDA: WER {gpu_wer:.2%} vs CPU {cpu_wer:.2%}; {rates[8]:.0f} audio s/s batched (RTF "
        f"{1 / rates[8]:.4f}) vs {rates[1]:.0f} at max_batch_size 1 ({rates[8] / rates[1]:.2f}x), 8 in flight"
    )
    assert abs(gpu_wer - cpu_wer) <= 0.005
