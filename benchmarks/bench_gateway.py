"""Gateway latency: end of speech to the first translated audio byte, at 1, 2, 4 and 8 concurrent streams.

Starts the five servers as local processes (CPU), then streams the FLEURS recordings (en -> fr and
fr -> en, the gateway's default mode for each pair) at real time, each recording with 0.5 s of silence
before and 1.5 s after. At concurrency c the recordings are dealt over c streams that run at once.

Two end-of-speech clocks are reported:
- client: when the last audio of the utterance (its end_ms) was sent, to the first audio byte received;
  this includes the VAD's endpointing delay (the silence it waits for) and the network.
- gateway: the gateway's own UtteranceTimings, from the VAD's SpeechEnded event.
Per-stage figures are the gateway's timings (medians). Target: client p95 under 1.2 s for one stream.

Environment: PARLEY_BENCH_LIMIT=N uses only the first N recordings (quick runs).
"""

from __future__ import annotations

import asyncio
import csv
import os
import statistics
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

from parley.audio.v1 import audio_pb2
from parley.gateway.v1 import gateway_pb2
from services.clients.cluster import STAGES, LocalCluster
from services.clients.gateway_client import GatewayClient, paced, split_pcm
from services.harness import free_port

FLEURS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "speech" / "fleurs"
TARGET_P95_S = 1.2
CONCURRENCY = (1, 2, 4, 8)
PAIRS = {"en": "fr", "fr": "en"}


def _recordings() -> list[tuple[str, bytes]]:
    with (FLEURS / "manifest.tsv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    limit = int(os.environ.get("PARLEY_BENCH_LIMIT", "0")) or len(rows)
    out = []
    for row in rows[:limit]:
        with wave.open(str(FLEURS / row["file"]), "rb") as w:
            out.append((row["language"], w.readframes(w.getnframes())))
    return out


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def _stream(address: str, language: str, pcm: bytes, samples: list[dict]) -> None:
    before = np.zeros(8000, "<i2").tobytes()
    after = np.zeros(24000, "<i2").tobytes()
    config = gateway_pb2.TranslateSpeechConfig(
        request_id=f"bench-{language}",
        source_language=language,
        target_language=PAIRS[language],
        input_format=audio_pb2.AudioFormat(encoding=audio_pb2.PCM_S16LE, sample_rate_hz=16000, channels=1),
        synthesize_speech=True,
    )
    end_ms: dict[int, int] = {}
    first_audio: dict[int, float] = {}
    timings: dict[int, gateway_pb2.UtteranceTimings] = {}
    async with GatewayClient(address) as client:
        started = time.monotonic()
        async for event in client.translate_speech(config, paced(split_pcm(before + pcm + after, 20))):
            kind = event.WhichOneof("event")
            i = event.utterance_index
            if kind == "transcript" and event.transcript.is_final:
                end_ms[i] = event.transcript.end_ms
            elif kind == "audio" and i not in first_audio:
                first_audio[i] = time.monotonic()
            elif kind == "timings":
                timings[i] = event.timings
    for i, t in timings.items():
        if i in first_audio and i in end_ms:
            samples.append(
                {
                    "client_s": first_audio[i] - (started + end_ms[i] / 1000),
                    "gateway_s": t.end_of_speech_to_first_audio_ms / 1000,
                    "stt_ms": t.stt_ms,
                    "translation_ms": t.translation_ms,
                    "tts_first_audio_ms": t.tts_first_audio_ms,
                    "transcript_ms": t.end_of_speech_to_transcript_ms,
                }
            )


async def _level(address: str, recordings: list[tuple[str, bytes]], concurrency: int) -> list[dict]:
    samples: list[dict] = []
    lanes = [recordings[i::concurrency] for i in range(concurrency)]

    async def lane(items):
        for language, pcm in items:
            await _stream(address, language, pcm, samples)

    await asyncio.gather(*(lane(items) for items in lanes if items))
    return samples


def main() -> None:
    if not FLEURS.exists():
        print(f"skipped: {FLEURS} is missing")
        return
    recordings = _recordings()
    ports = {stage: free_port() for stage in STAGES}
    log_path = Path(tempfile.mkdtemp(prefix="parley-bench-")) / "cluster.log"
    with log_path.open("w") as log:
        cluster = LocalCluster(ports=ports, log=log)
        try:
            cluster.up(300)
            address = cluster.address("gateway")
            asyncio.run(_level(address, recordings[:1], 1))  # warm-up, not counted
            print(
                f"{len(recordings)} FLEURS recordings ({sum(len(p) for _, p in recordings) / 32000:.0f} s) "
                f"streamed at real time; cluster log: {log_path}"
            )
            print(
                f"{'streams':>7} {'n':>3} {'client p50':>10} {'client p95':>10} {'gw p50':>7} {'gw p95':>7} "
                f"{'eos->text':>9} {'stt':>6} {'mt':>6} {'tts 1st':>7}  (s for p50/p95, ms for stages)"
            )
            for concurrency in CONCURRENCY:
                samples = asyncio.run(_level(address, recordings, concurrency))
                client = [s["client_s"] for s in samples]
                gateway = [s["gateway_s"] for s in samples]

                def med(key: str, samples=samples) -> float:
                    return statistics.median(s[key] for s in samples) if samples else float("nan")

                print(
                    f"{concurrency:>7} {len(samples):>3} {_pct(client, 50):>10.2f} {_pct(client, 95):>10.2f} "
                    f"{_pct(gateway, 50):>7.2f} {_pct(gateway, 95):>7.2f} {med('transcript_ms'):>9.0f} "
                    f"{med('stt_ms'):>6.0f} {med('translation_ms'):>6.0f} {med('tts_first_audio_ms'):>7.0f}"
                )
                if concurrency == 1 and client:
                    p95 = _pct(client, 95)
                    verdict = "meets" if p95 <= TARGET_P95_S else f"misses by {p95 - TARGET_P95_S:.2f} s"
                    print(
                        f"        target: client p95 <= {TARGET_P95_S} s for one stream: {verdict} "
                        f"({p95 / TARGET_P95_S:.1f}x the target)"
                    )
        finally:
            cluster.stop()
