"""Throughput and latency under concurrency, with the dynamic batcher on and with ``--max-batch-size 1``.

For each stage, two real server processes run side by side in the same run: one with the stage's batching
settings, one with ``--max-batch-size 1`` (every model call takes one item, as before batching) or, for a
stage whose model cannot batch, one model instance instead of an instance group. Closed-loop clients
(each sends its next request when the previous one is answered) run for
``LEVEL_S`` seconds per concurrency level; throughput is answered requests per second, latency the
per-request wall time (p50 and p99). The servers take turns level by level, so both see the same load.
The mean batch size comes from the server's Prometheus counters (``parley_batch_requests`` /
``parley_batch_executions``) over the level.

Stages:

* translate, ``ctranslate2`` with the tiny random model of ``tests/fixtures/tiny_ct2.py`` (2 layers,
  d_model 64, NLLB layout, every sentence decodes ``CT2_DECODE_TOKENS`` tokens): one real Tatoeba or
  FLORES sentence per request; concurrency 1, 4, 16, 64. Goals: at 16, at least 3x the throughput of
  batch size 1; at 1, p99 no more than ``max_queue_delay_ms`` above batch size 1.
* translate, ``llm`` embedded (Gemma 3 270M, llama.cpp), one instance: a batch's sentences decoded
  together (one forward pass per step for all of them, the few-shot prefix evaluated once) against
  ``--max-batch-size 1``; one real sentence per request. Concurrency 1, 4, 16 (64 is left out to keep
  the run short: 2.4-3.4 requests/s were measured at 16). Goal: at 16, at least 3x the throughput of
  batch size 1. The engine's own ceiling is printed beside it: the same sentences translated in-process
  one at a time and 16 at a time (full batches, no server).
* stt, Whisper base int8: one Transcribe of a real LJ Speech clip per request (adaptive windows);
  concurrency 1, 4, 16, 64; throughput in audio seconds per second.
* tts, Piper (en_US voice): one Synthesize of a Tatoeba or FLORES sentence per request, the audio cache
  off (``--cache-mb 0``: every request is synthesized). Piper's ONNX voice takes one sentence per call,
  so the comparison is an instance group (``--piper-workers 2``) against 1.
* vad, Silero VAD v6: one StreamDetect stream per request (a real LJ Speech clip, sent as fast as the
  server takes it, 100 ms per message); throughput in audio seconds per second. The v6 export runs a
  batch's streams one after another, so batching is not expected to speed it up.

Not measured here: the llm HTTP transport (it needs an external OpenAI-compatible server).
"""

from __future__ import annotations

import asyncio
import csv
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from parley.audio.v1 import audio_pb2
from parley.stt.v1 import stt_pb2, stt_pb2_grpc
from parley.translate.v1 import translate_pb2, translate_pb2_grpc
from parley.tts.v1 import tts_pb2, tts_pb2_grpc
from parley.vad.v1 import vad_pb2, vad_pb2_grpc
from services.common.audio import SAMPLE_RATE_HZ
from services.common.deadlines import Deadline
from services.harness import (
    SHARED_DATA,
    ServerProcess,
    batch_counts,
    free_port,
    read_manifest,
    read_wav,
    start_server,
)
from services.translate.config import Backend, TranslateConfig
from services.translate.llama import EmbeddedLlamaBackend
from tests.fixtures.tiny_ct2 import build_tiny_model

LEVEL_S = 6.0
WARMUP_S = 1.0
CT2_DECODE_TOKENS = 32
QUEUE_DELAY_MS = 5.0
LEVELS = (1, 4, 16, 64)
LLM_LEVELS = (1, 4, 16)
SLOW_LEVEL_S = 20.0  # stages whose requests take hundreds of ms: enough requests per level for a p99
VAD_CHUNK_BYTES = 3200  # 100 ms of PCM_S16LE at 16 kHz
PCM16_16K = audio_pb2.AudioFormat(encoding=audio_pb2.PCM_S16LE, sample_rate_hz=SAMPLE_RATE_HZ, channels=1)
Call = Callable[[int], Awaitable[float]]  # client call i -> units done
MakeCall = Callable[[grpc.aio.Channel], Call]


@dataclass
class Level:
    """Figures of one concurrency level on one server."""

    requests: int
    units: float
    wall_s: float
    latencies_s: list[float]
    mean_batch: float

    @property
    def throughput(self) -> float:
        return self.requests / self.wall_s

    @property
    def unit_rate(self) -> float:
        return self.units / self.wall_s

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q)) * 1000 if self.latencies_s else float("nan")


async def _closed_loop(
    call: Call, concurrency: int, duration_s: float
) -> tuple[int, float, float, list[float]]:
    """``concurrency`` clients calling ``call(i)`` back to back for ``duration_s``.

    Returns:
        (answered requests, units done, wall seconds, latencies in seconds).
    """
    latencies: list[float] = []
    units = 0.0
    counter = iter(range(10**9))
    stop_at = time.perf_counter() + duration_s

    async def client() -> None:
        nonlocal units
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            done = await call(next(counter))  # not ``units += await``: that reads units before awaiting
            units += done
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return len(latencies), units, time.perf_counter() - started, latencies


async def _measure(
    server: ServerProcess,
    metrics_port: int,
    name: str,
    make_call: MakeCall,
    concurrency: int,
    level_s: float,
) -> Level:
    async with grpc.aio.insecure_channel(server.address) as channel:
        call = make_call(channel)
        await _closed_loop(call, concurrency, WARMUP_S)
        before = await asyncio.to_thread(batch_counts, metrics_port, name)
        requests, units, wall_s, latencies = await _closed_loop(call, concurrency, level_s)
        after = await asyncio.to_thread(batch_counts, metrics_port, name)
    executions = after[1] - before[1]
    mean_batch = (after[0] - before[0]) / executions if executions else float("nan")
    return Level(requests, units, wall_s, latencies, mean_batch)


def _report(title: str, unit: str, levels: tuple[int, ...], results: dict[int, tuple[Level, Level]]) -> None:
    print(title)
    print(
        f"{'conc':>4} | {'batched ' + unit:>16} {'p50 ms':>8} {'p99 ms':>8} {'batch':>5} | "
        f"{'bs=1 ' + unit:>16} {'p50 ms':>8} {'p99 ms':>8} | {'x thr':>6} {'p50 diff ms':>11} "
        f"{'p99 diff ms':>11}"
    )
    for c in levels:
        on, off = results[c]
        print(
            f"{c:>4} | {on.unit_rate:>16.1f} {on.percentile_ms(50):>8.1f} {on.percentile_ms(99):>8.1f} "
            f"{on.mean_batch:>5.1f} | {off.unit_rate:>16.1f} {off.percentile_ms(50):>8.1f} "
            f"{off.percentile_ms(99):>8.1f} | {on.unit_rate / off.unit_rate:>6.2f} "
            f"{on.percentile_ms(50) - off.percentile_ms(50):>11.1f} "
            f"{on.percentile_ms(99) - off.percentile_ms(99):>11.1f}"
        )


def _sentences(n: int) -> list[str]:
    """Real English sentences: Tatoeba one-liners and FLORES sentences, alternately."""
    out: list[list[str]] = []
    for name in ("tatoeba-test.en-fr.tsv", "flores200-devtest-half.en-fr.tsv"):
        with (SHARED_DATA / "text" / name).open(encoding="utf-8", newline="") as f:
            out.append([r["src"] for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)][:n])
    return [out[i % 2][i // 2] for i in range(n)]


def _unary(
    stub_class: Callable[[grpc.aio.Channel], Any],
    method: str,
    request: Callable[[int], Any],
    units: Callable[[Any, Any], float],
) -> MakeCall:
    """Client call ``i``: one ``method`` call of ``request(i)``; counts ``units(request, response)``."""

    def make(channel: grpc.aio.Channel) -> Call:
        rpc = getattr(stub_class(channel), method)

        async def call(i: int) -> float:
            message = request(i)
            return units(message, await rpc(message, timeout=300))

        return call

    return make


def _audio_s(pcm: bytes) -> float:
    return len(pcm) / 2 / PCM16_16K.sample_rate_hz


def _translate_call(sentences: list[str]) -> MakeCall:
    return _unary(
        translate_pb2_grpc.TranslationStub,
        "Translate",
        lambda i: translate_pb2.TranslateRequest(
            request_id=str(i),
            texts=[sentences[i % len(sentences)]],
            source_language="en",
            target_language="fr",
        ),
        lambda _request, _response: 1.0,
    )


def _stt_call(clips: list[bytes]) -> MakeCall:
    return _unary(
        stt_pb2_grpc.SpeechToTextStub,
        "Transcribe",
        lambda i: stt_pb2.TranscribeRequest(
            request_id=str(i),
            audio=clips[i % len(clips)],
            format=PCM16_16K,
            config=stt_pb2.RecognitionConfig(language="en"),
        ),
        lambda request, _response: _audio_s(request.audio),
    )


def _tts_call(sentences: list[str]) -> MakeCall:
    return _unary(
        tts_pb2_grpc.SpeechSynthesisStub,
        "Synthesize",
        lambda i: tts_pb2.SynthesizeRequest(
            request_id=str(i), text=sentences[i % len(sentences)], language="en"
        ),
        lambda _request, response: response.duration_s,
    )


def _vad_call(clips: list[bytes]) -> MakeCall:
    def make(channel: grpc.aio.Channel) -> Call:
        stub = vad_pb2_grpc.VoiceActivityDetectionStub(channel)

        async def call(i: int) -> float:
            audio = clips[i % len(clips)]

            async def requests() -> AsyncIterator[vad_pb2.StreamDetectRequest]:
                yield vad_pb2.StreamDetectRequest(
                    config=vad_pb2.StreamDetectConfig(request_id=str(i), format=PCM16_16K)
                )
                for start in range(0, len(audio), VAD_CHUNK_BYTES):
                    yield vad_pb2.StreamDetectRequest(audio=audio[start : start + VAD_CHUNK_BYTES])

            async for _ in stub.StreamDetect(requests(), timeout=60):
                pass
            return _audio_s(audio)

        return call

    return make


def _pair(
    stage: str, flags: list[str], off_flags: list[str]
) -> tuple[tuple[ServerProcess, int], tuple[ServerProcess, int]]:
    ports = (free_port(), free_port())
    on = start_server(stage, *flags, "--metrics-port", str(ports[0]))
    try:
        off = start_server(stage, *off_flags, "--metrics-port", str(ports[1]))
    except BaseException:
        on.terminate()
        raise
    return (on, ports[0]), (off, ports[1])


async def _run_stage(
    stage: str,
    flags: list[str],
    make_call: MakeCall,
    levels: tuple[int, ...],
    *,
    off_flags: list[str] | None = None,
    level_s: float = LEVEL_S,
    batcher: str = "",
) -> dict[int, tuple[Level, Level]]:
    """Measures ``levels`` on a server with ``flags`` and one with ``off_flags`` (default: batch size 1)."""
    off_flags = [*flags, "--max-batch-size", "1"] if off_flags is None else off_flags
    (on, on_port), (off, off_port) = await asyncio.to_thread(_pair, stage, flags, off_flags)
    try:
        results = {}
        for c in levels:
            batched = await _measure(on, on_port, batcher or stage, make_call, c, level_s)
            single = await _measure(off, off_port, batcher or stage, make_call, c, level_s)
            results[c] = (batched, single)
        return results
    finally:
        on.terminate()
        off.terminate()


async def _llm_stage() -> None:
    """The embedded llm translation server, batched against ``--max-batch-size 1``."""
    llm = ["--backend", "llm", "--llm-languages", "en,fr", "--max-queue-delay-ms", str(QUEUE_DELAY_MS)]
    results = await _run_stage(
        "translate", llm, _translate_call(_sentences(200)), LLM_LEVELS, level_s=SLOW_LEVEL_S
    )
    _report(
        "translate, llm embedded (Gemma 3 270M Q4_K_M, llama.cpp, 1 instance), 1 sentence per request, "
        f"max_queue_delay_ms={QUEUE_DELAY_MS}, {SLOW_LEVEL_S:.0f} s per level",
        "req/s",
        LLM_LEVELS,
        results,
    )
    on16, off16 = results[16]
    print(f"goal llm c=16 >= 3x bs=1 throughput: reached {on16.throughput / off16.throughput:.2f}x")
    sequential_s, batched_s = _llm_engine_ceiling(_sentences(32), 16)
    print(
        f"ceiling, the llm engine alone (no server), 32 sentences: one at a time {sequential_s:.2f} s, "
        f"16 decoded together {batched_s:.2f} s = {sequential_s / batched_s:.2f}x"
    )


def _llm_engine_ceiling(sentences: list[str], batch_size: int) -> tuple[float, float]:
    """Seconds to translate ``sentences`` in-process one at a time, then ``batch_size`` at a time.

    What batching can gain on this machine at best: every batch full, no queueing, no RPC.
    """
    backend = EmbeddedLlamaBackend.from_config(
        TranslateConfig(backend=Backend.LLM, llm_languages=("en", "fr"), max_batch_size=batch_size)
    )
    try:
        pair = backend.resolve("en", "fr")
        timings = []
        for size in (1, batch_size):
            started = time.perf_counter()
            for k in range(0, len(sentences), size):
                backend.translate_sentences(sentences[k : k + size], pair, Deadline(None))
            timings.append(time.perf_counter() - started)
        sequential_s, batched_s = timings
        return sequential_s, batched_s
    finally:
        backend.close()


async def _main() -> None:
    with tempfile.TemporaryDirectory(prefix="parley-bench-") as tmp:
        model = build_tiny_model(Path(tmp) / "tiny-nllb", SHARED_DATA / "text", "nllb")
        flags = [
            "--backend",
            "ctranslate2",
            "--model-path",
            str(model),
            "--max-decoding-length",
            str(CT2_DECODE_TOKENS),
            "--max-queue-delay-ms",
            str(QUEUE_DELAY_MS),
        ]
        results = await _run_stage("translate", flags, _translate_call(_sentences(200)), LEVELS)
    _report(
        f"translate, ctranslate2 tiny NLLB (random weights, {CT2_DECODE_TOKENS} tokens per sentence), "
        f"1 sentence per request, max_queue_delay_ms={QUEUE_DELAY_MS}, {LEVEL_S:.0f} s per level",
        "req/s",
        LEVELS,
        results,
    )
    on16, off16 = results[16]
    on1, off1 = results[1]
    print(
        f"goal translate c=16 >= 3x bs=1 throughput: reached {on16.throughput / off16.throughput:.2f}x; "
        f"goal c=1 p99 <= bs=1 p99 + {QUEUE_DELAY_MS:.0f} ms: reached "
        f"{on1.percentile_ms(99) - off1.percentile_ms(99):+.1f} ms"
    )

    await _llm_stage()

    clips = [read_wav(row["path"])[0] for row in read_manifest("ljspeech")[:8]]
    results = await _run_stage("stt", [], _stt_call(clips), LEVELS, level_s=SLOW_LEVEL_S)
    _report(
        "stt, Whisper base int8 CPU, adaptive windows, 1 Transcribe of an LJ Speech clip per request, "
        f"{SLOW_LEVEL_S:.0f} s per level",
        "audio s/s",
        LEVELS,
        results,
    )

    results = await _run_stage(
        "tts",
        ["--piper-workers", "2", "--cache-mb", "0"],
        _tts_call(_sentences(200)),
        LEVELS,
        off_flags=["--piper-workers", "1", "--cache-mb", "0"],
        level_s=SLOW_LEVEL_S,
        batcher="tts-en_US-joe-medium",
    )
    _report(
        "tts, Piper en_US, 1 Synthesize of a sentence per request: 2 instances vs 1, "
        f"{SLOW_LEVEL_S:.0f} s per level",
        "audio s/s",
        LEVELS,
        results,
    )

    results = await _run_stage("vad", ["--max-queue-delay-ms", "0"], _vad_call(clips), LEVELS)
    _report(
        "vad, Silero v6, 1 StreamDetect stream per request (LJ Speech, 100 ms messages), "
        f"{LEVEL_S:.0f} s per level",
        "audio s/s",
        LEVELS,
        results,
    )


def main() -> None:
    """Runs every stage and prints the measured figures."""
    asyncio.run(_main())


if __name__ == "__main__":
    main()
