"""Speech-to-text: server overhead, real-time factor and memory; then adaptive windows and batching.

Part 1. Utterances of 5 s and 30 s are built from LJ Speech recordings in ../shared/data (whole clips joined
with 0.3 s of silence, then padded with silence to the exact length). Each is decoded ``REPEATS`` times by a
real server process (``python -m services.stt``, Whisper base, int8, CPU) and by the same
:class:`~services.stt.engine.WhisperEngine` in this process (same model, windows, threads, beam, language,
VAD filter), taking turns so both see the same machine load. Medians are printed; the goal is server
overhead <= 5% + 3 ms. The 5 s utterance is decoded with beam 1 and beam 5 (the beam-size default is chosen
from it). Resident memory is the server's VmRSS and VmHWM from /proc after the runs (goal: under 1 GB).

Part 2 (issue 5's goal). The shared English set (LJ Speech, LibriSpeech, LibriVox, JFK: 42 utterances)
sent with ``CONCURRENCY`` requests in flight to three servers in turn: fixed 30 s windows with batches of
one (Whisper's own padding, the baseline), adaptive windows with batches of one, adaptive windows with
batching. Throughput is audio seconds transcribed per second of wall time; each server gets one untimed
pass first. Goal: adaptive + batching >= 1.8x the baseline's throughput, word error rate within 1 point.
"""

from __future__ import annotations

import csv
import os
import statistics
import time
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np

from benchmarks.metrics import wer
from parley.audio.v1 import audio_pb2
from parley.stt.v1 import stt_pb2, stt_pb2_grpc
from services.common.audio import SAMPLE_RATE_HZ, float_to_pcm16
from services.harness import ENGLISH_SETS, read_manifest, read_wav, start_server
from services.stt.config import SttConfig
from services.stt.engine import WhisperEngine, merge_transcripts

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "speech" / "ljspeech"
PCM16 = audio_pb2.AudioFormat(encoding=audio_pb2.PCM_S16LE, sample_rate_hz=SAMPLE_RATE_HZ, channels=1)
GAP_S = 0.3
REPEATS = 5
LONG_REPEATS = 5
CONCURRENCY = 8
ADAPTIVE = ("--window-buckets-s", "10,15,20,30")
WINDOW_CONFIGS = (
    ("fixed 30 s windows, batch 1", ("--window-buckets-s", "30", "--max-batch-size", "1")),
    ("adaptive windows, batch 1", (*ADAPTIVE, "--max-batch-size", "1")),
    ("adaptive windows, batch <= 8", (*ADAPTIVE, "--max-batch-size", "8")),
)


def _read(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0


def build_utterance(target_s: float) -> tuple[np.ndarray, str]:
    """Whole LJ Speech clips that fit in ``target_s`` (0.3 s apart), padded with silence to ``target_s``."""
    with (DATA / "manifest.tsv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    parts: list[np.ndarray] = []
    texts: list[str] = []
    total = 0
    target = int(target_s * SAMPLE_RATE_HZ)
    gap = np.zeros(int(GAP_S * SAMPLE_RATE_HZ), dtype=np.float32)
    for row in sorted(rows, key=lambda r: -float(r["duration_s"])):
        clip = _read(DATA / row["file"])
        extra = len(clip) + (len(gap) if parts else 0)
        if total + extra <= target:
            parts += [gap, clip] if parts else [clip]
            texts.append(row["reference_text"])
            total += extra
    audio = np.concatenate([*parts, np.zeros(target - total, dtype=np.float32)])
    return audio, " ".join(texts)


def _vm(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) // 1024
    return fields


def _cpu_s(pid: int) -> float:
    """User + system CPU time of a process, in seconds (clock ticks from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _local_text(engine: WhisperEngine, audio: np.ndarray, beam: int) -> str:
    """What the server does for one request, in this process: windows decoded one by one, then merged."""
    options = engine.options(language="en", beam_size=beam)
    parts = [engine.transcribe_batch([w])[0] for w in engine.windows(audio, options)]
    return merge_transcripts(parts, len(audio) / SAMPLE_RATE_HZ, "en").text


def _throughput(address: str, pcms: list[bytes]) -> tuple[float, list[str]]:
    """Wall time of transcribing every clip with ``CONCURRENCY`` requests in flight, and the texts."""
    with grpc.insecure_channel(address) as channel, ThreadPoolExecutor(CONCURRENCY) as pool:
        stub = stt_pb2_grpc.SpeechToTextStub(channel)

        def one(pcm: bytes) -> str:
            request = stt_pb2.TranscribeRequest(
                audio=pcm, format=PCM16, config=stt_pb2.RecognitionConfig(language="en")
            )
            return stub.Transcribe(request, timeout=600).text

        list(pool.map(one, pcms))  # untimed pass
        start = time.perf_counter()
        texts = list(pool.map(one, pcms))
        return time.perf_counter() - start, texts


def windows_and_batching() -> None:
    """Part 2 of the module docstring."""
    rows = [row for name in ENGLISH_SETS for row in read_manifest(name)]
    pcms = [read_wav(r["path"])[0] for r in rows]
    refs = [r["reference_text"] for r in rows]
    audio_s = sum(len(p) for p in pcms) / 2 / SAMPLE_RATE_HZ
    print(
        f"\nWindows and batching: {len(rows)} English utterances ({audio_s:.0f} s of audio), {CONCURRENCY} "
        "requests in flight, Whisper base int8 CPU, beam 5, language en"
    )
    print(f"{'server':<30} {'wall s':>7} {'audio s/s':>9} {'x base':>6} {'WER':>6} {'WER diff':>8}")
    baseline: tuple[float, float] | None = None
    for name, flags in WINDOW_CONFIGS:
        server = start_server("stt", *flags)
        try:
            wall_s, texts = _throughput(server.address, pcms)
        finally:
            server.terminate()
        rate, error = audio_s / wall_s, wer(refs, texts, "en")
        baseline = baseline or (rate, error)
        print(
            f"{name:<30} {wall_s:>7.1f} {rate:>9.1f} {rate / baseline[0]:>6.2f} {error:>6.1%} "
            f"{100 * (error - baseline[1]):>+7.1f}pt"
        )
    print("goal: adaptive windows + batching >= 1.8x fixed 30 s windows at batch 1, WER within 1 point")


def main() -> None:
    if not DATA.exists():
        print(f"{DATA} is missing: nothing measured")
        return
    threads = max(1, len(os.sched_getaffinity(0)))
    engine = WhisperEngine(SttConfig(model="base", cpu_threads=threads))
    engine.warm()
    server = start_server("stt", "--model", "base", "--cpu-threads", str(threads))
    print(
        f"Whisper base, int8, CPU, {threads} thread(s), language en, VAD filter on; medians of {REPEATS} runs"
    )
    print(
        f"(goal: server latency <= in-process x 1.05 + 3 ms; {os.cpu_count()} CPUs, shared with other work)"
    )
    print(
        "wall: latency of one call; cpu: CPU time the call cost its process (less sensitive to others' load)"
    )
    print(
        f"{'audio':>6} {'beam':>4} {'wall local':>10} {'wall server':>11} {'overhead':>17} "
        f"{'cpu local':>9} {'cpu server':>10} {'overhead':>7} {'RTF local':>9} {'RTF server':>10} {'WER':>6}"
    )
    channel = grpc.insecure_channel(server.address)
    stub = stt_pb2_grpc.SpeechToTextStub(channel)
    try:
        for target_s, beams, repeats in ((5.0, (1, 5), REPEATS), (30.0, (5,), LONG_REPEATS)):
            audio, reference = build_utterance(target_s)
            request = stt_pb2.TranscribeRequest(
                audio=float_to_pcm16(audio),
                format=PCM16,
            )
            for beam in beams:
                request.config.CopyFrom(stt_pb2.RecognitionConfig(language="en", beam_size=beam))
                local_s, served_s, local_cpu, served_cpu, text = [], [], [], [], ""
                stub.Transcribe(request, timeout=120)  # one untimed call each: first-call effects
                _local_text(engine, audio, beam)
                for i in range(repeats):
                    # Alternate which side goes first, so neither always runs right after the other.
                    for side in ("local", "server") if i % 2 == 0 else ("server", "local"):
                        if side == "local":
                            start, cpu = time.perf_counter(), time.process_time()
                            _local_text(engine, audio, beam)
                            local_s.append(time.perf_counter() - start)
                            local_cpu.append(time.process_time() - cpu)
                        else:
                            start, cpu = time.perf_counter(), _cpu_s(server.process.pid)
                            text = stub.Transcribe(request, timeout=120).text
                            served_s.append(time.perf_counter() - start)
                            served_cpu.append(_cpu_s(server.process.pid) - cpu)
                local, served = statistics.median(local_s), statistics.median(served_s)
                lcpu, scpu = statistics.median(local_cpu), statistics.median(served_cpu)
                error = wer([reference], [text], "en")
                print(
                    f"{target_s:>5.0f}s {beam:>4} {local * 1000:>8.0f}ms {served * 1000:>9.0f}ms "
                    f"{(served - local) * 1000:>+8.0f}ms {100 * (served / local - 1):>+6.1f}% "
                    f"{lcpu:>8.2f}s {scpu:>9.2f}s {100 * (scpu / lcpu - 1):>+6.1f}% "
                    f"{local / target_s:>9.3f} {served / target_s:>10.3f} {error:>6.1%}"
                )
        for target_s in (5.0, 30.0):
            audio, _ = build_utterance(target_s)
            request = stt_pb2.TranscribeRequest(
                audio=float_to_pcm16(audio),
                format=PCM16,
                config=stt_pb2.RecognitionConfig(language="xx"),
            )
            trips = []
            for _ in range(20):
                start = time.perf_counter()
                try:
                    stub.Transcribe(request, timeout=30)
                except grpc.RpcError:
                    pass
                trips.append(time.perf_counter() - start)
            print(
                f"gRPC round trip of the {target_s:.0f} s payload, rejected before decoding (fixed cost of "
                f"serving): median {statistics.median(trips) * 1000:.1f} ms over {len(trips)}"
            )
        vm = _vm(server.process.pid)
        print(f"server memory: VmRSS {vm['VmRSS']} MiB, peak VmHWM {vm['VmHWM']} MiB (goal: under 1024 MiB)")
    finally:
        channel.close()
        server.terminate()
    windows_and_batching()


if __name__ == "__main__":
    main()
