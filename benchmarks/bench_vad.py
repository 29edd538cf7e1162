"""VAD real-time factor: Detect on a 30 s clip in-process vs through the server, plus server memory.

Real-time factor (RTF) = processing time / audio duration; lower is faster (0.01 = 100x real time).
The clip is shared recordings (jfk, fleurs, ljspeech) concatenated and cut to 30 s.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

import grpc
import numpy as np

from parley.audio.v1 import audio_pb2
from parley.vad.v1 import vad_pb2, vad_pb2_grpc
from services.common.audio import SAMPLE_RATE_HZ
from services.common.models import silero_vad_path
from services.harness import read_manifest, read_wav, start_server
from services.vad.engine import SileroVad, VadParams

CLIP_S = 30.0
REPEATS = 7
CONCURRENT = 4
FORMAT = audio_pb2.AudioFormat(encoding=audio_pb2.PCM_S16LE, sample_rate_hz=SAMPLE_RATE_HZ, channels=1)


def clip_pcm() -> bytes:
    """30 s of PCM_S16LE 16 kHz mono speech from the shared recordings."""
    paths = [row["path"] for folder in ("jfk", "fleurs", "ljspeech") for row in read_manifest(folder)]
    pcm = b""
    for path in paths:
        data, rate = read_wav(path)
        assert rate == SAMPLE_RATE_HZ, path
        pcm += data
        if len(pcm) >= 2 * SAMPLE_RATE_HZ * CLIP_S:
            break
    return pcm[: int(2 * SAMPLE_RATE_HZ * CLIP_S)]


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def timed(fn, repeats: int = REPEATS) -> tuple[float, object]:
    """Median wall time of ``fn()`` over ``repeats`` calls (after one warm-up), and its last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    pcm = clip_pcm()
    audio = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768
    duration_s = len(audio) / SAMPLE_RATE_HZ
    print(f"clip: {duration_s:.1f} s of speech, median of {REPEATS} runs after one warm-up")

    vad = SileroVad(silero_vad_path(), intra_op_threads=1)
    in_process_s, segments = timed(lambda: vad.detect(audio, VadParams()))
    probs_s, _ = timed(lambda: vad.probabilities(audio))

    server = start_server("vad")
    try:
        idle = rss_kib(server.process.pid)
        request = vad_pb2.DetectRequest(audio=pcm, format=FORMAT)
        with grpc.insecure_channel(server.address) as channel:
            stub = vad_pb2_grpc.VoiceActivityDetectionStub(channel)
            server_s, response = timed(lambda: stub.Detect(request, timeout=60))

        async def stream_20ms() -> int:
            async def requests():
                yield vad_pb2.StreamDetectRequest(config=vad_pb2.StreamDetectConfig(format=FORMAT))
                for start in range(0, len(pcm), 640):
                    yield vad_pb2.StreamDetectRequest(audio=pcm[start : start + 640])

            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = vad_pb2_grpc.VoiceActivityDetectionStub(channel)
                events = [r async for r in stub.StreamDetect(requests(), timeout=120)]
            return sum(r.WhichOneof("event") == "speech_ended" for r in events)

        stream_s, stream_segments = timed(lambda: asyncio.run(stream_20ms()), repeats=3)

        async def concurrent_detect() -> None:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = vad_pb2_grpc.VoiceActivityDetectionStub(channel)
                await asyncio.gather(*(stub.Detect(request, timeout=60) for _ in range(CONCURRENT)))

        concurrent_s, _ = timed(lambda: asyncio.run(concurrent_detect()), repeats=3)
        busy = rss_kib(server.process.pid)
    finally:
        server.terminate()

    print(f"{'':34} {'wall s':>8} {'RTF':>8} {'x real time':>12} {'segments':>9}")
    rows = [
        ("model only (probabilities)", probs_s, len(segments)),
        ("Detect in-process", in_process_s, len(segments)),
        ("Detect through the server", server_s, len(response.segments)),
        ("StreamDetect, 20 ms chunks", stream_s, stream_segments),
    ]
    for name, wall_s, n_segments in rows:
        print(
            f"{name:34} {wall_s:8.3f} {wall_s / duration_s:8.4f} {duration_s / wall_s:12.0f} {n_segments:9d}"
        )
    aggregate = CONCURRENT * duration_s / concurrent_s
    print(f"{f'Detect x{CONCURRENT} concurrent (server)':34} {concurrent_s:8.3f} {'':8} {aggregate:12.0f}")
    print(f"server overhead on Detect: {1000 * (server_s - in_process_s):.1f} ms per 30 s call")
    idle_mib, busy_mib, peak_mib = idle["VmRSS"] / 1024, busy["VmRSS"] / 1024, busy["VmHWM"] / 1024
    print(
        f"server RSS: {idle_mib:.1f} MiB idle after load, {busy_mib:.1f} MiB after the runs, "
        f"peak {peak_mib:.1f} MiB"
    )


if __name__ == "__main__":
    main()
