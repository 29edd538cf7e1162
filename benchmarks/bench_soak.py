"""Soak: N live streams at real time for M minutes against the local CPU cluster.

Starts the five servers as local processes, then runs ``PARLEY_SOAK_STREAMS`` (default 4) TranslateSpeech
streams at once, each one call lasting ``PARLEY_SOAK_MINUTES`` (default 10): real recordings from
``../shared/data`` sent back to back at real time in 100 ms chunks, with 1.5 s of silence between them
(even streams English -> French, odd ones French -> English). Prints:

- utterances in (``speech_started``) and out (a final transcript or an error event), error events by stage
  and code, and lost = in - out (the no-loss rule: must be 0);
- end of speech -> final transcript and -> first audio, p50/p95/max (the gateway's timings);
- each server's resident memory (VmRSS) after warm-up, half-way and at the end, and the growth per minute
  over the second half (caches and allocator pools fill in the first; a leak keeps growing).

The same figures go to ``docs/evaluation/soak.md`` (generated; ``make eval`` includes it in
docs/evaluation.md).
"""

from __future__ import annotations

import asyncio
import collections
import csv
import os
import platform
import tempfile
import time
import wave
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from parley.audio.v1 import audio_pb2
from parley.gateway.v1 import gateway_pb2
from services.clients.cluster import STAGES, LocalCluster
from services.clients.gateway_client import GatewayClient, paced, split_pcm
from services.common.audio import SAMPLE_RATE_HZ
from services.harness import free_port

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "speech"
SETS = {"en": ("fleurs", "ljspeech", "librispeech"), "fr": ("fleurs", "commands")}
PAIRS = {"en": "fr", "fr": "en"}
GAP_S = 1.5
REPORT = Path(__file__).resolve().parent.parent / "docs" / "evaluation" / "soak.md"


def _recordings(language: str) -> list[bytes]:
    out = []
    for name in SETS[language]:
        with (DATA / name / "manifest.tsv").open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        for row in rows:
            if row["language"] == language:
                with wave.open(str(DATA / name / row["file"]), "rb") as w:
                    out.append(w.readframes(w.getnframes()))
    return out


def _rss_mb(pid: int) -> float:
    """Resident set size of a process, in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _audio(language: str, duration_s: float) -> list[bytes]:
    """Recordings back to back, each followed by GAP_S of silence, until ``duration_s``; 100 ms chunks."""
    gap = np.zeros(int(GAP_S * SAMPLE_RATE_HZ), "<i2").tobytes()
    pcm = bytearray()
    recordings = _recordings(language)
    i = 0
    while len(pcm) < duration_s * 32000:
        pcm += recordings[i % len(recordings)] + gap
        i += 1
    return split_pcm(bytes(pcm[: int(duration_s * 32000)]), 100)


class Tally:
    """Counts over every stream."""

    def __init__(self) -> None:
        self.started = 0
        self.answered = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.to_transcript_s: list[float] = []
        self.to_audio_s: list[float] = []
        self.failed_calls: list[str] = []


async def _stream(address: str, lane: int, duration_s: float, tally: Tally) -> None:
    language = "en" if lane % 2 == 0 else "fr"
    config = gateway_pb2.TranslateSpeechConfig(
        request_id=f"soak-{lane}",
        source_language=language,
        target_language=PAIRS[language],
        input_format=audio_pb2.AudioFormat(
            encoding=audio_pb2.PCM_S16LE, sample_rate_hz=SAMPLE_RATE_HZ, channels=1
        ),
        synthesize_speech=True,
    )
    answered: set[int] = set()
    started: set[int] = set()
    try:
        async with GatewayClient(address) as client:
            async for event in client.translate_speech(
                config, paced(_audio(language, duration_s)), timeout_s=duration_s + 300
            ):
                kind = event.WhichOneof("event")
                i = event.utterance_index
                if kind == "speech_started":
                    started.add(i)
                elif (kind == "transcript" and event.transcript.is_final) or kind == "error":
                    answered.add(i)
                if kind == "error":
                    tally.errors[f"{event.error.stage}:{event.error.code}"] += 1
                elif kind == "timings":
                    t = event.timings
                    tally.to_transcript_s.append(t.end_of_speech_to_transcript_ms / 1000)
                    if t.end_of_speech_to_first_audio_ms:
                        tally.to_audio_s.append(t.end_of_speech_to_first_audio_ms / 1000)
    except Exception as exc:  # noqa: BLE001 - a failed call is a figure of the soak, reported below
        tally.failed_calls.append(f"stream {lane}: {type(exc).__name__}: {exc}")
    tally.started += len(started)
    tally.answered += len(started & answered)


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _report(
    tally: Tally,
    rss_start: dict[str, float],
    rss_mid: dict[str, float],
    rss_end: dict[str, float],
    minutes: float,
) -> list[str]:
    lost = tally.started - tally.answered
    lines = [
        f"utterances in {tally.started}, out {tally.answered}, lost {lost}; error events "
        f"{sum(tally.errors.values())} {dict(tally.errors) or ''}; failed calls {len(tally.failed_calls)}"
    ]
    lines += [f"  {failure}" for failure in tally.failed_calls]
    for name, values in (("transcript", tally.to_transcript_s), ("first audio", tally.to_audio_s)):
        lines.append(
            f"end of speech -> {name:<11}: p50 {_pct(values, 50):.2f} s, p95 {_pct(values, 95):.2f} s, "
            f"max {max(values, default=float('nan')):.2f} s (n={len(values)})"
        )
    lines.append(
        f"{'server':>9} {'RSS start':>9} {'half-way':>8} {'end':>6} {'growth':>7} "
        f"{'2nd half, per min':>17}  (MiB)"
    )
    for stage in STAGES:
        start, mid, end = rss_start[stage], rss_mid.get(stage, float("nan")), rss_end[stage]
        late = (end - mid) / (minutes / 2)
        lines.append(f"{stage:>9} {start:>9.0f} {mid:>8.0f} {end:>6.0f} {end - start:>+7.1f} {late:>+17.2f}")
    return lines


def main() -> None:
    if not DATA.exists():
        print(f"skipped: {DATA} is missing")
        return
    streams = int(os.environ.get("PARLEY_SOAK_STREAMS", "4"))
    minutes = float(os.environ.get("PARLEY_SOAK_MINUTES", "10"))
    ports = {stage: free_port() for stage in STAGES}
    log_path = Path(tempfile.mkdtemp(prefix="parley-soak-")) / "cluster.log"
    with log_path.open("w") as log:
        cluster = LocalCluster(ports=ports, log=log)
        try:
            cluster.up(300)
            address = cluster.address("gateway")
            asyncio.run(_stream(address, 0, 10.0, Tally()))  # warm-up, not counted
            pids = {stage: member.process.pid for stage, member in cluster.members.items()}
            rss_start = {stage: _rss_mb(pid) for stage, pid in pids.items()}
            print(f"{streams} streams at real time for {minutes:g} min; cluster log: {log_path}", flush=True)
            tally = Tally()
            began = time.monotonic()

            rss_mid: dict[str, float] = {}

            async def half_way() -> None:
                await asyncio.sleep(minutes * 30)
                rss_mid.update({stage: _rss_mb(pid) for stage, pid in pids.items()})

            async def run_all() -> None:
                await asyncio.gather(
                    half_way(), *(_stream(address, lane, minutes * 60, tally) for lane in range(streams))
                )

            asyncio.run(run_all())
            elapsed_min = (time.monotonic() - began) / 60
            rss_end = {stage: _rss_mb(pid) for stage, pid in pids.items()}
            lines = _report(tally, rss_start, rss_mid, rss_end, elapsed_min)
            print("\n".join(lines))
            load = os.getloadavg()[0]
            header = (
                f"Generated by `PARLEY_SOAK_STREAMS={streams} PARLEY_SOAK_MINUTES={minutes:g} python -m "
                f"benchmarks.run soak` (benchmarks/bench_soak.py) on {datetime.now(UTC):%Y-%m-%d %H:%M} "
                f"UTC; do not edit by hand. Machine: {platform.machine()}, {os.cpu_count()} CPU cores, load "
                f"average "
                f"{load:.1f} at the end. {streams} TranslateSpeech streams at real time, one call each for "
                f"{minutes:g} min (even: English -> French, odd: French -> English, synthesised speech on)."
            )
            REPORT.parent.mkdir(parents=True, exist_ok=True)
            REPORT.write_text(header + "\n\n```\n" + "\n".join(lines) + "\n```\n", encoding="utf-8")
        finally:
            cluster.stop()
