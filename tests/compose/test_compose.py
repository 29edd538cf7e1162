"""deploy/docker-compose.yml for real: the cpu cluster in containers, streamed to, broken and healed.

Every stream counts utterances in (``speech_started``) and results or errors out: an utterance that got
neither is lost silently, and no test allows one. The tests share one cluster and run in file order: the
stop-and-drain test runs last.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest

from benchmarks.metrics import wer
from parley.audio.v1 import audio_pb2
from parley.gateway.v1 import gateway_pb2
from services.clients.gateway_client import Collector, GatewayClient, split_pcm
from services.harness import read_wav
from tests.compose.conftest import METRICS_PORTS, STAGE_SERVICES, Cluster, record_figure
from tests.helpers import read_manifest

pytestmark = [pytest.mark.docker, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(900)]

RATE = 16000
SILENCE_S = 1.2
FILES = [
    "fleurs-fr-000.wav",
    "fleurs-fr-002.wav",
    "fleurs-fr-004.wav",
    "fleurs-fr-001.wav",
    "fleurs-fr-003.wav",
]


def fleurs_pcm(file: str) -> bytes:
    rows = {row["file"]: row for row in read_manifest("fleurs")}
    pcm, rate = read_wav(rows[file]["path"])
    assert rate == RATE
    return pcm


def silence(seconds: float = SILENCE_S) -> bytes:
    return np.zeros(int(seconds * RATE), "<i2").tobytes()


def config(request_id: str) -> gateway_pb2.TranslateSpeechConfig:
    return gateway_pb2.TranslateSpeechConfig(
        source_language="fr",
        target_language="en",
        mode=gateway_pb2.CASCADE,  # through the translate stage, not Whisper's own translation
        input_format=audio_pb2.AudioFormat(encoding=audio_pb2.PCM_S16LE, sample_rate_hz=RATE, channels=1),
        synthesize_speech=True,
        request_id=request_id,
    )


def metric(address: str, name: str, labels: str = "") -> float:
    """Sum of the samples of ``name`` whose label set contains ``labels``, from http://ADDRESS/metrics."""
    body = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    total = 0.0
    for match in re.finditer(rf"^{name}(?:{{([^}}]*)}})? (\S+)$", body, re.M):
        if labels in (match.group(1) or ""):
            total += float(match.group(2))
    return total


def metrics_address(cluster: Cluster, container) -> str:
    stage = next(
        s for s, svc in STAGE_SERVICES.items() if container.labels["com.docker.compose.service"] == svc
    )
    return f"{cluster.ip(container)}:{METRICS_PORTS[stage]}"


class LiveStream:
    """One TranslateSpeech stream fed from a queue, so a test can act between utterances."""

    def __init__(self, address: str, request_id: str):
        self.address = address
        self.cfg = config(request_id)
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.collector = Collector()
        self.changed = asyncio.Event()
        self.status: grpc.StatusCode | None = None
        self.task: asyncio.Task | None = None

    async def _audio(self) -> AsyncIterator[bytes]:
        while (chunk := await self.queue.get()) is not None:
            yield chunk

    async def _consume(self) -> None:
        try:
            async with GatewayClient(self.address) as client:
                async for event in client.translate_speech(self.cfg, self._audio(), timeout_s=800):
                    self.collector.add(event)
                    self.changed.set()
        except grpc.aio.AioRpcError as err:
            self.status = err.code()
        self.changed.set()

    def start(self) -> LiveStream:
        self.task = asyncio.create_task(self._consume())
        return self

    def send(self, pcm: bytes) -> None:
        for chunk in split_pcm(silence() + pcm + silence(), 200):
            self.queue.put_nowait(chunk)

    async def wait_for(self, predicate, timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

    def finished(self, n: int) -> bool:
        """At least n utterances ended: their timings (full result) or an error arrived."""
        done = [u for u in self.collector.utterances.values() if "timings" in u.received_s or u.errors]
        return len(done) >= n

    async def close(self, timeout_s: float = 120) -> None:
        self.queue.put_nowait(None)
        assert self.task is not None
        await asyncio.wait_for(self.task, timeout_s)

    def lost(self) -> list[int]:
        """Utterances announced (speech_started) that got neither a final result nor an error."""
        started = {i for i, kind in self.collector.events if kind == "speech_started"}
        results = self.collector.utterances
        return [i for i in started if not results[i].errors and "timings" not in results[i].received_s]


def crash(container) -> None:
    """SIGKILL of the container's process from the host: a crash, which the restart policy answers."""
    container.reload()
    os.kill(container.attrs["State"]["Pid"], signal.SIGKILL)


def assert_complete(u) -> None:
    assert u.transcript and u.translation and u.audio and not u.errors, u.to_json()


async def test_every_stage_goes_healthy(cluster):
    for stage in STAGE_SERVICES:
        assert cluster.health(cluster.container(stage)) == "healthy", stage
    record_figure("cold_start_to_all_healthy_s", cluster.figures["cold_start_s"])
    image = cluster.client.images.get(cluster.container("gateway").image.id)
    record_figure("image_size_mb", image.attrs["Size"] / 1e6)


async def test_a_real_recording_through_the_published_gateway_port(cluster):
    files = FILES[:2]
    pcm = silence() + b"".join(fleurs_pcm(f) + silence() for f in files)
    collector = Collector()
    async with GatewayClient(cluster.gateway_address) as client:
        async for event in client.translate_speech(
            config("compose-stream"), split_pcm(pcm, 200), timeout_s=300
        ):
            collector.add(event)
    assert collector.end is not None and collector.end.utterances == len(collector.utterances) >= len(files)
    for u in collector.utterances.values():
        assert_complete(u)
        assert u.audio_rate_hz > 0
    rows = {row["file"]: row for row in read_manifest("fleurs")}
    reference = " ".join(rows[f]["reference_text"] for f in files)
    transcript = " ".join(u.transcript for u in collector.utterances.values())
    assert wer([reference], [transcript], "fr") <= 0.45, transcript


async def test_one_call_is_one_trace_across_the_five_containers(cluster):
    await asyncio.sleep(2)  # spans of the previous streams are exported every 200 ms: let them land
    before = len(cluster.receiver.spans)
    stream = LiveStream(cluster.gateway_address, "compose-trace").start()
    stream.send(fleurs_pcm(FILES[2]))
    await stream.close(180)
    assert not stream.lost() and all(u.audio for u in stream.collector.utterances.values())
    wanted = {"parley-gateway", "parley-vad", "parley-stt", "parley-translate", "parley-tts"}
    by_trace: dict[str, set[str]] = {}
    for _ in range(100):
        spans = cluster.receiver.spans[before:]
        roots = {t for s, t, name in spans if s == "parley-gateway" and name.endswith("TranslateSpeech")}
        by_trace = {t: {s for s, t2, _ in spans if t2 == t} for t in roots}
        if len(by_trace) == 1 and wanted <= next(iter(by_trace.values())):
            break
        await asyncio.sleep(0.2)
    assert len(by_trace) == 1 and wanted <= next(iter(by_trace.values())), by_trace


async def test_prometheus_from_debian_scrapes_every_stage(cluster):
    cluster.compose("--profile", "observability", "up", "-d", "--build", "prometheus", timeout_s=900)
    (prometheus,) = cluster.containers("prometheus")
    api = f"http://{cluster.ip(prometheus)}:9090/api/v1"

    def query(expr: str) -> float:
        body = urllib.request.urlopen(f"{api}/query?query={urllib.parse.quote(expr)}", timeout=5).read()
        result = json.loads(body)["data"]["result"]
        return sum(float(r["value"][1]) for r in result)

    def up_stages() -> set[str]:
        try:
            body = json.loads(urllib.request.urlopen(f"{api}/targets", timeout=5).read())
        except OSError:  # not listening yet
            return set()
        return {t["labels"].get("stage", "") for t in body["data"]["activeTargets"] if t["health"] == "up"}

    for _ in range(90):  # deploy/prometheus.yml scrapes every 15 s
        if (up := up_stages()) >= set(STAGE_SERVICES):
            break
        await asyncio.sleep(1)
    assert up >= set(STAGE_SERVICES), up
    first = query("sum(parley_grpc_requests_total)")
    stream = LiveStream(cluster.gateway_address, "compose-prometheus").start()
    stream.send(fleurs_pcm(FILES[0]))
    await stream.close(180)
    for _ in range(60):
        if (now := query("sum(parley_grpc_requests_total)")) > first:
            break
        await asyncio.sleep(1)
    assert now > first


async def test_stt_crash_mid_stream_errors_fast_then_restarts_and_recovers(cluster):
    """SIGKILL of the stt process (a crash, as the OOM killer does): `docker kill` would count as a manual
    stop, which restart policies honour, so the process is killed from the host instead."""
    if os.geteuid() != 0:
        pytest.skip("killing the container's process from the host needs root")
    stt = cluster.container("stt")
    gateway_metrics = metrics_address(cluster, cluster.container("gateway"))
    stream = LiveStream(cluster.gateway_address, "compose-stt-crash").start()
    stream.send(fleurs_pcm(FILES[0]))
    await stream.wait_for(lambda: stream.finished(1), 180)
    assert_complete(stream.collector.utterances[0])

    stt.reload()
    restarts = stt.attrs["RestartCount"]
    stream.send(fleurs_pcm(FILES[1]))
    await stream.wait_for(lambda: 1 in stream.collector.utterances, 60)  # speech_started: STT comes next
    crash(stt)
    killed = time.monotonic()
    await stream.wait_for(lambda: stream.finished(2), 60)
    hit = stream.collector.utterances[1]
    if hit.errors:  # STT was hit (else it had already answered before the kill)
        assert (
            hit.errors[0]["stage"] == "stt" and hit.errors[0]["code"] == grpc.StatusCode.UNAVAILABLE.value[0]
        )
        error_s = hit.received_s["error"] - killed
        assert error_s < 1.0, error_s
        record_figure("stt_kill_to_error_event_s", error_s)

    for _ in range(60):
        stt.reload()
        if stt.attrs["RestartCount"] > restarts:
            break
        await asyncio.sleep(0.5)
    assert stt.attrs["RestartCount"] > restarts, "the restart policy did not restart stt"
    healthy_s = await asyncio.to_thread(cluster.wait_healthy, [stt], 300)
    record_figure("stt_kill_to_healthy_s", time.monotonic() - killed)
    assert healthy_s >= 0

    stream.send(fleurs_pcm(FILES[2]))
    await stream.wait_for(lambda: stream.finished(3), 180)
    last = stream.collector.utterances[max(stream.collector.utterances)]
    assert_complete(last)
    record_figure("stt_kill_to_next_full_result_s", last.received_s["timings"] - killed)
    assert metric(gateway_metrics, "parley_breaker_state", 'stage="stt"') == 0  # closed again
    await stream.close()
    assert not stream.lost(), stream.collector.events
    assert stream.collector.end is not None and stream.collector.end.utterances == 3


async def test_translate_partitioned_fails_by_the_deadline_then_recovers(cluster):
    timeout_s = 6.0  # PARLEY_TRANSLATE_TIMEOUT_S of the gateway in docker-compose.test.yml
    translate = cluster.container("translate")
    translate.reload()
    (network,) = translate.attrs["NetworkSettings"]["Networks"]
    aliases = ["translate", "translate-cpu"]
    net = cluster.client.networks.get(network)
    stream = LiveStream(cluster.gateway_address, "compose-partition").start()
    stream.send(fleurs_pcm(FILES[0]))
    await stream.wait_for(lambda: stream.finished(1), 180)
    assert_complete(stream.collector.utterances[0])

    net.disconnect(translate)
    partitioned = time.monotonic()
    try:
        stream.send(fleurs_pcm(FILES[1]))
        await stream.wait_for(lambda: stream.finished(2), 60)
    finally:
        net.connect(translate, aliases=aliases)
        reconnected = time.monotonic()
    hit = stream.collector.utterances[1]
    assert hit.transcript, "transcripts flow while translation is cut off"
    assert [e["stage"] for e in hit.errors] == ["translate"], hit.to_json()
    assert hit.errors[0]["code"] in (
        grpc.StatusCode.DEADLINE_EXCEEDED.value[0],
        grpc.StatusCode.UNAVAILABLE.value[0],
    )
    late_s = hit.received_s["error"] - hit.received_s["final_transcript"]
    assert late_s <= timeout_s + 1.0, late_s  # by the deadline, not later
    record_figure("translate_partition_error_after_transcript_s", late_s)
    del partitioned

    # Recovery: keepalive finds the dead connection, DNS gives the new address; retry until a full result.
    recovered = None
    for attempt in range(8):
        stream.send(fleurs_pcm(FILES[2 + attempt % 3]))
        await stream.wait_for(lambda n=3 + attempt: stream.finished(n), 120)
        last = stream.collector.utterances[max(stream.collector.utterances)]
        if last.translation and last.audio:
            recovered = last.received_s["timings"] - reconnected
            break
    assert recovered is not None, "translation never recovered after reconnecting"
    record_figure("translate_reconnect_to_full_result_s", recovered)
    await stream.close()
    assert not stream.lost(), stream.collector.events


async def test_two_replicas_share_the_calls_and_survive_one_crash(cluster):
    cluster.compose(
        "up",
        "-d",
        "--no-build",
        "--no-recreate",
        "--wait",
        "--scale",
        "stt-cpu=2",
        "--scale",
        "translate-cpu=2",
        timeout_s=660,
    )
    # The gateway resolves the stage names when it connects: restart it to pick up the new replicas.
    cluster.compose("restart", "gateway", timeout_s=120)
    cluster.wait_healthy([cluster.container("gateway")], 120)
    replicas = {svc: cluster.containers(svc) for svc in ("stt-cpu", "translate-cpu")}
    assert all(len(c) == 2 for c in replicas.values()), replicas

    def counts(svc: str, method: str) -> list[float]:
        return [
            metric(metrics_address(cluster, c), "parley_grpc_requests_total", f'method="{method}"')
            for c in replicas[svc]
        ]

    # A live stream holds one STT StreamingRecognize call (counted when it ends) and one Translate call
    # per clause: four streams, one recording each, spread the STT calls over the replicas.
    stt_method, tr_method = (
        "/parley.stt.v1.SpeechToText/StreamingRecognize",
        "/parley.translate.v1.Translation/Translate",
    )
    before = {"stt-cpu": counts("stt-cpu", stt_method), "translate-cpu": counts("translate-cpu", tr_method)}
    for i, f in enumerate(FILES[:4]):
        one = LiveStream(cluster.gateway_address, f"compose-replicas-{i}").start()
        one.send(fleurs_pcm(f))
        await one.wait_for(lambda one=one: one.finished(1), 180)
        await one.close()
        assert not one.lost(), one.collector.events
    spread = {
        svc: [a - b for a, b in zip(counts(svc, m), before[svc], strict=True)]
        for svc, m in (("stt-cpu", stt_method), ("translate-cpu", tr_method))
    }
    assert all(min(calls) >= 1 for calls in spread.values()), spread

    crash(replicas["stt-cpu"][0])
    stream = LiveStream(cluster.gateway_address, "compose-replicas").start()
    for f in FILES[:3]:
        n = len(stream.collector.utterances) + 1
        stream.send(fleurs_pcm(f))
        await stream.wait_for(lambda n=n: stream.finished(n), 180)
    after = list(stream.collector.utterances.values())[-2:]
    for u in after:
        assert_complete(u)  # the surviving replica answers
    await stream.close()
    assert not stream.lost(), stream.collector.events
    for svc, calls in spread.items():
        for replica, n in enumerate(calls, 1):
            record_figure(f"replica_calls_{svc}_{replica}", n)


async def test_compose_stop_drains_without_silent_loss(cluster):
    stream = LiveStream(cluster.gateway_address, "compose-stop").start()
    for f in FILES[:3]:
        stream.send(fleurs_pcm(f))
    await stream.wait_for(lambda: len(stream.collector.utterances) >= 1, 120)
    stopper = threading.Thread(target=cluster.compose, args=("stop",), kwargs={"timeout_s": 300})
    stopper.start()
    await stream.close(300)
    await asyncio.to_thread(stopper.join, 300)
    assert not stream.lost(), stream.collector.events
    announced = {i for i, kind in stream.collector.events if kind == "speech_started"}
    assert announced, "the stream was stopped before any utterance"
    # EndOfStream, or UNAVAILABLE once the gateway is gone: never a hang or a silent cut.
    assert stream.collector.end is not None or stream.status == grpc.StatusCode.UNAVAILABLE, stream.status
    results = stream.collector.utterances
    record_figure("stop_utterances_announced", len(announced))
    completed = sum(1 for i in announced if "timings" in results[i].received_s)
    record_figure("stop_utterances_completed", completed)
    record_figure("stop_utterances_errored", sum(1 for i in announced if results[i].errors))
